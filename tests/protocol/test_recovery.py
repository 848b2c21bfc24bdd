"""
The pure recovery rules of :mod:`securemig.protocol.recovery` for a live
migration carried through the hypervisor's own (libvirt): what a source
that has not journaled COMMITTED decides from where its hypervisor says the
guest is, and -- gone here before PREPARED -- from what the destination
says it holds (ASK).  (The rest of the module is explored exhaustively by
``tests/protocol/test_explorer.py``.)
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from securemig.protocol import wire
from securemig.protocol.phases import Phase
from securemig.protocol.recovery import (
    Decision,
    DestinationHolds,
    SourceGuest,
    SourceState,
    SourceStep,
    answer,
    asks_destination,
    carried_decision,
    holds,
    source_restart,
)


class CarriedDecisionTests(SynchronousTestCase):
    """``carried_decision``: never lose the only copy, never run two."""

    def test_table(self) -> None:
        """Each (guest, PREPARED seen, what the destination says it holds)
        gives the decision the doc's table says (doc/protocol.rst,
        "Carried sockets"): the destination's answer matters only for a
        guest gone here before PREPARED arrived."""
        expected = {
            (SourceGuest.RUNS, True): Decision.ABORTED,
            (SourceGuest.RUNS, False): Decision.ABORTED,
            (SourceGuest.MOVED, True): Decision.COMMITTED,
            (SourceGuest.MOVED, False): Decision.COMMITTED,
            (SourceGuest.GONE, True): Decision.COMMITTED,
            (SourceGuest.UNKNOWN, True): None,
            (SourceGuest.UNKNOWN, False): None,
        }
        for (guest, prepared), decision in expected.items():
            for there in DestinationHolds:
                case = (guest, prepared, there)
                self.assertIs(carried_decision(guest, prepared, there), decision, case)
        gone = {
            DestinationHolds.WHOLE: Decision.COMMITTED,
            DestinationHolds.NOTHING: Decision.ABORTED,
            DestinationHolds.UNKNOWN: None,
        }
        for there, decision in gone.items():
            self.assertIs(carried_decision(SourceGuest.GONE, False, there), decision, there)
        # Not asked: nothing decided (before the rule this aborted and lost it).
        self.assertIsNone(carried_decision(SourceGuest.GONE, False))

    def test_asks_only_when_gone_before_prepared(self) -> None:
        """The destination is asked only when nothing here decides: the
        guest gone here (not *migrated*) and PREPARED never seen."""
        for guest in SourceGuest:
            for prepared in (True, False):
                self.assertEqual(
                    asks_destination(guest, prepared),
                    guest is SourceGuest.GONE and not prepared,
                    (guest, prepared),
                )

    def test_one_copy_kept(self) -> None:
        """A model of both hosts.  The source holds a copy while its QEMU
        runs; the destination holds a whole paused one when it said
        PREPARED, when the hypervisor moved the guest, and -- PREPARED
        lost with the connection or never journaled here -- perhaps
        otherwise too (its hypervisor's Finish ran there).  What is seen
        may stand for several truths: UNKNOWN for any guest, an
        unanswered ASK for either holding, and a destination's WHOLE or
        NOTHING is the truth there.  For every case the decision keeps at
        least one copy of every truth it may stand for, and never two."""
        truths = {
            SourceGuest.RUNS: [SourceGuest.RUNS],
            SourceGuest.MOVED: [SourceGuest.MOVED],
            SourceGuest.GONE: [SourceGuest.GONE],
            SourceGuest.UNKNOWN: [SourceGuest.RUNS, SourceGuest.MOVED, SourceGuest.GONE],
        }
        answers = {
            DestinationHolds.WHOLE: [True],
            DestinationHolds.NOTHING: [False],
            DestinationHolds.UNKNOWN: [True, False],
        }
        for seen, possible in truths.items():
            for prepared in (True, False):
                for said, holdings in answers.items():
                    decision = carried_decision(seen, prepared, said)
                    for truth in possible:
                        for holds_there in holdings:
                            here = truth is SourceGuest.RUNS
                            moved = truth is SourceGuest.MOVED
                            if (prepared or moved) and not holds_there:
                                continue  # PREPARED/moved: it holds it whole
                            there = holds_there
                            if decision is Decision.ABORTED:
                                kept = [here]  # the destination's copy is discarded
                            elif decision is Decision.COMMITTED:
                                kept = [there]  # the source's copy is given up
                            else:
                                kept = [here, there]  # nothing discarded yet
                            case = (seen, prepared, said, truth, holds_there, decision)
                            if here or there:
                                self.assertTrue(any(kept), f"lost: {case}")
                            if decision is not None:
                                self.assertLessEqual(sum(kept), 1, f"twice: {case}")

    def test_holds_from_the_answer(self) -> None:
        """Each RESOLVED answer to ASK means one holding; an answer that is
        no statement about the guest (busy, refused) is "unknown": asked
        again, never taken for "nothing"."""
        expected = {
            wire.Settled.HELD: DestinationHolds.WHOLE,
            wire.Settled.DONE: DestinationHolds.WHOLE,
            wire.Settled.ABORTED: DestinationHolds.NOTHING,
            wire.Settled.UNKNOWN: DestinationHolds.NOTHING,
            wire.Settled.LOST: DestinationHolds.NOTHING,
            wire.Settled.FAILED: DestinationHolds.UNKNOWN,
            wire.Settled.REFUSED: DestinationHolds.UNKNOWN,
        }
        self.assertEqual(set(expected), set(wire.Settled))
        for settled, holding in expected.items():
            self.assertIs(holds(settled), holding, settled)

    def test_unknown_never_decides(self) -> None:
        """Whatever was seen before, an unanswered hypervisor decides
        nothing: aborting on an unknown discarded the only copy once."""
        for prepared in (True, False):
            self.assertIsNone(carried_decision(SourceGuest.UNKNOWN, prepared))


class SourceRestartTests(SynchronousTestCase):
    """``source_restart`` with ``carried``: the source's daemon."""

    def test_unknown_stays_open(self) -> None:
        """Nothing is done, journaled or told while the hypervisor cannot
        be asked; the record is asked about again."""
        for state in (SourceState.STREAMING, SourceState.PREPARED_RECEIVED):
            action = source_restart(state, carried=SourceGuest.UNKNOWN)
            self.assertEqual(action.steps, (), state)

    def test_gone_before_prepared_asks(self) -> None:
        """Gone here, PREPARED never seen: nothing journaled, the
        destination asked; its answer decides -- the whole guest there:
        commit and tell; nothing: abort and tell."""
        action = source_restart(SourceState.STREAMING, carried=SourceGuest.GONE)
        self.assertEqual(action.steps, (SourceStep.ASK_DESTINATION,))
        whole = source_restart(
            SourceState.STREAMING, carried=SourceGuest.GONE, there=DestinationHolds.WHOLE
        )
        self.assertEqual(whole.steps, (SourceStep.JOURNAL_COMMITTED, SourceStep.TELL_COMMITTED))
        nothing = source_restart(
            SourceState.STREAMING, carried=SourceGuest.GONE, there=DestinationHolds.NOTHING
        )
        self.assertIn(SourceStep.JOURNAL_ABORTED, nothing.steps)
        self.assertIn(SourceStep.TELL_ABORTED, nothing.steps)

    def test_gone_after_prepared_commits(self) -> None:
        """The lost-guest case: PREPARED arrived, the domain is shut off
        (reason unknown): commit and tell, the copy kept until DONE."""
        action = source_restart(SourceState.PREPARED_RECEIVED, carried=SourceGuest.GONE)
        self.assertEqual(action.steps, (SourceStep.JOURNAL_COMMITTED, SourceStep.TELL_COMMITTED))

    def test_runs_continues_before_aborting(self) -> None:
        """A domain that runs on is continued before ``aborted`` is
        journaled, then the destination told."""
        action = source_restart(SourceState.PREPARED_RECEIVED, carried=SourceGuest.RUNS)
        self.assertEqual(
            action.steps,
            (SourceStep.MAKE_RESUMABLE, SourceStep.JOURNAL_ABORTED, SourceStep.TELL_ABORTED),
        )

    def test_decided_records_keep_their_rule(self) -> None:
        """A record already committed or aborted is not decided again."""
        committed = source_restart(SourceState.COMMITTED, carried=SourceGuest.RUNS)
        self.assertIn(SourceStep.TELL_COMMITTED, committed.steps)
        aborted = source_restart(SourceState.ABORTED, carried=SourceGuest.GONE)
        self.assertNotIn(SourceStep.JOURNAL_COMMITTED, aborted.steps)


class InDoubtWithoutCommitTests(SynchronousTestCase):
    """A source record ``in-doubt`` without COMMITTED is undecided."""

    def test_state_and_answer(self) -> None:
        """Not ABORTED (as any other outcome without COMMITTED is): a
        destination asking gets "ask again", never "aborted"."""
        phases = {Phase.STARTED, Phase.LIVE, Phase.STREAMING, Phase.PREPARED}
        state = SourceState.from_journal(phases, "in-doubt")
        self.assertIs(state, SourceState.PREPARED_RECEIVED)
        self.assertIsNone(answer(state))
        self.assertIs(SourceState.from_journal(phases, "aborted"), SourceState.ABORTED)
        committed = SourceState.from_journal({*phases, Phase.COMMITTED}, "in-doubt")
        self.assertIs(committed, SourceState.COMMITTED)

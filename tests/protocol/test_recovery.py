"""
The pure recovery rules of :mod:`securemig.protocol.recovery` for a live
migration carried through the hypervisor's own (libvirt): what a source
that has not journaled COMMITTED decides from where its hypervisor says the
guest is.  (The rest of the module is explored exhaustively by
``tests/protocol/test_explorer.py``.)
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from securemig.protocol.phases import Phase
from securemig.protocol.recovery import (
    Decision,
    SourceGuest,
    SourceState,
    SourceStep,
    answer,
    carried_decision,
    source_restart,
)


class CarriedDecisionTests(SynchronousTestCase):
    """``carried_decision``: never lose the only copy, never run two."""

    def test_table(self) -> None:
        """Each (guest, PREPARED seen) gives the decision the doc's table
        says (doc/protocol.rst, "Carried sockets")."""
        expected = {
            (SourceGuest.RUNS, True): Decision.ABORTED,
            (SourceGuest.RUNS, False): Decision.ABORTED,
            (SourceGuest.MOVED, True): Decision.COMMITTED,
            (SourceGuest.MOVED, False): Decision.COMMITTED,
            (SourceGuest.GONE, True): Decision.COMMITTED,
            (SourceGuest.GONE, False): Decision.ABORTED,
            (SourceGuest.UNKNOWN, True): None,
            (SourceGuest.UNKNOWN, False): None,
        }
        for (guest, prepared), decision in expected.items():
            self.assertIs(carried_decision(guest, prepared), decision, (guest, prepared))

    def test_one_copy_kept(self) -> None:
        """A model of both hosts: the destination holds a whole paused copy
        when it said PREPARED (and when the hypervisor moved the guest);
        the source holds one while its QEMU runs; UNKNOWN is any of the
        three truths.  For every case the decision keeps at least one copy
        of every truth it may stand for, and never runs two."""
        truths = {
            SourceGuest.RUNS: [SourceGuest.RUNS],
            SourceGuest.MOVED: [SourceGuest.MOVED],
            SourceGuest.GONE: [SourceGuest.GONE],
            SourceGuest.UNKNOWN: [SourceGuest.RUNS, SourceGuest.MOVED, SourceGuest.GONE],
        }
        for seen, possible in truths.items():
            for prepared in (True, False):
                decision = carried_decision(seen, prepared)
                for truth in possible:
                    here = truth is SourceGuest.RUNS
                    there = prepared or truth is SourceGuest.MOVED
                    if decision is Decision.ABORTED:
                        kept = [here]  # the destination's copy is discarded
                    elif decision is Decision.COMMITTED:
                        kept = [there]  # the source's copy is given up
                    else:
                        kept = [here, there]  # nothing discarded yet
                    case = (seen, prepared, truth, decision)
                    if here or there:
                        self.assertTrue(any(kept), f"lost: {case}")
                    if decision is not None:
                        self.assertLessEqual(sum(kept), 1, f"twice: {case}")

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

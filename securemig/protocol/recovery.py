"""
Journal states and recovery rules of both sides, pure.

Each side of a migration journals durable steps (:mod:`securemig.host.journal`
writes them with ``synchronous=FULL``).  This module names those steps as
states and says, as pure functions of them, what a side does

- when it restarts with a migration unfinished (:func:`source_restart`,
  :func:`destination_restart`);
- when the coordinator's decision reaches a destination as
  RESOLVE(migration id, committed|aborted) (:func:`resolve`);
- what the source answers when a destination asks (:func:`answer`), and what
  it does with the destination's reply to its own RESOLVE (:func:`acknowledged`).

The rules (``doc/protocol.rst``, "Journal states and recovery"):

- the source's durable COMMITTED is the commit point.  Before it, any failure
  leaves the VM at the source (resumable) and the destination discards;
- the destination rolls a journaled COMMIT forward (move into place, resume,
  DONE) and reports a VM already in place as done, never as aborted;
- the source destroys its vTPM key and bundle only after COMMITTED is
  durable, and redoes that on every restart;
- live mode (the guest's memory is only in QEMU processes): the source keeps
  its paused QEMU, key and bundle after COMMITTED until the destination
  confirms its guest runs (DONE, sent after ``cont`` and QMP said running).
  The destination journals CONTINUING (in place, its QEMU still there) as
  the last durable step before ``cont``: a destination whose QEMU ended
  before that knows the guest never ran there (with or without a journaled
  COMMIT): it journals LOST and discards (staging, or the VM it moved into
  place); told LOST, a committed source continues its own paused QEMU
  (RECLAIMED).  So the guest never runs on both hosts (the destination runs
  it only after journaling CONTINUING, never after LOST; the source
  continues it after COMMITTED only on LOST) and is lost only with the QEMU
  that runs it, or may run it: a source QEMU that dies before PREPARED
  arrived, a destination QEMU that dies after CONTINUING was journaled;
- live through the hypervisor's own migration (libvirt, peer to peer: its
  QEMU here ends when it completes, before securemig's commit): a source
  that has not journaled COMMITTED decides from where its hypervisor says
  the guest is (:func:`carried_decision`): on once the destination said
  PREPARED unless the guest demonstrably runs on here; a guest gone here
  before PREPARED arrived, from what the destination says it holds (ASK);
  and nothing at all while either cannot be asked;
- nothing is guessed: a question with no durable answer yet gets ``None``
  ("ask again"), never a default.

Every step an action lists is idempotent, so a crash in the middle of an
action is recovered by running the restart rule again.  No I/O here: the
host (``securemig.host``) carries the steps out.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass

from securemig.protocol import wire
from securemig.protocol.phases import Phase

#: The coordinator's decision, as RESOLVE carries it (declared once, in wire).
Decision = wire.Decision


class SourceState(enum.Enum):
    """The source's journal state of one migration (its last durable step)."""

    STARTED = Phase.STARTED  #: VM locked and suspended; no migration id yet
    STREAMING = Phase.STREAMING  #: the destination's WELCOME (and id) journaled
    PREPARED_RECEIVED = Phase.PREPARED  #: the destination's PREPARED arrived
    COMMITTED = Phase.COMMITTED  #: the commit point; the copy here is garbage
    DONE = Phase.DONE  #: the destination has the COMMIT durably
    ABORTED = Phase.ABORTED  #: the VM stays here
    #: Live: committed, then the destination journaled LOST (its QEMU ended
    #: before the guest ran there): the guest continues here.
    RECLAIMED = Phase.RECLAIMED

    @classmethod
    def from_journal(cls, phases: Collection[str], outcome: str | None) -> SourceState:
        """The state of a source record from its journaled phases and outcome.

        ``committed`` wins over any later outcome: older hosts journaled
        ``aborted`` or ``in-doubt`` after it, but the commit stays made.
        """
        if outcome == "done":
            return cls.DONE
        if Phase.RECLAIMED in phases:
            return cls.RECLAIMED
        if Phase.COMMITTED in phases:
            return cls.COMMITTED
        if outcome is not None and outcome != "in-doubt":
            return cls.ABORTED
        # In doubt without COMMITTED: a carried live departure whose
        # hypervisor could not be asked (:func:`carried_decision`): nothing
        # decided yet, as before its end.
        if Phase.PREPARED in phases:
            return cls.PREPARED_RECEIVED
        if Phase.STREAMING in phases:
            return cls.STREAMING
        return cls.STARTED


class DestinationState(enum.Enum):
    """The destination's journal state of one migration."""

    ADMITTED = Phase.ADMITTED  #: record and empty staging exist
    STREAMING = Phase.STREAMING  #: images are being staged (partial staging)
    PREPARED = Phase.PREPARED  #: staging complete and durable; PREPARED may be sent
    COMMIT_RECEIVED = Phase.COMMITTED  #: the COMMIT journaled, before the move
    #: Live: in place and its QEMU there, journaled just before ``cont``: from
    #: here the guest may have run here.
    CONTINUING = Phase.CONTINUING
    RESUMED = Phase.RESUMED  #: the VM is in place and was resumed
    DONE = Phase.DONE  #: finished here
    ABORTED = Phase.ABORTED  #: staging discarded (or being discarded)
    IN_DOUBT = Phase.IN_DOUBT  #: prepared, and the source's decision is unknown here
    #: Live: its QEMU ended before the COMMIT was journaled here (so before
    #: any ``cont``): the guest never ran here and never will; nothing kept.
    LOST = Phase.LOST

    @classmethod
    def from_journal(cls, phases: Collection[str], outcome: str | None) -> DestinationState:
        """The state of a destination record from its phases and outcome.

        A journaled COMMIT wins over a later ``aborted`` or ``resume-failed``:
        the VM is this host's from then on, and recovery rolls it forward.
        """
        if outcome == "done":
            return cls.DONE
        if Phase.LOST in phases:
            return cls.LOST
        if Phase.RESUMED in phases:
            return cls.RESUMED
        if Phase.CONTINUING in phases:
            return cls.CONTINUING
        if Phase.COMMITTED in phases:
            return cls.COMMIT_RECEIVED
        if outcome == "in-doubt":
            return cls.IN_DOUBT
        if outcome is not None:
            return cls.ABORTED
        if Phase.PREPARED in phases:
            return cls.PREPARED
        if Phase.STREAMING in phases:
            return cls.STREAMING
        return cls.ADMITTED


class SourceGuest(enum.Enum):
    """A carried live departure's guest (libvirt: the domain), as the
    source's hypervisor tells it -- the one fact :func:`carried_decision`
    decides on."""

    #: Its QEMU is alive: running, or paused and resumable with its memory.
    RUNS = "runs"
    #: Shut off because the hypervisor's migration completed (libvirt's
    #: Confirm: ``VIR_DOMAIN_SHUTOFF_MIGRATED``).
    MOVED = "moved"
    #: Shut off for any other reason (a libvirtd restarted at completion
    #: ends the QEMU with reason *unknown*), or not defined: its memory is
    #: not here.
    GONE = "gone"
    #: The hypervisor cannot be asked (its daemon is down, or does not answer).
    UNKNOWN = "unknown"


class DestinationHolds(enum.Enum):
    """What the destination of a carried live departure says it holds, in
    answer to ASK -- asked only when the source cannot decide alone
    (:func:`asks_destination`)."""

    #: The whole guest: its hypervisor completed the migration there (the
    #: guest paused, PREPARED journaled or the arrival held in doubt), or
    #: the guest was rolled forward there already.
    WHOLE = "whole"
    #: No complete copy: no record, discarded, aborted, or its QEMU ended
    #: before the guest ever ran there (LOST).
    NOTHING = "nothing"
    #: Not asked yet, no answer (unreachable, busy), or it cannot tell
    #: (its hypervisor does not answer).
    UNKNOWN = "unknown"


def holds(settled: wire.Settled) -> DestinationHolds:
    """What a destination's RESOLVED answer to ASK says it holds: HELD (in
    doubt, the whole guest paused) or DONE (it runs there) is the whole
    guest; ABORTED, UNKNOWN (no record) and LOST are nothing; FAILED and
    REFUSED say nothing (asked again)."""
    if settled in (wire.Settled.HELD, wire.Settled.DONE):
        return DestinationHolds.WHOLE
    if settled in (wire.Settled.ABORTED, wire.Settled.UNKNOWN, wire.Settled.LOST):
        return DestinationHolds.NOTHING
    return DestinationHolds.UNKNOWN


def asks_destination(guest: SourceGuest, prepared: bool) -> bool:
    """Whether the source of a carried live departure must ask the
    destination what it holds before deciding: its guest is gone here
    (shut off for a reason other than *migrated*, or undefined) and
    PREPARED never arrived -- the destination may hold the whole guest,
    paused (its hypervisor's Finish ran there; PREPARED was lost with the
    connection, or the source died before journaling it), or nothing."""
    return guest is SourceGuest.GONE and not prepared


def carried_decision(
    guest: SourceGuest, prepared: bool, there: DestinationHolds = DestinationHolds.UNKNOWN
) -> Decision | None:
    """The source's decision for a carried live departure (the hypervisor
    migrates on its own, peer to peer) that has not journaled COMMITTED:
    its session failed, or the source restarted.  ``prepared``: the
    destination said PREPARED (journaled here when it arrived).

    - the guest demonstrably runs on here (its QEMU alive, running or
      paused): abort -- it continues here, and the destination's paused
      copy, if any, is discarded;
    - the hypervisor moved it (its Confirm ended it here): commit -- the
      paused destination holds the only copy;
    - it is gone here otherwise: once the destination said PREPARED it
      holds the whole guest (paused), so roll *forward*; before that only
      the destination can say (``there``, its answer to ASK): commit if it
      holds the whole guest, abort if it holds nothing (the domain's
      definition and vTPM state are kept here, to boot it again), nothing
      while it has not answered;
    - the hypervisor cannot be asked: decide *nothing* (``None``): the
      record stays open, in doubt, and is asked again; never abort on an
      unknown, which would discard the only copy at the destination."""
    if guest is SourceGuest.UNKNOWN:
        return None
    if guest is SourceGuest.RUNS:
        return Decision.ABORTED
    if guest is SourceGuest.MOVED or prepared:
        return Decision.COMMITTED
    if there is DestinationHolds.WHOLE:
        return Decision.COMMITTED
    if there is DestinationHolds.NOTHING:
        return Decision.ABORTED
    return None


class SourceStep(enum.Enum):
    """One idempotent thing a source host does, in an action's order."""

    JOURNAL_ABORTED = "journal aborted"
    #: Unlock the VM and make it resumable here (a QEMU guest from its saved RAM).
    MAKE_RESUMABLE = "make the VM resumable here"
    #: Delete the vTPM key first (the copy can never run again), then the bundle.
    DESTROY_COPY = "destroy the vTPM key and the bundle"
    #: Send RESOLVE(committed) to the destination until it answers.
    TELL_COMMITTED = "tell the destination: committed"
    #: Send RESOLVE(aborted) to the destination until it answers (needs the id).
    TELL_ABORTED = "tell the destination: aborted"
    JOURNAL_DONE = "journal done"
    #: Live: PREPARED arrived and this host's QEMU is gone: the destination
    #: holds the only copy, so commit (aborting would lose the guest).
    JOURNAL_COMMITTED = "journal committed"
    #: Live: the destination journaled LOST; the guest is this host's again.
    JOURNAL_RECLAIMED = "journal reclaimed"
    #: Carried live: ask the destination what it holds (ASK) until it answers.
    ASK_DESTINATION = "ask the destination what it holds"


class DestinationStep(enum.Enum):
    """One idempotent thing a destination host does, in an action's order."""

    JOURNAL_COMMIT = "journal the COMMIT"
    #: Rename staging to ``vms/NAME``; nothing to do if it is there already.
    MOVE_INTO_PLACE = "move the VM into place"
    #: Live: journal CONTINUING, the last durable step before ``cont``.
    JOURNAL_CONTINUING = "journal continuing"
    RESUME = "resume the VM (if it is not running)"
    JOURNAL_DONE = "journal done"
    DISCARD_STAGING = "remove staging (if any) and release the name"
    #: Live, LOST: remove the VM this migration moved into place, which never
    #: ran here (no QEMU of it is left; CONTINUING was never journaled).
    DISCARD_UNRUN = "remove the VM moved into place that never ran here"
    JOURNAL_ABORTED = "journal aborted"
    JOURNAL_IN_DOUBT = "journal in doubt"
    #: Ask the source for its decision (pull) until it answers.
    ASK_SOURCE = "ask the source"
    #: Live: its QEMU ended before the COMMIT was journaled: never runs here.
    JOURNAL_LOST = "journal lost"


@dataclass(frozen=True)
class SourceAction:
    """What a source host does: ``steps`` in order, and why."""

    steps: tuple[SourceStep, ...]
    why: str


@dataclass(frozen=True)
class DestinationAction:
    """What a destination host does: ``steps`` in order, and why.  No steps
    and a ``why`` naming an operator: a state the protocol never produces."""

    steps: tuple[DestinationStep, ...]
    why: str


_S = SourceStep
_D = DestinationStep
_ROLL_FORWARD = (_D.MOVE_INTO_PLACE, _D.RESUME, _D.JOURNAL_DONE)
_DISCARD = (_D.DISCARD_STAGING, _D.JOURNAL_ABORTED)
_LOSE = (_D.JOURNAL_LOST, _D.DISCARD_STAGING, _D.DISCARD_UNRUN)
#: Live: the roll forward with CONTINUING journaled before ``cont``.
_ROLL_FORWARD_LIVE = (_D.MOVE_INTO_PLACE, _D.JOURNAL_CONTINUING, _D.RESUME, _D.JOURNAL_DONE)


def source_decision(state: SourceState) -> Decision | None:
    """The decision a source state has durably made, if any (a RECLAIMED
    source committed; the destination's LOST undid nothing it had)."""
    if state in (SourceState.COMMITTED, SourceState.DONE, SourceState.RECLAIMED):
        return Decision.COMMITTED
    if state is SourceState.ABORTED:
        return Decision.ABORTED
    return None


def destination_decision(state: DestinationState) -> Decision | None:
    """The decision a destination state has durably adopted, if any
    (``None`` while it may still go either way: in doubt or before; and
    LOST, which is no decision but a fact either decision accepts)."""
    if state in (
        DestinationState.COMMIT_RECEIVED,
        DestinationState.CONTINUING,
        DestinationState.RESUMED,
        DestinationState.DONE,
    ):
        return Decision.COMMITTED
    if state is DestinationState.ABORTED:
        return Decision.ABORTED
    return None


def answer(state: SourceState) -> Decision | None:
    """What the source answers a destination asking about this migration.

    ``None`` means "not decided yet, ask again": the source is still running
    that migration (a restart journals ``aborted`` before it answers)."""
    return source_decision(state)


def source_restart(
    state: SourceState,
    live_qemu: bool | None = None,
    carried: SourceGuest | None = None,
    there: DestinationHolds = DestinationHolds.UNKNOWN,
) -> SourceAction:
    """What a restarting source does for a migration in ``state``.
    ``live_qemu``: a live migration, and whether its QEMU (the guest,
    running or paused) is still there; None: not live.  ``carried``: a
    live migration through the hypervisor's own (libvirt), and where its
    guest is (:func:`carried_decision`); ``there``: what the destination
    said it holds, if it was asked (:func:`asks_destination`)."""
    if carried is not None and source_decision(state) is None:
        prepared = state is SourceState.PREPARED_RECEIVED
        decision = carried_decision(carried, prepared, there)
        if decision is None and asks_destination(carried, prepared):
            return SourceAction(
                (_S.ASK_DESTINATION,),
                "its guest is gone here and PREPARED never arrived: ask the destination",
            )
        if decision is None:
            return SourceAction((), "its hypervisor cannot be asked: in doubt, asked again")
        if decision is Decision.COMMITTED:
            # Its definition and vTPM state are kept until the destination
            # confirms (DONE): a guest lost there can be booted here again.
            return SourceAction(
                (_S.JOURNAL_COMMITTED, _S.TELL_COMMITTED),
                f"the guest is not here ({carried.value}) and the destination holds it: commit",
            )
        # It runs here: continued first, then journaled aborted, then told.
        return SourceAction(
            (_S.MAKE_RESUMABLE, _S.JOURNAL_ABORTED, _S.TELL_ABORTED),
            "its guest runs on here: abort",
        )
    if state is SourceState.COMMITTED:
        if live_qemu:
            # Kept paused until the destination's guest demonstrably runs:
            # if its QEMU ended before that, this one continues the guest.
            return SourceAction((_S.TELL_COMMITTED,), "committed: its paused QEMU kept until DONE")
        # The crash may have come between COMMITTED and the end of the destroy.
        return SourceAction((_S.DESTROY_COPY, _S.TELL_COMMITTED), "committed: finish giving up")
    if state is SourceState.DONE:
        return SourceAction((), "done")
    if state is SourceState.RECLAIMED:
        return SourceAction((_S.MAKE_RESUMABLE,), "reclaimed: continue it here")
    if state is SourceState.PREPARED_RECEIVED and live_qemu is False:
        # Nothing left here to continue; the destination loaded the whole
        # stream (it sent PREPARED) and holds it until told: commit.
        return SourceAction(
            (_S.JOURNAL_COMMITTED, _S.DESTROY_COPY, _S.TELL_COMMITTED),
            "prepared, and its QEMU is gone: commit",
        )
    why = "aborted" if state is SourceState.ABORTED else f"restarted in {state.value}: abort"
    # Journal first: once the VM may run here, no restart may commit it.
    steps: tuple[SourceStep, ...] = (_S.MAKE_RESUMABLE, _S.TELL_ABORTED)
    if state is not SourceState.ABORTED:
        steps = (_S.JOURNAL_ABORTED, *steps)
    return SourceAction(steps, why)


def acknowledged(state: SourceState, reply: Decision | None, lost: bool = False) -> SourceAction:
    """What the source does with the destination's reply to its RESOLVE.

    ``reply`` is the decision the destination has durably adopted (``None``:
    not yet, e.g. busy with a live session); ``lost``: it journaled LOST
    (live: its QEMU ended before the guest ran there)."""
    decision = source_decision(state)
    if lost:
        if state is SourceState.COMMITTED:
            return SourceAction(
                (_S.JOURNAL_RECLAIMED, _S.MAKE_RESUMABLE),
                "the guest never ran at the destination: continue it here",
            )
        return SourceAction((), "nothing kept at the destination")
    if reply is None:
        tell = _S.TELL_COMMITTED if decision is Decision.COMMITTED else _S.TELL_ABORTED
        return SourceAction((tell,), "the destination has not adopted it yet: ask again")
    if reply is not decision:
        return SourceAction((), f"the destination says {reply.value}: an operator must look")
    if state is SourceState.COMMITTED:
        # Live: the paused QEMU kept until now goes (a copy already gone: nothing).
        return SourceAction(
            (_S.DESTROY_COPY, _S.JOURNAL_DONE), "the destination has the COMMIT durably"
        )
    return SourceAction((), "settled")


def _unrun(state: DestinationState) -> bool:
    """Live: a state in which no ``cont`` was ever sent here (CONTINUING,
    the last durable step before it, not journaled yet)."""
    return state in (
        DestinationState.PREPARED,
        DestinationState.IN_DOUBT,
        DestinationState.COMMIT_RECEIVED,
    )


def destination_restart(
    state: DestinationState,
    vm_in_place: bool,
    staging_complete: bool,
    live_qemu: bool | None = None,
) -> DestinationAction:
    """What a restarting destination does for a migration in ``state``;
    ``vm_in_place``: ``vms/NAME`` exists; ``staging_complete``: the staging
    of this migration holds every verified image; ``live_qemu``: a live
    arrival, and whether its QEMU (the loaded guest) is still there."""
    if state in (DestinationState.ADMITTED, DestinationState.STREAMING):
        # The source commits only after PREPARED, which was never sent.
        return DestinationAction(_DISCARD, "restarted before PREPARED")
    if state is DestinationState.LOST:
        return DestinationAction(_LOSE[1:], "lost: clean up")
    if _unrun(state) and live_qemu is False:
        # CONTINUING not journaled, so no cont was ever sent: it never ran here.
        return DestinationAction(_LOSE, "its QEMU ended before the guest ran here")
    if state in (DestinationState.CONTINUING, DestinationState.RESUMED) and live_qemu is False:
        # It ran here (or may have: cont may have been sent); its QEMU has
        # ended since, a crash of the guest: nothing runs it a second time.
        return DestinationAction((_D.JOURNAL_DONE,), "continued; its QEMU has ended since")
    if state is DestinationState.PREPARED:
        return DestinationAction((_D.JOURNAL_IN_DOUBT, _D.ASK_SOURCE), "prepared: in doubt")
    if state is DestinationState.IN_DOUBT:
        return DestinationAction((_D.ASK_SOURCE,), "in doubt")
    if state in (
        DestinationState.COMMIT_RECEIVED,
        DestinationState.CONTINUING,
        DestinationState.RESUMED,
    ):
        forward = _ROLL_FORWARD if live_qemu is None else _ROLL_FORWARD_LIVE
        if vm_in_place and state is not DestinationState.COMMIT_RECEIVED:
            return DestinationAction((_D.RESUME, _D.JOURNAL_DONE), "continued: finish")
        if vm_in_place:
            return DestinationAction(forward[1:], "committed and in place: resume")
        if staging_complete and state is DestinationState.COMMIT_RECEIVED:
            return DestinationAction(forward, "committed: roll forward")
        return DestinationAction((), "committed, but neither staging nor VM: an operator must look")
    if state is DestinationState.ABORTED:
        return DestinationAction((_D.DISCARD_STAGING,), "aborted: clean up")
    return DestinationAction((), "done")


def resolve(
    state: DestinationState, decision: Decision, live_qemu: bool | None = None
) -> DestinationAction:
    """What a destination in ``state`` does when the source's decision
    arrives (RESOLVE, or the source's answer to ASK_SOURCE); ``live_qemu``
    as for :func:`destination_restart`."""
    if state is DestinationState.LOST:
        return DestinationAction((), "lost here: nothing kept, it never ran here")
    mine = destination_decision(state)
    if mine is not None and mine is not decision:
        # The two journals disagree: only a bug or a lost disk does that.
        return DestinationAction((), f"journal says {mine.value}, source {decision.value}")
    if decision is Decision.ABORTED:
        return DestinationAction(_DISCARD if mine is None else (), "the source aborted")
    if state in (DestinationState.ADMITTED, DestinationState.STREAMING):
        return DestinationAction((), "committed before PREPARED: an operator must look")
    if _unrun(state) and live_qemu is False:
        return DestinationAction(_LOSE, "its QEMU ended before the guest ran here")
    forward = _ROLL_FORWARD if live_qemu is None else _ROLL_FORWARD_LIVE
    if state in (DestinationState.PREPARED, DestinationState.IN_DOUBT):
        return DestinationAction((_D.JOURNAL_COMMIT, *forward), "the source committed")
    if state is DestinationState.COMMIT_RECEIVED:
        return DestinationAction(forward, "the source committed: roll forward")
    if state in (DestinationState.CONTINUING, DestinationState.RESUMED):
        if live_qemu is False:
            return DestinationAction((_D.JOURNAL_DONE,), "continued; its QEMU has ended since")
        return DestinationAction((_D.RESUME, _D.JOURNAL_DONE), "the source committed: finish")
    return DestinationAction((), "done")

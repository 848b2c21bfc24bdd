"""Exhaustive exploration of the commit protocol under crashes and a bad network.

A real :class:`~securemig.protocol.source.SourceSession` and a real
:class:`~securemig.protocol.destination.DestinationSession` (insecure variant, one
2-byte image) are joined by a model network and model hosts:

- every message in flight may be delivered in order, or (each costing one
  *fault* of the budget) lost, duplicated, or delivered ahead of earlier ones;
- the hosts carry effects out as separate steps (journal writes, the move
  into place, the destroy of the source's copy, ...), so a crash can fall
  between any two of them;
- after every step either side may crash (its daemon dies: its session, its
  pending work and its connection are lost; its journal, files and a running
  VM survive) and restart at once, applying :mod:`securemig.protocol.recovery`;
- after a restart, or a session that ended without DONE, the two sides
  settle with RESOLVE, pushed by the source as the implementation does
  (``Model(pull=True)`` also lets a destination in doubt ask, a pull the
  implementation does not have); an idle session times out when nothing
  else can happen.

Breadth-first over every interleaving, with a visited set, checking after
every state: the VM may run (or be started) on at most one side; at least one
side holds a complete copy; a decision once journaled never changes and the
two sides' decisions never conflict; and every state where nothing but
faults could happen is *settled* (both sides have the same outcome, exactly
one copy is left, where that outcome says, nothing staged, locked or pending).

Bound in ``make test``: 2 crashes per side and 1 network fault (loss,
duplicate, early delivery or early timeout): 23,640 states in about 3 s,
push only.  ``SECUREMIG_EXPLORE_BOUND=C,F`` (or ``N`` for both) sets it:
``2,2`` is 130,269 states in 32 s; none violates anything.  (With the pull
allowed, measured before the source session's fix: ``2,2`` 150,395 states,
``3,2`` 273,928, ``3,3`` 1,244,714 in 312 s, no violation.)

The model obeys the sessions.  It found that SourceSession treated
``committing`` as before the commit point (a failure there yielded ABORT +
RollBack + ABORTED although the host journals COMMITTED as it starts the
commit: the VM ran twice after one destination crash, and was lost after one
duplicated PREPARED); the session now ends such a failure in doubt, and
only ``commit_failed`` (the journal write itself failed) rolls back.
``Model(journal_wins=True)`` is the host-side guard that hid it, kept to
compare.

``Model(live=True)`` is live mode: the same sessions and messages (the
commit is the same two-phase commit), but the guest's state is only in QEMU
processes (the source's runs the guest, then waits paused in postmigrate
after its stream; the destination's loads it and waits paused), and one
more fault: either side's QEMU is lost (SIGKILL) at any step.  Invariants:
the guest never runs on both hosts from one switchover (the destination's
QEMU continued and the source's continued after its stream), and some QEMU
always holds it, unless the QEMU that died ran it or may have (the
source's while it ran the guest, or before the source journaled PREPARED,
or once it was chosen to go on; the destination's after it journaled
CONTINUING, the last durable step before ``cont``): then the guest crashed,
an operator looks, and only "never twice" is still checked.  A destination
QEMU lost after the COMMIT was journaled and before CONTINUING is LOST: the
source continues the guest (``test_live_destination_qemu_lost_after_commit_reclaimed``);
the control ``Model(journal_continuing=False)`` shows the guest run twice
without that journal write.  Bound in
``make test``: 1 crash per side, 1 network fault, 1 QEMU lost: 48,727
states (about 12 s on a quiet machine; ``2,1``: 109,948 states in 29 s
before the source's PREPARED and COMMITTED became one journal write; none
violates anything).  ``Model(vtpm_mismatch=True)``: the vTPM that arrived
is not the one announced; its EK check runs beside PREPARED and the
source's commit and ends the destination's QEMU, unrun, before the COMMIT
is journaled there (or, after a restart, before CONTINUING): 9,277 states
at 1 crash per side and 1 network fault, none violates anything, the
guest never runs there and settles continued at the source.  The live
control ends the source's QEMU at COMMITTED, as before issue 22, and loses
the guest when the destination's QEMU dies after PREPARED.

The controls run the same explorer with the old destination restart rule
(a journaled COMMIT is discarded: the VM is lost) and with a source that
destroys its copy before COMMITTED is durable (the VM is lost too).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from securemig.protocol import destination as destination_session
from securemig.protocol import effects as fx
from securemig.protocol import source as source_session
from securemig.protocol import wire
from securemig.protocol.errors import ErrorCode, ProtocolError
from securemig.protocol.recovery import (
    Decision,
    DestinationAction,
    DestinationState,
    DestinationStep,
    SourceState,
    SourceStep,
    acknowledged,
    answer,
    destination_decision,
    destination_restart,
    resolve,
    source_decision,
    source_restart,
)

IMAGE = b"vm"
MID = b"M" * 16
HELLO = wire.Hello(
    version=wire.PROTOCOL_VERSION,
    variant=wire.Variant.FULL,
    vm_name="vm1",
    chunk_size=wire.MIN_CHUNK_SIZE,
    images=(wire.ImageInfo("ram", len(IMAGE)),),
    shared_disk="",
)
EOF = "EOF"  # in a channel: the sender's end of the connection closed

D = DestinationStep
S = SourceStep
#: The source's commit, as the host does it: PREPARED and COMMITTED durable
#: in one write (Departure.commit), then destroy.
COMMIT = ("journal-prepared-committed", S.DESTROY_COPY, "committed-locally")
#: Control: a source that destroys its copy before COMMITTED is durable.
COMMIT_DESTROY_FIRST = (
    "journal-prepared",
    S.DESTROY_COPY,
    "journal-committed",
    "committed-locally",
)
#: The destination's commit (``Arrival.commit``), then the session's resumed().
COMMIT_IN_PLACE = (D.JOURNAL_COMMIT, D.MOVE_INTO_PLACE, D.RESUME, "journal-resumed", "resumed")
#: Live: CONTINUING journaled (in place, its QEMU checked) just before ``cont``.
COMMIT_IN_PLACE_LIVE = (
    D.JOURNAL_COMMIT,
    D.MOVE_INTO_PLACE,
    D.JOURNAL_CONTINUING,
    D.RESUME,
    "journal-resumed",
    "resumed",
)
#: Live: the source keeps its paused QEMU after COMMITTED (released at once
#: only if it is gone), until DONE.
COMMIT_LIVE = ("journal-prepared-committed", "release-if-gone", "committed-locally")


def old_destination_restart(
    state: DestinationState, vm_in_place: bool, staging_complete: bool
) -> DestinationAction:
    """Control: ``DestinationHost.recover_staging`` before issue 11 deleted
    staging whose last phase is not prepared/in-doubt and journaled aborted."""
    if state in (DestinationState.PREPARED, DestinationState.IN_DOUBT):
        return DestinationAction((D.JOURNAL_IN_DOUBT, D.ASK_SOURCE), "kept in doubt")
    if state in (DestinationState.DONE, DestinationState.ABORTED):
        return DestinationAction((), "finished")
    return DestinationAction((D.DISCARD_STAGING, D.JOURNAL_ABORTED), "restarted before PREPARED")


@dataclass
class World:
    """Everything the explorer varies: sessions, network, host work, disks."""

    src: source_session.SourceSession | None
    dst: destination_session.DestinationSession | None = None
    to_dst: list[Any] = field(default_factory=list)
    to_src: list[Any] = field(default_factory=list)
    src_tasks: list[Any] = field(default_factory=list)
    dst_tasks: list[Any] = field(default_factory=list)
    # Source host: durable journal state and files; the pending RESOLVE is
    # in memory (a restart recomputes it from the journal).
    src_state: SourceState = SourceState.STARTED
    src_mid: bool = False  # the migration id is journaled (with STREAMING)
    src_copy: bool = True  # bundle and vTPM key
    src_locked: bool = True  # locked and suspended for the migration
    src_running: bool = False
    src_tell: Decision | None = None
    # Destination host.
    dst_state: DestinationState | None = None  # None: no record
    staging: bytes | None = None  # None: no staging directory
    staging_durable: bool = False  # prepared: complete, fsynced, manifest written
    in_place: bool = False  # vms/NAME exists
    dst_running: bool = False
    # Live mode (Model(live=True)): the guest's state is only in QEMU
    # processes.  Each QEMU: "running", "paused" (source: postmigrate after
    # the stream; destination: loaded), or None (never started, or gone).
    src_qemu: str | None = None
    dst_qemu: str | None = None
    dst_ran: bool = False  # the destination's QEMU was ever continued
    src_went_on: bool = False  # the source's QEMU was continued after its stream
    #: A QEMU died that ran the guest (or may have: the destination's after its
    #: COMMIT was journaled): the guest is lost by that crash, not by the protocol.
    crashed: bool = False
    qemu_faults: int = 0
    #: The destination's journal state when its QEMU was lost (for tests' goals).
    dst_qemu_lost_in: DestinationState | None = None
    # What is left of the bound.
    src_crashes: int = 0
    dst_crashes: int = 0
    faults: int = 0

    def clone(self) -> World:
        """A copy to apply one step to (cheaper than ``copy.deepcopy``)."""
        return dataclasses.replace(
            self,
            src=_clone_session(self.src),
            dst=_clone_session(self.dst),
            to_dst=list(self.to_dst),
            to_src=list(self.to_src),
            src_tasks=list(self.src_tasks),
            dst_tasks=list(self.dst_tasks),
        )

    def key(self) -> tuple[Any, ...]:
        """Everything that decides what can happen next, hashable."""
        return (
            _session_key(self.src),
            _session_key(self.dst),
            tuple(map(_message_key, self.to_dst)),
            tuple(map(_message_key, self.to_src)),
            tuple(self.src_tasks),
            tuple(self.dst_tasks),
            self.src_state,
            self.src_mid,
            self.src_copy,
            self.src_locked,
            self.src_running,
            self.src_tell,
            self.dst_state,
            self.staging,
            self.staging_durable,
            self.in_place,
            self.dst_running,
            self.src_qemu,
            self.dst_qemu,
            self.dst_ran,
            self.src_went_on,
            self.crashed,
            self.qemu_faults,
            self.dst_qemu_lost_in,
            self.src_crashes,
            self.dst_crashes,
            self.faults,
        )

    @property
    def staging_complete(self) -> bool:
        return self.staging_durable and self.staging == IMAGE

    def live(self, side: str) -> bool:
        session = self.src if side == "src" else self.dst
        return session is not None and not session.finished


def _clone_session(session: Any) -> Any:
    """A copy of a session that shares its (immutable) transition table.

    ``copy.deepcopy`` works too but copies Automat's automaton each time,
    which made the exploration four times slower; this relies on Automat
    keeping a machine's state in its core and its transitioner."""
    if session is None:
        return None
    clone = copy.copy(session)
    clone._core = copy.copy(session._core)
    clone._machine = machine = copy.copy(session._machine)
    fields = vars(machine)
    fields["__automat_core__"] = clone._core
    fields["__automat_transitioner__"] = copy.copy(fields["__automat_transitioner__"])
    return clone


def _session_key(
    session: source_session.SourceSession | destination_session.DestinationSession | None,
) -> Any:
    if session is None:
        return None
    # The core's plain fields are all a session remembers (nonce: a callable).
    core = vars(session._core)
    return tuple(sorted((k, v) for k, v in core.items() if k not in ("nonce", "hello")))


def _message_key(message: Any) -> Any:
    return ("DATA", message.tobytes()) if isinstance(message, wire.Data) else message


# --------------------------------------------------------------------------
# The model hosts: what the Twisted shell does with each effect.


class Model:
    """The hosts' rules; ``restart`` and ``commit`` are swapped by the controls."""

    def __init__(
        self,
        restart: Callable[[DestinationState, bool, bool], DestinationAction] = destination_restart,
        commit: tuple[Any, ...] = COMMIT,
        journal_wins: bool = False,
        pull: bool = False,
        live: bool = False,
        keep_paused: bool = True,
        journal_continuing: bool = True,
        vtpm_mismatch: bool = False,
    ) -> None:
        #: Live mode: QEMU processes hold the guest; "QEMU lost" faults.
        self.live = live
        #: Live control: False ends the source's QEMU at COMMITTED (before issue 22).
        self.keep_paused = keep_paused
        #: Live control: False sends ``cont`` with no CONTINUING journaled
        #: first, so LOST after a journaled COMMIT cannot tell "never ran here".
        self.journal_continuing = journal_continuing
        #: Live: the vTPM that arrived is not the one announced.  Its EK check
        #: runs beside PREPARED and the source's commit (Arrival.check_vtpm_beside)
        #: and gates ``cont``: the session waits for it before journaling the
        #: COMMIT, recovery redoes it before CONTINUING; a failed one ends the
        #: destination's QEMU (it never ran) before that step.
        self.vtpm_mismatch = vtpm_mismatch
        if live:
            commit = (
                COMMIT_LIVE if keep_paused else (COMMIT_LIVE[0], S.DESTROY_COPY, COMMIT_LIVE[2])
            )
        self.restart = restart
        #: Whether a destination in doubt may ask the source (a pull).  The
        #: implementation has no pull (RESOLVE is pushed by the source's
        #: daemon), so the explorer checks liveness without it by default.
        self.pull = pull
        self.commit = commit
        #: The source host drops what its session asks for against a durable
        #: COMMITTED (an ABORT, a RollBack); False: obey the session.
        self.journal_wins = journal_wins
        #: Effects the session asked for that the journal contradicts (see report).
        self.anomalies: set[str] = set()

    # -- sessions' effects

    def feed(self, w: World, side: str, call: Callable[[], list[Any]]) -> None:
        """Run a session input; a ProtocolError ends the session, as in the shell."""
        try:
            effects = call()
        except ProtocolError as e:
            session = w.src if side == "src" else w.dst
            assert session is not None
            effects = session.fail(e.code, str(e))
        (self.src_effects if side == "src" else self.dst_effects)(w, effects)

    def src_effects(self, w: World, effects: list[Any]) -> None:
        for e in effects:
            if isinstance(e, fx.Send):
                committed = source_decision(w.src_state) is Decision.COMMITTED
                if isinstance(e.message, wire.Abort) and committed and self.journal_wins:
                    # An ABORT after COMMITTED would make the destination discard.
                    self.anomalies.add(f"ABORT after COMMITTED (phase {w.src and w.src.phase})")
                    continue
                w.to_dst.append(e.message)
            elif isinstance(e, fx.StartStreams):
                if w.src_state is SourceState.STARTED:
                    w.src_state, w.src_mid = SourceState.STREAMING, True
                if self.live:
                    if w.src_qemu is None:  # it died running the guest: no stream
                        assert w.src is not None
                        self.feed(w, "src", partial(w.src.fail, ErrorCode.LIVE_FAILED, "QEMU"))
                        continue
                    # QEMU's stream completes: the source pauses in postmigrate;
                    # the destination's QEMU (waiting since LIVE_READY) loads it.
                    w.src_qemu, w.src_running, w.dst_qemu = "paused", False, "loading"
                digest = hashlib.sha256(IMAGE).digest()
                w.to_dst += [wire.StreamBegin(0), wire.Data.of(IMAGE), wire.StreamEnd(digest)]
                assert w.src is not None
                self.feed(w, "src", w.src.streams_sent)
            elif isinstance(e, fx.CommitLocally):
                w.src_tasks += self.commit
            elif isinstance(e, fx.RollBack):
                if source_decision(w.src_state) is Decision.COMMITTED and self.journal_wins:
                    # The journal wins: never roll back after the commit point.
                    self.anomalies.add(f"RollBack after COMMITTED (phase {w.src and w.src.phase})")
                    continue
                # Before the commit point: abort wins over the pending commit.
                w.src_tasks = [t for t in w.src_tasks if t not in self.commit]
                self.make_resumable(w)
            elif isinstance(e, fx.Finished):
                w.to_dst.append(EOF)
                if self.live and e.outcome is fx.Outcome.DONE:
                    # The destination's guest runs: the paused QEMU here goes.
                    w.src_tasks.append(S.DESTROY_COPY)
                w.src_tasks.append(("finish", e.outcome))

    def dst_effects(self, w: World, effects: list[Any]) -> None:
        for e in effects:
            if isinstance(e, fx.Send):
                w.to_src.append(e.message)
            elif isinstance(e, fx.Admit):
                w.dst_tasks.append("admit")
            elif isinstance(e, fx.OpenStream):
                if w.dst_state is DestinationState.ADMITTED:
                    w.dst_state = DestinationState.STREAMING
                w.staging = b""
            elif isinstance(e, fx.WriteChunk):
                assert w.staging is not None
                w.staging += e.data.tobytes()
            elif isinstance(e, fx.CloseStream):
                # The session checked the size; one chunk, so the digest matches.
                assert hashlib.sha256(w.staging or b"").digest() == e.sha256
            elif isinstance(e, fx.Prepare):
                w.dst_tasks.append("prepare")
            elif isinstance(e, fx.CommitInPlace):
                w.dst_tasks += COMMIT_IN_PLACE_LIVE if self.live else COMMIT_IN_PLACE
            elif isinstance(e, fx.Discard):
                # Arrival.cancel(): queued disk work does nothing; then remove.
                w.dst_tasks = [t for t in w.dst_tasks if t != "prepare"]
                w.dst_tasks.append(D.DISCARD_STAGING)
            elif isinstance(e, fx.Finished):
                w.to_src.append(EOF)
                w.dst_tasks.append(("finish", e.outcome))

    # -- host work, one step at a time

    def src_task(self, w: World) -> None:
        task = w.src_tasks.pop(0)
        if task == "journal-prepared":
            w.src_state = SourceState.PREPARED_RECEIVED
        elif task in ("journal-committed", "journal-prepared-committed"):
            w.src_state = SourceState.COMMITTED
        elif task == "committed-locally":
            if w.live("src"):
                assert w.src is not None
                self.feed(w, "src", w.src.committed_locally)
        elif task == "release-if-gone":
            if w.src_qemu is None:
                w.src_copy = False
        elif task is S.DESTROY_COPY:
            w.src_copy, w.src_qemu, w.src_running = False, None, False
        elif task is S.JOURNAL_ABORTED:
            w.src_state = SourceState.ABORTED
        elif task is S.JOURNAL_DONE:
            w.src_state = SourceState.DONE
        elif task is S.JOURNAL_COMMITTED:
            w.src_state = SourceState.COMMITTED
        elif task is S.JOURNAL_RECLAIMED:
            w.src_state = SourceState.RECLAIMED
        elif task is S.MAKE_RESUMABLE:
            self.make_resumable(w)
        elif task in (S.TELL_COMMITTED, S.TELL_ABORTED):
            if w.src_mid:  # RESOLVE names the migration id
                committed = task is S.TELL_COMMITTED
                w.src_tell = Decision.COMMITTED if committed else Decision.ABORTED
        elif task[0] == "finish":
            outcome = task[1]
            decided = source_decision(w.src_state)
            if outcome is fx.Outcome.DONE:
                w.src_state = SourceState.DONE
            elif decided is None:
                # Only ABORTED comes before the commit point.
                assert outcome is fx.Outcome.ABORTED, outcome
                w.src_state = SourceState.ABORTED
            elif decided is Decision.COMMITTED and outcome is fx.Outcome.ABORTED:
                self.anomalies.add("source session ended ABORTED after COMMITTED")
            # Ended without DONE: tell the destination (the daemon retries).
            if w.src_state is not SourceState.DONE and w.src_mid:
                w.src_tell = source_decision(w.src_state)
        else:
            raise AssertionError(task)

    def make_resumable(self, w: World) -> None:
        """The VM goes on at the source: resumed from its saved state, or
        (live) its QEMU continued, if it still has one."""
        if not w.src_copy:
            return
        w.src_locked = False
        if not self.live:
            w.src_running = True
        elif w.src_qemu is not None:
            w.src_went_on = w.src_went_on or w.src_qemu == "paused"
            w.src_qemu, w.src_running = "running", True

    def dst_task(self, w: World) -> None:
        task = w.dst_tasks.pop(0)
        checked = (D.JOURNAL_COMMIT, D.JOURNAL_CONTINUING)
        if self.vtpm_mismatch and task in checked and w.dst_qemu == "paused":
            # The EK check failed: the destination ends its own QEMU, which
            # never ran (no crash of the guest), then goes on as for a lost one.
            w.dst_qemu = None
        if task == "admit":
            if w.live("dst"):
                w.dst_state, w.staging = DestinationState.ADMITTED, b""
                assert w.dst is not None
                self.feed(w, "dst", lambda: w.dst.admitted(MID))  # type: ignore[union-attr]
        elif task in (D.JOURNAL_COMMIT, D.JOURNAL_CONTINUING) and self.live and w.dst_qemu is None:
            # Live: checked as the COMMIT is journaled and again just before
            # CONTINUING (Arrival.commit, and resolve): its QEMU ended before,
            # so it never ran here: LOST (the VM in place, if moved, goes).
            rolling = (*COMMIT_IN_PLACE_LIVE, D.JOURNAL_DONE)
            w.dst_tasks = [t for t in w.dst_tasks if t not in rolling]
            w.dst_tasks[:0] = [D.JOURNAL_LOST, D.DISCARD_STAGING, D.DISCARD_UNRUN, "lost-fail"]
        elif task is D.JOURNAL_CONTINUING:
            if self.journal_continuing:
                w.dst_state = DestinationState.CONTINUING
        elif task is D.DISCARD_UNRUN:
            if w.dst_state is DestinationState.LOST and w.in_place:
                w.in_place, w.dst_qemu = False, None
        elif task == "lost-fail":
            if w.live("dst"):
                assert w.dst is not None
                dst = w.dst
                self.feed(w, "dst", lambda: dst.fail(ErrorCode.RESUME_FAILED, "lost"))
        elif task is D.JOURNAL_LOST:
            w.dst_state = DestinationState.LOST
        elif task == "prepare":
            if self.live and w.dst_qemu is None:
                # Its QEMU died loading: the incoming migration failed.
                assert w.dst is not None
                self.feed(w, "dst", partial(w.dst.fail, ErrorCode.LIVE_FAILED, "QEMU"))
                return
            if self.live:
                w.dst_qemu = "paused"  # QEMU loaded the whole stream
            w.staging_durable = True
            w.dst_state = DestinationState.PREPARED
            assert w.dst is not None
            self.feed(w, "dst", w.dst.prepared)
        elif task == "journal-resumed":
            w.dst_state = DestinationState.RESUMED
        elif task == "resumed":
            if w.live("dst"):
                assert w.dst is not None
                self.feed(w, "dst", w.dst.resumed)
        elif task is D.JOURNAL_COMMIT:
            w.dst_state = DestinationState.COMMIT_RECEIVED
        elif task is D.MOVE_INTO_PLACE:
            if not w.in_place and w.staging_complete:
                w.in_place, w.staging, w.staging_durable = True, None, False
        elif task is D.RESUME:
            if not self.live:
                w.dst_running = w.dst_running or w.in_place
            elif w.in_place and w.dst_qemu is not None:
                w.dst_qemu, w.dst_running, w.dst_ran = "running", True, True
            elif w.in_place:
                # ``cont`` to a QEMU that is gone fails (RESUME_FAILED): no
                # RESUMED, no DONE; the journal stays where it was.
                rolling = ("journal-resumed", "resumed", D.JOURNAL_DONE)
                w.dst_tasks = [t for t in w.dst_tasks if t not in rolling]
                if w.live("dst"):
                    assert w.dst is not None
                    dst = w.dst
                    self.feed(w, "dst", lambda: dst.fail(ErrorCode.RESUME_FAILED, "gone"))
        elif task is D.JOURNAL_DONE:
            w.dst_state = DestinationState.DONE
        elif task is D.DISCARD_STAGING:
            if w.staging is not None and not w.in_place:
                w.dst_qemu = None  # removing staging ends its QEMU
            w.staging, w.staging_durable = None, False
        elif task is D.JOURNAL_ABORTED:
            w.dst_state = DestinationState.ABORTED
        elif task is D.JOURNAL_IN_DOUBT:
            w.dst_state = DestinationState.IN_DOUBT
        elif task is D.ASK_SOURCE:
            pass  # the pull is the explorer's "pull" step, enabled while in doubt
        elif task[0] == "finish":
            outcome, state = task[1], w.dst_state
            if outcome is fx.Outcome.DONE:
                w.dst_state = DestinationState.DONE
            elif outcome is fx.Outcome.IN_DOUBT and state is DestinationState.PREPARED:
                w.dst_state = DestinationState.IN_DOUBT
            elif state is DestinationState.LOST:
                pass  # a LOST arrival's outcome: nothing kept
            elif outcome is fx.Outcome.ABORTED and state is not None:
                if destination_decision(state) is Decision.COMMITTED:
                    self.anomalies.add("destination session ended ABORTED after COMMIT")
                else:
                    w.dst_state = DestinationState.ABORTED
            # RESUME_FAILED: the COMMIT stays journaled; recovery rolls it forward.
        else:
            raise AssertionError(task)

    # -- crash and restart

    def crash(self, w: World, side: str) -> None:
        """The daemon dies and restarts: session, connection, work and the
        in-memory RESOLVE are gone; journal, files and the VM stay."""
        if side == "src":
            if w.live("src"):
                w.to_dst.append(EOF)
            w.src, w.to_src, w.src_tasks, w.src_tell = None, [], [], None
            w.src_crashes -= 1
            w.src_tasks = list(source_restart(w.src_state, self.src_qemu_alive(w)).steps)
        else:
            if w.live("dst"):
                w.to_src.append(EOF)
            w.dst, w.to_dst, w.dst_tasks = None, [], []
            w.dst_crashes -= 1
            if w.dst_state is not None:
                if self.live:
                    action = destination_restart(
                        w.dst_state, w.in_place, w.staging_complete, self.dst_qemu_alive(w)
                    )
                else:
                    action = self.restart(w.dst_state, w.in_place, w.staging_complete)
                w.dst_tasks = list(action.steps)

    def src_qemu_alive(self, w: World) -> bool | None:
        return (w.src_qemu is not None) if self.live else None

    def dst_qemu_alive(self, w: World) -> bool | None:
        return (w.dst_qemu is not None) if self.live else None

    def lose_qemu(self, w: World, side: str) -> None:
        """A QEMU dies (SIGKILL, OOM): the guest state it held is gone."""
        w.qemu_faults -= 1
        if side == "src":
            # Paused after its stream, before PREPARED is journaled here: the
            # source cannot tell whether the destination loaded it all, so a
            # failure before then aborts (and the guest goes with this QEMU).
            before_prepared = w.src_state in (SourceState.STARTED, SourceState.STREAMING)
            # Or the source decided to keep the guest (aborted, reclaimed):
            # then this QEMU is the one that runs it, and it died.
            decided = w.src_state in (SourceState.ABORTED, SourceState.RECLAIMED) or any(
                t in (S.JOURNAL_ABORTED, S.MAKE_RESUMABLE) for t in w.src_tasks
            )
            w.crashed = w.crashed or w.src_qemu == "running" or before_prepared or decided
            w.src_qemu, w.src_running = None, False
        else:
            # After CONTINUING is journaled there, cont may have been sent.
            ran = w.dst_state in (
                DestinationState.CONTINUING,
                DestinationState.RESUMED,
                DestinationState.DONE,
            )
            w.crashed = w.crashed or w.dst_qemu == "running" or ran
            w.dst_qemu, w.dst_running, w.dst_qemu_lost_in = None, False, w.dst_state

    # -- the network

    def deliver(self, w: World, side: str, index: int) -> None:
        channel = w.to_dst if side == "dst" else w.to_src
        message = channel.pop(index)
        session = w.dst if side == "dst" else w.src
        if message == EOF:
            channel.clear()
            if session is not None and not session.finished:
                self.feed(w, side, session.connection_lost)
            return
        if session is None:
            if side == "dst" and isinstance(message, wire.Hello) and w.dst_state is None:
                # The listener takes a new connection: a fresh session.
                w.dst = session = destination_session.DestinationSession()
            else:
                return  # for a connection that died with its daemon
        self.feed(w, side, lambda: session.receive(message))  # type: ignore[union-attr]

    # -- settling between the hosts

    def reply(self, w: World) -> Decision | None:
        """The destination's answer to RESOLVE: its durable decision.  A
        migration it never admitted has nothing to settle there."""
        if w.dst_state is None:
            return Decision.ABORTED
        return destination_decision(w.dst_state)

    def dst_idle(self, w: World) -> bool:
        """The destination takes RESOLVE only for a migration with no live
        session or pending work (it answers "busy" otherwise)."""
        return not w.live("dst") and not w.dst_tasks

    # -- every step from a state

    def steps(self, w: World) -> Iterator[tuple[str, bool, Callable[[World], None]]]:
        """(label, is_fault, apply) for every step possible from ``w``."""
        for side, channel in (("dst", w.to_dst), ("src", w.to_src)):
            for i, m in enumerate(channel):
                name = type(m).__name__ if m != EOF else EOF
                if i == 0:
                    yield f"deliver {name} to {side}", False, _bind(self.deliver, side, 0)
                elif w.faults:
                    yield f"deliver {name} to {side} early", True, _faulty(self.deliver, side, i)
                if w.faults:
                    yield f"lose {name} to {side}", True, _faulty(_lose, side, i)
                    if m != EOF:
                        yield f"duplicate {name} to {side}", True, _faulty(_duplicate, side, i)
        if w.src_tasks:
            yield f"src does {_label(w.src_tasks[0])}", False, self.src_task
        if w.dst_tasks:
            yield f"dst does {_label(w.dst_tasks[0])}", False, self.dst_task
        if w.src_tell is not None and self.dst_idle(w):
            # RESOLVE: the destination carries out what it says, then answers.
            steps = (
                w.dst_state is not None
                and resolve(w.dst_state, w.src_tell, self.dst_qemu_alive(w)).steps
            )
            lost = w.dst_state is DestinationState.LOST
            if w.crashed and not steps and self.reply(w) is None and not lost:
                pass  # the guest crashed with a QEMU: an operator looks
            elif steps:
                yield f"RESOLVE {w.src_tell.value} to dst", False, self._push
            else:
                yield f"src hears {_value(self.reply(w))}", False, self._acknowledge
        if self.pull and w.dst_state is DestinationState.IN_DOUBT and self.dst_idle(w):
            decision = answer(w.src_state)
            if decision is not None:
                yield f"dst pulls {decision.value}", False, _bind(self._apply_resolve, decision)
        # The idle timer: when nothing else can happen, or early (a fault:
        # a slow disk or peer).
        quiet = not (w.to_dst or w.to_src or w.src_tasks or w.dst_tasks)
        for side in ("src", "dst"):
            if w.live(side) and quiet:
                yield f"{side} times out", False, _bind(self._timeout, side)
            elif w.live(side) and w.faults:
                yield f"{side} times out early", True, _faulty(self._timeout, side)
        if self.live and w.qemu_faults:
            for side, qemu in (("src", w.src_qemu), ("dst", w.dst_qemu)):
                if qemu is not None:
                    yield f"{side} QEMU lost ({qemu})", True, _bind(self.lose_qemu, side)
        if w.src_crashes:
            yield "src crashes", True, _bind(self.crash, "src")
        if w.dst_crashes:
            yield "dst crashes", True, _bind(self.crash, "dst")

    def _acknowledge(self, w: World) -> None:
        reply = self.reply(w)
        lost = w.dst_state is DestinationState.LOST
        if reply is None and not (lost or w.crashed):
            # The rules never leave a RESOLVE unadoptable.
            self.anomalies.add(f"RESOLVE not adopted in {w.dst_state}")
        action = acknowledged(w.src_state, reply, lost)
        w.src_tell = None
        w.src_tasks += action.steps

    def _push(self, w: World) -> None:
        assert w.src_tell is not None
        self._apply_resolve(w, w.src_tell)

    def _apply_resolve(self, w: World, decision: Decision) -> None:
        assert w.dst_state is not None
        w.dst_tasks += resolve(w.dst_state, decision, self.dst_qemu_alive(w)).steps

    def _timeout(self, w: World, side: str) -> None:
        session = w.src if side == "src" else w.dst
        assert session is not None
        self.feed(w, side, lambda: session.fail(ErrorCode.TIMEOUT, "idle"))


def _bind(f: Callable[..., None], *args: Any) -> Callable[[World], None]:
    return lambda w: f(w, *args)


def _faulty(f: Callable[..., None], *args: Any) -> Callable[[World], None]:
    def apply(w: World) -> None:
        w.faults -= 1
        f(w, *args)

    return apply


def _lose(w: World, side: str, index: int) -> None:
    (w.to_dst if side == "dst" else w.to_src).pop(index)


def _duplicate(w: World, side: str, index: int) -> None:
    channel = w.to_dst if side == "dst" else w.to_src
    channel.append(channel[index])


def _value(decision: Decision | None) -> str:
    return "not yet" if decision is None else decision.value


def _label(task: Any) -> str:
    if isinstance(task, tuple):
        return f"{task[0]} {task[1].value}"
    return task.value if isinstance(task, S | D) else str(task)


# --------------------------------------------------------------------------
# The invariants


def violations(w: World, live: bool = False) -> Iterator[str]:
    """What is wrong in this state, whatever happens next."""
    if w.src_copy and not w.src_locked and w.in_place:
        yield "VM may run twice: usable at the source and in place at the destination"
    if w.src_running and w.dst_running:
        yield "VM runs twice"
    if w.dst_ran and w.src_went_on:
        yield "VM ran on both hosts from the same switchover"
    if live:
        if not w.crashed and w.src_qemu is None and w.dst_qemu is None:
            yield "VM lost: no QEMU holds the guest"
    elif not (w.src_copy or w.in_place or w.staging_complete):
        yield "VM lost: no complete copy on either side"
    ours, theirs = source_decision(w.src_state), w.dst_state and destination_decision(w.dst_state)
    if ours is not None and theirs is not None and ours is not theirs:
        yield f"decisions conflict: source {ours.value}, destination {theirs.value}"


def changed(before: World, after: World) -> Iterator[str]:
    """A journaled decision that a step changed."""
    if after.dst_state is DestinationState.LOST:
        # LOST is no decision but a fact (the guest never ran there) that
        # either decision accepts, even after a journaled COMMIT.
        after = dataclasses.replace(after, dst_state=before.dst_state)
    for name, a, b in (
        ("source", source_decision(before.src_state), source_decision(after.src_state)),
        (
            "destination",
            before.dst_state and destination_decision(before.dst_state),
            after.dst_state and destination_decision(after.dst_state),
        ),
    ):
        if a is not None and a is not b:
            yield f"{name} decision changed from {a.value} to {b and b.value}"


def unsettled(w: World) -> Iterator[str]:
    """Why a state where only faults could happen is not settled."""
    if w.live("src") or w.live("dst"):
        yield "a session is still running"
    if w.crashed:
        return  # the guest crashed with its QEMU: an operator looks
    if w.src_state not in (SourceState.DONE, SourceState.ABORTED, SourceState.RECLAIMED):
        yield f"source ended in {w.src_state.value}"
    if w.dst_state not in (
        None,
        DestinationState.DONE,
        DestinationState.ABORTED,
        DestinationState.LOST,
    ):
        yield f"destination ended in {w.dst_state and w.dst_state.value}"
    if w.staging is not None:
        yield "staging left on the destination"
    if w.src_state is SourceState.DONE:
        if not (w.dst_state is DestinationState.DONE and w.in_place and w.dst_running):
            yield "source done, but the VM does not run at the destination"
        if w.src_copy:
            yield "source done, but its copy is left"
    elif w.src_state in (SourceState.ABORTED, SourceState.RECLAIMED):
        if not (w.src_copy and w.src_running and not w.src_locked):
            yield f"source {w.src_state.value}, but the VM does not run there"
        if w.in_place or w.dst_state is DestinationState.DONE:
            yield f"source {w.src_state.value}, but the VM is at the destination"


@dataclass
class Result:
    """What one exploration found."""

    states: int
    #: violation -> the steps that reach it (the first found, the shortest).
    found: dict[str, tuple[str, ...]]
    anomalies: set[str]
    #: The steps to the first state that met the exploration's ``goal``.
    goal: tuple[str, ...] | None = None


def explore(
    crashes: int,
    faults: int,
    model: Model | None = None,
    qemu_faults: int = 0,
    goal: Callable[[World], bool] | None = None,
) -> Result:
    """Every state reachable with at most ``crashes`` per side and ``faults``
    network faults, breadth first.

    Besides the invariants of every state, two checks make "every run where
    messages eventually arrive ends settled": a state where only faults can
    happen must be settled, and from every state the steps that are not
    faults must still lead to such a state (no run can go round for ever).
    ``goal``: a state a test wants reached (the path to it is returned)."""
    model = model or Model()
    w = World(
        source_session.SourceSession(HELLO), src_crashes=crashes, dst_crashes=crashes, faults=faults
    )
    if model.live:
        # The guest runs at the source while QEMU's pre-copy runs.
        w.src_qemu, w.src_running, w.qemu_faults = "running", True, qemu_faults
    model.src_effects(w, w.src.start())  # type: ignore[union-attr]
    ids = {w.key(): 0}
    parent: list[tuple[int, str]] = [(-1, "start")]
    came_from: list[list[int]] = [[]]  # reverse edges of the steps that are not faults
    settled: list[int] = []
    queue: deque[tuple[World, int]] = deque([(w, 0)])
    found: dict[str, tuple[str, ...]] = {}
    reached: tuple[str, ...] | None = None

    def path(i: int, *last: str) -> tuple[str, ...]:
        labels = list(last)
        while i > 0:
            i, label = parent[i]
            labels.insert(0, label)
        return tuple(labels)

    crashed: set[int] = set()  # the guest crashed with a QEMU: an operator settles
    while queue:
        w, me = queue.popleft()
        if w.crashed:
            crashed.add(me)
        progress = False
        for label, is_fault, apply in model.steps(w):
            progress = progress or not is_fault
            after = w.clone()
            apply(after)
            wrong = [*violations(after, model.live), *changed(w, after)]
            for v in wrong:
                if v not in found:
                    found[v] = path(me, label)
            if wrong:
                continue  # a violating state is reported, not explored further
            key = after.key()
            if key not in ids:
                ids[key] = len(parent)
                parent.append((me, label))
                came_from.append([])
                queue.append((after, ids[key]))
            if not is_fault:
                came_from[ids[key]].append(me)
            if goal is not None and reached is None and goal(after):
                reached = path(me, label)
        if not progress:
            settled.append(me)
            for why in unsettled(w):
                found.setdefault(f"unsettled: {why}", path(me))
    # Which states can still settle without another fault?
    can_settle = set(settled)
    todo = list(settled)
    while todo:
        for before in came_from[todo.pop()]:
            if before not in can_settle:
                can_settle.add(before)
                todo.append(before)
    stuck = [i for i in range(len(parent)) if i not in can_settle and i not in crashed]
    if stuck:
        found["cannot settle without a fault"] = path(stuck[0])
    return Result(len(parent), found, model.anomalies, reached)


def bound() -> tuple[int, int]:
    """(crashes per side, network faults): ``SECUREMIG_EXPLORE_BOUND`` is
    ``N`` (both N) or ``C,F``; ``make test`` uses 2 crashes, 1 fault."""
    text = os.environ.get("SECUREMIG_EXPLORE_BOUND", "2,1")
    crashes, _, faults = text.partition(",")
    return int(crashes), int(faults or crashes)


class ExplorerTests(SynchronousTestCase):
    """The recovery rules hold in every interleaving up to the bound."""

    def test_no_violation(self) -> None:
        """No invariant is violated with the bound's crashes and faults."""
        crashes, faults = bound()
        result = explore(crashes, faults)
        self.assertEqual(result.found, {})
        self.assertEqual(result.anomalies, set())
        self.assertGreater(result.states, 1000)

    def test_no_violation_with_pull(self) -> None:
        """The rules also hold where a destination in doubt may ask (pull)."""
        result = explore(1, 1, model=Model(pull=True))
        self.assertEqual((result.found, result.anomalies), ({}, set()))

    def test_live_no_violation(self) -> None:
        """Live mode (the guest only in QEMU processes), with one QEMU lost
        (either side's, at any step) on top of the bound: the guest never
        runs on both hosts from one switchover, and is lost only with a QEMU
        that ran it (or, at the destination, may have: after its COMMIT was
        journaled, the last durable step before ``cont``)."""
        crashes, faults = bound()
        if "SECUREMIG_EXPLORE_BOUND" not in os.environ:
            crashes = 1  # 48,727 states in about 12 s on a quiet machine
        result = explore(crashes, faults, model=Model(live=True), qemu_faults=1)
        self.assertEqual(result.found, {})
        self.assertEqual(result.anomalies, set())
        self.assertGreater(result.states, 1000)

    def test_live_destination_qemu_lost_after_commit_reclaimed(self) -> None:
        """The window issue 22 left open: the destination's QEMU dies after
        its COMMIT was journaled, before CONTINUING (so before ``cont``): the
        destination journals LOST (the VM it moved into place goes) and the
        source continues its paused QEMU; settled, no crash counted."""

        def reclaimed_after_commit(w: World) -> bool:
            return (
                w.dst_qemu_lost_in is DestinationState.COMMIT_RECEIVED
                and w.src_state is SourceState.RECLAIMED
                and w.dst_state is DestinationState.LOST
                and w.src_running
                and not w.crashed
                and not w.in_place
                and not (w.src_tasks or w.dst_tasks or w.live("src") or w.live("dst"))
            )

        result = explore(0, 0, model=Model(live=True), qemu_faults=1, goal=reclaimed_after_commit)
        self.assertEqual((result.found, result.anomalies), ({}, set()))
        assert result.goal is not None
        committed = result.goal.index("dst does journal the COMMIT")
        lost = result.goal.index("dst QEMU lost (paused)")
        self.assertGreater(lost, committed, result.goal)

    def test_live_vtpm_mismatch_reclaimed(self) -> None:
        """The EK check off the switchover path (beside PREPARED and the
        source's commit, gating ``cont``): a vTPM other than the one
        announced, with a crash per side and a network fault on top, never
        runs at the destination, violates nothing (never lost: no crash of
        the guest counted), and settles with the guest continued at the
        source (RECLAIMED) after the source had committed."""

        def ran_there(w: World) -> bool:
            return w.dst_ran

        def reclaimed(w: World) -> bool:
            return (
                w.src_state is SourceState.RECLAIMED
                and w.dst_state is DestinationState.LOST
                and w.src_running
                and not w.crashed
                and not (w.src_tasks or w.dst_tasks or w.live("src") or w.live("dst"))
            )

        model = partial(Model, live=True, vtpm_mismatch=True)
        result = explore(1, 1, model=model(), goal=ran_there)
        self.assertEqual((result.found, result.anomalies), ({}, set()))
        self.assertIsNone(result.goal)
        self.assertGreater(result.states, 1000)
        result = explore(0, 0, model=model(), goal=reclaimed)
        assert result.goal is not None
        self.assertLess(
            result.goal.index("src does journal-prepared-committed"),
            result.goal.index("dst does journal the COMMIT"),
            result.goal,
        )

    def test_live_happy_path_settles(self) -> None:
        """Live mode without crashes or faults commits and settles."""
        result = explore(crashes=0, faults=0, model=Model(live=True))
        self.assertEqual((result.found, result.anomalies), ({}, set()))

    def test_happy_path_settles(self) -> None:
        """Without crashes or faults the migration commits and settles."""
        result = explore(crashes=0, faults=0)
        self.assertEqual((result.found, result.anomalies), ({}, set()))


class ControlTests(SynchronousTestCase):
    """The explorer finds the violations of issue 11 when they are there."""

    def test_old_destination_restart_loses_the_vm(self) -> None:
        """A restart that discards a journaled COMMIT loses the VM."""
        result = explore(crashes=1, faults=0, model=Model(restart=old_destination_restart))
        path = result.found.get("VM lost: no complete copy on either side")
        self.assertIsNotNone(path)
        assert path is not None
        # It is a crash between the COMMIT's journal write and the move.
        committed = path.index("dst does journal the COMMIT")
        self.assertEqual(path[committed + 1 :].count("dst crashes"), 1)

    def test_live_source_ending_its_qemu_at_commit_loses_the_guest(self) -> None:
        """Issue 22: a source that ends its paused QEMU at COMMITTED (before
        the destination's guest ran) loses the guest when the destination's
        QEMU dies after PREPARED."""
        result = explore(0, 0, model=Model(live=True, keep_paused=False), qemu_faults=1)
        path = result.found.get("VM lost: no QEMU holds the guest")
        self.assertIsNotNone(path)
        assert path is not None
        self.assertIn("dst QEMU lost (paused)", path)

    def test_live_cont_without_continuing_runs_twice(self) -> None:
        """Without CONTINUING journaled before ``cont``, a destination whose
        QEMU ended after the COMMIT cannot tell a guest that never ran there
        from one that did: LOST then lets the source continue a guest that
        ran at the destination (a crash of its daemon after ``cont``,
        before RESUMED is journaled)."""
        model = Model(live=True, journal_continuing=False)
        result = explore(1, 0, model=model, qemu_faults=1)
        path = result.found.get("VM ran on both hosts from the same switchover")
        self.assertIsNotNone(path)
        assert path is not None
        self.assertIn("dst QEMU lost (running)", path)

    def test_destroy_before_committed_loses_the_vm(self) -> None:
        """A source destroying its copy before COMMITTED is durable loses the VM."""
        result = explore(crashes=1, faults=0, model=Model(commit=COMMIT_DESTROY_FIRST))
        self.assertIn("VM lost: no complete copy on either side", result.found)

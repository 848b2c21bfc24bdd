"""
The source's recovery: finish what this host's unfinished departures
journaled, and say which decisions the destinations must still hear.

The source coordinates the commit, so its journal decides (``doc/protocol.rst``,
"Journal states and recovery").  For each departure the journal still has
work for:

- COMMITTED is durable: the VM is the destination's.  The vTPM key and the
  bundle are destroyed here (again, if a crash came in between, or if the
  hypervisor was down when the commit tried: a migration done but not
  ``released``), and the destination is owed RESOLVE(committed) until it
  confirms.
- COMMITTED never happened, and no process holds the VM's lock any more (the
  ``securemig migrate`` that drove it is gone): the migration is aborted and
  the VM made resumable here; a VM that ran before it is resumed from its
  saved state (a QEMU guest from its RAM image, never cold-booted).  The
  destination is owed RESOLVE(aborted) so it discards any staging it holds.

- COMMITTED never happened, the migration went live through the
  hypervisor's own (libvirt), and its guest is gone here before PREPARED
  arrived: only the destination can say whether it holds the whole guest
  (:class:`Ask`); until it answers nothing is decided.

Nothing is guessed: a record whose VM is still locked belongs to a migration
in progress and is left alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from twisted.logger import Logger

from securemig import crashpoint, files
from securemig.crashpoint import CrashPoint
from securemig.host import storage
from securemig.host.departure import release
from securemig.host.journal import Journal, MigrationRecord, driven_now
from securemig.hypervisor.backends import backend_for, capabilities
from securemig.hypervisor.bundle import LOCK, Bundle, disk_owner, disk_owner_path
from securemig.protocol import wire
from securemig.protocol.effects import Outcome
from securemig.protocol.errors import MigrationError
from securemig.protocol.phases import Phase
from securemig.protocol.recovery import (
    DestinationHolds,
    SourceGuest,
    asks_destination,
    carried_decision,
    holds,
)
from securemig.trust.vtpm import key_reader

log = Logger()


@dataclass(frozen=True)
class Owed:
    """A decision a destination has not confirmed yet."""

    record: MigrationRecord
    decision: wire.Decision

    @property
    def migration_id(self) -> bytes:
        """The destination's id of the migration."""
        assert self.record.migration_id is not None
        return bytes.fromhex(self.record.migration_id)


#: A failed release (its hypervisor down) is tried again after this many
#: seconds, twice as long after each failure, at most the last.
RELEASE_FIRST_RETRY, RELEASE_LAST_RETRY = 1.0, 60.0


@dataclass
class Backoff:
    """When each committed departure whose copy here could not be removed
    (``release`` failed: a libvirt domain whose libvirtd is down) may be
    tried again: after :data:`RELEASE_FIRST_RETRY` seconds, twice as long
    after each further failure, at most :data:`RELEASE_LAST_RETRY`;
    forgotten once it succeeds.  The daemon keeps one across its rounds
    (``--resolve-interval``), so a host whose libvirtd stays down is not
    asked -- and its failure logged -- every round.  ``clock``: seconds."""

    clock: Callable[[], float] = time.monotonic
    #: record id -> (when it is due, the delay after its next failure)
    due_at: dict[str, tuple[float, float]] = field(default_factory=dict)

    def due(self, key: str) -> bool:
        """Whether ``key`` may be tried now."""
        return self.due_at.get(key, (0.0, 0.0))[0] <= self.clock()

    def failed(self, key: str) -> float:
        """``key`` failed now: the seconds until it is due again."""
        _, delay = self.due_at.get(key, (0.0, RELEASE_FIRST_RETRY))
        self.due_at[key] = (self.clock() + delay, min(delay * 2, RELEASE_LAST_RETRY))
        return delay

    def succeeded(self, key: str) -> None:
        """``key`` is done: forgotten."""
        self.due_at.pop(key, None)


@dataclass(frozen=True)
class Ask:
    """A carried live departure whose source cannot decide alone
    (``protocol.recovery.asks_destination``): the destination is asked
    what it holds (ASK), and :func:`decide_asked` decides on its answer."""

    record: MigrationRecord

    @property
    def migration_id(self) -> bytes:
        """The destination's id of the migration."""
        assert self.record.migration_id is not None
        return bytes.fromhex(self.record.migration_id)


async def settle_departures(
    journal: Journal,
    unseal: Callable[[bytes], bytes] | None = None,
    defer: bool = False,
    backoff: Backoff | None = None,
) -> tuple[list[str], list[Owed | Ask]]:
    """Settle this host's unfinished departures.  ``unseal`` opens a vTPM key
    sealed to this host's TPM (to resume a VM with a vTPM from its saved
    state; continuing a QEMU that still runs, paused, needs no key).

    Without ``unseal`` a VM that needs its key to run again is left
    suspended: with ``defer`` (a command run without the host's TPM, e.g.
    ``securemig status``) its record is left unsettled for this host's
    daemon or ``securemig vm start --identity``; without it (a daemon with
    no TPM identity) the migration is aborted and the operator told how to
    resume it.  Never is a guest left paused by settling.  ``backoff``: when
    a committed departure's failed release is tried again (without: every
    call).

    Returns what was done (sentences for the log and the operator) and the
    decisions still owed to destinations, and the questions (:class:`Ask`)
    to put to them.
    """
    done: list[str] = []
    owed: list[Owed | Ask] = []
    for record in journal.departures():
        if record.outcome in (None, Outcome.DONE.value) and driven_now(record):
            # Its `securemig migrate` still runs, or this process drives it
            # now (done: it may be removing the copy here right now): not
            # ours to settle.  One this process drove and has ended (the
            # daemon's migrate --daemon) is.
            continue
        if record.reached(Phase.RECLAIMED):
            done += await reclaim(journal, record)
            continue
        if not record.reached(Phase.COMMITTED) and _carried_open(record):
            # Live through the hypervisor's own migration, not decided:
            # decided from where its hypervisor says the guest is
            # (protocol.recovery.carried_decision), or not at all.
            said, ask = await _decide_carried(journal, record)
            done += said
            record = journal.get(record.id) or record
            if not record.reached(Phase.COMMITTED) and record.outcome in (None, "in-doubt"):
                if ask and record.migration_id is not None:
                    owed.append(Ask(record))
                continue  # asked again next round: nothing decided, nothing owed
        if record.reached(Phase.COMMITTED):
            done += await _finish_commit(journal, record, backoff)
            decision = wire.Decision.COMMITTED
        else:
            did = await _abort(journal, record, unseal, defer)
            if did is None:
                continue  # a migration in progress, or left for the daemon
            done += did
            decision = wire.Decision.ABORTED
        if record.migration_id is not None and not record.peer_settled:
            owed.append(Owed(record, decision))
    return done, owed


async def live_qemu(record: MigrationRecord) -> bool | None:
    """A live departure: whether its QEMU (the guest, running or paused)
    still runs here (asked off the reactor thread); None for one that is
    not live or has no bundle."""
    if not record.reached(Phase.LIVE) or not record.bundle or not Path(record.bundle).exists():
        return None
    bundle = Bundle.load(Path(record.bundle))
    backend = backend_for(bundle.manifest.backend)
    return await backend.process_alive(bundle)


def _carried_open(record: MigrationRecord) -> bool:
    """A live departure through the hypervisor's own migration (carried)
    with no decision journaled: no outcome, or in doubt without COMMITTED
    (its hypervisor could not be asked)."""
    if record.outcome not in (None, Outcome.IN_DOUBT.value) or not record.reached(Phase.LIVE):
        return False
    if not record.bundle or not Path(record.bundle).exists():
        return False
    return capabilities(Bundle.load(Path(record.bundle)).manifest.backend).carried


async def _decide_carried(
    journal: Journal,
    record: MigrationRecord,
    there: DestinationHolds = DestinationHolds.UNKNOWN,
) -> tuple[list[str], bool]:
    """Decide a carried live departure (``protocol.recovery.carried_decision``):
    commit when the guest is not here and its hypervisor moved it or the
    destination said PREPARED -- or, gone here before PREPARED arrived,
    the destination says it holds the whole guest (``there``, its answer to
    ASK); abort when it demonstrably runs here -- continued first (a paused
    QEMU resumed), asked again, and only then journaled aborted -- or is
    gone here and the destination holds nothing; nothing while the
    hypervisor, or the destination, cannot be asked.  Under the VM's lock
    (a command or migration holding it: next round).  Returns what was
    done, and whether the destination must be asked (ASK)."""
    assert record.bundle is not None
    bundle_dir = Path(record.bundle)
    try:
        lock = storage.VMLock(bundle_dir / LOCK)
    except storage.LockBusy:
        return [], False
    try:
        bundle = Bundle.load(bundle_dir)
        backend = backend_for(bundle.manifest.backend)
        prepared = record.reached(Phase.PREPARED)
        if record.migration_id is None:
            # No WELCOME ever came: no destination admitted it, so none
            # holds anything of it, and there is nobody to ask.
            there = DestinationHolds.NOTHING
        guest = await backend.guest_here(bundle)
        decision = carried_decision(guest, prepared, there)
        if decision is wire.Decision.ABORTED and guest is SourceGuest.RUNS:
            # Continued before the abort is journaled: a guest libvirt was
            # about to end (a libvirtd restarted at completion) is not
            # taken for one that runs on.
            try:
                await backend.resume(bundle)
            except Exception as e:
                log.warn("VM {vm}: could not continue it here: {e}", vm=record.vm, e=e)
            guest = await backend.guest_here(bundle)
            decision = carried_decision(guest, prepared, there)
        if decision is None and asks_destination(guest, prepared):
            if record.outcome is None:
                journal.finish(
                    record.id,
                    Outcome.IN_DOUBT.value,
                    error="LIVE_FAILED: the guest is gone here and PREPARED never arrived: "
                    "the destination is asked what it holds",
                )
            return [
                f"VM {record.vm}: the guest is gone here and PREPARED never arrived: "
                f"asking {record.peer} what it holds"
            ], True
        if decision is None:
            if record.outcome is None:
                journal.finish(
                    record.id,
                    Outcome.IN_DOUBT.value,
                    error="LIVE_FAILED: the hypervisor here cannot be asked where the guest is",
                )
            return [
                f"VM {record.vm}: its hypervisor here cannot be asked where the guest is: "
                "in doubt, asked again"
            ], False
        if decision is wire.Decision.COMMITTED:
            journal.phase(record.id, Phase.COMMITTED)
            holder = "holds it" if prepared or guest is not SourceGuest.GONE else "says it holds it"
            return [
                f"VM {record.vm}: the guest is not here ({guest.value}) and {record.peer} "
                f"{holder}: committed"
            ], False
        journal.finish(
            record.id,
            Outcome.ABORTED.value,
            error=f"LIVE_FAILED: the migration never committed; the guest is {guest.value} here",
        )
        crashpoint.reached(CrashPoint.SOURCE_SETTLE_ABORTED)
        if guest is SourceGuest.RUNS:
            return [
                f"VM {record.vm}: migration to {record.peer} never committed: it runs here"
            ], False
        return [
            f"VM {record.vm}: migration to {record.peer} never committed: aborted",
            await _resume(bundle, None),
        ], False
    finally:
        lock.release()


async def decide_asked(journal: Journal, ask: Ask, answer: wire.Resolved) -> list[str]:
    """Decide a carried departure the destination was asked about (ASK) on
    its answer (``protocol.recovery.holds``): the hypervisor is asked
    again first (the guest may have changed), then the rule decides --
    commit if the destination holds the whole guest, abort if nothing;
    an answer that says neither decides nothing (asked again).  Returns
    what was done."""
    record = journal.get(ask.record.id) or ask.record
    if record.reached(Phase.COMMITTED) or not _carried_open(record):
        return []  # decided meanwhile (another round, a command)
    said, _ = await _decide_carried(journal, record, holds(answer.settled))
    return said


def _carried(record: MigrationRecord) -> bool:
    """A live departure through the hypervisor's own migration whose bundle
    is still here (committed: its definition, vTPM state and sealed secret
    are kept until the destination's DONE)."""
    if not record.reached(Phase.LIVE) or not record.bundle or not Path(record.bundle).exists():
        return False
    return capabilities(Bundle.load(Path(record.bundle)).manifest.backend).carried


async def _finish_commit(
    journal: Journal, record: MigrationRecord, backoff: Backoff | None = None
) -> list[str]:
    said = []
    done = record.outcome == Outcome.DONE.value  # the guest runs there: nothing kept here
    if (
        not done
        and (_carried(record) or await live_qemu(record))
        and not record.reached(Phase.RELEASED)
    ):
        # Kept paused until the destination says its guest runs (DONE), or
        # that its QEMU ended before it ran there (LOST): then it goes on here.
        if record.outcome is None:
            journal.finish(
                record.id,
                Outcome.IN_DOUBT.value,
                error="CONNECTION_LOST: source restarted after COMMITTED, before DONE",
            )
        return [
            f"VM {record.vm}: committed to {record.peer}; its paused QEMU is kept here "
            "until the destination confirms"
        ]
    if not record.reached(Phase.RELEASED) and record.bundle and Path(record.bundle).exists():
        # Also a departure journaled done whose copy here could not be
        # removed then (``release`` does not journal ``released`` while, say,
        # its libvirtd is down): removed now, under the VM's lock.
        bundle_dir = Path(record.bundle)
        if backoff is not None and not backoff.due(record.id):
            return []  # it failed a moment ago: tried again once due
        try:
            lock = storage.VMLock(bundle_dir / LOCK)
        except storage.LockBusy:
            return [f"VM {record.vm} was committed to {record.peer}: its lock is busy, next round"]
        try:
            gone = await release(journal, record.id, Bundle.load(bundle_dir))
        finally:
            lock.release()
        if not gone:
            # Its hypervisor is still down: asked again, backing off.
            later = "next round" if backoff is None else f"in {backoff.failed(record.id):g} s"
            return [
                f"VM {record.vm} was committed to {record.peer}: its copy here not yet "
                f"removed; tried again {later}"
            ]
        if backoff is not None:
            backoff.succeeded(record.id)
        crashpoint.reached(CrashPoint.SOURCE_SETTLE_RELEASED)
        said.append(f"VM {record.vm} was committed to {record.peer}: its copy here removed")
    elif not record.reached(Phase.RELEASED):
        journal.phase(record.id, Phase.RELEASED)
    elif record.bundle:
        # Released by a process killed before its remover started
        # (files.removals_deferred): the copy set aside goes now.
        files.sweep_discarded(Path(record.bundle).parent)
    if record.outcome is None:
        journal.finish(
            record.id,
            Outcome.IN_DOUBT.value,
            error="CONNECTION_LOST: source restarted after COMMITTED, before DONE",
        )
        said.append(f"VM {record.vm}: committed to {record.peer}, confirmation pending")
    return said


async def _abort(
    journal: Journal,
    record: MigrationRecord,
    unseal: Callable[[bytes], bytes] | None,
    defer: bool = False,
) -> list[str] | None:
    if record.outcome is not None:
        # Aborted already; the destination's confirmation is owed, and the
        # guest may not run yet: a live guest's QEMU waiting paused here, or
        # a suspended one still saved (a crash came between the journal
        # write and its resume).  The rule is to make it run again.
        return await _continue_aborted(record, unseal, defer)
    bundle_dir = Path(record.bundle) if record.bundle else None
    lock = None
    if bundle_dir is not None and bundle_dir.exists():
        try:
            lock = storage.VMLock(bundle_dir / LOCK)
        except storage.LockBusy:
            return None
    try:
        ran = (
            bundle_dir is not None
            and bundle_dir.exists()
            and (record.reached(Phase.SUSPENDED) or record.reached(Phase.LIVE))
        )
        bundle = Bundle.load(bundle_dir) if ran and bundle_dir is not None else None
        if bundle is not None and defer and await _needs_key(bundle, unseal):
            # Aborting here would leave it stopped, and the daemon skips an
            # aborted record: leave it unsettled for one that has the key.
            return None
        journal.finish(
            record.id,
            Outcome.ABORTED.value,
            error="CONNECTION_LOST: source restarted before COMMITTED",
        )
        said = [f"VM {record.vm}: migration to {record.peer} never committed: aborted"]
        crashpoint.reached(CrashPoint.SOURCE_SETTLE_ABORTED)
        if bundle is not None:
            said.append(await _resume(bundle, unseal))
        return said
    finally:
        if lock is not None:
            lock.release()


async def _continue_aborted(
    record: MigrationRecord,
    unseal: Callable[[bytes], bytes] | None = None,
    defer: bool = False,
) -> list[str]:
    """An aborted departure whose guest does not run again yet, the process
    that settled it having died before its resume: a live one's QEMU still
    waiting paused here (the stream completed, or was cut), or a VM that
    ran and was suspended for the migration and is still saved in its
    bundle.  Run it again, under the VM's lock; nothing for any other."""
    bundle_dir = Path(record.bundle) if record.bundle else None
    if bundle_dir is None or not bundle_dir.exists():
        return []
    if await live_qemu(record):
        bundle = Bundle.load(bundle_dir)
        backend = backend_for(bundle.manifest.backend)
        if await backend.ask(backend.status, bundle) != "paused":
            return []
        key: Callable[[bytes], bytes] | None = None
    elif not record.reached(Phase.LIVE) and record.reached(Phase.SUSPENDED):
        bundle = Bundle.load(bundle_dir)
        if bundle.manifest.state != "suspended":
            return []  # resumed already (by the migration's rollback, or here)
        if defer and await _needs_key(bundle, unseal):
            return []  # left for this host's daemon, which has the key
        key = unseal
    else:
        return []
    try:
        lock = storage.VMLock(bundle_dir / LOCK)
    except storage.LockBusy:
        return []  # a migration or a command has it: asked again next round
    try:
        return [await _resume(bundle, key)]
    finally:
        lock.release()


async def _needs_key(bundle: Bundle, unseal: Callable[[bytes], bytes] | None) -> bool:
    """Whether running ``bundle`` again here needs its vTPM key, which
    ``unseal`` cannot give: it has a vTPM and no process of it is left to
    continue (a QEMU paused after a live stream is continued without it)."""
    if not bundle.manifest.vtpm or unseal is not None:
        return False
    backend = backend_for(bundle.manifest.backend)
    return not await backend.ask(backend.has_process, bundle)


async def _resume(bundle: Bundle, unseal: Callable[[bytes], bytes] | None) -> str:
    """Run a VM again from its saved state, as it ran before the migration
    (a QEMU that still runs, paused after a live stream, is continued)."""
    if await _needs_key(bundle, unseal):
        return (
            f"VM {bundle.name} has a vTPM: resume it with "
            "`securemig vm start --identity DIR` (from its saved state)"
        )
    key = None if unseal is None else key_reader(unseal)
    backend = backend_for(bundle.manifest.backend, vtpm_key=key)
    # A guest that runs may be paused after a live stream (or still sending
    # it): a backend whose resume continues it (and cancels the stream) is
    # always asked.
    try:
        if (
            await backend.ask(backend.status, bundle) == "running"
            and not capabilities(bundle.manifest.backend).resume_continues
        ):
            return f"VM {bundle.name} runs here"
        await backend.resume(bundle)
    except (MigrationError, OSError) as e:
        log.error("could not resume VM {vm}: {e}", vm=bundle.name, e=e)
        return f"VM {bundle.name} could not be resumed here: {e}"
    return f"VM {bundle.name} resumed here from its saved state"


async def acknowledge(journal: Journal, owed: Owed, answer: wire.Resolved) -> bool:
    """Carry out the destination's answer to a RESOLVE (``protocol.recovery.
    acknowledged``); True if nothing more is owed to it.

    DONE to a commit: the VM runs there; a live departure's paused QEMU,
    its key and bundle go (again, if a crash came in between), then done is
    journaled.  LOST to a commit: the destination's QEMU ended before the
    guest ran there, journaled there; the guest is continued here."""
    record = owed.record
    committed = owed.decision is wire.Decision.COMMITTED
    if answer.settled is wire.Settled.LOST:
        journal.set_peer_settled(record.id)
        if committed:
            journal.phase(record.id, Phase.RECLAIMED)
            crashpoint.reached(CrashPoint.SOURCE_SETTLE_RECLAIMED)
            fresh = journal.get(record.id)
            await reclaim(journal, fresh if fresh is not None else record)
        return True
    if answer.settled in (wire.Settled.DONE, wire.Settled.ABORTED):
        if committed and answer.settled is wire.Settled.DONE:
            if (
                not record.reached(Phase.RELEASED)
                and record.bundle
                and Path(record.bundle).exists()
            ):
                await release(journal, record.id, Bundle.load(Path(record.bundle)))
                crashpoint.reached(CrashPoint.SOURCE_SETTLE_RELEASED)
            journal.set_peer_settled(record.id)
            journal.finish(record.id, "done")
        else:
            journal.set_peer_settled(record.id)
        return True
    if answer.settled is wire.Settled.UNKNOWN and not committed:
        # It never kept anything of a migration that did not commit.
        journal.set_peer_settled(record.id)
        return True
    return False


async def reclaim(journal: Journal, record: MigrationRecord) -> list[str]:
    """Live, committed, and the destination journaled LOST: continue the
    guest's paused QEMU here (no key needed) and journal the migration
    aborted.  Idempotent: a restart after ``reclaimed`` redoes it."""
    said: list[str] = []
    bundle_dir = Path(record.bundle) if record.bundle else None
    if bundle_dir is None or not bundle_dir.exists():
        said.append(f"VM {record.vm}: reclaimed, but its bundle is gone here")
    else:
        bundle = Bundle.load(bundle_dir)
        shared = bundle.manifest.shared_disk
        if shared and disk_owner(Path(shared)) == record.peer_name:
            # Handed over at the commit; it never ran there.
            disk_owner_path(Path(shared)).unlink(missing_ok=True)
        try:
            lock = storage.VMLock(bundle_dir / LOCK)
        except storage.LockBusy:
            return [f"VM {record.vm}: reclaimed; its lock is busy, continued later"]
        try:
            said.append(await _resume(bundle, None))
        finally:
            lock.release()
    if record.outcome in (None, Outcome.IN_DOUBT.value):
        journal.finish(
            record.id,
            Outcome.ABORTED.value,
            error="LIVE_FAILED: the destination's QEMU ended before its guest ran there "
            "(LOST); the guest continued here",
        )
    log.warn("migration {mid} of VM {vm}: reclaimed here", mid=record.migration_id, vm=record.vm)
    return said

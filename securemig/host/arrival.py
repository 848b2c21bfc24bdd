"""
The destination host: admitting, staging, preparing and committing arrivals.

Layout of a destination's state directory::

    STATE_DIR/journal.sqlite      every migration this host took part in
    STATE_DIR/vms/NAME/           VMs that arrived (bundle layout)
    STATE_DIR/staging/MID/        an arrival in progress (or held in doubt)
    STATE_DIR/locks/NAME.lock     held while VM NAME is arriving

:class:`DestinationHost` admits arrivals and, on the reactor thread,
settles what its journal left unfinished (after a restart, a source's
RESOLVE, or ``settle``).  The methods of :class:`Arrival` under "on the disk
thread" run on the connection's disk executor
(:class:`~securemig.transport.executor.ThreadExecutor`, fed by
:class:`~securemig.transport.destination.DestinationProtocol`), in the order
the session asked; the others run on the reactor thread, and none of those
blocks it (a live arrival's guest is ended with the backend's asynchronous
``end``).  The shell is typed against :mod:`securemig.host.contract`
(``ArrivalHost``, ``ArrivingVM``), never against these classes.

The vTPM key's way through an arrival: it arrives wrapped
(:meth:`Arrival.accept_key`, journaled ``key-received``); once every stream
is verified it is released, unwrapped inside this host's TPM in the attested
state (:meth:`Arrival.release_key`; a live arrival's already when its vTPM
starts, :meth:`Arrival.start_incoming`); the vTPM that arrived is checked to
open with it and to be the one announced (:meth:`Arrival.check_vtpm`, disk
thread); it is re-sealed to this host's TPM (:meth:`Arrival.keep_key`) and
only that sealed form is written, by :meth:`Arrival.prepare`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from securemig import crashpoint, files
from securemig.crashpoint import CrashPoint
from securemig.host import storage
from securemig.host.contract import KeySealer, KeyUnwrapper, VtpmKey
from securemig.host.journal import Journal, MigrationRecord
from securemig.host.shareddisk import foreign_owner
from securemig.hypervisor import backends
from securemig.hypervisor.backends import backend_for, capabilities
from securemig.hypervisor.bundle import VTPM_IMAGE, Bundle, BundleError, Image, Manifest, image_file
from securemig.hypervisor.contract import BACKEND_INFO_FILE, LiveSide
from securemig.protocol import wire
from securemig.protocol.effects import Finished, Outcome
from securemig.protocol.errors import ErrorCode, MigrationError, ProtocolError
from securemig.protocol.phases import Phase
from securemig.trust import vtpm
from securemig.trust.keyrelease import DestinationSecurity, KeyTransferError
from securemig.trust.vtpm import key_reader

log = Logger()


def variant_name(variant: wire.Variant) -> str:
    """The variant as journaled and shown: ``full`` or ``shared-storage``."""
    return variant.name.lower().replace("_", "-")


async def remove_staging(staging: Path) -> None:
    """Remove a staging directory, first ending what a live arrival may have
    started in it (its backend's guest and vTPM, by their records there),
    without blocking the reactor thread."""
    if staging.is_dir():
        await backends.end_started(staging)
    files.remove_tree(staging)


def remove_staging_blocking(staging: Path) -> None:
    """:func:`remove_staging`, blocking: off the reactor thread (the disk
    executor's worker)."""
    if staging.is_dir():
        backends.end_started_blocking(staging)
    files.remove_tree(staging)


class DestinationHost:
    """One destination's state directory and the policy it applies."""

    def __init__(
        self,
        state_dir: Path,
        backend: str = backends.DEFAULT,
        unseal: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.state_dir = state_dir.absolute()
        self.vms = self.state_dir / "vms"
        self.staging = self.state_dir / "staging"
        self.locks = self.state_dir / "locks"
        for d in (self.vms, self.staging, self.locks):
            d.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.state_dir / "journal.sqlite")
        self.backend = backend
        #: Unseals a vTPM key sealed to this host's TPM; None without a TPM
        #: identity (then VMs with a vTPM cannot be resumed here).
        self.unseal = unseal
        #: Names of VMs whose ended arrival is being discarded (on a disk
        #: thread; read on the reactor's: a set's add, discard and ``in``
        #: are each atomic), for RESOLVE's answer meanwhile (:meth:`busy`).
        self.discarding: set[str] = set()

    def resume(self, bundle: Bundle) -> Deferred[None]:
        """Resume an arrived VM with the backend its manifest names."""

        key = None if self.unseal is None else key_reader(self.unseal)
        return backend_for(bundle.manifest.backend, vtpm_key=key).resume(bundle)

    async def recover(self) -> list[tuple[str, str]]:
        """Redo, after a restart, what each unfinished arrival journaled; returns
        (migration id, what was done) pairs.

        Each journaled phase is a durable step (``doc/protocol.rst``, "Journal
        states and recovery"), redone idempotently:

        - before PREPARED: the source cannot have committed (it commits only
          after PREPARED), so staging is removed and the arrival is aborted;
        - PREPARED (or already in doubt): only the source knows whether it
          committed; the staging is kept in doubt until its RESOLVE;
        - COMMIT journaled: the source had committed; the move into place,
          the resume and DONE are rolled forward;
        - resumed, or the VM already in place: the arrival is done.
        """
        actions: list[tuple[str, str]] = []
        for record in self.journal.unfinished():
            if record.role == "destination":
                try:
                    actions.append((record.id, await self._recover_one(record)))
                except Exception as e:
                    # One record that cannot be settled now does not stop the others.
                    log.error("recovery of migration {mid} failed: {e}", mid=record.id, e=e)
                    actions.append((record.id, f"not settled: {e}"))
        for path in sorted(self.staging.iterdir()):
            # Staging the journal does not know (a crash between the journal's
            # begin and mkdir cannot make this; a hand-made copy can).
            if self.journal.get(path.name) is None:
                await remove_staging(path)
                actions.append((path.name, "unknown staging removed"))
        return actions

    async def live_qemu(self, record: Any) -> bool | None:
        """A live arrival (it reached ``incoming``): whether its QEMU still
        runs, in staging or in place; None for an arrival that is not live.
        Asked off the reactor thread (``Backend.ask``); a hypervisor that
        does not answer in time raises -- never taken for "gone"."""
        if not record.reached(Phase.INCOMING):
            return None
        staging = self.staging / record.id
        path = staging if staging.exists() else self.vms / record.vm
        backend = backend_for(self.backend)
        return await backend.ask(backend.has_process, Bundle(path, Manifest(name=record.vm)))

    async def recheck_held(self) -> list[tuple[str, str]]:
        """Live arrivals of a carried backend held in doubt before PREPARED
        because whether the hypervisor completed here could not be told
        (its daemon did not answer): asked again; one it did not complete is
        discarded (the source cannot have committed it: its hypervisor
        commits only after completing here), one it did stays for the
        source's RESOLVE, one still unknown stays.  First, staging that
        aborted arrivals left (:meth:`_remove_aborted_leftovers`).  Returns
        (migration id, what was done) pairs."""
        actions = await self._remove_aborted_leftovers()
        if not capabilities(self.backend).carried:
            return actions
        for record in self.journal.records(1000):
            if (
                record.role != "destination"
                or record.outcome != Outcome.IN_DOUBT.value
                or not record.reached(Phase.INCOMING)
                or record.reached(Phase.PREPARED)
            ):
                continue
            staging = self.staging / record.id
            if not staging.exists():
                continue
            backend = backend_for(self.backend)
            try:
                if await backend.ask(backend.arrived, Bundle.load(staging)):
                    continue
            except Exception:
                continue  # still unknown: kept
            lock = self._try_lock(record.vm)
            if lock is None:
                continue
            try:
                await remove_staging(staging)
            finally:
                lock.release()
            self.journal.finish(
                record.id,
                Outcome.ABORTED.value,
                error="LIVE_FAILED: the hypervisor's migration did not complete here",
            )
            actions.append((record.id, "the hypervisor did not complete it here: discarded"))
        return actions

    async def _remove_aborted_leftovers(self) -> list[tuple[str, str]]:
        """Staging of arrivals journaled aborted that their session could
        not remove (its hypervisor failed or did not answer then:
        :meth:`Arrival.discard`), removed now under the name's lock, so
        that it goes even if the source never resolves it again.  Aborted
        is decided: nothing there is the guest's only copy.  One that
        fails again stays for the next round."""
        actions: list[tuple[str, str]] = []
        for record in self.journal.records(1000):
            staging = self.staging / record.id
            if (
                record.role != "destination"
                or record.outcome != Outcome.ABORTED.value
                or not staging.exists()
            ):
                continue
            lock = self._try_lock(record.vm)
            if lock is None:
                continue
            try:
                # On the reactor's bounded pool, not a backend's own thread
                # (each backend object starts one): a libvirtd that stays
                # down is asked again every round without a thread more.
                await deferToThread(remove_staging_blocking, staging)
            except Exception as e:
                log.warn(
                    "migration {mid}: its aborted staging is not removed yet: {e}",
                    mid=record.id,
                    e=e,
                )
                continue
            finally:
                lock.release()
            actions.append((record.id, "aborted: its staging, left by the discard, removed"))
        return actions

    async def arrived(self, record: Any) -> bool:
        """A live arrival in staging that its hypervisor's own migration
        completed here (``Backend.arrived``, asked off the reactor thread)."""
        if not record.reached(Phase.INCOMING) or not capabilities(self.backend).carried:
            return False
        staging = self.staging / record.id
        backend = backend_for(self.backend)
        try:
            return await backend.ask(backend.arrived, Bundle.load(staging))
        except Exception as e:
            log.warn("migration {mid}: cannot tell whether it arrived: {e}", mid=record.id, e=e)
            return True  # unknown: kept, never lost by guessing

    async def _lose(self, record: Any, why: str) -> None:
        """A live arrival whose QEMU ended before CONTINUING was journaled
        here: it never ran here; journal LOST, remove staging (or the VM
        this migration moved into place: ``committed`` journaled, staging
        gone), journal aborted."""
        self.journal.phase(record.id, Phase.LOST)
        await self._discard_unrun(record)
        self.journal.finish(record.id, Outcome.ABORTED.value, error=f"LIVE_FAILED: {why}")
        log.warn("migration {mid}: VM {vm}: {why}: lost here", mid=record.id, vm=record.vm, why=why)

    def _unrun(self, record: MigrationRecord) -> bool:
        """A live arrival that never sent ``cont`` here (``protocol.recovery``
        ``_unrun``): prepared (staged), or COMMIT journaled and CONTINUING
        not (staged, or moved into place), and no outcome yet."""
        if not record.reached(Phase.INCOMING) or record.reached(Phase.CONTINUING):
            return False
        if record.reached(Phase.RESUMED) or record.reached(Phase.LOST) or record.outcome == "done":
            return False
        if record.reached(Phase.COMMITTED):
            return (self.staging / record.id).exists() or (self.vms / record.vm).exists()
        staged = (self.staging / record.id).exists()
        return staged and record.phase in (Phase.PREPARED, Phase.IN_DOUBT)

    async def vtpm_mismatch(self, record: MigrationRecord) -> str | None:
        """A live arrival whose guest never ran here (:meth:`_unrun`): what
        is wrong with the vTPM that arrived, checked against the one the
        source announced (its EK, from the manifest; the key unsealed from
        the bundle), or None if it is that one or there is none.  Its
        session ran this check beside the commit (``Arrival.check_vtpm_beside``);
        a restart may have cut it, so recovery runs it again before any
        ``cont``."""
        if capabilities(self.backend).carried or not self._unrun(record):
            return None
        staging = self.staging / record.id
        bundle = Bundle.load(staging if staging.exists() else self.vms / record.vm)
        if not bundle.manifest.vtpm:
            return None
        if self.unseal is None:
            return "no TPM identity here to check the vTPM that arrived"
        try:
            key = self.unseal(bundle.vtpm_key_path.read_bytes())
            await deferToThread(
                DestinationSecurity.check_vtpm,
                bundle.path,
                key,
                bytes.fromhex(bundle.manifest.vtpm),
                self.staging,
            )
        except Exception as e:
            return f"the vTPM check failed: {e}"
        return None

    async def _lose_if_vtpm_differs(self, record: MigrationRecord) -> str | None:
        """:meth:`vtpm_mismatch`; if something is wrong, end this arrival's
        QEMU (it never ran) and journal it LOST (the source continues the
        guest); returns what was wrong."""
        why = await self.vtpm_mismatch(record)
        if why is None:
            return None
        staging = self.staging / record.id
        path = staging if staging.exists() else self.vms / record.vm
        await backend_for(self.backend).end(Bundle(path, Manifest(name=record.vm)))
        await self._lose(record, why)
        return why

    async def _discard_unrun(self, record: MigrationRecord) -> None:
        """Remove what a LOST arrival left: its staging, or, if its COMMIT
        was journaled and staging is gone, the VM it moved into place (no
        other arrival of that name can have come since: it kept the name's
        lock until LOST, and a LOST record is settled before any new one)."""
        staging = self.staging / record.id
        if staging.exists() or not record.reached(Phase.COMMITTED):
            await remove_staging(staging)
        else:
            await remove_staging(self.vms / record.vm)

    async def _recover_one(self, record: Any) -> str:
        staging = self.staging / record.id
        in_place = (self.vms / record.vm).exists() and not staging.exists()
        committed = record.reached(Phase.COMMITTED) or record.reached(Phase.RESUMED)
        if record.reached(Phase.LOST):
            await self._discard_unrun(record)
            if record.outcome is None:
                self.journal.finish(record.id, Outcome.ABORTED.value, error="LIVE_FAILED: lost")
            return "lost here (its QEMU ended before the guest ran): staging removed"
        if self._unrun(record) and await self.live_qemu(record) is False:
            await self._lose(record, "its QEMU ended before the guest ran here")
            return "its QEMU ended before the guest ran here: lost here; the source continues it"
        if committed and (staging.exists() or in_place):
            why = await self._lose_if_vtpm_differs(record)
            if why is not None:
                return f"{why}: lost here; the source continues it"
            # In place is not done: the crash may have come before the resume
            # (a live arrival's QEMU waits paused), and the rule
            # (protocol.recovery.destination_restart) is to resume it.
            return await self._roll_forward(record, "destination restarted after COMMIT")
        if record.phase in (Phase.PREPARED, Phase.IN_DOUBT) and staging.exists():
            self.journal.finish(
                record.id, Outcome.IN_DOUBT.value, error="destination restarted after PREPARED"
            )
            return "prepared: held in doubt until the source resolves it"
        if staging.exists() and await self.arrived(record):
            # Before PREPARED, yet the hypervisor's own migration completed
            # here: the source's guest has ended, this is the only copy, and
            # the source decides (it commits what its hypervisor moved).
            self.journal.finish(
                record.id,
                Outcome.IN_DOUBT.value,
                error="destination restarted after the hypervisor's migration completed here",
            )
            return "arrived (the hypervisor completed): held in doubt until the source resolves it"
        await remove_staging(staging)
        self.journal.finish(
            record.id,
            Outcome.ABORTED.value,
            error="CONNECTION_LOST: destination restarted before PREPARED",
        )
        return "restarted before PREPARED: staging removed"

    async def _roll_forward(self, record: Any, why: str) -> str:
        """The source committed: move the staged VM into place (if it is not
        there yet), resume it and journal DONE.  Idempotent."""
        staging, target = self.staging / record.id, self.vms / record.vm
        if not record.reached(Phase.COMMITTED):
            self.journal.phase(record.id, Phase.COMMITTED)
        if staging.exists():
            if target.exists():
                raise ProtocolError(
                    ErrorCode.VM_BUSY,
                    f"the source committed, but {target} exists: resolve by hand",
                )
            files.rename_durably(staging, target)
        bundle = Bundle.load(target)
        # Live: from CONTINUING on, cont may have been sent (it may have run).
        ran = record.reached(Phase.RESUMED) or record.reached(Phase.CONTINUING)
        if record.reached(Phase.INCOMING):
            gone = await self.live_qemu(record) is False
        else:
            gone = await self.backend_status(bundle) == "stopped"
        if ran and gone:
            # It ran here and its guest has ended since: starting it again from
            # a saved state would run an older state of the guest a second time.
            log.error(
                "migration {mid}: VM {vm} was resumed here and its guest has ended since",
                mid=record.id,
                vm=record.vm,
            )
            # Not resumed, so its backend never put the arrival's record
            # away: it goes here, or a later end (``vm stop --force``) would
            # take the VM for an arrival that never committed and remove it
            # with what was made for it (libvirt: its domain and disks).
            files.remove_durably(target / BACKEND_INFO_FILE)
        # A guest that runs may wait paused after a live stream: a backend
        # whose resume continues it (and leaves a running one alone) is asked.
        elif (
            await self.backend_status(bundle) != "running"
            or capabilities(bundle.manifest.backend).resume_continues
        ):
            if record.reached(Phase.INCOMING) and not record.reached(Phase.CONTINUING):
                # The last durable step before cont (its QEMU is there:
                # an ended one was LOST before the roll forward).
                self.journal.phase(record.id, Phase.CONTINUING)
            await self.resume(bundle)
        self.journal.phase(record.id, Phase.RESUMED)
        self.journal.finish(record.id, Outcome.DONE.value)
        self.journal.phase(record.id, Phase.DONE)
        log.info(
            "migration {mid}: {why}: VM {vm} rolled forward", mid=record.id, why=why, vm=record.vm
        )
        if ran and gone:
            return f"source committed: VM {record.vm} ran here and its guest has ended since"
        return f"source committed: VM {record.vm} resumed here"

    async def backend_status(self, bundle: Bundle) -> str:
        """The VM's state as its backend reports it (asked off the reactor
        thread: ``Backend.ask``)."""
        backend = backend_for(bundle.manifest.backend)
        return await backend.ask(backend.status, bundle)

    async def resolve(
        self, message: wire.Resolve | wire.Ask, peer_name: str, protocol: str
    ) -> wire.Resolved:
        """Carry out the source's decision for one of our arrivals (RESOLVE),
        or say what is held here of it (ASK, :meth:`held`); accepted only
        from the peer that started it, over the same variant."""
        mid = message.migration_id

        def answer(settled: wire.Settled, reason: str) -> wire.Resolved:
            return wire.Resolved(mid, settled, reason[: wire.MAX_REASON])

        record = self.journal.get(mid.hex())
        if record is None or record.role != "destination":
            return answer(wire.Settled.UNKNOWN, "no such migration here")
        if record.protocol != protocol or record.peer_name != peer_name:
            log.warn(
                "refused RESOLVE of migration {mid} from {peer}: it was started by another source",
                mid=mid.hex(),
                peer=peer_name,
            )
            return answer(wire.Settled.REFUSED, "this migration was started by another source")
        if isinstance(message, wire.Ask):
            return answer(*await self.held(record))
        staging = self.staging / record.id
        if record.outcome == Outcome.DONE.value:
            return answer(wire.Settled.DONE, f"VM {record.vm} is in place here")
        lost = "its QEMU ended before the guest ran here; nothing kept"
        if record.reached(Phase.LOST):
            committed = message.decision is wire.Decision.COMMITTED
            return answer(wire.Settled.LOST if committed else wire.Settled.ABORTED, lost)
        if (
            message.decision is wire.Decision.COMMITTED
            and self._unrun(record)
            and await self.live_qemu(record) is False
        ):
            lock = self._try_lock(record.vm)
            if lock is None:
                return answer(wire.Settled.FAILED, self.busy(record.vm))
            try:
                await self._lose(record, "its QEMU ended before the guest ran here")
            finally:
                lock.release()
            return answer(wire.Settled.LOST, lost)
        if message.decision is wire.Decision.COMMITTED:
            if record.outcome == Outcome.ABORTED.value and not staging.exists():
                # The source says committed, yet we discarded: only possible if
                # we discarded before PREPARED, which the source never commits.
                return answer(wire.Settled.FAILED, "aborted here before PREPARED; nothing kept")
            lock = self._try_lock(record.vm)
            if lock is None:
                return answer(wire.Settled.FAILED, self.busy(record.vm))
            try:
                why = await self._lose_if_vtpm_differs(record)
                if why is None:
                    said = await self._roll_forward(record, "RESOLVE committed")
            finally:
                lock.release()
            if why is not None:
                return answer(wire.Settled.LOST, f"{why}; nothing kept")
            return answer(wire.Settled.DONE, said.removeprefix("source committed: "))
        if record.reached(Phase.COMMITTED):
            return answer(wire.Settled.FAILED, "COMMIT was journaled here: the VM is ours")
        if staging.exists():
            # The name's lock, as for a commit: while this migration's own
            # session still runs (it holds the lock until it ends or holds its
            # staging in doubt) its staging is not removed under it.
            lock = self._try_lock(record.vm)
            if lock is None:
                return answer(wire.Settled.FAILED, self.busy(record.vm))
            try:
                await remove_staging(staging)
            finally:
                lock.release()
        if record.outcome != Outcome.ABORTED.value:
            self.journal.finish(
                record.id, Outcome.ABORTED.value, error="resolved: the source did not commit"
            )
        return answer(wire.Settled.ABORTED, "staging discarded")

    def busy(self, vm: str) -> str:
        """RESOLVE's answer while VM ``vm``'s name is held here: busy, and,
        while an ended arrival of it is still being discarded (its
        hypervisor has not answered yet), that; the source asks again."""
        if vm in self.discarding:
            return (
                f"VM {vm} is busy here: its aborted arrival is still being removed "
                "(the hypervisor has not answered yet); try again"
            )
        return f"VM {vm} is busy here; try again"

    async def held(self, record: MigrationRecord) -> tuple[wire.Settled, str]:
        """The answer to ASK: what this host holds of arrival ``record``,
        for a source that cannot decide alone (``protocol.recovery.
        asks_destination``: its guest gone there, PREPARED never seen).

        HELD: the whole guest, paused -- PREPARED journaled, or its
        hypervisor completed the migration here (libvirt's Finish ran;
        PREPARED was lost with the connection or never journaled) -- kept
        in doubt for the source's decision; DONE or HELD once rolled
        forward; ABORTED or LOST: nothing complete is kept; FAILED ("ask
        again"): its session still runs, or its hypervisor cannot say.
        Nothing is decided here; only a QEMU that ended before the guest
        ever ran here is journaled LOST, as a restart would."""
        if record.outcome == Outcome.DONE.value:
            return wire.Settled.DONE, f"VM {record.vm} is in place here"
        if record.reached(Phase.LOST):
            return wire.Settled.LOST, "its QEMU ended before the guest ran here; nothing kept"
        if record.reached(Phase.COMMITTED):
            return wire.Settled.HELD, "COMMIT was journaled here: the VM is rolled forward here"
        staging = self.staging / record.id
        if record.outcome == Outcome.ABORTED.value:
            return wire.Settled.ABORTED, "aborted here; nothing kept"
        if record.outcome is None:
            # Its session still runs (libvirt may still complete here), or
            # this host has not recovered it yet: no answer is final yet.
            return wire.Settled.FAILED, f"VM {record.vm} is still arriving here; ask again"
        if not staging.exists():
            return wire.Settled.ABORTED, "nothing kept here"
        lock = self._try_lock(record.vm)
        if lock is None:
            return wire.Settled.FAILED, f"VM {record.vm} is busy here; ask again"
        cannot = wire.Settled.FAILED, "its hypervisor here cannot say; ask again"
        try:
            try:
                qemu = await self.live_qemu(record)
            except Exception as e:
                log.warn(
                    "migration {mid}: cannot tell whether its QEMU runs: {e}", mid=record.id, e=e
                )
                return cannot
            if self._unrun(record) and qemu is False:
                await self._lose(record, "its QEMU ended before the guest ran here")
                return wire.Settled.LOST, "its QEMU ended before the guest ran here; nothing kept"
            if record.reached(Phase.PREPARED):
                return wire.Settled.HELD, "prepared: the whole guest, paused, held in doubt"
            if not capabilities(self.backend).carried or not record.reached(Phase.INCOMING):
                return wire.Settled.ABORTED, "not prepared: nothing complete here"
            backend = backend_for(self.backend)
            try:
                arrived = await backend.ask(backend.arrived, Bundle.load(staging))
            except Exception as e:
                log.warn("migration {mid}: cannot tell whether it arrived: {e}", mid=record.id, e=e)
                return cannot
            if arrived:
                return wire.Settled.HELD, (
                    "its hypervisor completed the migration here: the whole guest, paused, "
                    "held in doubt"
                )
            return wire.Settled.ABORTED, "its hypervisor did not complete it here: nothing whole"
        finally:
            lock.release()

    def _try_lock(self, vm: str) -> storage.Lock | None:
        """VM ``vm``'s name here, or None while something (an arrival of it,
        the session of the migration being settled) holds it."""
        try:
            return storage.Lock(self.locks / f"{vm}.lock")
        except storage.LockBusy:
            return None

    async def settle(self, source: Journal) -> list[tuple[str, str]]:
        """Settle migrations held in doubt here from the source's journal.

        The source's ``committed`` phase is the commit point of the protocol:
        if the source journaled it, the VM is moved into place and resumed
        here; if the source's migration ended without it, the staging is
        discarded (the VM is still at the source).  A source record with no
        outcome yet and no commit is left alone: the source may still be
        deciding, and nothing is guessed.  Returns (migration id, what was
        done) pairs.
        """
        actions: list[tuple[str, str]] = []
        for staging in sorted(self.staging.iterdir()):
            record = self.journal.get(staging.name)
            if record is None or record.outcome not in (None, Outcome.IN_DOUBT.value):
                continue
            theirs = source.by_migration_id(staging.name)
            if theirs is None:
                actions.append((staging.name, "unknown to this source journal; left in doubt"))
                continue
            committed = Phase.COMMITTED in {phase for phase, _ in theirs.events}
            if not committed and theirs.outcome in (None, Outcome.IN_DOUBT.value):
                # In doubt without COMMITTED: its hypervisor could not be
                # asked where the guest is (protocol.recovery.carried_decision);
                # this paused copy may be the only one.
                actions.append((staging.name, "source has not decided yet; left in doubt"))
                continue
            lock = self._try_lock(record.vm)
            if lock is None:
                actions.append((staging.name, f"VM {record.vm} is busy here; left in doubt"))
                continue
            try:
                actions.append((staging.name, await self._settle_one(staging, record, committed)))
            finally:
                lock.release()
        return actions

    async def _settle_one(self, staging: Path, record: Any, committed: bool) -> str:
        target = self.vms / record.vm
        if not committed:
            await remove_staging(staging)
            self.journal.finish(
                staging.name, Outcome.ABORTED.value, error="settled: the source did not commit"
            )
            return "source did not commit: staging discarded"
        if target.exists():
            return f"source committed, but {target} exists; left in doubt"
        why = await self._lose_if_vtpm_differs(record)
        if why is not None:
            return f"{why}: lost here; the source continues it"
        self.journal.phase(staging.name, Phase.COMMITTED)
        files.rename_durably(staging, target)
        bundle = Bundle.load(target)
        await self.resume(bundle)
        self.journal.phase(staging.name, Phase.RESUMED)
        self.journal.finish(staging.name, Outcome.DONE.value)
        return f"source committed: VM {record.vm} resumed here"

    def admit(
        self,
        hello: wire.Hello,
        peer: str,
        protocol: str,
        peer_name: str | None = None,
        *,
        keeps_keys: bool = True,
    ) -> Arrival:
        """Accept a HELLO or raise :class:`ProtocolError` saying why not.
        ``keeps_keys``: the listener has a TPM identity to re-seal a vTPM key
        to (the secure variant's attestor; the insecure one's ``--identity``)."""
        name = hello.vm_name
        # A vTPM state arrives, or a domain whose hypervisor keeps the
        # vTPM's secret itself (libvirt: its domains all have one).
        if not keeps_keys and (
            any(i.name == VTPM_IMAGE for i in hello.images)
            or (hello.backend == self.backend and capabilities(self.backend).carried)
        ):
            raise ProtocolError(
                ErrorCode.POLICY_REFUSED,
                "this destination has no TPM "
                "identity to keep a vTPM key (start it with --identity)",
            )
        # First, before anything is locked, journaled or staged: a VM this
        # host's backend cannot run would move, commit, and then not run.
        mismatch = backends.refusal(
            self.backend,
            hello.backend,
            live=hello.mode is wire.Mode.LIVE,
            guest=hello.guest,
            vtpm=bool(hello.vtpm),
        )
        if mismatch is not None:
            raise ProtocolError(ErrorCode.BACKEND_MISMATCH, mismatch)
        if hello.mode is wire.Mode.LIVE:
            # Its own stream, maybe on multifd channels, or the hypervisor's
            # own migration: a description (a channel count, a disk to
            # create) this destination will not take is refused before
            # anything is held.
            try:
                backends.backend_for(self.backend).live_channels(hello.backend_info)
            except BundleError as e:
                code = e.code if e.code is ErrorCode.POLICY_REFUSED else ErrorCode.BAD_PARAMETER
                raise ProtocolError(code, str(e)) from None
        if hello.variant is wire.Variant.SHARED_STORAGE and any(
            image.name == "disk" for image in hello.images
        ):
            raise ProtocolError(
                ErrorCode.POLICY_REFUSED, "a shared-storage migration must not carry a disk image"
            )
        self._check_shared_disk(hello)
        try:
            lock = storage.Lock(self.locks / f"{name}.lock")
        except storage.LockBusy:
            raise ProtocolError(ErrorCode.VM_BUSY, f"VM {name} is already arriving here") from None
        try:
            if (self.vms / name).exists():
                raise ProtocolError(ErrorCode.VM_BUSY, f"VM {name} is already present here")
            held = self._staged(name, Outcome.IN_DOUBT)
            if held:
                raise ProtocolError(
                    ErrorCode.VM_BUSY,
                    f"an earlier migration of VM {name} ({held[0]}) is in doubt here; "
                    "settle it first (securemig status)",
                )
            # An aborted arrival whose removal failed (its hypervisor did not
            # answer) is removed later, by the domain's UUID for libvirt: a
            # new arrival of the same VM admitted meanwhile could commit and
            # then be destroyed by that removal.  Refused until it is gone.
            leftover = self._staged(name, Outcome.ABORTED)
            if leftover:
                raise ProtocolError(
                    ErrorCode.VM_BUSY,
                    f"an aborted arrival of VM {name} ({leftover[0]}) is still being removed "
                    "here (its hypervisor has not answered yet); try again",
                )
            storage.check_free_space(self.state_dir, sum(i.size for i in hello.images))
            migration_id = os.urandom(wire.MIGRATION_ID_SIZE)
            staging = self.staging / migration_id.hex()
            # Journal first: a crash between the two leaves a record without
            # staging (recover_staging settles it), never staging unaccounted for.
            self.journal.begin(
                role="destination",
                vm=name,
                peer=peer,
                variant=variant_name(hello.variant),
                protocol=protocol,
                id=migration_id.hex(),
                peer_name=peer_name,
                total=sum(i.size for i in hello.images),
            )
            staging.mkdir()
            self.journal.phase(migration_id.hex(), Phase.ADMITTED)
        except BaseException:
            lock.release()
            raise
        log.info(
            "admitted VM {vm} from {peer} as migration {mid}",
            vm=name,
            peer=peer,
            mid=migration_id.hex(),
        )
        return Arrival(self, hello, migration_id, lock, staging)

    def _staged(self, name: str, outcome: Outcome) -> list[str]:
        """Earlier arrivals of VM ``name`` that ended ``outcome`` and whose
        staging is still here."""
        return [
            r.id
            for r in self.journal.records(1000)
            if r.vm == name and r.outcome == outcome.value and (self.staging / r.id).exists()
        ]

    @staticmethod
    def _check_shared_disk(hello: wire.Hello) -> None:
        if not hello.shared_disk:
            return
        path = hello.shared_disk
        if hello.variant is not wire.Variant.SHARED_STORAGE:
            raise ProtocolError(ErrorCode.BAD_PARAMETER, "a shared disk in a full migration")
        if not os.path.isabs(path) or os.path.normpath(path) != path:
            raise ProtocolError(
                ErrorCode.BAD_PARAMETER, "the shared disk path must be absolute and normalised"
            )
        if not os.path.isfile(path):
            raise ProtocolError(
                ErrorCode.POLICY_REFUSED, f"shared disk {path} is not visible on this destination"
            )


class Arrival:
    """One VM arriving: its staging directory, lock and journal entry."""

    def __init__(
        self,
        host: DestinationHost,
        hello: wire.Hello,
        migration_id: bytes,
        lock: storage.Lock,
        staging: Path,
    ) -> None:
        self.host = host
        self.hello = hello
        self.migration_id = migration_id
        self.id = migration_id.hex()
        self.lock = lock
        self.staging = staging
        self.cancelled = False
        #: The vTPM key as it arrived (wrapped, or in the clear in the
        #: insecure variant), then as released to this host (unwrapped in its
        #: TPM: at the prepare, or when a live arrival's vTPM starts).
        self.accepted_key: wire.WrappedKey | wire.ClearKey | None = None
        self.vtpm_key: VtpmKey | None = None
        #: The vTPM key, re-sealed to this host's TPM, and the vTPM's
        #: identity, checked with it.
        self.sealed_vtpm_key: bytes | None = None
        self.vtpm_identity: str | None = None
        #: Live mode: the destination guest's side of the migration, and the
        #: unix socket its stream goes to.
        self.live: LiveSide | None = None
        #: Live mode: LOST journaled (its QEMU ended before the guest ran here).
        self.lost = False
        #: Live, a carried backend: discarded before PREPARED, but the
        #: hypervisor had completed: held in doubt (see :meth:`discard`).
        self.held = False
        self.live_socket: Path | None = None
        #: Live mode: the EK check of the vTPM that arrived, running beside
        #: PREPARED and the source's commit (:meth:`check_vtpm_beside`);
        #: fires with None once it passed, or with what failed.
        self.vtpm_checking: Deferred[str | None] | None = None
        #: Live mode: the swtpm of that check, started ahead (on the check's
        #: own thread: :meth:`start_vtpm_check`).
        self._vtpm_check: vtpm.IdentityCheck | None = None
        #: Live mode: what the prepare writes (manifest, sealed key) was made
        #: durable when the guest started waiting here (:meth:`start_incoming`).
        self.staged_ahead = False
        self._file: Any = None
        self._behind: storage.WriteBehind | None = None
        self._hash: Any = hashlib.sha256()
        self._image: wire.ImageInfo | None = None

    # -- on the disk thread

    def open_stream(self, index: int, hashed: bool = True) -> None:
        """Create the staging file of image ``index``; ``hashed``: check its
        SHA-256 at the end (not on the data channel, whose records are
        authenticated one by one, nor on the insecure twin, which does no
        cryptography: there only the sizes are checked)."""
        if self.cancelled:
            return
        self._image = self.hello.images[index]
        path = self.staging / image_file(self._image.name)
        path.parent.mkdir(exist_ok=True)
        self._file = open(path, "xb", buffering=0)  # noqa: SIM115
        self._behind = storage.WriteBehind(self._file.fileno())
        self._hash = hashlib.sha256() if hashed else None

    def write(self, parts: tuple[bytes | memoryview, ...]) -> int:
        """Hash and append one chunk, given as pieces; returns its length."""
        n = 0
        for part in parts:
            n += len(part)
            if not self.cancelled and self._file is not None:
                if self._hash is not None:
                    self._hash.update(part)
                files.write_all(self._file, part)
        if self._behind is not None and not self.cancelled:
            self._behind.wrote(n)
        return n

    def close_stream(self, sha256: bytes) -> None:
        """fsync the image and check its digest against the source's."""
        if self.cancelled or self._file is None:
            return
        f, self._file = self._file, None
        try:
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()
        assert self._image is not None
        if self._hash is not None and not hmac.compare_digest(self._hash.digest(), sha256):
            raise ProtocolError(
                ErrorCode.STREAM_MISMATCH,
                f"image {self._image.name}: SHA-256 of the received bytes differs from the "
                "source's",
            )

    def check_vtpm(self, key: VtpmKey) -> str | None:
        """Check the vTPM that arrived opens with ``key`` and is the one the
        source announced (a swtpm start); returns its identity (hex), None
        for a VM without a vTPM state.  A live arrival's vTPM state came in
        its guest's stream, into the swtpm that runs with this key, which
        stored it in staging as it loaded it: checked there alike, on a copy
        made outside staging (the check runs beside the commit, and staging
        may be moved into place meanwhile: :meth:`check_vtpm_beside`)."""
        if self.live is not None and not key.identity:
            return None  # no vTPM (its QEMU's empty state directory is no state)
        scratch = self.host.staging if self.live is not None else None
        ahead, self._vtpm_check = self._vtpm_check, None
        return DestinationSecurity.check_vtpm(
            self.staging, key.secret, key.identity, scratch, ahead
        )

    def start_vtpm_check(self, key: VtpmKey) -> None:
        """Live mode, before the stream: start the swtpm :meth:`check_vtpm`
        will use (its process's start is most of the check's time, which is
        then off the switchover path too).  Blocks: call it from the thread
        that will run :meth:`check_vtpm` (or :meth:`drop_vtpm_check`), which
        the swtpm dies with."""
        if key.identity and self._vtpm_check is None:
            self._vtpm_check = vtpm.IdentityCheck(key.secret, self.host.staging)

    def drop_vtpm_check(self) -> None:
        """End a swtpm :meth:`start_vtpm_check` started that no check used."""
        ahead, self._vtpm_check = self._vtpm_check, None
        if ahead is not None:
            ahead.close()

    def check_vtpm_beside(self, checking: Deferred[str | None]) -> None:
        """Live mode: keep the EK check (:meth:`check_vtpm`, ``checking`` on
        a thread of its own) that runs beside PREPARED and the source's
        commit instead of before them (a swtpm start: about a quarter of a
        second the guest would wait paused).  It still gates the guest:
        :meth:`commit` waits for it before anything else, and one that
        failed ends this QEMU before ``cont``, so the guest never ran here
        and the source, which kept its paused QEMU, continues it (LOST).
        Recovery redoes it (:meth:`DestinationHost.vtpm_mismatch`)."""

        def failed(failure: Any) -> str:
            return str(failure.getErrorMessage())

        self.vtpm_checking = checking.addCallbacks(lambda _: None, failed)

    def manifest(self) -> Manifest:
        """The arriving VM's manifest, from its HELLO."""
        return Manifest(
            name=self.hello.vm_name,
            # A source that names its VM's backend was admitted only if this
            # host's runs it; an older one's VM takes this host's, as before.
            backend=self.hello.backend or self.host.backend,
            images=[Image(i.name, i.size) for i in self.hello.images],
            shared_disk=self.hello.shared_disk or None,
            vtpm=self.vtpm_identity,
            memory_mib=self.hello.memory_mib or None,
            guest=self.hello.guest or "firmware",
            guest_cmdline=self.hello.guest_cmdline,
            state="running" if self.live is not None else "suspended",
        )

    def prepare(self) -> None:
        """Write the bundle manifest in staging and make it all durable;
        then, for a suspended arrival, let its backend make it ready to
        resume (:meth:`Backend.ready_blocking`, given the released key: a
        backend that loads the VM now needs it)."""
        if self.cancelled:
            return
        if not self.staged_ahead:
            self._stage_durably()
        released = self.vtpm_key
        if self.live is None:
            bundle = Bundle(self.staging, self.manifest())
            key = None if released is None else (lambda b: released.secret)
            backend_for(bundle.manifest.backend, vtpm_key=key).ready_blocking(bundle)
        # Prepared: only the sealed key is kept from here on, not the clear one.
        self.vtpm_key = None

    def _stage_durably(self) -> None:
        bundle = Bundle(self.staging, self.manifest())
        if self.sealed_vtpm_key is not None:
            files.write_durably(bundle.vtpm_key_path, self.sealed_vtpm_key, mode=0o600)
        bundle.save()
        files.fsync_dir(self.staging)

    def discard(self) -> None:
        """Remove staging (ending a live arrival's QEMU) and release the name.
        A live arrival the hypervisor's own migration completed here (the
        source's guest has ended: this is the only copy) is held in doubt
        instead, for the source's decision (RESOLVE).  The name is released
        whatever happens: a removal that fails (the hypervisor refused or
        lost its connection) is logged and left to recovery.  While the
        hypervisor is asked, RESOLVE says so (:meth:`DestinationHost.busy`)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.live_socket is not None:
            self.live_socket.unlink(missing_ok=True)
        self.host.discarding.add(self.hello.vm_name)
        try:
            self._discard()
        finally:
            self.host.discarding.discard(self.hello.vm_name)
            self.lock.release()

    def _discard(self) -> None:
        if self.live is not None and self.arrived_here():
            self.held = True
            log.warn(
                "migration {mid}: VM {vm} arrived (the hypervisor completed) before the "
                "commit: held in doubt until the source decides",
                mid=self.id,
                vm=self.hello.vm_name,
            )
            return
        crashpoint.reached(CrashPoint.DESTINATION_DISCARDING, self.qemu_pidfile())
        try:
            remove_staging_blocking(self.staging)
        except Exception as e:
            # The session has ended: nobody else would report this, and the
            # name must not stay held by an arrival that is over.  What is
            # left in staging (perhaps a domain the hypervisor still has) is
            # this aborted migration's: the source's RESOLVE, or this
            # host's recheck (DestinationHost.recheck_held), removes it
            # under the name's lock.
            log.warn(
                "migration {mid}: could not discard the arrival of VM {vm} yet ({e}): "
                "its staging is left for recovery",
                mid=self.id,
                vm=self.hello.vm_name,
                e=e,
            )

    def arrived_here(self) -> bool:
        """Whether this live arrival's guest was made complete here by the
        hypervisor's own migration (``Backend.arrived``).  Blocks."""
        if not capabilities(self.host.backend).carried:
            return False
        bundle = Bundle(self.staging, self.manifest())
        try:
            return backend_for(self.host.backend).arrived(bundle)
        except Exception as e:
            log.warn("migration {mid}: cannot tell whether it arrived: {e}", mid=self.id, e=e)
            # Unknown: keep it rather than lose the only copy; recovery asks again.
            return True

    # -- on the reactor thread

    def cancel(self) -> None:
        """Make queued disk jobs do nothing; a discard follows."""
        self.cancelled = True
        self.vtpm_key = None

    def journal_phase(self, phase: Phase, nbytes: int) -> None:
        """Record a phase of this arrival."""
        self.host.journal.phase(self.id, phase, nbytes=nbytes)

    def journal_progress(self, nbytes: int) -> None:
        """Record the bytes received so far (for ``securemig jobs``)."""
        self.host.journal.progress(self.id, nbytes)

    def accept_key(self, key: wire.WrappedKey | wire.ClearKey, nbytes: int) -> None:
        """Keep the vTPM key that arrived, as it arrived (still wrapped: it is
        released only at the prepare, or when a live vTPM starts); journaled
        ``key-received``."""
        self.accepted_key = key
        self.journal_phase(Phase.KEY_RECEIVED, nbytes)

    def key_expected(self, secure: bool) -> bool:
        """Whether a vTPM key is to be released, checked and re-sealed before
        :meth:`prepare`: the secure variant always has one; the insecure one
        if the source sent one.  Raises :class:`KeyTransferError` for a vTPM
        state that came without its key."""
        if self.accepted_key is not None or secure:
            return True
        if any(i.name == VTPM_IMAGE for i in self.hello.images):
            raise KeyTransferError("a vTPM state arrived without its key")
        return False

    def release_key(self, unwrapper: KeyUnwrapper | None, *, live: bool = False) -> VtpmKey:
        """The vTPM key: unwrapped by ``unwrapper`` inside this host's TPM
        (only in the attested PCR state; call from the thread that owns the
        TPM), or as the insecure variant sent it.  Released once: a live
        arrival's key, released (``live``: it must have come wrapped) for
        :meth:`start_incoming`, is the one the prepare re-seals."""
        if self.vtpm_key is not None:
            return self.vtpm_key
        key = self.accepted_key
        if live and not isinstance(key, wire.WrappedKey):
            raise KeyTransferError("live mode needs the wrapped vTPM key")
        # A hypervisor that keeps the vTPM's secret itself (libvirt's, 1 to
        # 128 bytes, suspended or live): the whole material is that secret,
        # and no vTPM identity follows it.
        whole = capabilities(self.host.backend).carried
        sizes = range(1, 129) if whole else (32, 64)
        if isinstance(key, wire.WrappedKey) and unwrapper is not None:
            secret, identity = unwrapper.unwrap(key, self.migration_id)
        elif isinstance(key, wire.ClearKey) and len(key.material) in sizes:
            secret, identity = key.material[:32], key.material[32:]
        else:
            raise KeyTransferError("no usable vTPM key arrived")
        if whole:
            secret, identity = secret + identity, b""
            if len(secret) not in sizes:
                raise KeyTransferError(f"a vTPM secret of {len(secret)} bytes (1 to 128 are kept)")
        self.vtpm_key = VtpmKey(secret, identity)
        return self.vtpm_key

    def keep_key(self, sealer: KeySealer, key: VtpmKey, identity: str | None) -> None:
        """Re-seal the checked key to this host's TPM (it is never written
        in the clear here), with the vTPM's ``identity``, for :meth:`prepare`."""
        self.sealed_vtpm_key = sealer.seal(key.secret)
        self.vtpm_identity = identity

    def prepared(self, nbytes: int) -> None:
        """Staging is durable: journal PREPARED."""
        self.journal_phase(Phase.PREPARED, nbytes)
        crashpoint.reached(CrashPoint.DESTINATION_PREPARED, self.qemu_pidfile())

    async def start_incoming(self, released: VtpmKey) -> None:
        """Live mode: start the VM's vTPM with its ``released`` key
        (:meth:`release_key`) and its guest paused, waiting for the stream
        at :attr:`live_socket`, in staging; journaled ``incoming``.  The
        backend's side of the migration (a backend that keeps the key in its
        own manager defines it there first)."""
        key = released.secret
        # The vTPM device is part of the guest's machine: the manifest names it.
        self.vtpm_identity = released.identity.hex() or None
        carried = capabilities(self.host.backend).carried
        if carried:
            # The hypervisor's own migration: the whole released material is
            # its secret's value (libvirt's is 1 to 128 bytes, and no vTPM
            # identity follows it); the key the prepare re-seals is that.
            key = released.secret + released.identity
            self.vtpm_key = VtpmKey(key, b"")
            self.vtpm_identity = None
        if not capabilities(self.host.backend).live_destination:
            raise ProtocolError(
                ErrorCode.POLICY_REFUSED,
                f"this destination's {self.host.backend} backend takes no live migration",
            )
        bundle = Bundle(self.staging, self.manifest())
        bundle.save()
        backend = backend_for(self.host.backend, vtpm_key=lambda b: key)
        if carried:
            # The hypervisor's own migration makes the guest here, through
            # sockets of this migration's id (the same name on both hosts);
            # its backend learns what arrives from HELLO.  The key, sealed to
            # this host's TPM, is in staging from now: once the hypervisor
            # completed, this copy may have to be rolled forward before
            # PREPARED (see discard).
            if self.sealed_vtpm_key is not None:
                files.write_durably(bundle.vtpm_key_path, self.sealed_vtpm_key, mode=0o600)
            files.write_durably(self.staging / BACKEND_INFO_FILE, self.hello.backend_info)
            self.live = await backend.live_destination(bundle, self.id)
            # All the prepare writes is known now: durable before the
            # stream, not between the hypervisor's completion and PREPARED.
            self._stage_durably()
            self.staged_ahead = True
            self.host.journal.phase(self.id, Phase.INCOMING)
            return
        # Per migration: a name from the bundle alone is the same for the
        # source of a VM and an arrival of it moved into place there.
        tag = f"{self.id}-d"
        self.live_socket = backend.live_socket(bundle, tag)
        if self.multifd:
            self.live = await backend.live_destination(
                bundle,
                tag,
                multifd=self.multifd,  # type: ignore[call-arg]
            )
        else:
            self.live = await backend.live_destination(bundle, tag)
        if self.sealed_vtpm_key is not None or not released.identity:
            # What the prepare writes is known now (the key was re-sealed as
            # it was released): durable before the stream, not on the
            # switchover path.  (Before PREPARED, recovery removes staging
            # whatever it holds.)
            self._stage_durably()
            self.staged_ahead = True
        self.host.journal.phase(self.id, Phase.INCOMING)

    @property
    def carried(self) -> bool:
        """Live through the hypervisor's own migration, its sockets carried
        (``Capabilities.carried``), rather than one QEMU stream."""
        return capabilities(self.host.backend).carried

    @property
    def multifd(self) -> int:
        """Live, the backend's own stream: its multifd channels besides the
        main one (0: one stream), as HELLO asked and admission checked."""
        if self.hello.mode is not wire.Mode.LIVE or self.carried:
            return 0
        return backend_for(self.host.backend).live_channels(self.hello.backend_info)

    def carried_sockets(self) -> dict[str, str]:
        """Live, carried: the local sockets the carrier dials, by name."""
        return backend_for(self.host.backend).carried_sockets(self.id, destination=True)

    @property
    def carried_connections(self) -> int:
        """Live, carried: how many connections the source's hypervisor may
        open at once on them (its multifd channels, its disks)."""
        return backend_for(self.host.backend).carried_connections(self.hello.backend_info)

    def loaded(self) -> None:
        """Live, carried: the hypervisor completed here (the guest paused)."""
        crashpoint.reached(CrashPoint.DESTINATION_LOADED, getattr(self.live, "pidfile", None))

    def incoming_started(self) -> None:
        """Live mode: the stream's receiver listens; the guest waits for it."""
        crashpoint.reached(CrashPoint.DESTINATION_INCOMING, self.qemu_pidfile())

    async def wait_loaded(self) -> None:
        """Live mode: until the guest here has loaded the whole stream (paused,
        not yet running); raises :class:`MigrationError` if it failed."""
        if self.live is None:
            raise MigrationError("no live arrival was started")
        await self.live.wait()

    def check_shared_disk(self, me: str) -> None:
        """Secure shared-storage variant, before the commit: the source
        handed the shared disk to us (host ``me``) at its commit point,
        before it sent COMMIT; a disk another host owns is not resumed here
        (:mod:`securemig.host.shareddisk`)."""
        shared = self.hello.shared_disk
        if not shared:
            return
        owner = foreign_owner(Path(shared), me)
        if owner is not None:
            raise ProtocolError(
                ErrorCode.RESUME_FAILED, f"shared disk {shared} belongs to {owner}, not to us"
            )

    async def commit(self) -> None:
        """The source committed: move the VM into place and resume it (live
        mode: continue its loaded, paused QEMU).

        Live mode: CONTINUING, journaled once the VM is in place with its
        QEMU still there, is the last durable step before ``cont``.  If the
        QEMU that loaded the stream has ended before it (checked as the
        COMMIT arrives and again just before CONTINUING), the guest never
        ran here and never can (its state was only in that QEMU): LOST is
        journaled instead, staging (or the VM moved into place) removed, and
        the source (which kept its paused QEMU) continues the guest when it
        learns it.

        A failure here (its hypervisor cannot be asked: a libvirtd down)
        frees the name as a failed resume does: the source owes RESOLVE
        (committed), which rolls the arrival forward once the hypervisor
        answers; a name held until a restart would refuse it ("busy")."""
        try:
            await self._commit()
        except BaseException:
            self.lock.release()
            raise

    async def _commit(self) -> None:
        if self.live is not None and self.vtpm_checking is not None:
            why = await self.vtpm_checking
            if why is not None:
                # Not the vTPM announced: this copy must never run.  Its QEMU
                # ends first, so that whatever happens next (the journal's
                # LOST, or a crash before it and the restart) finds a guest
                # that never ran here, which the source continues.
                log.error(
                    "migration {mid}: VM {vm}: {why}: its guest does not run here",
                    mid=self.id,
                    vm=self.hello.vm_name,
                    why=why,
                )
                await self.live.abandon()
                await self.lose()
                raise ProtocolError(
                    ErrorCode.RESUME_FAILED,
                    f"{why}: nothing kept here (LOST); the source continues VM "
                    f"{self.hello.vm_name}",
                )
        if self.live is not None and not await self.live.waits_loaded():
            crashpoint.reached(CrashPoint.DESTINATION_LIVE_LOST)
            await self.lose()
            raise self._lost()
        self.host.journal.phase(self.id, Phase.COMMITTED)
        crashpoint.reached(CrashPoint.DESTINATION_COMMIT_JOURNALED, self.qemu_pidfile())
        target = self.host.vms / self.hello.vm_name
        files.rename_durably(self.staging, target)
        crashpoint.reached(
            CrashPoint.DESTINATION_IN_PLACE, target / "qemu.pid" if self.live else None
        )
        bundle = Bundle.load(target)
        if self.live is not None:
            # Asked of the live side: it knows where the guest's process is
            # after the move (QEMU's pid file moved with the bundle;
            # libvirt's stays in libvirt's run directory), with no call to
            # a daemon on the switchover path.
            if not await self.live.alive_moved(bundle):
                await self.lose(target)
                raise self._lost()
            self.host.journal.phase(self.id, Phase.CONTINUING)
            crashpoint.reached(CrashPoint.DESTINATION_CONTINUING, target / "qemu.pid")
        try:
            # Live: continued on the connection held since the stream (the
            # guest waits paused for this); else, and after a restart, resumed.
            if self.live is None or not await self.live.continue_moved(bundle):
                if self.live is not None:
                    self.live.release()
                await self.host.resume(bundle)
        finally:
            # Resumed or not (RESUME_FAILED), the VM stays in place: its name
            # is free for whatever an operator does next.
            self.lock.release()
        self.host.journal.phase(self.id, Phase.RESUMED)
        crashpoint.reached(CrashPoint.DESTINATION_RESUMED)

    def qemu_pidfile(self) -> Path | None:
        """Live mode: the pid file of the arriving VM's QEMU (for crash points)."""
        return self.staging / "qemu.pid" if self.live is not None else None

    def _lost(self) -> ProtocolError:
        return ProtocolError(
            ErrorCode.RESUME_FAILED,
            f"the QEMU of VM {self.hello.vm_name} ended before its guest ran here: "
            "nothing kept here (LOST); the source continues it",
        )

    async def lose(self, in_place: Path | None = None) -> None:
        """Live mode, before CONTINUING is journaled here: its QEMU ended, so
        the guest never ran here; journal LOST, remove staging (or the VM
        this migration moved ``in_place``, which never ran), free the name."""
        self.lost = True
        self.host.journal.phase(self.id, Phase.LOST)
        if self.live is not None:
            self.live.release()
        await remove_staging(self.staging)
        if in_place is not None:
            await remove_staging(in_place)
        self.lock.release()
        log.warn(
            "migration {mid}: the QEMU of VM {vm} ended before its guest ran here: lost here",
            mid=self.id,
            vm=self.hello.vm_name,
        )

    def hold(self) -> None:
        """Keep the prepared staging for recovery; free the lock (and a live
        arrival's QMP socket: its QEMU serves one client, and recovery
        continues or ends it later)."""
        if self.live is not None:
            self.live.release()
        log.warn(
            "migration {mid}: holding prepared staging {path} in doubt",
            mid=self.id,
            path=str(self.staging),
        )
        self.lock.release()

    def finish(self, effect: Finished, nbytes: int) -> None:
        """Journal the outcome (a LOST arrival: aborted, nothing kept here)."""
        error = f"{effect.code.name}: {effect.reason}" if effect.code else None
        outcome = Outcome.ABORTED if self.lost else effect.outcome
        if self.held:
            outcome = Outcome.IN_DOUBT
        self.host.journal.finish(self.id, outcome.value, error=error, nbytes=nbytes)
        if effect.outcome is Outcome.DONE:
            self.host.journal.phase(self.id, Phase.DONE)

"""
The source host: locking a VM, giving it up at the commit, or keeping it.

The commit point of a migration is :meth:`Departure.commit`'s journal
write: before it, every failure leaves the VM here, unlocked and intact;
after it, the VM belongs to the destination and this side discards its copy.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from securemig import crashpoint, files
from securemig.crashpoint import CrashPoint
from securemig.host import storage
from securemig.host.arrival import variant_name
from securemig.host.journal import Journal, driving
from securemig.host.shareddisk import foreign_owner
from securemig.hypervisor.backends import Backend, backend_for, capabilities
from securemig.hypervisor.bundle import Bundle, BundleError, set_disk_owner
from securemig.hypervisor.contract import LiveSide
from securemig.hypervisor.qemu import LIVE_DOWNTIME_LIMIT_MS, LIVE_MAX_BANDWIDTH, LiveStats
from securemig.protocol import wire
from securemig.protocol.effects import Finished, Outcome
from securemig.protocol.errors import ErrorCode, MigrationError, ProtocolError
from securemig.protocol.phases import Phase
from securemig.protocol.recovery import Decision, SourceGuest, asks_destination, carried_decision
from securemig.trust import vtpm

log = Logger()


class VMLocked(BundleError):
    """Another migration of this VM holds its lock."""

    default_code = ErrorCode.VM_BUSY


class Undecided(MigrationError):
    """A carried live departure whose hypervisor cannot be asked where the
    guest is, after the destination may hold it whole: neither committed
    nor aborted (``protocol.recovery.carried_decision``); this host's
    daemon decides once the hypervisor answers."""

    default_code = ErrorCode.LIVE_FAILED


class Departure:
    """One VM leaving this host."""

    def __init__(
        self,
        bundle: Bundle,
        variant: wire.Variant,
        peer: str,
        protocol: str,
        journal: Journal,
        vtpm_key: bytes | None = None,
        peer_name: str | None = None,
        live: bool = False,
        live_options: tuple[int, int] | None = None,
    ) -> None:
        self.bundle = bundle
        self.variant = variant
        #: Live mode: QEMU's own stream moves memory (and the vTPM) while the
        #: guest runs; no image is streamed, and the disk must be shared.
        self.live = live
        if live:
            check_live(bundle, variant)
        self.images = [] if live else bundle.streamed_images(variant)
        #: Live mode: the source QEMU's side of the migration, once started,
        #: and QEMU's numbers when it completed.
        self.live_migration: LiveSide | None = None
        self.live_stats: LiveStats | None = None
        #: Live mode: the guest's downtime bounded at the source (ms), from
        #: its stop to the destination's DONE (``LiveStats.guest_downtime_ms``).
        self.guest_downtime_ms: int | None = None
        #: Live mode: QEMU's downtime limit (ms) and bandwidth (bytes/s).
        self.live_options: tuple[int, int] = live_options or (
            LIVE_DOWNTIME_LIMIT_MS,
            LIVE_MAX_BANDWIDTH,
        )
        #: Live mode, a backend whose stream is carried sockets: copy the
        #: disks too (non-shared storage), extra memory channels; and what
        #: HELLO tells the destination's backend (``backend_info``).
        self.copy_storage = False
        self.parallel = 0
        self.backend_info = b""
        # The vTPM key, unsealed before the VM is suspended, so a rollback
        # can restart the vTPM without the host TPM (busy with the session).
        self.backend: Backend = backend_for(
            bundle.manifest.backend, vtpm_key=None if vtpm_key is None else lambda b: vtpm_key
        )
        self.journal = journal
        self.lock: storage.VMLock | None = None
        self.was_running = False
        self.committed = False
        #: Live, after COMMITTED: what the hypervisor left of the guest here
        #: is kept until the destination's DONE (:meth:`keeps_copy`).
        self.kept = False
        #: Live, carried: the destination said PREPARED (journaled here).
        self.prepared = False
        #: Live, carried: ended with nothing decided (:class:`Undecided`):
        #: journaled in doubt without COMMITTED, for the daemon; and why
        #: (who cannot be asked yet: the hypervisor here, or the destination).
        self.undecided = False
        self.undecided_why = ""
        #: After a suspended migration's commit: the removal of the bundle
        #: here, overlapping the destination's resume (see :meth:`commit`).
        self.releasing: Deferred[None] | None = None
        #: Secure shared-storage variant: the host the shared disk passes to.
        self.disk_successor: str | None = None
        self.id = ""
        #: TCP payload bytes the destination acknowledged (see protocol.tcp_bytes_acked).
        self.wire_bytes: int | None = None
        self.peer = peer
        #: The name the destination proves (secure variant), for RESOLVE later.
        self.peer_name = peer_name
        self.protocol = protocol

    async def acquire(self) -> None:
        """Lock the VM, journal the start, and suspend it into its images."""
        try:
            self.lock = storage.VMLock(self.bundle.lock_path)
        except storage.LockBusy:
            raise VMLocked(
                f"VM {self.bundle.name} is locked by another migration ({self.bundle.lock_path})"
            ) from None
        self.id = self.journal.begin(
            role="source",
            vm=self.bundle.name,
            peer=self.peer,
            variant=variant_name(self.variant),
            protocol=self.protocol,
            peer_name=self.peer_name,
            bundle=str(self.bundle.path),
            total=self.total_bytes,
        )
        # Until transport.client.migrate ends: recovery in this process
        # (the daemon's, for migrate --daemon) leaves the record alone.
        driving(self.id)
        try:
            self.was_running = self.backend.status(self.bundle) == "running"
            if self.live:
                if not self.was_running:
                    raise BundleError(
                        f"VM {self.bundle.name} is not running: live migration moves a "
                        "running guest (migrate it without --live)"
                    )
                caps = capabilities(self.bundle.manifest.backend)
                if caps.carried:
                    self.backend_info = await self.backend.live_info(
                        self.bundle, self.copy_storage, self.parallel
                    )
                elif self.copy_storage:
                    raise BundleError(
                        f"VM {self.bundle.name}: --copy-storage is for backends whose "
                        "migration copies its own disks (libvirt domains)"
                    )
                elif self.parallel:
                    if not 1 <= self.parallel <= caps.multifd:
                        raise BundleError(
                            f"VM {self.bundle.name}: --parallel: 1 to {caps.multifd} "
                            f"multifd channels for a {self.bundle.manifest.backend} VM"
                            if caps.multifd
                            else f"VM {self.bundle.name}: its backend migrates on one "
                            "stream (no --parallel)"
                        )
                    # Its own stream on multifd channels: HELLO tells the
                    # destination's QEMU how many to expect.
                    self.backend_info = await self.backend.live_info(
                        self.bundle, False, self.parallel
                    )
                # Recovery continues the guest here if this migration never
                # commits (its QEMU may be left paused, after the stream).
                self.journal.phase(self.id, Phase.LIVE)
                return
            if not capabilities(self.bundle.manifest.backend).suspend:
                raise BundleError(
                    f"VM {self.bundle.name} is a {self.bundle.manifest.backend} VM: that "
                    "backend does not migrate suspended"
                )
            await self.backend.suspend(self.bundle)
            # What the suspend wrote (a libvirt domain's save file and disks
            # exist only now): the images HELLO announces.
            self.images = self.bundle.streamed_images(self.variant)
            if self.was_running:
                # Recovery resumes the VM here if this migration never commits.
                self.journal.phase(self.id, Phase.SUSPENDED)
        except BaseException as e:
            await self.rollback()
            self.refused(e)
            raise

    def refused(self, error: BaseException) -> None:
        """Journal the end of a migration refused here before anything was
        sent (the VM stays, unlocked): its record is closed, not left
        ``started`` for recovery to settle as a lost connection."""
        if isinstance(error, MigrationError):
            code = error.code.name
        else:
            code = "IO_ERROR" if isinstance(error, OSError) else "INTERNAL"
        self.journal.finish(self.id, "aborted", error=f"{code}: {error}", nbytes=0)

    def hello(self, chunk_size: int) -> wire.Hello:
        """The HELLO announcing this VM: version 2, whose tail says what the VM
        is (its backend, vTPM) so a destination that cannot run it refuses it
        at admission."""
        hello = wire.Hello(
            version=1,
            variant=self.variant,
            vm_name=self.bundle.name,
            chunk_size=chunk_size,
            images=tuple(wire.ImageInfo(i.name, i.size) for i in self.images),
            shared_disk=self.shared_disk,
            memory_mib=self.bundle.manifest.memory_mib or 0,
            guest="linux" if self.bundle.manifest.guest == "linux" else "",
            guest_cmdline=self.bundle.manifest.guest_cmdline,
            mode=wire.Mode.LIVE if self.live else wire.Mode.SUSPENDED,
            backend=self.bundle.manifest.backend,
            vtpm=1 if self.bundle.manifest.vtpm else 0,
            backend_info=self.backend_info,
        )
        return replace(hello, version=2) if wire.has_tail(hello) else hello

    def hand_shared_disk(self, me: str, successor: str) -> None:
        """Secure shared-storage variant, before anything moves: check that
        the shared disk is ours (host ``me``) to hand over, and hand it to
        ``successor`` at the commit point (:mod:`securemig.host.shareddisk`).
        Raises :class:`BundleError` naming the owner otherwise."""
        shared = self.shared_disk
        if not shared:
            return
        owner = foreign_owner(Path(shared), me)
        if owner is not None:
            raise BundleError(f"shared disk {shared} belongs to {owner}, not {me}")
        self.disk_successor = successor

    @property
    def shared_disk(self) -> str:
        """The shared disk's path, announced in the shared-storage variant."""
        if self.variant is wire.Variant.SHARED_STORAGE:
            return self.bundle.manifest.shared_disk or ""
        return ""

    @property
    def total_bytes(self) -> int:
        """Bytes of image data this migration streams."""
        return sum(i.size for i in self.images)

    @property
    def expected_bytes(self) -> int:
        """What a progress bar counts to: the images, or (live) the guest's
        RAM once; QEMU sends the pages dirtied meanwhile again, so a live
        migration may move more."""
        if self.live:
            return (self.bundle.manifest.memory_mib or 0) << 20
        return self.total_bytes

    def stream_files(self) -> list[tuple[Path, int]]:
        """Paths and sizes of the images, in HELLO order."""
        return [(self.bundle.image_path(i), i.size) for i in self.images]

    def connected(self) -> None:
        """The connection is up."""
        self.journal.phase(self.id, Phase.CONNECTED)

    def streaming(self, migration_id: bytes | None) -> None:
        """The destination admitted us; images flow."""
        if migration_id is not None:
            self.journal.set_migration_id(self.id, migration_id.hex())
        self.journal.phase(self.id, Phase.STREAMING)

    async def commit(self) -> None:
        """The commit point: journal COMMITTED, then give the VM up.

        Live mode: only once this side's QEMU too says the stream completed
        (paused in postmigrate), or is gone (PREPARED says the destination
        loaded the whole stream: it holds the only copy, and aborting would
        lose it).  After the commit the paused QEMU, its vTPM key and the
        bundle stay (and the lock) until the destination's guest runs
        (:meth:`hand_over`, on DONE): if the destination's QEMU ends before
        that, this one continues the guest (``protocol.recovery``)."""
        crashpoint.reached(CrashPoint.SOURCE_PREPARED_RECEIVED, self.qemu_pidfile())
        if self.live_migration is not None and self.carried:
            # Durable before anything is decided: recovery then knows the
            # destination holds the whole guest (carried_decision).
            self.prepared = True
            self.journal.phase(self.id, Phase.PREPARED)
        if self.live_migration is not None:
            try:
                self.live_stats = await self.live_migration.wait(timeout=30.0)
            except MigrationError as e:
                if self.carried:
                    guest = await self.guest_here()
                    decision = carried_decision(guest, prepared=True)
                    if decision is None:
                        raise Undecided(
                            f"{e}; the source's hypervisor cannot be asked where the guest "
                            "is: in doubt (this host's daemon decides once it answers)"
                        ) from None
                    if decision is Decision.ABORTED:
                        raise ProtocolError(ErrorCode.LIVE_FAILED, str(e)) from None
                elif await self.live_qemu_alive():
                    raise ProtocolError(ErrorCode.LIVE_FAILED, str(e)) from None
                log.warn(
                    "VM {vm}: its guest ended here after the stream; the destination loaded "
                    "it all (PREPARED): committing",
                    vm=self.bundle.name,
                )
        if self.prepared:
            self.journal.phase(self.id, Phase.COMMITTED)
        else:
            # One durable write: PREPARED alone decides nothing here
            # (recovery treats it as not committed), so the two need not be
            # two fsyncs.
            self.journal.phases(self.id, Phase.PREPARED, Phase.COMMITTED)
        self.committed = True
        crashpoint.reached(CrashPoint.SOURCE_COMMITTED, self.qemu_pidfile())
        record = self.journal.get(self.id)
        shared = self.bundle.manifest.shared_disk
        if shared and self.disk_successor is not None:
            set_disk_owner(
                Path(shared), self.disk_successor, record.migration_id if record else None
            )
        self.kept = await self.keeps_copy()
        if self.kept:
            return  # kept until DONE: hand_over()
        # The vTPM key goes before the COMMIT is sent: without it this copy
        # can never run again.  Removing the images (a GiB takes a tenth of
        # a second or more) need not: it overlaps the destination's resume
        # instead of delaying it; the command ends only once it is done
        # (:meth:`released`), and recovery redoes it after a crash.
        destroy_vtpm_key(self.bundle)
        self.releasing = Deferred.fromCoroutine(self._release())

    async def _release(self) -> None:
        await release(self.journal, self.id, self.bundle)
        self._unlock()
        crashpoint.reached(CrashPoint.SOURCE_RELEASED)

    def released(self) -> Deferred[None] | None:
        """After a suspended migration's commit: fires once the VM is given
        up here (its bundle removed, the lock released); None when nothing
        is under way.  A failure to release is logged: committed is
        committed."""
        if self.releasing is None:
            return None
        d, self.releasing = self.releasing, None

        def failed(f: Failure) -> None:
            log.error(
                "VM {vm} committed, but giving it up here failed: {e}",
                vm=self.bundle.name,
                e=f.getErrorMessage(),
            )

        return d.addErrback(failed)

    def live_socket(self, tag: str) -> Path:
        """Live mode: the unix socket securemig listens on for this VM's
        stream (``tag``: the migration's own), not yet there."""
        path = self.backend.live_socket(self.bundle, tag)
        path.unlink(missing_ok=True)
        return path

    @property
    def carried(self) -> bool:
        """Live through the hypervisor's own migration, its sockets carried
        (``Capabilities.carried``), rather than one QEMU stream."""
        return capabilities(self.bundle.manifest.backend).carried

    def carried_sockets(self, tag: str) -> dict[str, str]:
        """Live, carried: the sockets securemig listens on for migration
        ``tag`` (its id), by name; none of them left from before."""
        sockets = self.backend.carried_sockets(tag, destination=False)
        for path in sockets.values():
            Path(path).unlink(missing_ok=True)
        return sockets

    async def start_live(self, uri: str) -> None:
        """Live mode: start the guest's own stream to ``uri`` while it runs,
        with this migration's downtime limit and bandwidth (carried: ``uri``
        is the migration's tag, and the disks are copied and memory channels
        added as asked)."""
        if self.carried:
            self.live_migration = await self.backend.live_source(
                self.bundle,
                uri,
                *self.live_options,
                copy_storage=self.copy_storage,  # type: ignore[call-arg]
                parallel=self.parallel,
            )
        elif self.parallel:
            # Its own stream on multifd channels, each carried on its own.
            self.live_migration = await self.backend.live_source(
                self.bundle,
                uri,
                *self.live_options,
                multifd=self.parallel,  # type: ignore[call-arg]
            )
        else:
            self.live_migration = await self.backend.live_source(
                self.bundle, uri, *self.live_options
            )
        crashpoint.reached(CrashPoint.SOURCE_LIVE_STARTED)

    async def live_sent(self) -> None:
        """Live mode: until the backend says the stream completed (its guest
        paused here); its numbers are kept for the journal (:meth:`hand_over`)."""
        if self.live_migration is None:
            raise MigrationError("no live migration was started")
        self.live_stats = await self.live_migration.wait()

    def qemu_pidfile(self) -> Path | None:
        """Live mode: the pid file of this VM's QEMU (for crash points)."""
        return self.bundle.path / "qemu.pid" if self.live else None

    async def keeps_copy(self) -> bool:
        """Live, after COMMITTED: whether something is kept here until the
        destination's guest runs (DONE): QEMU's paused process, or -- a
        hypervisor that ended its own (libvirt: committed only once the
        guest is not here) -- the domain's definition, vTPM state and
        sealed secret, so a guest whose destination QEMU dies before it ran
        there (LOST) can at least be booted here again with its vTPM."""
        if self.live_migration is None:
            return False
        return self.carried or await self.live_qemu_alive()

    def live_started(self) -> bool:
        """Live mode: whether the backend's migration was started (its QEMU,
        paused after the stream, is kept after COMMITTED until DONE)."""
        return self.live_migration is not None

    async def live_qemu_alive(self) -> bool:
        """Live mode: whether this VM's QEMU still runs here (asked off the
        reactor thread: libvirt's answer blocks)."""
        return await self.backend.process_alive(self.bundle)

    async def guest_here(self) -> SourceGuest:
        """Live, carried: where the hypervisor says the guest is
        (``Backend.guest_here``, off the reactor thread); MOVED without
        asking once the hypervisor's migration returned success."""
        if self.live_migration is not None and getattr(self.live_migration, "completed", False):
            return SourceGuest.MOVED
        return await self.backend.guest_here(self.bundle)

    async def hand_over(self) -> None:
        """Live mode, after COMMITTED: the destination said DONE (its guest
        runs, QMP says so): end the paused QEMU and its swtpm here, then
        destroy the key and the bundle.  Idempotent (recovery redoes it)."""
        running = time.monotonic()  # DONE just arrived: the guest runs there
        live = self.live_migration
        if self.live_migration is not None:
            try:
                await self.live_migration.finish()
            except Exception as e:
                # Its QEMU may have ended already (killed, crashed): the guest
                # runs there, and what is left here goes with the bundle
                # (its discard ends any process of it) all the same.
                log.warn(
                    "VM {vm}: ending its paused QEMU here: {e}; removing its copy",
                    vm=self.bundle.name,
                    e=e,
                )
            crashpoint.reached(CrashPoint.SOURCE_LIVE_ENDED)
        if live is not None and live.started is not None and self.live_stats is not None:
            # After finish: a hypervisor that committed before its own call
            # returned (libvirt) has its numbers only then.
            self.guest_downtime_ms = self.live_stats.guest_downtime_ms(live.started, running)
        if self.live_stats is not None:
            # Journaled only now, with the guest running there: nothing
            # written between QEMU's completion and the destination's cont.
            stats = self.live_stats
            self.journal.set_live_numbers(
                self.id, stats.downtime_ms, stats.total_ms, stats.transferred,
                self.guest_downtime_ms,
            )  # fmt: skip
        await release(self.journal, self.id, self.bundle)
        self._unlock()
        crashpoint.reached(CrashPoint.SOURCE_RELEASED)

    def keep_paused(self) -> None:
        """Live mode, after COMMITTED, the destination's DONE not seen: the
        paused QEMU stays for recovery (RESOLVE tells whether the guest runs
        there, or never did); let go of its QMP socket and the lock."""
        if self.live_migration is not None:
            self.live_migration.release()
        self._unlock()

    def rollback(self) -> Deferred[None]:
        """Before the commit: keep the VM here, resumed if it was running,
        and unlocked once that is done.  Fires when it is."""
        assert not self.committed
        if not self.was_running:
            self._unlock()
            return succeed(None)
        if self.live:
            # The guest never stopped here, or waits in postmigrate: it goes on.
            return self._live_rollback()

        def failed(f: Failure) -> None:
            log.error(
                "could not resume VM {vm} at the source: {f}",
                vm=self.bundle.name,
                f=f.getErrorMessage(),
            )

        d = self.backend.resume(self.bundle)
        d.addErrback(failed)
        d.addBoth(lambda _: self._unlock())
        return d

    def _live_rollback(self) -> Deferred[None]:
        async def go_on() -> None:
            try:
                if self.live_migration is not None:
                    try:
                        await self.live_migration.cancel()
                    finally:
                        self.live_migration.release()
            except Exception as e:
                log.error("could not continue VM {vm} here: {e}", vm=self.bundle.name, e=e)
            try:
                if self.live_migration is not None and self.carried:
                    await self._decide_carried()
            finally:
                self._unlock()

        return Deferred.fromCoroutine(go_on())

    async def _decide_carried(self) -> None:
        """Live, carried, the session failed before COMMITTED (the guest
        continued here if it could be): decide from where the hypervisor
        says the guest is (``protocol.recovery.carried_decision``): commit
        what it moved, or what the destination holds whole (PREPARED) once
        the guest is gone here; decide nothing while it cannot be asked."""
        guest = await self.guest_here()
        decision = carried_decision(guest, self.prepared)
        if decision is Decision.COMMITTED:
            await self._committed_by_hypervisor()
        elif decision is None:
            self.undecided = True
            if asks_destination(guest, self.prepared):
                # Gone here, PREPARED never seen: the destination may hold the
                # whole guest (its hypervisor's Finish ran) or nothing; this
                # host's daemon asks it (ASK) and decides on its answer.
                self.undecided_why = (
                    "the guest is gone here and the destination never said PREPARED: "
                    "this host's daemon asks the destination what it holds"
                )
            else:
                self.undecided_why = (
                    "the hypervisor here could not be asked where the guest is: "
                    "this host's daemon decides once it answers"
                )
            log.warn(
                "VM {vm}: {why}; in doubt, neither committed nor aborted",
                vm=self.bundle.name,
                why=self.undecided_why,
            )

    async def moved_by_hypervisor(self) -> bool:
        """Live, a backend whose hypervisor migrates on its own (libvirt,
        peer to peer): its migration completed, so the guest is no longer
        here -- it waits paused at the destination, the only copy of its
        memory -- and cancelling cannot bring it back.  Asked off the
        reactor thread; False while the hypervisor cannot be asked."""
        if self.live_migration is None or not self.carried:
            return False
        return await self.guest_here() is SourceGuest.MOVED

    async def _committed_by_hypervisor(self) -> None:
        """The session failed after the hypervisor completed (before
        PREPARED, or before COMMITTED was journaled): aborting would discard
        the only copy at the destination.  The hypervisor decided: COMMITTED
        is journaled here, this copy given up, and the destination owes
        RESOLVE(committed) its roll forward (it holds the arrived guest in
        doubt, ``DestinationHost``).  In doubt until it confirms."""
        log.warn(
            "VM {vm}: the hypervisor's migration completed before the commit; the guest "
            "waits at the destination: committing",
            vm=self.bundle.name,
        )
        self.journal.phase(self.id, Phase.COMMITTED)
        self.committed = True
        self.kept = True
        crashpoint.reached(CrashPoint.SOURCE_COMMITTED)
        # Kept until the destination says its guest runs (RESOLVE: DONE).

    def finish(self, effect: Finished, nbytes: int, peer_settled: bool = False) -> None:
        """Journal the outcome; ``peer_settled``: the destination told us its
        own (DONE, or its ABORT), so no RESOLVE is owed.  A session that
        failed after this side committed (the hypervisor moved the guest) is
        in doubt, not aborted."""
        error = f"{effect.code.name}: {effect.reason}" if effect.code else None
        outcome = effect.outcome
        if (self.committed or self.undecided) and outcome is Outcome.ABORTED:
            # Committed: its ABORT said it discarded, but it holds the
            # arrived guest: it is owed RESOLVE(committed) all the same.
            # Undecided: nothing is aborted on an unknown (the record stays
            # in doubt without COMMITTED, for the daemon to decide).
            outcome, peer_settled = Outcome.IN_DOUBT, False
        self.journal.finish(self.id, outcome.value, error=error, nbytes=nbytes)
        if peer_settled:
            self.journal.set_peer_settled(self.id)

    def _unlock(self) -> None:
        if self.lock is not None:
            self.lock.release()


def destroy_vtpm_key(bundle: Bundle) -> None:
    """After a durable COMMITTED: remove the vTPM key here, durably (this
    copy of the VM can never run again).  Idempotent."""
    files.remove_durably(bundle.vtpm_key_path)


async def release(journal: Journal, local_id: str, bundle: Bundle) -> bool:
    """After a durable COMMITTED: give the VM up here for good.  The vTPM
    key goes first (without it this copy can never run again), then the
    bundle; journaled ``released``.  Idempotent: recovery redoes it.

    Returns whether the copy here is gone.  A discard that failed (a
    libvirt domain whose libvirtd is down) is not journaled ``released``:
    the durable COMMITTED without it is what tells this host's daemon to
    redo the release (``Journal.departures``, ``recovery``) until it is."""
    destroy_vtpm_key(bundle)
    if bundle.path.exists():
        record = journal.get(local_id)
        moved = record.migration_id if record is not None and record.migration_id else ""
        try:
            await backend_for(bundle.manifest.backend).discard_moved(bundle, moved)
        except Exception as e:
            # Committed is committed: the VM is the destination's now, and
            # without its key this copy cannot run; what is left here is
            # removed later, never a reason to roll back.
            log.error(
                "VM {vm} committed, but removing its copy here failed ({e}); "
                "this host's daemon removes it later",
                vm=bundle.name,
                e=e,
            )
            return False
    else:
        # Redone after a crash between the bundle's rename and the journal's
        # ``released``: what the killed remover left is removed now.
        files.sweep_discarded(bundle.path.parent)
    record = journal.get(local_id)
    if record is not None and not record.reached(Phase.RELEASED):
        journal.phase(local_id, Phase.RELEASED)
    return True


def check_keys(bundle: Bundle, *, secure: bool, live: bool, unseal_with: Path | None) -> None:
    """Before anything is touched: refuse a migration whose vTPM key this
    host cannot hand over as asked, saying how to ask.  Secure: the VM's key,
    sealed to this host's TPM, is released to the destination (and live
    migration is secure only); insecure: a VM with a vTPM needs the
    identity (``unseal_with``) that unseals its key, sent in the clear."""
    if live and not secure:
        raise BundleError("live migration is secure only: give --identity, not --insecure")
    if secure and not bundle.vtpm_key_path.exists():
        raise BundleError(
            f"VM {bundle.name} has no vTPM key ({bundle.vtpm_key_path}); "
            "create it with --identity, or migrate it --insecure"
        )
    if not secure and has_vtpm_key(bundle) and unseal_with is None:
        raise BundleError(
            f"VM {bundle.name} has a vTPM: give --identity to unseal its key (the insecure "
            "variant then sends it in the clear)"
        )


def check_live(bundle: Bundle, variant: wire.Variant) -> None:
    """Refuse a live migration this VM cannot make, saying why."""
    if not capabilities(bundle.manifest.backend).live_source:
        raise BundleError(
            f"VM {bundle.name} is a {bundle.manifest.backend} VM: that backend does not "
            "migrate live (migrate it without --live)"
        )
    if variant is not wire.Variant.SHARED_STORAGE or any(
        image.name == "disk" for image in bundle.manifest.images
    ):
        # Copying a disk while the guest writes it is a second stream with
        # its own convergence and failure cases (QEMU's block mirror): not here.
        raise BundleError(
            f"VM {bundle.name}: live migration moves RAM only; its disk must be on shared "
            "storage (--shared-storage, a VM created with --shared-disk or without a disk)"
        )


def has_vtpm_key(bundle: Bundle) -> bool:
    """Whether the VM has a vTPM key to hand over: its manifest names a vTPM
    (QEMU's), or its backend keeps the vTPM's secret itself and the bundle
    holds it sealed (a libvirt domain's secret, which has no identity)."""
    if bundle.manifest.vtpm:
        return True
    return capabilities(bundle.manifest.backend).carried and bundle.vtpm_key_path.exists()


def unseal_vtpm_key(bundle: Bundle, identity: Path) -> bytes:
    """The VM's vTPM key and identity, unsealed with this host's TPM, for the
    insecure variant (which sends them in the clear)."""

    secret = vtpm.key_reader(vtpm.unsealer(identity))(bundle)
    return secret + bytes.fromhex(bundle.manifest.vtpm or "")

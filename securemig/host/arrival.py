"""
The destination host: admitting, staging, preparing and committing arrivals.

Layout of a destination's state directory::

    STATE_DIR/journal.sqlite      every migration this host took part in
    STATE_DIR/vms/NAME/           VMs that arrived (bundle layout)
    STATE_DIR/staging/MID/        an arrival in progress (or held in doubt)
    STATE_DIR/locks/NAME.lock     held while VM NAME is arriving

Methods of :class:`Arrival` that touch files run on the connection's disk
thread (see :mod:`securemig.transport.control`), in the order the session asked.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from securemig import files
from securemig.host import storage
from securemig.host.journal import Journal
from securemig.hypervisor.backends import backend_for
from securemig.hypervisor.bundle import Bundle, Image, Manifest, image_file
from securemig.protocol import wire
from securemig.protocol.effects import Finished, Outcome
from securemig.protocol.errors import ErrorCode, ProtocolError
from securemig.trust.vtpm import key_reader

log = Logger()


def variant_name(variant: wire.Variant) -> str:
    """The variant as journaled and shown: ``full`` or ``shared-storage``."""
    return variant.name.lower().replace("_", "-")


class DestinationHost:
    """One destination's state directory and the policy it applies."""

    def __init__(
        self,
        state_dir: Path,
        backend: str = "image",
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

    def resume(self, bundle: Bundle) -> Deferred[None]:
        """Resume an arrived VM with the backend its manifest names."""

        key = None if self.unseal is None else key_reader(self.unseal)
        return backend_for(bundle.manifest.backend, vtpm_key=key).resume(bundle)

    def recover_staging(self) -> list[str]:
        """Settle staging left by a crash; returns what was removed.

        A staging directory whose migration never reached PREPARED cannot
        have been committed by the source (it commits only after PREPARED),
        so it is removed.  A prepared one is kept and marked in doubt: only
        the source's journal can say whether it committed.
        """
        removed = []
        for path in sorted(self.staging.iterdir()):
            record = self.journal.get(path.name)
            if record is not None and record.phase in ("prepared", "in-doubt"):
                if record.outcome is None:
                    self.journal.finish(
                        path.name,
                        Outcome.IN_DOUBT.value,
                        error="destination restarted after PREPARED",
                    )
                continue
            files.remove_tree(path)
            removed.append(path.name)
            if record is not None and record.outcome is None:
                self.journal.finish(
                    path.name,
                    Outcome.ABORTED.value,
                    error="CONNECTION_LOST: destination restarted before PREPARED",
                )
        for record in self.journal.unfinished():
            if record.role == "destination" and not (self.staging / record.id).exists():
                self.journal.finish(
                    record.id,
                    Outcome.ABORTED.value,
                    error="destination restarted; nothing was staged",
                )
        return removed

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
            committed = "committed" in {phase for phase, _ in theirs.events}
            if not committed and theirs.outcome is None:
                actions.append((staging.name, "source has not decided yet; left in doubt"))
                continue
            try:
                lock = storage.Lock(self.locks / f"{record.vm}.lock")
            except storage.LockBusy:
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
            files.remove_tree(staging)
            self.journal.finish(
                staging.name, Outcome.ABORTED.value, error="settled: the source did not commit"
            )
            return "source did not commit: staging discarded"
        if target.exists():
            return f"source committed, but {target} exists; left in doubt"
        self.journal.phase(staging.name, "committed")
        files.rename_durably(staging, target)
        bundle = Bundle.load(target)
        await self.resume(bundle)
        self.journal.phase(staging.name, "resumed")
        self.journal.finish(staging.name, Outcome.DONE.value)
        return f"source committed: VM {record.vm} resumed here"

    def admit(self, hello: wire.Hello, peer: str, protocol: str) -> Arrival:
        """Accept a HELLO or raise :class:`ProtocolError` saying why not."""
        name = hello.vm_name
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
            held = [
                r.id
                for r in self.journal.records(1000)
                if r.vm == name
                and r.outcome == Outcome.IN_DOUBT.value
                and (self.staging / r.id).exists()
            ]
            if held:
                raise ProtocolError(
                    ErrorCode.VM_BUSY,
                    f"an earlier migration of VM {name} ({held[0]}) is in doubt here; "
                    "settle it first (securemig status)",
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
            )
            staging.mkdir()
            self.journal.phase(migration_id.hex(), "admitted")
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
        #: Secure variant: the vTPM key, re-sealed to this host's TPM, and
        #: the vTPM's identity, checked with it.
        self.sealed_vtpm_key: bytes | None = None
        self.vtpm_identity: str | None = None
        self._file: Any = None
        self._behind: storage.WriteBehind | None = None
        self._hash: Any = hashlib.sha256()
        self._image: wire.ImageInfo | None = None

    # -- on the disk thread

    def open_stream(self, index: int, hashed: bool = True) -> None:
        """Create the staging file of image ``index``; ``hashed``: check its
        SHA-256 at the end (not on the data channel, whose records are
        authenticated one by one)."""
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

    def prepare(self) -> None:
        """Write the bundle manifest in staging and make it all durable."""
        if self.cancelled:
            return
        manifest = Manifest(
            name=self.hello.vm_name,
            backend=self.host.backend,
            images=[Image(i.name, i.size) for i in self.hello.images],
            shared_disk=self.hello.shared_disk or None,
            vtpm=self.vtpm_identity,
            memory_mib=self.hello.memory_mib or None,
        )
        bundle = Bundle(self.staging, manifest)
        if self.sealed_vtpm_key is not None:
            files.write_durably(bundle.vtpm_key_path, self.sealed_vtpm_key, mode=0o600)
        bundle.save()
        files.fsync_dir(self.staging)

    def discard(self) -> None:
        """Remove staging and release the name."""
        if self._file is not None:
            self._file.close()
            self._file = None
        files.remove_tree(self.staging)
        self.lock.release()

    # -- on the reactor thread

    def cancel(self) -> None:
        """Make queued disk jobs do nothing; a discard follows."""
        self.cancelled = True

    def journal_phase(self, phase: str, nbytes: int) -> None:
        """Record a phase of this arrival."""
        self.host.journal.phase(self.id, phase, nbytes=nbytes)

    async def commit(self) -> None:
        """The source committed: move the VM into place and resume it."""
        self.host.journal.phase(self.id, "committed")
        target = self.host.vms / self.hello.vm_name
        files.rename_durably(self.staging, target)
        bundle = Bundle.load(target)
        await self.host.resume(bundle)
        self.host.journal.phase(self.id, "resumed")
        self.lock.release()

    def hold(self) -> None:
        """Keep the prepared staging for recovery; free the lock."""
        log.warn(
            "migration {mid}: holding prepared staging {path} in doubt",
            mid=self.id,
            path=str(self.staging),
        )
        self.lock.release()

    def finish(self, effect: Finished, nbytes: int) -> None:
        """Journal the outcome."""
        error = f"{effect.code.name}: {effect.reason}" if effect.code else None
        self.host.journal.finish(self.id, effect.outcome.value, error=error, nbytes=nbytes)
        if effect.outcome is Outcome.DONE:
            self.host.journal.phase(self.id, "done")

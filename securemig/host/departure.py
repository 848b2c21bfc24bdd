"""
The source host: locking a VM, giving it up at the commit, or keeping it.

The commit point of a migration is :meth:`Departure.commit`'s journal
write: before it, every failure leaves the VM here, unlocked and intact;
after it, the VM belongs to the destination and this side discards its copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from securemig.host import storage
from securemig.host.arrival import variant_name
from securemig.host.journal import Journal
from securemig.hypervisor import Backend, backend_for
from securemig.hypervisor.bundle import Bundle, BundleError
from securemig.protocol import wire
from securemig.protocol.session import Finished

log = Logger()


class VMLocked(BundleError):
    """Another migration of this VM holds its lock."""


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
    ) -> None:
        self.bundle = bundle
        self.variant = variant
        self.images = bundle.streamed_images(variant)
        # The vTPM key, unsealed before the VM is suspended, so a rollback
        # can restart the vTPM without the host TPM (busy with the session).
        self.backend: Backend = backend_for(
            bundle.manifest.backend, vtpm_key=None if vtpm_key is None else lambda b: vtpm_key
        )
        self.journal = journal
        self.lock: storage.Lock | None = None
        self.was_running = False
        self.committed = False
        #: Secure shared-storage variant: the host the shared disk passes to.
        self.disk_successor: str | None = None
        self.id = ""
        #: TCP payload bytes the destination acknowledged (see protocol.tcp_bytes_acked).
        self.wire_bytes: int | None = None
        self.peer = peer
        self.protocol = protocol

    async def acquire(self) -> None:
        """Lock the VM, journal the start, and suspend it into its images."""
        try:
            self.lock = storage.Lock(self.bundle.lock_path)
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
        )
        try:
            self.was_running = self.backend.status(self.bundle) == "running"
            await self.backend.suspend(self.bundle)
        except BaseException:
            await self.rollback()
            raise

    def hello(self, chunk_size: int) -> wire.Hello:
        """The HELLO announcing this VM."""
        return wire.Hello(
            version=wire.PROTOCOL_VERSION,
            variant=self.variant,
            vm_name=self.bundle.name,
            chunk_size=chunk_size,
            images=tuple(wire.ImageInfo(i.name, i.size) for i in self.images),
            shared_disk=self.shared_disk,
            memory_mib=self.bundle.manifest.memory_mib or 0,
        )

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

    def stream_files(self) -> list[tuple[Path, int]]:
        """Paths and sizes of the images, in HELLO order."""
        return [(self.bundle.image_path(i), i.size) for i in self.images]

    def connected(self) -> None:
        """The connection is up."""
        self.journal.phase(self.id, "connected")

    def streaming(self, migration_id: bytes | None) -> None:
        """The destination admitted us; images flow."""
        if migration_id is not None:
            self.journal.set_migration_id(self.id, migration_id.hex())
        self.journal.phase(self.id, "streaming")

    async def commit(self) -> None:
        """The commit point: journal COMMITTED, then give the VM up."""
        self.journal.phase(self.id, "prepared")
        self.journal.phase(self.id, "committed")
        self.committed = True
        # No cloning: the vTPM key goes first, so this copy can never run again.
        if self.bundle.vtpm_key_path.exists():
            self.bundle.vtpm_key_path.unlink()
            storage.fsync_dir(self.bundle.path)
        shared = self.bundle.manifest.shared_disk
        if shared and self.disk_successor is not None:
            record = self.journal.get(self.id)
            storage.set_disk_owner(
                Path(shared), self.disk_successor, record.migration_id if record else None
            )
        try:
            await self.backend.discard(self.bundle)
        except Exception as e:
            # Committed is committed: the VM is the destination's now. What is
            # left here is garbage for the operator, not a reason to roll back.
            log.error("committed, but discarding the local copy failed: {e}", e=e)
        self._unlock()

    def rollback(self) -> Deferred[None]:
        """Before the commit: keep the VM here, resumed if it was running,
        and unlocked once that is done.  Fires when it is."""
        assert not self.committed
        if not self.was_running:
            self._unlock()
            return succeed(None)

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

    def finish(self, effect: Finished, nbytes: int) -> None:
        """Journal the outcome."""
        error = f"{effect.code.name}: {effect.reason}" if effect.code else None
        self.journal.finish(self.id, effect.outcome.value, error=error, nbytes=nbytes)

    def _unlock(self) -> None:
        if self.lock is not None:
            self.lock.release()


@dataclass
class SecureOptions:
    """How a source runs the secure variant."""

    identity: Path
    policy_dir: Path | None = None
    tofu: bool = False
    #: The name the destination must prove; default: the host of --to.
    destination_name: str | None = None

    def prepare(self, bundle: Bundle, host: str) -> Any:
        """Open the TPM, unseal the VM's vTPM key for this migration."""
        from securemig.trust.keyrelease import SourceSecurity, open_attestor

        attestor = open_attestor(self.identity, self.policy_dir, self.tofu)
        secret = attestor.unseal(bundle.vtpm_key_path.read_bytes())
        return SourceSecurity(attestor, secret, self.destination_name or host, bundle.manifest.vtpm)


class ConnectFailed(Exception):
    """The destination could not be reached; nothing was sent."""


async def migrate(
    reactor: object,
    bundle: Bundle,
    to: str,
    *,
    variant: wire.Variant,
    journal: Journal,
    chunk_size: int = wire.DEFAULT_CHUNK_SIZE,
    idle_timeout: float | None = None,
    deadline: float | None = None,
    on_progress: Callable[[int], None] = lambda n: None,
    on_start: Callable[[Departure], None] = lambda d: None,
    secure: SecureOptions | None = None,
    unseal_with: Path | None = None,
) -> tuple[Departure, Finished]:
    """Migrate ``bundle`` to ``to`` (``HOST:PORT``): over mutual TLS with
    attestation and vTPM key release when ``secure`` is given, else over the
    insecure variant.

    Fires with the departure and the session's final effect.  Raises
    :class:`VMLocked` or :class:`~securemig.hypervisor.bundle.BundleError` before
    anything is sent, :class:`ConnectFailed` if the destination cannot be
    reached (the VM stays here in every one of those cases).
    """
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol

    from securemig.protocol.session import SourceSession
    from securemig.transport import connection as protocol

    host, port = parse_address(to)
    if secure is not None and not bundle.vtpm_key_path.exists():
        raise BundleError(
            f"VM {bundle.name} has no vTPM key ({bundle.vtpm_key_path}); "
            "create it with --identity, or migrate it --insecure"
        )
    if secure is None and bundle.manifest.vtpm and unseal_with is None:
        raise BundleError(
            f"VM {bundle.name} has a vTPM: give --identity to unseal its key (the insecure "
            "variant then sends it in the clear)"
        )
    # Keys are unsealed before the VM is touched: nothing to undo if that fails.
    security = None if secure is None else secure.prepare(bundle, host)
    clear_key = None
    if secure is None and bundle.manifest.vtpm and unseal_with is not None:
        clear_key = unseal_vtpm_key(bundle, unseal_with)
    vtpm_key = security.secret if security is not None else clear_key and clear_key[:32]
    departure = Departure(
        bundle, variant, to, "secure" if secure else "insecure", journal, vtpm_key or None
    )
    await departure.acquire()
    if security is not None:
        try:
            shared = bundle.manifest.shared_disk
            if variant is wire.Variant.SHARED_STORAGE and shared:
                owner = storage.disk_owner(Path(shared))
                me = security.attestor.identity.name
                if owner is not None and owner != me:
                    raise BundleError(f"shared disk {shared} belongs to {owner}, not {me}")
                departure.disk_successor = security.destination_name
        except BaseException:
            await departure.rollback()
            raise
    on_start(departure)
    session = SourceSession(
        departure.hello(chunk_size), secure=security is not None, clear_key=clear_key
    )
    proto = protocol.SourceProtocol(
        session,
        departure,
        reactor,  # type: ignore[arg-type]
        lambda: protocol.ThreadExecutor(reactor),  # type: ignore[arg-type]
        on_progress,
        idle_timeout=protocol.IDLE_TIMEOUT if idle_timeout is None else idle_timeout,
        deadline=protocol.DEADLINE if deadline is None else deadline,
        security=security,
    )
    endpoint_type = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    endpoint: Any = endpoint_type(reactor, host, port, timeout=30)
    if security is not None:
        from twisted.internet.endpoints import wrapClientTLS

        from securemig.transport import tls

        assert secure is not None
        endpoint = wrapClientTLS(
            tls.client_options(secure.identity, security.destination_name), endpoint
        )
    try:
        await connectProtocol(endpoint, proto)
    except Exception as e:
        await departure.rollback()
        departure.journal.finish(
            departure.id, "aborted", error=f"CONNECTION_LOST: cannot connect to {to}: {e}"
        )
        raise ConnectFailed(f"cannot connect to {to}: {e}") from None
    result = await proto.finished
    departure.wire_bytes = proto.wire_bytes
    return departure, result


def unseal_vtpm_key(bundle: Bundle, identity: Path) -> bytes:
    """The VM's vTPM key and identity, unsealed with this host's TPM, for the
    insecure variant (which sends them in the clear)."""
    from securemig.trust import vtpm

    secret = vtpm.key_reader(vtpm.unsealer(identity))(bundle)
    return secret + bytes.fromhex(bundle.manifest.vtpm or "")


def parse_address(to: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6) with a clear error."""
    host, sep, port = to.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"destination {to!r} is not HOST:PORT")
    return host.strip("[]"), int(port)

"""Shared test helpers: real bundles, real hosts, in-memory connections."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase as TestCase

from securemig.host.arrival import DestinationHost
from securemig.host.departure import Departure
from securemig.host.journal import Journal
from securemig.hypervisor import image
from securemig.hypervisor.bundle import Bundle, create_image_vm
from securemig.protocol import wire
from securemig.protocol.source import SourceSession
from securemig.transport.destination import DestinationFactory, DestinationProtocol
from securemig.transport.executor import InlineExecutor
from securemig.transport.options import DestinationOptions
from securemig.transport.source import SourceProtocol


def digests(paths: list[Path]) -> dict[str, str]:
    """SHA-256 of each file, by file name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def bundle_digests(bundle: Bundle) -> dict[str, str]:
    """SHA-256 of each image of a bundle."""
    return digests([bundle.image_path(i) for i in bundle.manifest.images])


class Recorder(Protocol):
    """A hand-driven peer: records what it receives, sends what a test says."""

    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True

    def messages(self) -> list[wire.Message]:
        """The messages received so far."""
        decoder = wire.FrameDecoder(max_data=wire.MAX_CHUNK_SIZE)
        decoder.feed(self.received)
        out = []
        while (m := decoder.next_message()) is not None:
            out.append(m)
        return out


class InMemory:
    """A destination host and a source VM directory in a test's temp dir,
    connected over ``iosim`` with a shared :class:`Clock`.  No reactor
    runs: the image backend's file work is done inline (``test``'s patch)."""

    def __init__(self, base: Path, test: TestCase, **timers: float) -> None:
        test.patch(image, "run_blocking", maybeDeferred)
        self.base = base
        self.clock = Clock()
        self.host = DestinationHost(base / "dst")
        self.vm_dir = base / "src"
        self.source_journal = Journal(base / "src-journal.sqlite")
        self.timers = timers
        self.factory = DestinationFactory(
            self.host, self.clock, DestinationOptions(**timers), executor_factory=InlineExecutor
        )

    def vm(self, name: str = "vm1", ram_mib: int = 1, **kw: Any) -> Bundle:
        """Create a test VM in the source directory."""
        return create_image_vm(self.vm_dir, name, ram_mib, **kw)

    def destination(self) -> DestinationProtocol:
        """A fresh destination protocol for one connection."""
        return self.factory.buildProtocol(None)

    def connect(self, server: Protocol, client: Protocol) -> iosim.IOPump:
        """Join two protocols in memory and let them greet."""
        return iosim.connect(
            server,
            iosim.FakeTransport(server, isServer=True),
            client,
            iosim.FakeTransport(client, isServer=False),
            clock=self.clock,
        )

    def source(
        self,
        bundle: Bundle,
        variant: wire.Variant = wire.Variant.FULL,
        chunk: int = 65536,
        executor: Any = InlineExecutor,
    ) -> tuple[SourceProtocol, Departure]:
        """A source protocol for ``bundle`` whose VM is already locked."""
        departure = Departure(bundle, variant, "memory", "insecure", self.source_journal)
        Deferred.fromCoroutine(departure.acquire())
        session = SourceSession(departure.hello(chunk))
        proto = SourceProtocol(session, departure, self.clock, executor, **self.timers)
        return proto, departure

    def migrate(
        self, bundle: Bundle, variant: wire.Variant = wire.Variant.FULL
    ) -> tuple[SourceProtocol, DestinationProtocol, Departure]:
        """Run a whole migration in memory."""
        src, departure = self.source(bundle, variant)
        dst = self.destination()
        self.connect(dst, src).flush()
        return src, dst, departure


# --------------------------------------------------------------------------
# A real swtpm shared by the TPM tests of one test process.

_shared_tpm: Any = None


def shared_tpm() -> Any:
    """A provisioned, running swtpm and an open TPM on it, started once per
    test process (provisioning takes about a second) and ended at exit.
    Raises, naming the Debian packages, when swtpm is not installed."""
    global _shared_tpm
    if _shared_tpm is None:
        import atexit
        import shutil
        import tempfile

        from securemig.trust.tpm import swtpm
        from securemig.trust.tpm.tpm import TPM

        base = Path(tempfile.mkdtemp(prefix="securemig-test-tpm-"))
        swtpm.provision(base / "tpm", base / "ca")
        atexit.register(shutil.rmtree, base, True)
        process = swtpm.start(base / "tpm")
        atexit.register(process.stop)
        _shared_tpm = (process, TPM(process.tcti), base)
    return _shared_tpm


def migrate_vm(vm_dir: Path, to: str, *extra: str, name: str = "vm1", **run: Any) -> Any:
    """Run ``securemig migrate NAME --vm-dir DIR --to TO EXTRA...`` as a
    process (``run``: more arguments of subprocess.run, e.g. ``env``)."""
    from securemig.lab import processes

    return processes.securemig("migrate", name, "--vm-dir", str(vm_dir), "--to", to, *extra, **run)


class CuttingProxy:
    """A TCP forwarder on loopback that cuts the first connection, both
    ways, just before a frame of type ``frame_type`` would cross it in
    direction ``direction`` (``"to-destination"`` or ``"to-source"``); that
    frame is never delivered.  Later connections (RESOLVE) pass untouched.
    A real network partition, at a chosen message: for the insecure
    variant, whose frames are readable on the wire."""

    def __init__(self, target: tuple[str, int], frame_type: int, direction: str) -> None:
        import socket
        import threading

        self.target = target
        self.frame_type = frame_type
        self.direction = direction
        self.cut = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[Any] = []
        self._first = True
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop accepting and drop every connection."""
        for s in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self._sockets += [client, server]
            watch, self._first = self._first, False
            for src, dst, way in (
                (client, server, "to-destination"),
                (server, client, "to-source"),
            ):
                threading.Thread(
                    target=self._pump, args=(src, dst, watch and way == self.direction), daemon=True
                ).start()

    def _pump(self, src: Any, dst: Any, watch: bool) -> None:
        import socket

        buffer = b""
        try:
            while chunk := src.recv(1 << 20):
                if not watch:
                    dst.sendall(chunk)
                    continue
                buffer += chunk
                # Forward whole frames only, so a cut falls exactly before one.
                while len(buffer) >= wire.HEADER.size:
                    kind, length = wire.HEADER.unpack_from(buffer)
                    if kind == self.frame_type:
                        self.cut.set()
                        for s in (src, dst):
                            with contextlib.suppress(OSError):
                                s.shutdown(socket.SHUT_RDWR)
                        return
                    end = wire.HEADER.size + length
                    if len(buffer) < end:
                        break
                    dst.sendall(buffer[:end])
                    buffer = buffer[end:]
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

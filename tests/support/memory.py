"""A destination host and a source VM joined in memory (``iosim``), and a
hand-driven peer."""

from __future__ import annotations

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

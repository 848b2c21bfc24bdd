"""The data channel's Twisted ends, and the order of the two channels, in
memory: real mutual TLS 1.3 over ``iosim``, real swtpm host TPMs (the
attestation and key release of ``test_secure``), a data channel whose
receiving transport really pauses, and a deterministic Clock.

Nothing orders the control connection and the data channel on the wire;
these tests choose the orders that a slow control connection produces: the
first data record before WRAPPED_KEY, and the end of the data channel
before the destination's ABORT."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from securemig.host import storage
from securemig.host.arrival import DestinationHost
from securemig.host.departure import Departure
from securemig.host.journal import Journal
from securemig.hypervisor import image
from securemig.hypervisor.bundle import Bundle, create_image_vm
from securemig.protocol import records, wire
from securemig.protocol.connection import FIRST_RECORD_TIMEOUT, IDLE_TIMEOUT
from securemig.protocol.effects import Finished, Outcome
from securemig.protocol.errors import ErrorCode, ProtocolError
from securemig.protocol.source import SourceSession
from securemig.transport import tls
from securemig.transport.destination import DestinationProtocol
from securemig.transport.executor import InlineExecutor
from securemig.transport.options import DestinationOptions
from securemig.transport.source import DataChannelSender, SourceProtocol
from securemig.transport.tcp import BOUND_DATA_READ_SIZE, TRANSPORT_IO_SIZE
from securemig.trust.attestor import open_attestor
from securemig.trust.keyrelease import DestinationSecurity, MigrationKey, SourceSecurity
from tests.support.bundles import bundle_digests
from tests.support.secure import world

LOOPBACK = "127.0.0.1"
#: The data channel's pieces, as TCP reads deliver them, and how many bytes
#: the sender may have on the way before its producer is paused.
SEGMENT = 64 * 1024
WINDOW = 256 * 1024


class PausableTransport(iosim.FakeTransport):
    """An iosim transport that behaves as TCP's does where these tests need
    it (iosim's own ignores both): its reading side can pause, and a
    streaming producer writing to it is paused while more than
    :data:`WINDOW` bytes wait to be taken, and resumed at half of it."""

    paused = False
    producer_paused = False
    # As Twisted's TCP transports have them (tune_transport sets them).
    bufferSize = 64 * 1024
    SEND_LIMIT = 128 * 1024

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def buffered(self) -> int:
        return sum(len(b) for b in self.stream)

    def write(self, data: bytes) -> None:
        super().write(data)
        producing = self.producer is not None and self.streamingProducer
        if producing and not self.producer_paused and self.buffered() > WINDOW:
            self.producer_paused = True
            self.producer.pauseProducing()

    def take(self, n: int) -> bytes:
        """Up to ``n`` written bytes, as the peer's next read."""
        data = b"".join(self.stream)
        piece, rest = data[:n], data[n:]
        self.stream = [rest] if rest else []
        if self.producer_paused and self.buffered() <= WINDOW // 2:
            self.producer_paused = False
            if self.producer is not None:
                self.producer.resumeProducing()
        return piece


class DataLink:
    """The data channel in memory: the source's bytes wait, as in the
    kernel's buffers, while the destination's transport is paused, and are
    delivered in TCP-read-sized pieces.  Records what it saw."""

    def __init__(self, receiver: Protocol, sender: Protocol, on_held: Any) -> None:
        host = IPv4Address("TCP", LOOPBACK, 40001)
        peer = IPv4Address("TCP", LOOPBACK, 50001)
        self.server = PausableTransport(receiver, isServer=True, hostAddress=host, peerAddress=peer)
        self.client = PausableTransport(sender, isServer=False, hostAddress=peer, peerAddress=host)
        self.on_held = on_held
        #: The destination session's phase each time bytes waited unread.
        self.held: list[str] = []
        #: The source's session phase when it learned the data channel ended.
        self.cut_in_phase: str | None = None
        self.source_phase = lambda: "?"
        receiver.makeConnection(self.server)
        sender.makeConnection(self.client)

    def pump(self) -> bool:
        """Move what can move; whether anything did."""
        if self.server.disconnecting and not self.server.disconnected:
            # The destination closed with bytes unread: a reset for the source.
            self.client.stream = []
            self.server.disconnected = self.client.disconnected = True
            self.cut_in_phase = self.source_phase()
            self.client.reportDisconnect()
            self.server.reportDisconnect()
            return True
        if self.client.stream and self.server.paused:
            self.held.append(self.on_held())
        if self.client.stream and not self.server.paused and not self.server.disconnected:
            self.server.bufferReceived(self.client.take(SEGMENT))
            return True
        if self.client.disconnecting and not self.client.disconnected and not self.client.stream:
            self.client.disconnected = self.server.disconnected = True
            self.server.reportDisconnect()
            self.client.reportDisconnect()
            return True
        return False


class FakePort:
    """What ``listenTCP`` returns, for the destination's data port."""

    def __init__(self, factory: Factory) -> None:
        self.factory = factory
        self.listening = True

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", LOOPBACK, 40001)

    def stopListening(self) -> None:
        self.listening = False


class SecureInMemory:
    """A secure source and destination (world()'s enrolled hosts source-a
    and dest-b, their TPMs opened in this process) joined by TLS over
    iosim, with the data channel on a :class:`DataLink`."""

    def __init__(self, base: Path, test: SynchronousTestCase) -> None:
        test.patch(image, "run_blocking", maybeDeferred)  # no reactor runs
        identities, _, _ = world()
        self.base = base
        self.clock = Clock()
        self.host = DestinationHost(base / "dst")
        self.src_attestor = open_attestor(identities / "source-a", base / "src-policy", True)
        self.dst_attestor = open_attestor(identities / "dest-b", base / "dst-policy", True)
        attestor = self.dst_attestor
        self.security = DestinationSecurity(attestor, MigrationKey(attestor.tpm, attestor.pcrs))
        self.identities = identities
        self.port: FakePort | None = None
        self.link: DataLink | None = None

    def close(self) -> None:
        self.src_attestor.close()
        self.dst_attestor.close()

    def vm(self) -> Bundle:
        return create_image_vm(self.base / "src", "vm1", 2)

    def listen(self, interface: str, factory: Factory) -> FakePort:
        assert interface == LOOPBACK
        self.port = FakePort(factory)
        return self.port

    def connect_data(self, host: str, port: int, proto: Protocol) -> Deferred[Any]:
        assert (host, port) == (LOOPBACK, 40001) and self.port is not None
        receiver = self.port.factory.buildProtocol(None)
        self.link = DataLink(receiver, proto, lambda: self.dst.session.phase)
        self.link.source_phase = lambda: self.src.session.phase
        return succeed(proto)

    def build(self, bundle: Bundle, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.dst = DestinationProtocol(
            self.host,
            self.clock,
            InlineExecutor,
            DestinationOptions(
                "secure",
                idle_timeout=idle_timeout,
                security=self.security,
                data_listener=self.listen,
            ),
        )
        self.departure = Departure(
            bundle, wire.Variant.FULL, "memory", "secure", Journal(self.base / "src.sqlite")
        )
        Deferred.fromCoroutine(self.departure.acquire())
        source_security = SourceSecurity(self.src_attestor, os.urandom(32), "dest-b")
        self.src = SourceProtocol(
            SourceSession(self.departure.hello(65536), secure=True),
            self.departure,
            self.clock,
            InlineExecutor,
            security=source_security,
            data_connector=self.connect_data,
        )
        server_tls = TLSMemoryBIOFactory(
            tls.server_options(self.identities / "dest-b"),
            False,
            Factory.forProtocol(lambda: self.dst),
            clock=self.clock,
        ).buildProtocol(None)
        client_tls = TLSMemoryBIOFactory(
            tls.client_options(self.identities / "source-a", "dest-b"),
            True,
            Factory.forProtocol(lambda: self.src),
            clock=self.clock,
        ).buildProtocol(None)
        host = IPv4Address("TCP", LOOPBACK, 4433)
        peer = IPv4Address("TCP", LOOPBACK, 50000)
        self.control = iosim.connect(
            server_tls,
            iosim.FakeTransport(server_tls, isServer=True, hostAddress=host, peerAddress=peer),
            client_tls,
            iosim.FakeTransport(client_tls, isServer=False, hostAddress=peer, peerAddress=host),
            greet=False,
            clock=self.clock,
        )

    def run(self) -> None:
        """Pump both channels until quiet, the data channel first: each of
        its bytes is delivered (or waits) before the next control segment."""
        for _ in range(100_000):
            moved = False
            while self.link is not None and self.link.pump():
                moved = True
            moved = self.control.pump() or moved
            if not moved:
                return
        raise AssertionError("still moving")


class ChannelOrderTests(SynchronousTestCase):
    """The two orders a slow control connection produces, each deterministic."""

    def setUp(self) -> None:
        self.env = SecureInMemory(Path(self.mktemp()).absolute(), self)
        self.addCleanup(self.env.close)

    def test_first_record_before_wrapped_key(self) -> None:
        """The source writes WRAPPED_KEY and then its records; the records
        reach the destination first.  The destination pauses the data
        connection until it accepted the key, reads it then, and the
        migration succeeds."""
        bundle = self.env.vm()
        before = bundle_digests(bundle)
        self.env.build(bundle)
        self.env.run()
        result = self.successResultOf(self.env.src.finished)
        self.assertEqual((result.outcome, result.code, result.reason), (Outcome.DONE, None, ""))
        link = self.env.link
        assert link is not None
        # The order really was the late one: data waited, unread, while the
        # destination still awaited the wrapped key.
        self.assertIn("awaitWrappedKey", link.held)
        self.assertEqual(set(link.held), {"awaitWrappedKey"})
        self.assertEqual(bundle_digests(Bundle.load(self.env.host.vms / "vm1")), before)
        self.assertFalse(bundle.path.exists())
        self.assertFalse(self.env.port is not None and self.env.port.listening)
        record = self.env.host.journal.records()[0]
        self.assertEqual(record.outcome, "done")

    def test_destination_refusal_reported_not_connection_lost(self) -> None:
        """The destination fails while images arrive (its disk is full),
        sends ABORT on the control connection and closes the data channel;
        the source learns of the closed data channel first, and still
        reports the destination's code and reason."""
        admit = self.env.host.admit

        def full_disk(parts: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def admit_with_a_full_disk(*args: Any, **kwargs: Any) -> Any:
            arrival = admit(*args, **kwargs)
            arrival.write = full_disk
            return arrival

        self.env.host.admit = admit_with_a_full_disk  # type: ignore[method-assign]
        bundle = self.env.vm()
        before = bundle_digests(bundle)
        self.env.build(bundle)
        self.env.run()
        result: Finished = self.successResultOf(self.env.src.finished)
        self.assertEqual((result.outcome, result.code), (Outcome.ABORTED, ErrorCode.DISK_FULL))
        self.assertEqual(
            result.reason, "destination: writing a staging file: No space left on device"
        )
        assert self.env.link is not None
        self.assertEqual(self.env.link.cut_in_phase, "streaming")
        self.assertEqual(self.env.departure.journal.get(self.env.departure.id).outcome, "aborted")
        self.assertEqual(bundle_digests(Bundle.load(bundle.path)), before)
        self.assertFalse(storage.is_locked(bundle.lock_path))
        self.assertEqual(list(self.env.host.staging.iterdir()), [])


class FakeControl:
    """Test double of the source's control protocol: what the data channel
    sender tells it."""

    def __init__(self) -> None:
        self.failures: list[ProtocolError] = []
        self.lost: list[str] = []

    def fail(self, error: ProtocolError) -> None:
        self.failures.append(error)

    def data_channel_lost(self, detail: str) -> None:
        self.lost.append(detail)


class DataChannelSenderTests(SynchronousTestCase):
    def test_destination_sending_on_data_channel_fails_source(self) -> None:
        """The data channel is one-way: bytes from the destination end the
        source's migration."""
        control = FakeControl()
        sender = DataChannelSender(control)  # type: ignore[arg-type]
        sender.makeConnection(StringTransport())
        sender.dataReceived(b"x")
        self.assertEqual([e.code for e in control.failures], [ErrorCode.UNEXPECTED_MESSAGE])

    def test_cut_before_the_end_waits_for_the_reason(self) -> None:
        """Cut before every stream was sent: the control protocol is told
        (it waits for an ABORT), nothing fails at once; after the last
        stream, a close is the normal end."""
        control = FakeControl()
        sender = DataChannelSender(control)  # type: ignore[arg-type]
        sender.makeConnection(StringTransport())
        sender.connectionLost()
        self.assertEqual((control.failures, len(control.lost)), ([], 1))
        sender.done = True
        sender.connectionLost()
        self.assertEqual(len(control.lost), 1)


class TCPStringTransport(StringTransport):
    """A StringTransport with the read and send sizes of Twisted's TCP
    transports (what tune_transport sets)."""

    bufferSize = 64 * 1024
    SEND_LIMIT = 128 * 1024


class Stranger(Protocol):
    """Someone who connects to a data port and does not hold the key."""

    def __init__(self, port: FakePort, first: bytes = b"") -> None:
        self.receiver = port.factory.buildProtocol(None)
        self.transport_ = TCPStringTransport(peerAddress=IPv4Address("TCP", LOOPBACK, 50999))
        self.receiver.makeConnection(self.transport_)
        if first:
            self.receiver.dataReceived(first)

    @property
    def closed(self) -> bool:
        return bool(self.transport_.disconnecting)


#: What strangers send: nothing, half of a plausible first record, garbage.
HALF_RECORD = records.RECORD_HEADER.pack(records.Kind.FRAMES, 20)[:3]
GARBAGE = b"GET / HTTP/1.1\r\n\r\n"


class StrangerTests(SynchronousTestCase):
    """Strangers on a data port are let go (their first-record deadline,
    the channel binding, the migration's end) while the migration succeeds."""

    def setUp(self) -> None:
        self.env = SecureInMemory(Path(self.mktemp()).absolute(), self)
        self.addCleanup(self.env.close)
        self.strangers: list[Stranger] = []
        listen = self.env.listen

        def listen_and_be_found(interface: str, factory: Factory) -> FakePort:
            # The port is found at once (as soon as it is offered): three
            # strangers connect before the source does, and are held, as it
            # would be, until the key arrives.
            port = listen(interface, factory)

            def connect() -> None:
                self.strangers.extend(
                    [Stranger(port), Stranger(port, HALF_RECORD), Stranger(port, GARBAGE)]
                )

            self.env.clock.callLater(0, connect)
            return port

        self.env.listen = listen_and_be_found  # type: ignore[method-assign]

    def assertDone(self) -> None:
        result = self.successResultOf(self.env.src.finished)
        self.assertEqual((result.outcome, result.code, result.reason), (Outcome.DONE, None, ""))

    def test_strangers_closed_when_the_channel_binds(self) -> None:
        bundle = self.env.vm()
        before = bundle_digests(bundle)
        self.env.build(bundle)
        self.env.run()
        self.assertDone()
        self.assertEqual(len(self.strangers), 3)
        self.assertEqual([s.closed for s in self.strangers], [True, True, True])
        # Only the bound channel reads several records at once; what a
        # stranger may make the destination read stays at the usual size.
        self.assertEqual([s.transport_.bufferSize for s in self.strangers], [TRANSPORT_IO_SIZE] * 3)
        assert self.env.link is not None
        self.assertEqual(self.env.link.server.bufferSize, BOUND_DATA_READ_SIZE)
        self.assertEqual(self.env.dst.data_receivers, [])
        self.assertEqual(self.env.dst.connection.strangers, [])
        self.assertEqual(bundle_digests(Bundle.load(self.env.host.vms / "vm1")), before)

    def test_strangers_closed_within_the_deadline(self) -> None:
        """The source's data connection is late: the strangers have
        FIRST_RECORD_TIMEOUT from when the key is accepted, then are closed;
        one that comes later is closed when the channel binds."""
        connect = self.env.connect_data
        late: list[Any] = []

        def connect_late(host: str, port: int, proto: Protocol) -> Deferred[Any]:
            connected: Deferred[Any] = Deferred()
            late.append(lambda: connect(host, port, proto).chainDeferred(connected))
            return connected

        self.env.connect_data = connect_late  # type: ignore[method-assign]
        self.env.build(self.env.vm())
        self.env.run()
        self.assertEqual(self.env.dst.session.phase, "awaitStream")
        # The garbage is refused as soon as it can be read; the others wait.
        self.assertEqual([s.closed for s in self.strangers], [False, False, True])
        self.env.clock.advance(FIRST_RECORD_TIMEOUT - 0.5)
        assert self.env.port is not None
        after = Stranger(self.env.port)
        self.env.clock.advance(0.5)
        self.assertEqual([s.closed for s in self.strangers], [True, True, True])
        self.assertFalse(after.closed)
        [connect_now] = late
        connect_now()
        self.env.run()
        self.assertDone()
        self.assertTrue(after.closed)
        self.assertEqual(self.env.dst.data_receivers, [])


class EndRecordTests(SynchronousTestCase):
    """The destination prepares only after the data channel's END record."""

    def setUp(self) -> None:
        self.env = SecureInMemory(Path(self.mktemp()).absolute(), self)
        self.addCleanup(self.env.close)

    def assertStaysAtSource(self, bundle: Bundle, before: Any, code: ErrorCode) -> Finished:
        result: Finished = self.successResultOf(self.env.src.finished)
        self.assertEqual((result.outcome, result.code), (Outcome.ABORTED, code))
        self.assertEqual(bundle_digests(Bundle.load(bundle.path)), before)
        self.assertEqual(list(self.env.host.staging.iterdir()), [])
        self.assertEqual(self.env.host.journal.records()[0].outcome, "aborted")
        self.assertFalse((self.env.host.vms / "vm1").exists())
        return result

    def test_withheld_end(self) -> None:
        """No END record (the channel stays open): the destination never
        prepares and its idle timeout fails the migration."""
        self.patch(records.Sealer, "end", lambda self: [])
        bundle = self.env.vm()
        before = bundle_digests(bundle)
        self.env.build(bundle, idle_timeout=10.0)
        self.env.run()
        self.assertEqual(self.env.dst.session.phase, "preparing")
        # Not prepared: the vTPM key was not unwrapped.
        self.assertIsNone(self.env.dst.arrival.sealed_vtpm_key)
        self.env.clock.advance(10.0)
        self.env.run()
        result = self.assertStaysAtSource(bundle, before, ErrorCode.TIMEOUT)
        self.assertIn("no progress for 10 s", result.reason)

    def test_altered_end(self) -> None:
        seal = records.Sealer.seal

        def altered_end(self: records.Sealer) -> list[bytes]:
            header, sealed = seal(self, [b""], records.Kind.END)
            return [header, sealed[:-1] + bytes([sealed[-1] ^ 1])]

        self.patch(records.Sealer, "end", altered_end)
        bundle = self.env.vm()
        before = bundle_digests(bundle)
        self.env.build(bundle)
        self.env.run()
        result = self.assertStaysAtSource(bundle, before, ErrorCode.RECORD_REFUSED)
        self.assertIn("does not authenticate", result.reason)


class SourceRulesTests(SynchronousTestCase):
    """--allow-source is enforced when the handshake completes: the
    decoder never sees a byte of a disallowed source."""

    def setUp(self) -> None:
        self.env = SecureInMemory(Path(self.mktemp()).absolute(), self)
        self.addCleanup(self.env.close)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_disallowed_source_refused_before_any_frame(self) -> None:
        self.env.security.allowed_sources = frozenset({"someone-else"})
        admitted: list[Any] = []
        self.env.host.admit = lambda *a: admitted.append(a)  # type: ignore[method-assign]
        bundle = self.env.vm()
        before = bundle_digests(bundle)
        self.env.build(bundle)
        fed: list[bytes] = []
        decoder = self.env.dst.connection.decoder
        feed = decoder.feed
        decoder.feed = lambda data: (fed.append(data), feed(data))  # type: ignore[method-assign]
        self.env.run()
        result: Finished = self.successResultOf(self.env.src.finished)
        self.assertEqual((result.outcome, result.code), (Outcome.ABORTED, ErrorCode.POLICY_REFUSED))
        self.assertIn("source-a is not allowed", result.reason)
        # The HELLO the source sent (which an allowed source's would have
        # been admitted with) never reached the decoder or the session.
        self.assertEqual(fed, [])
        self.assertIsNone(self.env.dst.session.hello)
        self.assertEqual(admitted, [])
        self.assertEqual(bundle_digests(Bundle.load(bundle.path)), before)
        self.assertEqual([e for e in self.events if e.get("log_failure")], [])

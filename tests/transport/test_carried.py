"""
Carried sockets (:mod:`securemig.transport.carried`) on real UNIX and
loopback TCP sockets: each connection to a source-side path reaches the
same-named socket at the destination, both ways, sealed; strangers, forged
records and replayed preambles never reach the destination's socket.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from securemig.protocol import records
from securemig.transport.carried import (
    PREAMBLE,
    SOCKETS,
    CarrierDestination,
    CarrierSource,
    Progress,
    connection_key,
)

CIPHER = "TLS_AES_128_GCM_SHA256"


class Echo(Protocol):
    """The destination's socket: echoes, upper-cased, and counts connections."""

    def connectionMade(self) -> None:
        self.factory.connections += 1  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.factory.received += data  # type: ignore[attr-defined]
        self.transport.write(data.upper())  # type: ignore[union-attr]


class Client(Protocol):
    """A hypervisor's client at the source: sends, collects the answer."""

    def __init__(self, payload: bytes, expect: int) -> None:
        self.payload, self.expect = payload, expect
        self.got = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.got += data
        if len(self.got) >= self.expect and not self.done.called:
            self.done.callback(self.got)
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(self.got)


class Raw(Protocol):
    """A stranger on the carrier port."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


class ProgressTests(TestCase):
    """What a carrier counts as progress for the session's idle clock."""

    def test_rpc_counts_only_until_the_stream_moves(self) -> None:
        """libvirt's RPC (its Prepare, before any page moves) is progress;
        once the stream or the disk copy moved a byte, RPC alone (its
        keepalives while a stalled stream waits) is not, so the idle
        timeout can end a migration whose stream stalled."""
        told: list[int] = []
        progress = Progress(told.append)
        progress.carried("rpc", 100)
        progress.carried("disk", 7)
        progress.carried("rpc", 28)
        progress.carried("memory", 5)
        progress.carried("rpc", 28)
        self.assertEqual(told, [100, 7, 5])

    def test_memory_first(self) -> None:
        """QEMU's own multifd stream (one socket, ``memory``): every byte."""
        told: list[int] = []
        progress = Progress(told.append)
        for n in (1, 2, 3):
            progress.carried("memory", n)
        self.assertEqual(told, [1, 2, 3])


class CarriedTests(TestCase):
    """Both ends of the carrier in one reactor, real sockets."""

    def setUp(self) -> None:
        # Short: UNIX socket paths are limited to 107 bytes.
        base = Path(tempfile.mkdtemp(prefix="smc-"))
        self.addCleanup(shutil.rmtree, base, True)
        self.base = base
        self.echo = Factory.forProtocol(Echo)
        self.echo.connections = 0  # type: ignore[attr-defined]
        self.echo.received = b""  # type: ignore[attr-defined]
        port = reactor.listenUNIX(str(base / "dst-memory.sock"), self.echo)
        self.addCleanup(port.stopListening)
        self.key = os.urandom(16)
        self.mid = os.urandom(8)
        self.receiver = CarrierDestination(
            reactor,
            {"memory": str(base / "dst-memory.sock")},
            CIPHER,
            self.key,
            self.mid,
            first_record_timeout=2.0,
        )
        self.addCleanup(self.receiver.close)
        self.sender = CarrierSource(
            reactor,
            {"memory": str(base / "src-memory.sock")},
            *self.receiver.address,
            CIPHER,
            self.key,
            self.mid,
        )
        self.addCleanup(self.sender.close)

    async def call(self, payload: bytes) -> bytes:
        client = Client(payload, len(payload))

        class F(ClientFactory):
            def buildProtocol(self, addr: Any) -> Client:
                return client

        reactor.connectUNIX(str(self.base / "src-memory.sock"), F())
        return await client.done

    async def test_each_connection_carried_both_ways(self) -> None:
        """Three connections at once, each its own dial at the destination;
        a megabyte goes there and comes back transformed."""
        payloads = [os.urandom(1 << 20).hex().encode()[: 1 << 20] for _ in range(3)]
        answers = [await d for d in [Deferred.fromCoroutine(self.call(p)) for p in payloads]]
        self.assertEqual(answers, [p.upper() for p in payloads])
        self.assertEqual(self.echo.connections, 3)  # type: ignore[attr-defined]
        self.assertEqual(self.sender.accepted["memory"], 3)
        self.assertEqual(self.receiver.errors, [])

    async def stranger(self, data: bytes) -> None:
        raw = Raw(data)

        class F(ClientFactory):
            def buildProtocol(self, addr: Any) -> Raw:
                return raw

        reactor.connectTCP(*self.receiver.address, F())
        await raw.closed

    async def test_forged_record_never_reaches_the_socket(self) -> None:
        """A preamble and a first record under another key: the connection
        is closed, the destination's socket never dialed; the real source's
        connection is carried after it."""
        wrong = records.Sealer(CIPHER, connection_key(os.urandom(16), "memory", 0, True), b"x")
        await self.stranger(PREAMBLE.pack(SOCKETS.index("memory"), 0) + b"".join(wrong.seal([b""])))
        self.assertEqual(self.echo.connections, 0)  # type: ignore[attr-defined]
        self.assertEqual(self.receiver.strangers_closed, 1)
        self.assertEqual(await self.call(b"after"), b"AFTER")

    async def test_replayed_preamble_and_silence_refused(self) -> None:
        """A connection number already bound is refused at its preamble; a
        silent stranger is closed after the first-record timeout; an
        oversized first record is refused from its header."""
        self.assertEqual(await self.call(b"one"), b"ONE")
        await self.stranger(PREAMBLE.pack(SOCKETS.index("memory"), 0))
        await self.stranger(b"")
        big = records.Sealer(
            CIPHER,
            connection_key(self.key, "memory", 5, True),
            b"%s/memory/5/d" % self.mid,
        )
        await self.stranger(
            PREAMBLE.pack(SOCKETS.index("memory"), 5) + b"".join(big.seal([b"x" * 64]))
        )
        await deferLater(reactor, 0, lambda: None)
        self.assertEqual(self.echo.connections, 1)  # type: ignore[attr-defined]
        self.assertEqual(self.receiver.strangers_closed, 3)


class Accepted(Protocol):
    """QEMU's incoming socket: remembers, in the order it accepted them,
    what each connection sent."""

    def connectionMade(self) -> None:
        self.got = b""
        self.factory.order.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.got += data


def dial(address: tuple[str, int], proto: Protocol) -> None:
    """Connect ``proto`` to a carrier port."""

    class F(ClientFactory):
        def buildProtocol(self, addr: Any) -> Protocol:
            return proto

    reactor.connectTCP(*address, F())


async def until(case: TestCase, check: Callable[[], bool], tries: int = 500) -> None:
    """Until ``check()`` holds, looking every 10 ms; the test fails after
    ``tries`` looks."""
    for _ in range(tries):
        if check():
            return
        await deferLater(reactor, 0.01, lambda: None)
    case.fail("timed out")


class Bound(Protocol):
    """A connection that binds as channel ``number`` (its preamble and
    first record under that channel's key), then sends ``then``; with
    ``hold``, only when :meth:`bind` says so (connected, silent until then)."""

    def __init__(
        self, key: bytes, mid: bytes, number: int, then: bytes = b"", hold: bool = False
    ) -> None:
        self.sealer = records.Sealer(
            CIPHER,
            connection_key(key, "memory", number, True),
            b"%s/memory/%d/d" % (mid, number),
        )
        self.number, self.then, self.hold = number, then, hold
        self.connected = False
        self.closed: Deferred[None] = Deferred()

    def send(self, data: bytes) -> None:
        """One more record of this channel."""
        self.transport.write(b"".join(self.sealer.seal([data])))  # type: ignore[union-attr]

    def connectionMade(self) -> None:
        self.connected = True
        if not self.hold:
            self.bind()

    def bind(self) -> None:
        """Send the preamble and the first record (and ``then``)."""
        self.transport.write(  # type: ignore[union-attr]
            PREAMBLE.pack(SOCKETS.index("memory"), self.number)
            + b"".join(self.sealer.seal([b""]))
            + self.then
        )

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


class MultifdChannelTests(TestCase):
    """The QEMU backend's multifd stream: one socket, ``memory``, at most
    N + 1 connections (``limits``), each its own sealed stream."""

    def setUp(self) -> None:
        base = Path(tempfile.mkdtemp(prefix="smc-"))
        self.addCleanup(shutil.rmtree, base, True)
        self.echo = Factory.forProtocol(Echo)
        self.echo.connections = 0  # type: ignore[attr-defined]
        self.echo.received = b""  # type: ignore[attr-defined]
        port = reactor.listenUNIX(str(base / "qemu.sock"), self.echo)
        self.addCleanup(port.stopListening)
        self.key = os.urandom(16)
        self.mid = os.urandom(8)
        # Two multifd channels: QEMU's main channel and two more.
        self.receiver = CarrierDestination(
            reactor,
            {"memory": str(base / "qemu.sock")},
            CIPHER,
            self.key,
            self.mid,
            first_record_timeout=2.0,
            limits={"memory": 3},
        )
        self.addCleanup(self.receiver.close)

    def carrier_to(self, qemu: Factory, channels: int, **options: Any) -> CarrierDestination:
        """A QEMU socket of its own (``qemu`` answers it) and a carrier to it
        that takes ``channels`` connections."""
        base = Path(tempfile.mkdtemp(prefix="smc-"))
        self.addCleanup(shutil.rmtree, base, True)
        port = reactor.listenUNIX(str(base / "qemu.sock"), qemu)
        self.addCleanup(port.stopListening)
        receiver = CarrierDestination(
            reactor,
            {"memory": str(base / "qemu.sock")},
            CIPHER,
            self.key,
            self.mid,
            limits={"memory": channels},
            **options,
        )
        self.addCleanup(receiver.close)
        return receiver

    async def connect(self, proto: Protocol) -> None:
        class F(ClientFactory):
            def buildProtocol(self, addr: Any) -> Protocol:
                return proto

        reactor.connectTCP(*self.receiver.address, F())

    def other_channel_record(self, number: int, data: bytes) -> bytes:
        """A record a real source sealed for channel ``number`` (the key and
        the associated data of that channel)."""
        sealer = records.Sealer(
            CIPHER,
            connection_key(self.key, "memory", number, True),
            b"%s/memory/%d/d" % (self.mid, number),
        )
        sealer.seal([b""])  # its opening record went first on its own connection
        return b"".join(sealer.seal([data]))

    async def test_channel_beyond_n_refused(self) -> None:
        """Channel 3 of a migration that takes 3 connections (0 to 2), under
        the right key: closed at its preamble; the QEMU socket never dialed."""
        beyond = Bound(self.key, self.mid, 3)
        await self.connect(beyond)
        await beyond.closed
        self.assertEqual(self.echo.connections, 0)  # type: ignore[attr-defined]
        self.assertEqual(self.receiver.strangers_closed, 1)
        self.assertEqual(self.receiver.bound, set())

    async def test_record_of_another_channel_refused(self) -> None:
        """Channel 1's record sent on bound channel 2's connection (its
        sequence number right, as if channel 1's stream were spliced in):
        it does not authenticate, both ends are aborted, and no byte of it
        reaches QEMU's socket."""
        main = Bound(self.key, self.mid, 0)  # QEMU's main channel reaches it first
        await self.connect(main)
        for _ in range(300):
            if self.echo.connections:  # type: ignore[attr-defined]
                break
            await deferLater(reactor, 0.01, lambda: None)
        spliced = Bound(self.key, self.mid, 2, self.other_channel_record(1, b"pages"))
        await self.connect(spliced)
        await spliced.closed
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.echo.received, b"")  # type: ignore[attr-defined]
        self.assertEqual(len(self.receiver.errors), 1, self.receiver.errors)
        self.assertIn("memory: RECORD_REFUSED: data record 1 does not", self.receiver.errors[0])
        self.assertEqual(self.echo.connections, 2)  # type: ignore[attr-defined]
        main.transport.loseConnection()  # type: ignore[union-attr]

    async def test_exactly_n_plus_one_then_port_closes(self) -> None:
        """Channels 0, 1 and 2 bind and reach QEMU's socket; then the port
        stops listening: a fourth connection is not accepted at all."""
        channels = [Bound(self.key, self.mid, n) for n in range(3)]
        for channel in channels:
            await self.connect(channel)
        for _ in range(200):
            if self.echo.connections == 3:  # type: ignore[attr-defined]
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.echo.connections, 3)  # type: ignore[attr-defined]
        self.assertEqual(self.receiver.bound, {("memory", n) for n in range(3)})
        refused: Deferred[str] = Deferred()

        class F(ClientFactory):
            def buildProtocol(self, addr: Any) -> Protocol:
                return Protocol()

            def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
                refused.callback(reason.type.__name__)

        reactor.connectTCP(*self.receiver.address, F())
        self.assertEqual(await refused, "ConnectionRefusedError")
        for channel in channels:
            channel.transport.loseConnection()  # type: ignore[union-attr]

    async def test_a_burst_of_channels_all_wait(self) -> None:
        """QEMU opens its main channel and 16 multifd channels at once: all
        17 are connected, none yet read, more than the 8 strangers a port
        lets wait (MAX_PENDING_DATA_CONNECTIONS).  None is closed as the
        oldest stranger (a hang: QEMU waits for that channel for ever), and
        each binds once it sends its first record."""
        echo = Factory.forProtocol(Echo)
        echo.connections = 0  # type: ignore[attr-defined]
        echo.received = b""  # type: ignore[attr-defined]
        n = 17
        receiver = self.carrier_to(echo, n, expected=n)
        channels = [Bound(self.key, self.mid, i, hold=True) for i in range(n)]
        for channel in channels:
            dial(receiver.address, channel)
        await until(self, lambda: all(c.connected for c in channels) and len(receiver.pool) == n)
        self.assertEqual(receiver.strangers_closed, 0)
        for channel in channels:
            channel.bind()
        await until(self, lambda: echo.connections == n)  # type: ignore[attr-defined]
        self.assertEqual(receiver.bound, {("memory", i) for i in range(n)})
        self.assertEqual([c.closed.called for c in channels], [False] * n)
        for channel in channels:
            channel.transport.loseConnection()  # type: ignore[union-attr]

    async def test_main_channel_reaches_qemu_first(self) -> None:
        """Channels 2 and 1 authenticate before channel 0 (QEMU's main
        channel): they wait, bound, and QEMU's socket accepts channel 0
        first, then them (QEMU before 8.0 takes its first connection for
        the main channel)."""
        order = Factory.forProtocol(Accepted)
        order.order = []  # type: ignore[attr-defined]
        receiver = self.carrier_to(order, 3)
        channels = [Bound(self.key, self.mid, n) for n in range(3)]

        async def connect(channel: Bound) -> None:
            dial(receiver.address, channel)

        for n in (2, 1):
            await connect(channels[n])
        await until(self, lambda: receiver.bound == {("memory", 2), ("memory", 1)})
        await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(order.order, [])  # type: ignore[attr-defined]
        await connect(channels[0])
        await until(self, lambda: len(order.order) == 3)  # type: ignore[attr-defined]
        for n, channel in enumerate(channels):
            channel.send(b"ch%d" % n)
        await until(self, lambda: all(a.got for a in order.order))  # type: ignore[attr-defined]
        self.assertEqual(order.order[0].got, b"ch0")  # type: ignore[attr-defined]
        self.assertEqual(
            sorted(a.got for a in order.order),  # type: ignore[attr-defined]
            [b"ch0", b"ch1", b"ch2"],
        )
        for channel in channels:
            channel.transport.loseConnection()  # type: ignore[union-attr]

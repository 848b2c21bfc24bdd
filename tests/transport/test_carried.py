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

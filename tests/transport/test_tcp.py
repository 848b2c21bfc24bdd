"""The one TCP client endpoint helper: IPv4 and IPv6 addresses connect
on loopback, with the connect timeout it was given."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from securemig.transport import tcp


class ClientEndpointTests(TestCase):
    async def connects(self, interface: str) -> None:
        accepted: Deferred[Protocol] = Deferred()

        class Accept(Protocol):
            def connectionMade(self) -> None:
                accepted.callback(self)

        port = reactor.listenTCP(0, Factory.forProtocol(Accept), interface=interface)  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        endpoint = tcp.client_endpoint(reactor, interface, port.getHost().port)
        client = await connectProtocol(endpoint, Protocol())
        self.assertTrue(client.transport.connected)  # type: ignore[union-attr]
        server = await accepted
        self.assertEqual(
            server.transport.getPeer().port,  # type: ignore[union-attr]
            client.transport.getHost().port,  # type: ignore[union-attr]
        )
        client.transport.loseConnection()  # type: ignore[union-attr]
        server.transport.loseConnection()  # type: ignore[union-attr]

    async def test_ipv4(self) -> None:
        self.assertIsInstance(tcp.client_endpoint(reactor, "127.0.0.1", 1), TCP4ClientEndpoint)
        await self.connects("127.0.0.1")

    async def test_ipv6(self) -> None:
        self.assertIsInstance(tcp.client_endpoint(reactor, "::1", 1), TCP6ClientEndpoint)
        await self.connects("::1")

    def test_timeout(self) -> None:
        self.assertEqual(tcp.client_endpoint(reactor, "::1", 1)._timeout, tcp.CONNECT_TIMEOUT)
        self.assertEqual(tcp.client_endpoint(reactor, "127.0.0.1", 1, timeout=5)._timeout, 5)

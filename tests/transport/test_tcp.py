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


class NoDelayTests(TestCase):
    async def test_tuned_connections_send_small_writes_at_once(self) -> None:
        """tune_transport (every control and data connection) sets
        TCP_NODELAY on both ends, also under a wrapper as TLS is; a
        relay's blocking duplicate has it too; a UNIX socket is left as
        it is.  Without it the commit's small messages wait for the
        peer's delayed ACK."""
        import socket

        from securemig.transport.relay import blocking_dup

        accepted: Deferred[Protocol] = Deferred()

        class Accept(Protocol):
            def connectionMade(self) -> None:
                accepted.callback(self)

        port = reactor.listenTCP(0, Factory.forProtocol(Accept), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        endpoint = tcp.client_endpoint(reactor, "127.0.0.1", port.getHost().port)
        client = await connectProtocol(endpoint, Protocol())
        server = await accepted

        def delay_off(transport: object) -> bool:
            handle = transport.getHandle()  # type: ignore[attr-defined]
            return bool(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        self.assertFalse(delay_off(client.transport))

        class Wrapper:  # as TLS wraps its TCP transport
            transport = client.transport

        tcp.tune_transport(Wrapper())
        tcp.tune_transport(server.transport)
        self.assertTrue(delay_off(client.transport))
        self.assertTrue(delay_off(server.transport))
        dup = blocking_dup(server.transport)
        self.addCleanup(dup.close)
        self.assertTrue(dup.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        left, right = socket.socketpair()
        self.addCleanup(left.close)
        self.addCleanup(right.close)
        tcp.no_delay(left)  # not TCP: nothing, no error
        client.transport.loseConnection()  # type: ignore[union-attr]
        server.transport.loseConnection()  # type: ignore[union-attr]

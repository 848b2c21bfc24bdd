"""
A plain relay of a live migration's stream, for the QEMU backend's own
tests: QEMU at the source connects to a unix socket the relay listens on,
and every byte it sends is passed on to where the destination's QEMU
listens, with producer/consumer flow control both ways.  It counts the
bytes it relayed and can be cut, which is how a test breaks a migration
mid-pre-copy.  (securemig itself seals the stream:
:mod:`securemig.transport.live`.)
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol


class _Side(Protocol):
    """One end of the relay; writes what arrives to its peer."""

    transport: Any

    def __init__(self, relay: Relay, inbound: bool) -> None:
        self.relay = relay
        self.inbound = inbound
        self.peer: _Side | None = None

    def connectionMade(self) -> None:
        if self.inbound:
            # Nothing is read from QEMU until the far end is there.
            self.transport.pauseProducing()
            self.relay._connect(self)
        else:
            assert self.peer is not None
            self.peer.peer = self
            # Each side's writes pause the other's reads: flow control end to end.
            self.transport.registerProducer(self.peer.transport, True)
            self.peer.transport.registerProducer(self.transport, True)
            self.peer.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.inbound:
            self.relay.relayed += len(data)
        if self.peer is not None:
            self.peer.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()
        self.relay._lost(self)


class Relay:
    """Relays the first connection to ``listen_path`` to ``target_path``."""

    def __init__(self, reactor: Any, listen_path: str, target_path: str) -> None:
        self.reactor = reactor
        self.target_path = target_path
        #: Bytes from the source's QEMU passed on so far.
        self.relayed = 0
        #: Fires when the stream has ended (both ends closed, or never joined).
        self.done: Deferred[None] = Deferred()
        self._sides: list[_Side] = []
        self._accepted = False
        relay = self

        class Inbound(Factory):
            def buildProtocol(self, addr: Any) -> _Side | None:
                return relay._accept()

        self.port = reactor.listenUNIX(listen_path, Inbound())

    def _accept(self) -> _Side | None:
        if self._accepted:
            return None  # one stream per migration
        self._accepted = True
        self.port.stopListening()
        side = _Side(self, inbound=True)
        self._sides.append(side)
        return side

    def _connect(self, inbound: _Side) -> None:
        relay = self

        class Outbound(ClientFactory):
            def buildProtocol(self, addr: Any) -> _Side:
                out = _Side(relay, inbound=False)
                out.peer = inbound
                relay._sides.append(out)
                return out

            def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
                inbound.transport.loseConnection()

        self.reactor.connectUNIX(self.target_path, Outbound())

    def _lost(self, side: _Side) -> None:
        side.peer = None
        if all(not s.connected for s in self._sides) and not self.done.called:
            self.done.callback(None)

    def cut(self) -> None:
        """Break the stream both ways (a network partition mid-pre-copy)."""
        for side in self._sides:
            if side.transport is not None and side.connected:
                side.transport.abortConnection()
        if not self._accepted:
            self.port.stopListening()

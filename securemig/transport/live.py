"""
The relay of a live migration's stream: QEMU at the source connects to a
unix socket securemig listens on (:func:`securemig.hypervisor.qemu.live_socket`),
and every byte it sends is passed on to where the destination's QEMU
listens, with producer/consumer flow control both ways (a slow
destination pauses the source's QEMU, never grows a buffer).

This relay joins two unix sockets on one host (the backend's own tests and
the bench's baseline); the secure variant seals the same bytes into the
data channel's AEAD records instead.  It counts the bytes it relayed and
can be cut, which is how a test breaks a migration mid-pre-copy.
"""

from __future__ import annotations

from collections.abc import Callable
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


# -- the sealed stream: QEMU's bytes in the data channel's AEAD records

#: QEMU reads and writes its stream in pieces of at most this size here
#: (Twisted's unix read size); a record holds one such piece.
LIVE_RECORD_PLAINTEXT = 1 << 20


class _SealingSide(Protocol):
    """Source: QEMU's stream in (a unix connection), sealed records out."""

    transport: Any

    def __init__(self, sender: LiveSender) -> None:
        self.sender = sender

    def connectionMade(self) -> None:
        self.sender._qemu_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.sender._from_qemu(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.sender._qemu_closed()


class _WireSide(Protocol):
    """One TCP end of the sealed stream."""

    transport: Any

    def __init__(self, on_data: Any, on_lost: Any, on_made: Any = None) -> None:
        self.on_data, self.on_lost, self.on_made = on_data, on_lost, on_made

    def connectionMade(self) -> None:
        if self.on_made is not None:
            self.on_made(self)

    def dataReceived(self, data: bytes) -> None:
        self.on_data(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.on_lost(reason)


class LiveSender:
    """The source's end of a sealed live stream: listens on ``listen_path``
    for its QEMU (``migrate uri=unix:...``), connects to the destination's
    :class:`LiveReceiver` at ``host:port`` and seals every piece of QEMU's
    stream into one record with ``sealer``; when QEMU closes the stream
    (it completed) the END record follows.  Flow control end to end: a full
    socket to the destination pauses the reads from QEMU."""

    def __init__(
        self,
        reactor: Any,
        listen_path: str,
        host: str,
        port: int,
        sealer: Any,
        on_progress: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.reactor = reactor
        self.sealer = sealer
        self.on_progress = on_progress
        self.sent = 0
        self.done: Deferred[None] = Deferred()
        self._qemu: _SealingSide | None = None
        self._out: _WireSide | None = None
        self._pending: list[bytes] = []
        self._qemu_ended = False
        sender = self

        class FromQemu(Factory):
            def buildProtocol(self, addr: Any) -> _SealingSide | None:
                return None if sender._qemu is not None else _SealingSide(sender)

        self.port = reactor.listenUNIX(listen_path, FromQemu())

        class ToDestination(ClientFactory):
            def buildProtocol(self, addr: Any) -> _WireSide:
                return _WireSide(sender._from_destination, sender._destination_lost, sender._wired)

            def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
                sender._destination_lost(reason)

        reactor.connectTCP(host, port, ToDestination(), timeout=30)

    def _wired(self, out: _WireSide) -> None:
        self._out = out
        for data in self._pending:
            out.transport.writeSequence(data)
        self._pending = []
        if self._qemu is not None:
            out.transport.registerProducer(self._qemu.transport, True)
        if self._qemu_ended:
            self._end()

    def _qemu_connected(self, side: _SealingSide) -> None:
        self._qemu = side
        self.port.stopListening()
        if self._out is not None:
            self._out.transport.registerProducer(side.transport, True)

    def _from_qemu(self, data: bytes) -> None:
        self.sent += len(data)
        self.on_progress(len(data))
        sealed = self.sealer.seal([data])
        if self._out is None:
            self._pending.append(sealed)
        else:
            self._out.transport.writeSequence(sealed)

    def _qemu_closed(self) -> None:
        self._qemu_ended = True
        if self._out is not None:
            self._end()

    def _end(self) -> None:
        assert self._out is not None
        self._out.transport.unregisterProducer()
        self._out.transport.writeSequence(self.sealer.end())
        self._out.transport.loseConnection()

    def _from_destination(self, data: bytes) -> None:
        # The destination never sends on this stream.
        self.cut()

    def _destination_lost(self, reason: Any) -> None:
        if self._qemu is not None and self._qemu.transport is not None:
            self._qemu.transport.abortConnection()
        if not self.done.called:
            self.done.callback(None)

    def cut(self) -> None:
        """Break the stream both ways."""
        for side in (self._qemu, self._out):
            if side is not None and side.transport is not None:
                side.transport.abortConnection()
        if self._qemu is None:
            self.port.stopListening()


class LiveReceiver:
    """The destination's end of a sealed live stream: listens on loopback
    TCP (``port``) for one connection, opens its records with ``opener``
    and writes their plaintext into its QEMU's ``migrate-incoming`` unix
    socket (``qemu_path``).  A record that does not authenticate (altered,
    replayed, another session's key) or a stream cut without END ends both
    connections, so QEMU's incoming migration fails and the source's QEMU
    stops sending: nothing forged reaches QEMU's loader.  ``error`` is then
    the refusal."""

    def __init__(
        self,
        reactor: Any,
        qemu_path: str,
        opener: Any,
        interface: str = "127.0.0.1",
        on_progress: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.on_progress = on_progress
        self.reactor = reactor
        self.qemu_path = qemu_path
        self.opener = opener
        self.delivered = 0
        self.error: Exception | None = None
        self.done: Deferred[None] = Deferred()
        self._in: _WireSide | None = None
        self._qemu: _WireSide | None = None
        receiver = self

        class FromSource(Factory):
            def buildProtocol(self, addr: Any) -> _WireSide | None:
                if receiver._in is not None:
                    return None
                return _WireSide(receiver._from_source, receiver._source_lost, receiver._accepted)

        self.port = reactor.listenTCP(0, FromSource(), interface=interface)

    @property
    def address(self) -> tuple[str, int]:
        """Where the source's :class:`LiveSender` connects."""
        host = self.port.getHost()
        return host.host, host.port

    def _accepted(self, side: _WireSide) -> None:
        self._in = side
        self.port.stopListening()
        side.transport.pauseProducing()
        receiver = self

        class ToQemu(ClientFactory):
            def buildProtocol(self, addr: Any) -> _WireSide:
                return _WireSide(lambda data: None, receiver._qemu_lost, receiver._qemu_made)

            def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
                receiver._refuse(RuntimeError(f"the destination's QEMU is not listening: {reason}"))

        self.reactor.connectUNIX(self.qemu_path, ToQemu())

    def _qemu_made(self, side: _WireSide) -> None:
        self._qemu = side
        assert self._in is not None
        side.transport.registerProducer(self._in.transport, True)
        self._in.transport.resumeProducing()

    def _from_source(self, data: bytes) -> None:
        self.opener.feed(data)
        try:
            while (plain := self.opener.next_record()) is not None:
                self.delivered += len(plain)
                self.on_progress(len(plain))
                assert self._qemu is not None
                self._qemu.transport.write(plain)
        except Exception as e:  # a refused record: nothing more reaches QEMU
            self._refuse(e)
            return
        if self.opener.ended and self._qemu is not None:
            self._qemu.transport.loseConnection()

    def _source_lost(self, reason: Any) -> None:
        if not self.opener.ended:
            try:
                self.opener.closed()
            except Exception as e:
                self._refuse(e)
                return
        self._finish()

    def _qemu_lost(self, reason: Any) -> None:
        if self._in is not None and self._in.transport is not None and not self.opener.ended:
            self._in.transport.abortConnection()
        self._finish()

    def _refuse(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self.cut()
        self._finish()

    def _finish(self) -> None:
        if not self.done.called:
            self.done.callback(None)

    def cut(self) -> None:
        """Break the stream both ways."""
        for side in (self._in, self._qemu):
            if side is not None and side.transport is not None:
                side.transport.abortConnection()
        if self._in is None:
            self.port.stopListening()

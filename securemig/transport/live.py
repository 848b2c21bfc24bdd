"""
A live migration's sealed stream: QEMU at the source connects to a unix
socket securemig listens on (:func:`securemig.hypervisor.qemu.live_socket`);
:class:`LiveSender` seals every byte it sends into the data channel's AEAD
records, and the destination's :class:`LiveReceiver` opens them and passes
them on to where the destination's QEMU listens.  Twisted accepts, connects
and keeps strangers out; the bytes themselves move on a relay thread per
side (:mod:`securemig.transport.relay`), blocking on a full socket, so a
slow destination pauses the source's QEMU and never grows a buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger

from securemig.protocol import records
from securemig.protocol.strangers import (
    FIRST_RECORD_TIMEOUT,
    MAX_PENDING_DATA_CONNECTIONS,
    CloseStranger,
    StrangerPool,
)
from securemig.transport.relay import OpeningRelay, SealingRelay, blocking_dup
from securemig.transport.strangers import PoolTimer

log = Logger()


# -- the sealed stream: QEMU's bytes in the data channel's AEAD records

#: The source's relay reads QEMU's stream in pieces of at most this size
#: (what one read returns: QEMU writes in smaller ones); a record holds one
#: piece, and the receiver refuses a longer one from its header.
LIVE_RECORD_PLAINTEXT = 1 << 20
#: The sender's first record is empty: it only proves the key.  Until it
#: authenticates, a connection to the live port may send no longer record
#: (a stranger cannot make the destination buffer a megabyte).
LIVE_OPENING_PLAINTEXT = 0
#: Seconds the live port listens for the source's authenticated connection
#: (the sender connects as LIVE_READY arrives; its connect timeout too).
LIVE_ACCEPT_TIMEOUT = 30.0


class _SealingSide(Protocol):
    """Source: QEMU's stream in (a unix connection), read by the relay."""

    transport: Any

    def __init__(self, sender: LiveSender) -> None:
        self.sender = sender

    def connectionMade(self) -> None:
        self.sender._qemu_connected(self)

    def connectionLost(self, reason: Any = None) -> None:
        self.sender._qemu_closed()


class _WireSide(Protocol):
    """One end of the sealed stream that Twisted reads: before its relay
    starts, or the direction nothing should come from (a peer's close)."""

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
    (it completed) the END record follows.  Once both are connected, a
    relay thread (:class:`~securemig.transport.relay.SealingRelay`) does
    the reading, sealing and sending, blocking on a full socket to the
    destination (so QEMU's writes block: flow control end to end)."""

    def __init__(
        self,
        reactor: Any,
        listen_path: str,
        host: str,
        port: int,
        sealer: records.Sealer,
        on_progress: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.reactor = reactor
        self.sealer = sealer
        self.on_progress = on_progress
        self.sent = 0
        self.done: Deferred[None] = Deferred()
        #: Why the relay ended early (None: it did not).
        self.error: Exception | None = None
        self._qemu: _SealingSide | None = None
        self._out: _WireSide | None = None
        self._relay: SealingRelay | None = None
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

        reactor.connectTCP(host, port, ToDestination(), timeout=LIVE_ACCEPT_TIMEOUT)

    def _wired(self, out: _WireSide) -> None:
        self._out = out
        self._start()

    def _qemu_connected(self, side: _SealingSide) -> None:
        self._qemu = side
        self.port.stopListening()
        # Nothing is read from QEMU but by the relay.
        side.transport.stopReading()
        self._start()

    def _start(self) -> None:
        # The relay sends the opening record first: it proves the key.
        if self._qemu is None or self._out is None or self._relay is not None:
            return
        try:
            qemu = blocking_dup(self._qemu.transport)
            wire = blocking_dup(self._out.transport)
        except (OSError, RuntimeError) as e:
            self.error = e
            self.cut()
            return
        self._relay = SealingRelay(
            self.reactor,
            qemu,
            wire,
            self.sealer,
            LIVE_RECORD_PLAINTEXT,
            self._sent,
            self._relayed,
            "securemig-live-seal",
            opening=True,
        )
        self._relay.start()

    def _sent(self, n: int) -> None:
        self.sent += n
        self.on_progress(n)

    def _relayed(self, error: Exception | None) -> None:
        if error is not None:
            if self.error is None and not self.done.called:
                self.error = error
            self.cut()
            return
        # QEMU ended its stream and END went after it: close both.
        for side in (self._qemu, self._out):
            if side is not None and side.transport is not None:
                side.transport.loseConnection()

    def _qemu_closed(self) -> None:
        # Twisted does not read QEMU's socket: this is our own close.
        pass

    def _from_destination(self, data: bytes) -> None:
        # The destination never sends on this stream.
        self.cut()

    def _destination_lost(self, reason: Any) -> None:
        if self._relay is not None:
            self._relay.abort()
        if self._qemu is not None and self._qemu.transport is not None:
            self._qemu.transport.abortConnection()
        if not self.done.called:
            self.done.callback(None)

    def cut(self) -> None:
        """Break the stream both ways."""
        if self._relay is not None:
            self._relay.abort()
        for side in (self._qemu, self._out):
            if side is not None and side.transport is not None:
                side.transport.abortConnection()
        if self._qemu is None:
            self.port.stopListening()


class LiveReceiver:
    """The destination's end of a sealed live stream: listens on loopback
    TCP (``port``) for the source's :class:`LiveSender`, opens its records
    with an opener from ``new_opener`` (one per connection) and writes their
    plaintext into its QEMU's ``migrate-incoming`` unix socket
    (``qemu_path``).

    The port is the data channel's kind of port: anyone may connect, so a
    connection is a *stranger* until its first record, the sender's empty
    opening record (:data:`LIVE_OPENING_PLAINTEXT`), authenticates under the
    live stream's key (the rules of every such port,
    :class:`~securemig.protocol.strangers.StrangerPool`).  A stranger has
    ``first_record_timeout`` seconds and
    one record of :data:`LIVE_OPENING_PLAINTEXT` bytes (checked from its
    header, before anything is buffered) to do that, at most
    ``max_pending`` of them wait at once (above it the oldest is closed),
    and one that fails is closed while the port listens on for the source,
    for up to ``accept_timeout`` seconds in all.  The first connection that
    authenticates is the stream; the port then closes, the other strangers
    too, and only then is QEMU's socket connected: a stranger's byte never
    reaches it.  After that, a record that does not authenticate (altered,
    replayed, another session's key) or a stream cut without END ends both
    connections, so QEMU's incoming migration fails and the source's QEMU
    stops sending: nothing forged reaches QEMU's loader.  ``error`` is then
    the refusal (or, no stream bound in time, the last stranger's)."""

    def __init__(
        self,
        reactor: Any,
        qemu_path: str,
        new_opener: Callable[[], records.Opener],
        interface: str = "127.0.0.1",
        on_progress: Callable[[int], None] = lambda n: None,
        accept_timeout: float = LIVE_ACCEPT_TIMEOUT,
        first_record_timeout: float = FIRST_RECORD_TIMEOUT,
        max_pending: int = MAX_PENDING_DATA_CONNECTIONS,
        listen: Callable[[str, Factory], Any] | None = None,
    ) -> None:
        self.on_progress = on_progress
        self.reactor = reactor
        self.qemu_path = qemu_path
        self.new_opener = new_opener
        self.accept_timeout = accept_timeout
        #: Connections waiting for their first record, and their clocks.
        self.pool: StrangerPool[_WireSide] = StrangerPool(
            "live stream connections", first_record_timeout, max_pending
        )
        self._timer = PoolTimer(reactor, self.pool, self._close_stranger)
        #: The bound stream's opener (None until a connection authenticated).
        self.opener: records.Opener | None = None
        self.delivered = 0
        self.error: Exception | None = None
        #: Why the last stranger was closed (None: none was).
        self.last_refusal: str | None = None
        self.done: Deferred[None] = Deferred()
        self._in: _WireSide | None = None
        self._qemu: _WireSide | None = None
        self._relay: OpeningRelay | None = None
        self._qemu_gone = False
        # Each stranger's opener.
        self._openers: dict[_WireSide, records.Opener] = {}
        self._listening = True
        #: Fires once the port no longer listens (after the stream bound or ended).
        self.port_closed: Deferred[None] | None = None
        receiver = self

        class FromSource(Factory):
            def buildProtocol(self, addr: Any) -> _WireSide | None:
                if receiver._in is not None or receiver.done.called:
                    return None
                return receiver._stranger()

        # ``listen(interface, factory)``: the destination's ``--data-ports``.
        if listen is None:
            self.port = reactor.listenTCP(0, FromSource(), interface=interface)
        else:
            self.port = listen(interface, FromSource())
        self._accept_timer = reactor.callLater(accept_timeout, self._accept_expired)

    @property
    def address(self) -> tuple[str, int]:
        """Where the source's :class:`LiveSender` connects."""
        host = self.port.getHost()
        return host.host, host.port

    def _stranger(self) -> _WireSide:
        side = _WireSide(None, None, None)
        side.on_data = lambda data: self._from_source(side, data)
        side.on_lost = lambda reason: self._source_lost(side, reason)
        side.on_made = self._stranger_made
        return side

    @property
    def strangers_closed(self) -> int:
        """Connections closed before their first record authenticated."""
        return self.pool.closed

    def _stranger_made(self, side: _WireSide) -> None:
        opener = self.new_opener()
        opener.max_plaintext = LIVE_OPENING_PLAINTEXT
        self._openers[side] = opener
        self._timer.run(self.pool.admit(side, self.reactor.seconds()))

    def _close_stranger(self, close: CloseStranger[_WireSide]) -> None:
        # A stranger goes; the port listens on for the source.
        side = close.conn_id
        self._openers.pop(side, None)
        self.last_refusal = close.reason
        log.warn(
            "closed a live stream connection from {peer}: {reason}",
            peer=side.transport.getPeer(),
            reason=close.reason,
        )
        side.transport.abortConnection()

    def _opener(self) -> records.Opener:
        # The bound stream's (only called once a connection bound: _in is set).
        if self.opener is None:
            raise RuntimeError("no live stream is bound")
        return self.opener

    def _from_source(self, side: _WireSide, data: bytes) -> None:
        if side is self._in:
            # Read with the opening record, before the wire was paused.
            self._opener().feed(data)
            return
        if side not in self.pool:
            return  # closed already
        opener = self._openers[side]
        opener.feed(data)
        try:
            opener.next_record()
        except Exception as e:  # not the source: it goes, the port stays
            self._timer.run(self.pool.refuse(side, str(e)))
            return
        if opener.sequence > 0:
            self._bind(side, opener)

    def _bind(self, side: _WireSide, opener: records.Opener) -> None:
        # It holds the live stream's key: the source.  Only now is QEMU's
        # socket connected; what else waits is closed and so is the port.
        self.pool.record_received(side)
        self._openers.pop(side, None)
        self._timer.run(self.pool.close_all("the live stream is bound"))
        if self._accept_timer.active():
            self._accept_timer.cancel()
        self._in = side
        self.opener = opener
        opener.max_plaintext = LIVE_RECORD_PLAINTEXT
        self._stop_listening()
        side.transport.pauseProducing()
        receiver = self

        class ToQemu(ClientFactory):
            def buildProtocol(self, addr: Any) -> _WireSide:
                return _WireSide(lambda data: None, receiver._qemu_lost, receiver._qemu_made)

            def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
                # The message, not the Failure's repr (which reads "Traceback
                # (failure with no frames)" in the log for an expected case).
                receiver._refuse(
                    RuntimeError(
                        f"the destination's QEMU is not listening: {reason.getErrorMessage()}"
                    )
                )

        self.reactor.connectUNIX(self.qemu_path, ToQemu())

    def _qemu_made(self, side: _WireSide) -> None:
        # QEMU's socket is there: a relay thread opens the records (those
        # that came with the opening record first) and writes their
        # plaintext to it.  Twisted goes on reading QEMU's side only to see
        # it close (QEMU sends nothing on an incoming migration).
        self._qemu = side
        assert self._in is not None
        opener = self._opener()
        try:
            wire = blocking_dup(self._in.transport)
            qemu = blocking_dup(side.transport)
        except (OSError, RuntimeError) as e:
            self._refuse(e)
            return
        self._relay = OpeningRelay(
            self.reactor,
            wire,
            qemu,
            opener,
            self._delivered,
            self._relayed,
            "securemig-live-open",
            leftover=opener.take_buffered(),
        )
        self._relay.start()

    def _delivered(self, n: int) -> None:
        self.delivered += n
        self.on_progress(n)

    def _relayed(self, error: Exception | None) -> None:
        if error is not None:
            if not self._qemu_gone:
                # A refused record, a truncation: nothing more reached QEMU.
                self._refuse(error)
            return
        # END: QEMU got its end of file; close both.
        for side in (self._qemu, self._in):
            if side is not None and side.transport is not None:
                side.transport.loseConnection()

    def _source_lost(self, side: _WireSide, reason: Any) -> None:
        if side is not self._in:
            self.pool.forget(side)
            self._openers.pop(side, None)
            self._timer.schedule()
            return
        if self._relay is None and not self._opener().ended:
            # Cut before QEMU's socket answered.
            try:
                self._opener().closed()
            except Exception as e:
                self._refuse(e)
                return
        self._finish()

    def _qemu_lost(self, reason: Any) -> None:
        self._qemu_gone = True
        if self._relay is not None:
            self._relay.abort()
        if self._in is not None and self._in.transport is not None and not self._opener().ended:
            self._in.transport.abortConnection()
        self._finish()

    def _accept_expired(self) -> None:
        last = f" (the last connection: {self.last_refusal})" if self.last_refusal else ""
        self._refuse(
            RuntimeError(
                f"no connection to the live stream port authenticated within "
                f"{self.accept_timeout:g} s{last}"
            )
        )

    def _refuse(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self.cut()
        self._finish()

    def _finish(self) -> None:
        if self._accept_timer.active():
            self._accept_timer.cancel()
        if not self.done.called:
            self.done.callback(None)

    def _stop_listening(self) -> None:
        if self._listening:
            self._listening = False
            self.port_closed = maybeDeferred(self.port.stopListening)

    @property
    def reached_qemu(self) -> bool:
        """True once QEMU's incoming socket was connected."""
        return self._qemu is not None

    def cut(self) -> None:
        """Break the stream both ways; close the port and every stranger."""
        self._timer.run(self.pool.close_all("the live stream ended"))
        if self._relay is not None:
            self._relay.abort()
        for side in (self._in, self._qemu):
            if side is not None and side.transport is not None:
                side.transport.abortConnection()
        self._stop_listening()
        if self._in is None:
            self._finish()

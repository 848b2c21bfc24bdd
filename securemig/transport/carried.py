"""
Carried sockets: every connection a hypervisor makes to a per-migration
UNIX socket at the source travels, as sealed records, to the same-named
socket at the destination (issue 23: ``rpc``, libvirt's RPC; ``memory``,
QEMU's stream and its multifd channels; ``disk``, the NBD disk copy).

It is :mod:`securemig.transport.live` made two-way and many-connection, the
shape of KubeVirt's migration proxy (one listener per socket, one dial per
accepted connection) with the data channel's AEAD records in place of TLS:

- the source listens on one UNIX path per socket name; each connection
  accepted there dials the destination's carrier port (loopback TCP here, the
  data channel's network in production) and sends a clear preamble: the
  socket's index in :data:`SOCKETS` and the connection's number;
- both directions of that connection get their own key, derived (HKDF) from
  the migration's carried-socket key (the TLS exporter of the attested
  session, label :data:`CARRIED_EXPORTER_LABEL`) with the socket, the
  connection number and the direction; each record's associated data names
  them too, so a record moved to another connection or direction fails;
- the first record is empty and proves the key; until it authenticates the
  connection is a stranger (one record of 0 plaintext bytes, a few seconds,
  at most a few at once), and a (socket, number) binds once: a replayed
  preamble is refused.  Only then does the destination dial its local UNIX
  socket of that name: no stranger's byte reaches libvirt, QEMU or NBD;
- either side's close sends the authenticated END record; a connection cut
  without it (truncation) or a record that fails aborts both ends, so the
  hypervisor sees an error, never a clean end of a forged stream;
- ``memory``'s connection 0 (QEMU's main migration channel) reaches the
  destination's socket before any other of that socket (:data:`MAIN_FIRST`):
  the others, bound, wait for it;
- once a connection is bound and both its ends are there, each direction
  runs on a relay thread of its own (:mod:`securemig.transport.relay`): the
  channels of one migration are sealed and opened side by side, not in
  turn on the reactor thread.

The QEMU backend's live stream on multifd channels (``migrate --live
--parallel N``) is the same machinery with one socket, ``memory``, and
``limits`` of N + 1 connections (QEMU's main channel and its N multifd
channels): the destination refuses a connection numbered beyond them and,
once all N + 1 are bound, stops listening and closes every stranger.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
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

#: The TLS exporter label of the carried sockets' key (its own label: its
#: keys are never the image streams' or QEMU's live stream's).
CARRIED_EXPORTER_LABEL = b"EXPORTER-securemig-carried-sockets"
#: The sockets a migration may carry, by index (the preamble's first byte):
#: the hypervisors' RPC (libvirt's), the guest's memory stream (QEMU's, and
#: each of its multifd channels) and the disk copy (NBD).
SOCKETS = ("rpc", "memory", "disk")
#: Preamble: socket index (1 byte), connection number (4 bytes).
PREAMBLE = struct.Struct("!BI")
#: A record holds at most this much of a socket's bytes.
CARRIED_RECORD_PLAINTEXT = 1 << 20
#: Connections per socket name and migration (multifd channels, disks).
MAX_CONNECTIONS = 64
#: Sockets whose connection 0 must reach the destination's socket before
#: any other does: QEMU's incoming migration (before QEMU 8.0) takes the
#: first connection it accepts for its main channel, and each carried
#: connection's wire authenticates in its own time, so the source's order
#: (QEMU's main channel is connected before its multifd channels) is not
#: the order the destination's dials would otherwise arrive in.
MAIN_FIRST = frozenset({"memory"})


class Progress:
    """What a carrier tells the session's idle clock (``on_progress``):
    every byte of the hypervisor's stream and disk copy; libvirt's RPC only
    until one of those has moved.  From then on the migration progresses
    only if they do: libvirt's keepalives (every 5 s) on its RPC connection
    would otherwise hold a migration whose stream stalled open for ever
    (``--idle-timeout`` never firing)."""

    def __init__(self, on_progress: Callable[[int], None]) -> None:
        self.on_progress = on_progress
        #: The stream or the disk copy has moved a byte.
        self.streaming = False

    def carried(self, name: str, n: int) -> None:
        """``n`` bytes carried on a connection of socket ``name``."""
        if name != "rpc":
            self.streaming = True
        elif self.streaming:
            return
        self.on_progress(n)


def connection_key(key: bytes, name: str, number: int, to_destination: bool) -> bytes:
    """The key of one direction of one carried connection."""
    info = b"securemig carried socket %s %d %s" % (
        name.encode(),
        number,
        b"to-destination" if to_destination else b"to-source",
    )
    return HKDF(SHA256(), len(key), salt=None, info=info).derive(key)


def _channel_id(migration_id: bytes, name: str, number: int, to_destination: bool) -> bytes:
    return b"%s/%s/%d/%s" % (migration_id, name.encode(), number, b"d" if to_destination else b"s")


def _sealer(
    cipher: str, key: bytes, mid: bytes, name: str, number: int, to_destination: bool
) -> records.Sealer:
    return records.Sealer(
        cipher,
        connection_key(key, name, number, to_destination),
        _channel_id(mid, name, number, to_destination),
    )


def _opener(
    cipher: str, key: bytes, mid: bytes, name: str, number: int, to_destination: bool
) -> records.Opener:
    return records.Opener(
        cipher,
        connection_key(key, name, number, to_destination),
        _channel_id(mid, name, number, to_destination),
        0,
    )


class _End(Protocol):
    """One end of a carried connection (UNIX or TCP); its owner does the rest."""

    transport: Any

    def __init__(self, pair: _Pair, wire: bool) -> None:
        self.pair = pair
        self.wire = wire

    def connectionMade(self) -> None:
        self.pair.made(self)

    def dataReceived(self, data: bytes) -> None:
        self.pair.received(self, data)

    def connectionLost(self, reason: Any = None) -> None:
        self.pair.lost(self)


class _Pair:
    """A carried connection: a local UNIX end and a TCP wire end, sealing
    what goes onto the wire and opening what comes off it.

    Until both ends are there and the wire authenticated, Twisted reads
    them (the preamble, the first record); then :meth:`join` hands each
    direction to a relay thread (:mod:`securemig.transport.relay`) and
    Twisted only closes the two ends once both relays are done."""

    def __init__(
        self,
        owner: Any,
        sealer: records.Sealer | None,
        opener: records.Opener | None,
        name: str,
    ) -> None:
        self.owner = owner
        self.sealer = sealer
        self.opener = opener
        self.name = name
        self.local: _End | None = None
        self.wire: _End | None = None
        self.bound = False
        self.ended = False
        self.failed = False
        #: The connection's number among its socket's (from the preamble).
        self.number = 0
        #: Preamble bytes received so far (destination).
        self.buffer = b""
        #: Clear bytes the source sends before its first record: the preamble.
        self.preface = b""
        #: The relays of both directions (once joined), and how many still run.
        self.up: SealingRelay | None = None
        self.down: OpeningRelay | None = None
        self.running = 0

    # -- wiring

    def made(self, end: _End) -> None:
        if end.wire:
            self.wire = end
        else:
            self.local = end
        self.owner._made(self, end)

    def join(self) -> None:
        """Both ends are there and the wire authenticated: a relay thread
        for each direction, each blocking on a full socket (so a slow
        reader pauses the other end's writer, as producers did)."""
        assert self.local is not None and self.wire is not None
        assert self.sealer is not None and self.opener is not None
        self.bound = True
        local, wire = self.local.transport, self.wire.transport
        local.stopReading()
        wire.stopReading()
        reactor = self.owner.reactor
        tag = f"securemig-carried-{self.name}-{self.number}"
        try:
            self.up = SealingRelay(
                reactor,
                blocking_dup(local),
                blocking_dup(wire),
                self.sealer,
                CARRIED_RECORD_PLAINTEXT,
                self._sent,
                self._up_done,
                f"{tag}-seal",
                opening=bool(self.preface),
                preface=self.preface,
            )
            self.down = OpeningRelay(
                reactor,
                blocking_dup(wire),
                blocking_dup(local),
                self.opener,
                lambda n: self.owner.progress.carried(self.name, n),
                self._down_done,
                f"{tag}-open",
                leftover=self.opener.take_buffered(),
            )
        except (OSError, RuntimeError) as e:
            self.fail(f"cannot relay: {e}")
            return
        self.running = 2
        self.up.start()
        self.down.start()

    # -- data

    def received(self, end: _End, data: bytes) -> None:
        # Only before the relays start: the destination's preamble and
        # first record (the source's ends are not read until then).
        if not end.wire:
            return
        if self.opener is None:
            self.owner._preamble(self, data)
            return
        self.opener.feed(data)
        if not self.bound:
            self.owner._first_record(self)

    def _sent(self, n: int) -> None:
        self.owner.carried[self.name] += n
        self.owner.progress.carried(self.name, n)

    # -- the relays' ends (on the reactor thread)

    def _up_done(self, error: Exception | None) -> None:
        # The hypervisor closed its socket and END went onto the wire: the
        # connection ends both ways, as it did on one thread.
        self._relay_done(error, lambda: self.down.abort() if self.down else None)

    def _down_done(self, error: Exception | None) -> None:
        # END arrived (and the hypervisor's socket got its end of file): our
        # END follows on the wire once what was read is sealed.
        self._relay_done(error, lambda: self.up.finish() if self.up else None)

    def _relay_done(self, error: Exception | None, other_end: Callable[[], None]) -> None:
        """One direction's relay ended: a failure fails the pair; the first
        to end cleanly ends the other direction (``other_end``)."""
        self.running -= 1
        if error is not None and not self.ended:
            self.fail(str(error))
            return
        if not self.ended:
            self.ended = True
            other_end()
        self._settle()

    def _settle(self) -> None:
        if self.running or self.failed:
            return
        for end in (self.wire, self.local):
            if end is not None and end.transport is not None:
                end.transport.loseConnection()
        self.owner._ended(self)

    # -- ends

    def lost(self, end: _End) -> None:
        # Twisted sees an end go only before the relays start (after, it
        # does not read them) or when this pair closes them itself.
        if self.ended or self.bound:
            return
        self.close()

    def close(self) -> None:
        """An orderly end before the relays started: both ends closed."""
        if self.ended:
            return
        self.ended = True
        for end in (self.wire, self.local):
            if end is not None and end.transport is not None:
                end.transport.loseConnection()
        self.owner._ended(self)

    def fail(self, reason: str) -> None:
        """A refused record, a truncation: both ends aborted."""
        if not self.ended:
            log.warn("carried {name} connection refused: {reason}", name=self.name, reason=reason)
            self.owner.errors.append(f"{self.name}: {reason}")
        self.ended = True
        self.failed = True
        for relay in (self.up, self.down):
            if relay is not None:
                relay.abort()
        for end in (self.wire, self.local):
            if end is not None and end.transport is not None:
                end.transport.abortConnection()
        self.owner._ended(self)


class CarrierSource:
    """The source's end: listens on ``listen[name]`` (UNIX paths) and
    carries each accepted connection to the destination's
    :class:`CarrierDestination` at ``host:port``."""

    def __init__(
        self,
        reactor: Any,
        listen: dict[str, str],
        host: str,
        port: int,
        tls_cipher: str,
        key: bytes,
        migration_id: bytes,
        on_progress: Callable[[int], None] = lambda n: None,
        limits: dict[str, int] | None = None,
    ) -> None:
        self.reactor = reactor
        #: Connections accepted at most, by socket (default :data:`MAX_CONNECTIONS`).
        self.limits = limits or {}
        #: Told the plaintext bytes of each piece carried, both ways (the
        #: session's idle clock), as :class:`Progress` counts them.
        self.progress = Progress(on_progress)
        self.host, self.port = host, port
        self.cipher, self.key, self.migration_id = tls_cipher, key, migration_id
        #: Plaintext bytes carried so far, by socket (source to destination).
        self.carried: dict[str, int] = dict.fromkeys(SOCKETS, 0)
        #: Connections accepted so far, by socket.
        self.accepted: dict[str, int] = dict.fromkeys(SOCKETS, 0)
        self.errors: list[str] = []
        self._pairs: set[_Pair] = set()
        self._ports = []
        for name, path in listen.items():
            if name not in SOCKETS:
                raise ValueError(f"unknown carried socket {name!r}")
            self._ports.append(reactor.listenUNIX(path, self._factory(name)))

    def _factory(self, name: str) -> Factory:
        source = self

        class Accept(Factory):
            def buildProtocol(self, addr: Any) -> _End | None:
                number = source.accepted[name]
                if number >= source.limits.get(name, MAX_CONNECTIONS):
                    return None
                source.accepted[name] += 1
                pair = _Pair(
                    source,
                    _sealer(source.cipher, source.key, source.migration_id, name, number, True),
                    _opener(source.cipher, source.key, source.migration_id, name, number, False),
                    name,
                )
                pair.opener.max_plaintext = CARRIED_RECORD_PLAINTEXT  # type: ignore[union-attr]
                pair.number = number
                source._pairs.add(pair)
                return _End(pair, wire=False)

        return Accept()

    def _made(self, pair: _Pair, end: _End) -> None:
        if not end.wire:
            # Nothing is read from the hypervisor until the wire is there.
            end.transport.pauseProducing()

            class Dial(ClientFactory):
                def buildProtocol(self, addr: Any) -> _End:
                    return _End(pair, wire=True)

                def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
                    pair.fail(f"cannot reach the destination's carrier: {reason.getErrorMessage()}")

            self.reactor.connectTCP(self.host, self.port, Dial(), timeout=30)
            return
        # The preamble and the opening record go first, from the relay.
        pair.preface = PREAMBLE.pack(SOCKETS.index(pair.name), pair.number)
        pair.join()

    def _preamble(self, pair: _Pair, data: bytes) -> None:
        raise AssertionError("the source has its opener from the start")

    def _first_record(self, pair: _Pair) -> None:
        raise AssertionError("the source's pairs are bound from the start")

    def _ended(self, pair: _Pair) -> None:
        self._pairs.discard(pair)

    def close(self) -> None:
        """Stop listening; abort what is still carried."""
        for port in self._ports:
            port.stopListening()
        self._ports = []
        for pair in list(self._pairs):
            pair.fail("the migration ended")


class CarrierDestination:
    """The destination's end: listens on loopback TCP for the source's
    connections, authenticates each by its first record, then dials
    ``targets[name]`` (the local UNIX socket of that name) and carries the
    connection both ways."""

    def __init__(
        self,
        reactor: Any,
        targets: dict[str, str],
        tls_cipher: str,
        key: bytes,
        migration_id: bytes,
        interface: str = "127.0.0.1",
        first_record_timeout: float = FIRST_RECORD_TIMEOUT,
        max_pending: int = MAX_PENDING_DATA_CONNECTIONS,
        on_progress: Callable[[int], None] = lambda n: None,
        limits: dict[str, int] | None = None,
        listen: Callable[[str, Factory], Any] | None = None,
        expected: int = 0,
    ) -> None:
        self.reactor = reactor
        self.progress = Progress(on_progress)
        self.targets = targets
        #: Connections that may bind, by socket (default :data:`MAX_CONNECTIONS`):
        #: numbers 0 to limit - 1.  When every socket named here has all of
        #: its connections bound, the port closes and so does every stranger.
        self.limits = limits or {}
        self.cipher, self.key, self.migration_id = tls_cipher, key, migration_id
        #: Connections waiting for their first record, and their clocks
        #: (the rules of every such port, :mod:`securemig.protocol.strangers`).
        #: The source's own connections may arrive all at once (QEMU opens
        #: its multifd channels together, ``expected`` of them in all), each
        #: before its first record is read: the pool holds that many more
        #: than ``max_pending``, so the burst fits beside as many strangers
        #: (one pool: strangers alone may fill it, still bounded, oldest
        #: closed first).
        self.pool: StrangerPool[_Pair] = StrangerPool(
            "carrier connections", first_record_timeout, max_pending + expected
        )
        self._timer = PoolTimer(reactor, self.pool, self._close_stranger)
        self.carried: dict[str, int] = dict.fromkeys(SOCKETS, 0)
        self.errors: list[str] = []
        #: (socket, number) pairs that authenticated: each binds once.
        self.bound: set[tuple[str, int]] = set()
        #: (socket, number) pairs whose local socket answered.
        self._made_local: set[tuple[str, int]] = set()
        #: Bound, waiting for connection 0 of their socket (:data:`MAIN_FIRST`).
        self._waiting: list[_Pair] = []
        self._pairs: set[_Pair] = set()
        destination = self

        class Accept(Factory):
            def buildProtocol(self, addr: Any) -> _End:
                pair = _Pair(destination, None, None, "stranger")
                destination._pairs.add(pair)
                return _End(pair, wire=True)

        # ``listen(interface, factory)``: the destination's ``--data-ports``.
        if listen is None:
            self.port = reactor.listenTCP(0, Accept(), interface=interface)
        else:
            self.port = listen(interface, Accept())
        self._port_closed: Deferred[None] | None = None
        host = self.port.getHost()
        self._address: tuple[str, int] = (host.host, host.port)

    @property
    def address(self) -> tuple[str, int]:
        """Where the source's :class:`CarrierSource` connects (also once
        the port closed)."""
        return self._address

    @property
    def strangers_closed(self) -> int:
        """Connections closed before their first record authenticated."""
        return self.pool.closed

    def _made(self, pair: _Pair, end: _End) -> None:
        if end.wire:
            pair.buffer = b""
            self._timer.run(self.pool.admit(pair, self.reactor.seconds()))
            return
        # The local socket answered: carry both ways.
        self._made_local.add((pair.name, pair.number))
        pair.join()
        if pair.number == 0 and pair.name in MAIN_FIRST:
            waiting, self._waiting = self._waiting, []
            for other in waiting:
                if not other.ended:
                    self._dial(other)

    def _preamble(self, pair: _Pair, data: bytes) -> None:
        buffered = pair.buffer + data
        if len(buffered) < PREAMBLE.size:
            pair.buffer = buffered
            return
        index, number = PREAMBLE.unpack(buffered[: PREAMBLE.size])
        rest = buffered[PREAMBLE.size :]
        if index >= len(SOCKETS) or SOCKETS[index] not in self.targets:
            self._drop(pair, f"no carried socket number {index}")
            return
        name = SOCKETS[index]
        limit = self.limits.get(name, MAX_CONNECTIONS)
        if number >= limit:
            self._drop(pair, f"{name} connection {number} is beyond the {limit} it takes")
            return
        if (name, number) in self.bound:
            self._drop(pair, f"{name} connection {number} is bound already")
            return
        pair.name = name
        pair.number = number
        pair.opener = _opener(self.cipher, self.key, self.migration_id, name, number, True)
        pair.sealer = _sealer(self.cipher, self.key, self.migration_id, name, number, False)
        if rest:
            pair.received(pair.wire, rest)  # type: ignore[arg-type]

    def _first_record(self, pair: _Pair) -> None:
        assert pair.opener is not None
        try:
            pair.opener.next_record()
        except Exception as e:
            self._drop(pair, str(e))
            return
        if pair.opener.sequence == 0:
            return  # more bytes needed
        key = (pair.name, pair.number)
        if key in self.bound:
            self._drop(pair, f"{pair.name} connection {key[1]} is bound already")
            return
        self.bound.add(key)
        self.pool.record_received(pair)
        self._timer.schedule()
        if self.limits and all(
            sum(1 for bound in self.bound if bound[0] == name) >= limit
            for name, limit in self.limits.items()
        ):
            # Every connection this migration takes is there: no more come.
            self._timer.run(self.pool.close_all("every carried connection is bound"))
            self._stop_listening()
        pair.opener.max_plaintext = CARRIED_RECORD_PLAINTEXT
        assert pair.wire is not None
        pair.wire.transport.pauseProducing()
        if pair.name in MAIN_FIRST and pair.number > 0 and (pair.name, 0) not in self._made_local:
            # QEMU (before 8.0) takes the first connection to its incoming
            # socket for its main channel: a multifd channel whose wire
            # authenticated first waits until connection 0 reached it.
            self._waiting.append(pair)
            return
        self._dial(pair)

    def _dial(self, pair: _Pair) -> None:
        destination = self

        class Dial(ClientFactory):
            def buildProtocol(self, addr: Any) -> _End:
                return _End(pair, wire=False)

            def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
                pair.fail(f"the local {pair.name} socket does not answer")

        self.reactor.connectUNIX(destination.targets[pair.name], Dial())

    def _drop(self, pair: _Pair, reason: str) -> None:
        self._timer.run(self.pool.refuse(pair, reason))

    def _close_stranger(self, close: CloseStranger[_Pair]) -> None:
        pair, reason = close.conn_id, close.reason
        log.warn("closed a carrier connection: {reason}", reason=reason)
        pair.ended = True
        self._pairs.discard(pair)
        if pair.wire is not None and pair.wire.transport is not None:
            pair.wire.transport.abortConnection()

    def _ended(self, pair: _Pair) -> None:
        self.pool.forget(pair)
        self._timer.schedule()
        self._pairs.discard(pair)

    def _stop_listening(self) -> Deferred[None]:
        # Once (the port may close when all are bound, then at the end);
        # each caller gets its own Deferred of that one stop.
        if self._port_closed is None:
            self._port_closed = maybeDeferred(self.port.stopListening)
        mine: Deferred[None] = Deferred()

        def passed(result: object) -> object:
            mine.callback(None)
            return result

        self._port_closed.addBoth(passed)
        return mine

    def close(self) -> Deferred[None]:
        """Stop listening; abort what is still carried."""
        self._timer.run(self.pool.close_all("the migration ended"))
        for pair in list(self._pairs):
            pair.fail("the migration ended")
        return self._stop_listening()

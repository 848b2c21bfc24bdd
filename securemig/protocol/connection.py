"""
One connection object per role: bytes in, effects out, time as an input.

As aioquic's ``QuicConnection`` does, the object owns everything about a
migration's connections that is not I/O: the control connection's frame
decoder and its chunk limit, the session, which messages each channel may
carry (:mod:`securemig.protocol.channels`), the destination's data
channels, and time.  The Twisted shell (:mod:`securemig.transport.control`)
feeds it what happened and carries out the effects it returns::

    start(now)                          the connection is up; the clocks start
    receive_data(bytes, now)            control bytes arrived; then
    next_batch() -> effects | None      one message's effects at a time
    progress(now)                       our data was taken, a disk write finished
    get_timer() -> when | None          when to call handle_timer next
    handle_timer(now) -> effects        TIMEOUT, the close grace, ...
    fail(error) / connection_lost(...)  local failures, the peer gone

One message is decoded at a time, and its effects carried out before the
next is decoded: a message's effects (admitting a HELLO) change what the
next message may be.

Time is an input like any other: the shell keeps one ``callLater`` at
:meth:`~MigrationConnection.get_timer` and calls
:meth:`~MigrationConnection.handle_timer` with its clock's ``seconds()``, so
every timeout is tested without a reactor.  The clocks of a connection:

- *idle*: ends the migration with ``TIMEOUT`` when nothing progressed for
  ``idle_timeout`` seconds (bytes received, the transport taking our data,
  a disk write finishing);
- *deadline*: ends it when the whole migration ran past ``deadline``;
- *close grace*: after the session ended, the shell half-closes and keeps
  reading (and discarding) for :data:`CLOSE_GRACE` so the peer gets our
  ABORT (closing a socket with unread data sends a TCP reset, which makes
  the peer's kernel drop what it had not yet read); then :class:`CloseNow`;
- source only, *data channel grace*: when the destination ends the data
  channel, its reason (an ABORT) travels on the control connection and may
  arrive later; the source waits up to :data:`DATA_CHANNEL_GRACE` for it
  before it reports ``CONNECTION_LOST``.

Every failure found here (a violation in the peer's bytes, a timeout) ends
the session through its ``fail`` input, so the effects returned include the
ABORT to send; :attr:`~MigrationConnection.error` keeps the first one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from securemig.protocol import channels, records, wire
from securemig.protocol.channels import DataChannelReader
from securemig.protocol.destination import DestinationSession
from securemig.protocol.effects import (
    DestinationEffect,
    DestinationEffects,
    Prepare,
    SourceEffect,
)
from securemig.protocol.errors import ErrorCode, MigrationError, ProtocolError
from securemig.protocol.session import Session, SessionState
from securemig.protocol.source import SourceSession

# The data port's strangers follow the rules of every port anyone may
# connect to; their defaults are re-exported for the ports' callers.
from securemig.protocol.strangers import FIRST_RECORD_TIMEOUT as FIRST_RECORD_TIMEOUT
from securemig.protocol.strangers import (
    MAX_PENDING_DATA_CONNECTIONS as MAX_PENDING_DATA_CONNECTIONS,
)
from securemig.protocol.strangers import CloseStranger, StrangerPool

E = TypeVar("E")

#: Defaults for the two clocks of a connection, in seconds.
IDLE_TIMEOUT = 60.0
DEADLINE = 3600.0
#: After ending a session, how long to keep reading so the peer gets our ABORT.
CLOSE_GRACE = 10.0
#: Source: how long the destination's ABORT may trail the end of the data
#: channel it caused.  A control segment lost once is resent after about
#: 200 ms (Linux's minimum RTO); a few such losses fit.
DATA_CHANNEL_GRACE = 5.0


@dataclass(frozen=True)
class CloseNow:
    """The close grace is over: drop the connection, read or not."""


class MigrationConnection(Generic[E]):
    """What both roles' connection objects share: the control connection's
    decoder, the session, the clocks.  See the module's documentation."""

    def __init__(
        self,
        session: Session[E, SessionState],
        idle_timeout: float = IDLE_TIMEOUT,
        deadline: float = DEADLINE,
    ) -> None:
        self.session = session
        self.idle_timeout = idle_timeout
        self.deadline = deadline
        self.decoder = wire.FrameDecoder()
        #: The error that ended the session on this side, if one did.
        self.error: MigrationError | None = None
        self._connected = False
        self._started = 0.0
        self._last_progress = 0.0
        self._close_at: float | None = None

    # -- inputs

    def start(self, now: float) -> None:
        """The connection is up: the idle timer and the deadline start."""
        self._connected = True
        self._started = self._last_progress = now

    def progress(self, now: float) -> None:
        """Something moved: restart the idle timer."""
        self._last_progress = now

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes arrived on the control connection (after the session
        ended they are read and dropped)."""
        if self.session.finished:
            return
        self.progress(now)
        self.decoder.feed(data)

    def next_batch(self) -> list[E] | None:
        """The effects of the next whole message, or None when more bytes
        are needed or the session is over.  A violation ends the session:
        the batch is then the session's failure (ABORT and all)."""
        if self.session.finished:
            return None
        # The chunk limit: no DATA frame before a HELLO set the chunk size.
        self.decoder.max_data = self.max_data()
        try:
            message = self.decoder.next_message()
            if message is None:
                return None
            self.check_control(message)
            return self.session.receive(message)
        except ProtocolError as e:
            return self.fail(e)

    def fail(self, error: MigrationError) -> list[E]:
        """End the session because of a local failure or the peer's
        violation (nothing, if it already ended)."""
        if self.session.finished:
            return []
        if self.error is None:
            self.error = error
        return self.session.fail(error.code, error.reason)

    def connection_lost(self, detail: str = "") -> list[E]:
        """The control connection is gone (``detail``: why, unless it was a
        clean close).  No clock runs after it."""
        self._connected = False
        self._close_at = None
        if self.session.finished:
            return []
        return self.session.connection_lost(detail)

    def closing(self, now: float) -> None:
        """The shell half-closed after the session's end: start the close grace."""
        if self._connected:
            self._close_at = now + CLOSE_GRACE

    # -- time

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called, or None."""
        if not self._connected:
            return None
        if self.session.finished:
            return self._close_at
        return min(
            self._started + self.deadline,
            self._last_progress + self.idle_timeout,
            *self.extra_timers(),
        )

    def handle_timer(self, now: float) -> Sequence[E | CloseNow]:
        """Time is ``now``: the effects of whatever clock ran out (none if
        called early)."""
        if not self._connected:
            return []
        if self.session.finished:
            if self._close_at is not None and now >= self._close_at:
                self._close_at = None
                return [CloseNow()]
            return []
        if now >= self._started + self.deadline:
            reason = f"migration ran past its deadline of {self.deadline:g} s"
            return self.fail(ProtocolError(ErrorCode.TIMEOUT, reason))
        if now >= self._last_progress + self.idle_timeout:
            reason = f"no progress for {self.idle_timeout:g} s in phase {self.session.phase}"
            return self.fail(ProtocolError(ErrorCode.TIMEOUT, reason))
        return self.handle_extra_timers(now)

    # -- what each role adds

    def max_data(self) -> int | None:
        """The largest DATA payload the control connection accepts now."""
        return None

    def check_control(self, message: wire.Message) -> None:
        """Refuse a message that may not arrive on the control connection."""

    def extra_timers(self) -> list[float]:
        """This role's own clocks, while the session runs."""
        return []

    def handle_extra_timers(self, now: float) -> list[E]:
        """This role's own clocks ran out (or not yet)."""
        return []


# --------------------------------------------------------------------------
# The destination: the control connection and the data channel's connections.


class DataConnection:
    """One TCP connection to a destination's data port, as the connection
    object sees it.  Anyone can connect to a port: a connection is a
    stranger until a record from it authenticates, and then, if it is the
    first, it is *the* data channel."""

    def __init__(self, reader: DataChannelReader, opened: float = 0.0) -> None:
        self.reader = reader
        #: When it connected (its first-record clock starts then, or when
        #: the data channel may first be read, whichever is later).
        self.opened = opened
        #: True once this connection is the migration's data channel.
        self.bound = False
        #: True once it was dropped: nothing more is read from it.
        self.dropped = False
        self._pending: wire.Message | None = None
        #: The last stream's PREPARE (and what follows it), held until the
        #: END record authenticates the channel's end.
        self._after_end: DestinationEffects | None = None


@dataclass(frozen=True)
class DataChannelBound:
    """This data connection proved it holds the key: it is the data
    channel; close the data port (no other connection is needed)."""


@dataclass(frozen=True)
class DropDataConnection:
    """Close this data connection unread; the migration goes on."""

    reason: str


#: What the data channel can ask of the shell, besides session effects.
DataChannelEvent = DataChannelBound | DropDataConnection


class DestinationConnection(MigrationConnection[DestinationEffect]):
    """The destination's connection object: the control connection, and in
    the secure variant the connections to its data port.

    Channel rules: with a data channel offered, stream frames on the
    control connection are refused; in records only stream frames are
    allowed; a second authenticated data connection is dropped; and no data
    connection is read while the wrapped key is pending
    (:attr:`data_channel_held`).  The shell keeps the data transports
    paused while it is True; bytes that still arrive (a transport that
    does not pause) wait unread, at most one record of the largest size
    per connection, beyond which the connection is dropped.

    Strangers (connections without an authenticated record) are kept by a
    :class:`~securemig.protocol.strangers.StrangerPool`, held until the key
    is accepted: each gets :data:`FIRST_RECORD_TIMEOUT` from when it can be
    read, and a first record no larger than one STREAM_BEGIN; at most
    :data:`MAX_PENDING_DATA_CONNECTIONS` wait at once; all are closed when
    the channel binds and when the session ends.  Only the bound channel's
    bytes count as the migration's progress.  The connections to close are
    collected in :meth:`take_drops`, which the shell calls after every input.

    The END record: on the data channel the last STREAM_END's PREPARE waits
    for the channel's authenticated END record; a channel that ends without
    it (or with an altered one) fails the migration, one that withholds it
    stalls into the idle timeout.

    Peer check (secure variant, ``check_peer``): no control byte is decoded
    before :meth:`peer_allowed` says the TLS peer's certificate passed the
    source rules (the shell checks it when the handshake completes); bytes
    before that end the session unread.
    """

    session: DestinationSession

    def __init__(
        self,
        session: DestinationSession,
        idle_timeout: float = IDLE_TIMEOUT,
        deadline: float = DEADLINE,
        check_peer: bool = False,
        first_record_timeout: float = FIRST_RECORD_TIMEOUT,
        max_pending: int = MAX_PENDING_DATA_CONNECTIONS,
    ) -> None:
        super().__init__(session, idle_timeout, deadline)
        self.data_offered = False
        #: The data channel, once a connection proved it holds the key.
        self.data_channel: DataConnection | None = None
        #: False until the TLS peer passed the source rules (secure variant).
        self.peer_checked = not check_peer
        self._unchecked_bytes = False
        #: Data connections waiting for their first record; held (no clock
        #: runs) until the data channel can first be read (the key accepted).
        self.pool: StrangerPool[DataConnection] = StrangerPool(
            "data connections", first_record_timeout, max_pending, held=True
        )
        self._drops: list[tuple[DataConnection, str]] = []

    @property
    def strangers(self) -> list[DataConnection]:
        """The data connections waiting for their first record, oldest first."""
        return list(self.pool)

    # -- the peer check

    def peer_allowed(self) -> None:
        """The TLS peer's certificate passed the source rules: decode its bytes."""
        self.peer_checked = True

    def receive_data(self, data: bytes, now: float) -> None:
        """Control bytes; before the peer check they are never decoded."""
        if not self.peer_checked:
            self._unchecked_bytes = True
            return
        super().receive_data(data, now)

    def next_batch(self) -> list[DestinationEffect] | None:
        """As the base class; and notes when the data channel became readable."""
        if self._unchecked_bytes and not self.session.finished:
            self._unchecked_bytes = False
            return self.fail(
                ProtocolError(
                    ErrorCode.POLICY_REFUSED, "bytes before the source's certificate was checked"
                )
            )
        batch = super().next_batch()
        if self.data_offered and not self.data_channel_held:
            self.pool.release(self._last_progress)
        return batch

    def max_data(self) -> int | None:
        """DATA is bounded by the chunk size the HELLO announced."""
        hello = self.session.hello
        return hello.chunk_size if hello is not None else None

    def check_control(self, message: wire.Message) -> None:
        """With a data channel offered, images may arrive only on it."""
        channels.check_control(message, self.data_offered)

    def offer_data_channel(self, port: int) -> None:
        """Secure variant: offer the data channel on ``port`` in WELCOME
        (before the session is admitted)."""
        self.session.offer_data_port(port)
        self.data_offered = True

    @property
    def data_channel_held(self) -> bool:
        """True while no data connection may be read: the wrapped key is
        not accepted yet (see :mod:`securemig.protocol.channels`)."""
        return self.session.phase.key_pending

    def data_connection(
        self, tls_cipher: str, key: bytes, migration_id: bytes, now: float = 0.0
    ) -> DataConnection | None:
        """A new connection to the data port, its records keyed with ``key``
        (exported from the control connection's TLS session); None when
        none is expected (no data channel offered, the channel bound, or the
        migration ended).  Above the pending cap the oldest stranger is
        dropped (see :meth:`take_drops`)."""
        hello = self.session.hello
        if (
            not self.data_offered
            or self.session.finished
            or hello is None
            or self.data_channel is not None
        ):
            return None
        opener = records.Opener(
            tls_cipher, key, migration_id, records.max_plaintext(hello.chunk_size)
        )
        connection = DataConnection(DataChannelReader(opener, hello.chunk_size), now)
        self._closing(self.pool.admit(connection, now))
        return connection

    def data_received(self, connection: DataConnection, data: bytes, now: float) -> None:
        """Bytes arrived on a data connection; read them with :meth:`next_data_batch`.
        A stranger's bytes are no progress of the migration (else anyone
        could keep it from its idle timeout)."""
        if connection.dropped or self.session.finished:
            return
        if connection.bound:
            self.progress(now)
        connection.reader.feed(data)

    def take_drops(self) -> list[tuple[DataConnection, str]]:
        """The data connections to close now, and why.  Once the session
        ended, every stranger is among them."""
        if self.session.finished:
            self._closing(self.pool.close_all("the migration ended"))
        drops, self._drops = self._drops, []
        return drops

    def extra_timers(self) -> list[float]:
        """The first-record deadline of the oldest stranger that can be read."""
        due = self.pool.get_timer()
        return [] if due is None else [due]

    def handle_extra_timers(self, now: float) -> list[DestinationEffect]:
        """Strangers past their first-record deadline are dropped (no effect
        on the migration)."""
        self._closing(self.pool.handle_timer(now))
        return []

    def _closing(self, closes: list[CloseStranger[DataConnection]]) -> None:
        # The pool's closes, for take_drops.
        for close in closes:
            connection = close.conn_id
            if not connection.dropped:
                connection.dropped = True
                self._drops.append((connection, close.reason))

    def next_data_batch(
        self, connection: DataConnection
    ) -> DestinationEffects | DataChannelEvent | None:
        """What the next piece of a data connection asks for: an event for
        the shell, or the effects of one stream message; None when more
        bytes are needed, the channel is held, or nothing more is read."""
        if connection.dropped or self.session.finished:
            return None
        reader = connection.reader
        if self.data_channel_held:
            if reader.buffered > reader.hold_limit:
                return self._drop(
                    connection,
                    f"{reader.buffered} bytes arrived before the vTPM key was accepted "
                    f"(at most {reader.hold_limit} wait unread)",
                )
            return None
        message, connection._pending = connection._pending, None
        if message is None:
            try:
                message = reader.next_message()
            except ProtocolError as e:
                return self._violation(connection, e)
            if not connection.bound and reader.authenticated:
                if self.data_channel is not None:
                    return self._drop(connection, "a second data channel")
                self._bind(connection)
                connection._pending = message
                return DataChannelBound()
            if message is None:
                if reader.ended and connection._after_end is not None:
                    # The END record authenticated: now the destination prepares.
                    batch, connection._after_end = connection._after_end, None
                    return batch
                return None
        try:
            batch = self.session.receive(message)
        except ProtocolError as e:
            return self.fail(e)
        return self._until_end(connection, batch)

    def _bind(self, connection: DataConnection) -> None:
        # It is the channel: no other connection to the port is needed.
        connection.bound = True
        self.data_channel = connection
        self.pool.record_received(connection)
        self._closing(self.pool.close_all("the data channel is bound"))

    @staticmethod
    def _until_end(connection: DataConnection, batch: DestinationEffects) -> DestinationEffects:
        # The last STREAM_END asks to prepare; on the data channel that
        # waits for the END record, so a channel cut (or altered) after its
        # last frame is not taken for a complete one.
        for index, effect in enumerate(batch):
            if isinstance(effect, Prepare) and not connection.reader.ended:
                connection._after_end = list(batch[index:])
                return list(batch[:index])
        return batch

    def data_connection_lost(self, connection: DataConnection) -> DestinationEffects:
        """A data connection ended: the data channel must have ended with
        its END record; any other connection ending changes nothing."""
        if connection is not self.data_channel or connection.dropped or self.session.finished:
            return []
        try:
            connection.reader.closed()
        except ProtocolError as e:
            return self.fail(e)
        return []

    def _violation(
        self, connection: DataConnection, error: ProtocolError
    ) -> DestinationEffects | DataChannelEvent:
        # A connection that authenticated a record is the source's (only the
        # TLS peer has the key): its violation ends the migration, unless
        # another connection already is the channel.  A stranger's is dropped.
        if connection is self.data_channel or (
            self.data_channel is None and connection.reader.authenticated
        ):
            self._bind(connection)
            return self.fail(error)
        return self._drop(connection, error.reason)

    def _drop(self, connection: DataConnection, reason: str) -> DropDataConnection:
        self.pool.refuse(connection, reason)  # returned to the shell at once, not via take_drops
        connection.dropped = True
        return DropDataConnection(reason)


# --------------------------------------------------------------------------
# The source.


class SourceConnection(MigrationConnection[SourceEffect]):
    """The source's connection object: the control connection, and the
    ordering rule for a data channel the destination ended (its ABORT,
    on the control connection, wins over the data channel's end)."""

    session: SourceSession

    def __init__(
        self,
        session: SourceSession,
        idle_timeout: float = IDLE_TIMEOUT,
        deadline: float = DEADLINE,
        data_channel_grace: float = DATA_CHANNEL_GRACE,
    ) -> None:
        super().__init__(session, idle_timeout, deadline)
        self.data_channel_grace = data_channel_grace
        self._data_channel_lost: tuple[float, str] | None = None

    def data_channel_lost(self, detail: str, now: float) -> None:
        """The data channel ended before every stream was sent.  The
        destination ends it when it refuses the migration, and its ABORT
        may still be on its way: fail with ``CONNECTION_LOST`` only if the
        session has not ended within the grace."""
        if not self.session.finished and self._data_channel_lost is None:
            self._data_channel_lost = (now + self.data_channel_grace, detail)

    def extra_timers(self) -> list[float]:
        """The data channel grace, while it runs."""
        return [self._data_channel_lost[0]] if self._data_channel_lost is not None else []

    def handle_extra_timers(self, now: float) -> list[SourceEffect]:
        """The grace ran out and no ABORT came: the data channel was cut."""
        if self._data_channel_lost is None or now < self._data_channel_lost[0]:
            return []
        detail = self._data_channel_lost[1]
        self._data_channel_lost = None
        reason = (
            f"the data channel closed: {detail} (and no ABORT from the destination "
            f"within {self.data_channel_grace:g} s)"
        )
        return self.fail(ProtocolError(ErrorCode.CONNECTION_LOST, reason))

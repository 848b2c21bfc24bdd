"""The connection objects (:mod:`securemig.protocol.connection`) without a
reactor or a Clock: bytes and times in, effects out.

The channel rules of a secure destination (control connection and data
connections), the timers of both roles, and the source's wait for the
destination's ABORT when the data channel ends."""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from securemig.hypervisor import backends
from securemig.protocol import effects as fx
from securemig.protocol import records, wire
from securemig.protocol.channels import FIRST_RECORD_PLAINTEXT
from securemig.protocol.connection import (
    CLOSE_GRACE,
    FIRST_RECORD_TIMEOUT,
    MAX_PENDING_DATA_CONNECTIONS,
    CloseNow,
    DataChannelBound,
    DataConnection,
    DestinationConnection,
    DropDataConnection,
    SourceConnection,
)
from securemig.protocol.destination import DestinationSession
from securemig.protocol.errors import ErrorCode, ProtocolError
from securemig.protocol.records import Sealer
from securemig.protocol.source import SourceSession
from tests.support.messages import EVIDENCE, OFFER, WRAPPED, make_hello

CIPHER = "TLS_AES_256_GCM_SHA384"
MID = b"M" * 16
CHUNK = wire.MIN_CHUNK_SIZE


def drain(connection: Any) -> list[Any]:
    """Every effect of the control bytes received so far."""
    out: list[Any] = []
    while (batch := connection.next_batch()) is not None:
        out += batch
    return out


def abort_of(effects: list[Any]) -> wire.Abort:
    aborts = [e.message for e in effects if isinstance(e, fx.Send)]
    assert aborts and isinstance(aborts[-1], wire.Abort), effects
    return aborts[-1]


class SecureDestination:
    """A secure destination connection driven, as the shell would drive it,
    to ``awaitWrappedKey`` with a data channel offered; the host's answers
    (admission, quotes, the key offer) are stood in."""

    def __init__(self, sizes: tuple[int, ...] = (CHUNK,)) -> None:
        self.conn = DestinationConnection(DestinationSession(secure=True), 10.0, 100.0)
        self.conn.start(0.0)
        self.key = os.urandom(32)
        self.sealer = Sealer(CIPHER, self.key, MID)
        assert [type(e) for e in self.control(make_hello(sizes, chunk_size=CHUNK))] == [fx.Admit]
        self.conn.offer_data_channel(4242)
        welcome = self.conn.session.admitted(MID)[0]
        assert isinstance(welcome, fx.Send) and welcome.message == wire.Welcome(MID, 4242)
        self.control(wire.Challenge(b"c" * 32))
        self.conn.session.attested(EVIDENCE)
        self.control(EVIDENCE)
        self.conn.session.peer_verified()
        self.conn.session.key_offered(OFFER)
        assert self.conn.session.phase == "awaitWrappedKey"

    def control(self, *messages: wire.Message, now: float = 0.0) -> list[Any]:
        """Send control messages as bytes; their effects."""
        for message in messages:
            self.conn.receive_data(wire.encode(message), now)
        return drain(self.conn)

    def accept_key(self) -> None:
        assert self.control(WRAPPED) == [fx.AcceptKey(WRAPPED)]

    def connect(self) -> DataConnection:
        connection = self.conn.data_connection(CIPHER, self.key, MID)
        assert connection is not None
        return connection

    def record(self, *frames: bytes, sealer: Sealer | None = None) -> bytes:
        return b"".join((sealer or self.sealer).seal(list(frames)))

    def data(self, connection: DataConnection, data: bytes, now: float = 0.0) -> list[Any]:
        """Bytes on a data connection; every event and effect they caused."""
        self.conn.data_received(connection, data, now)
        out: list[Any] = []
        while (item := self.conn.next_data_batch(connection)) is not None:
            out += item if isinstance(item, list) else [item]
        return out


def stream_frames(data: bytes) -> list[bytes]:
    return [
        wire.encode(wire.StreamBegin(0)),
        wire.data_header(len(data)) + data,
        wire.encode(wire.StreamEnd(wire.UNHASHED)),
    ]


class DestinationChannelTests(SynchronousTestCase):
    """Which channel may carry what, checked at the connection object."""

    def setUp(self) -> None:
        self.d = SecureDestination()

    def assertFailed(self, effects: list[Any], code: ErrorCode) -> wire.Abort:
        """The migration ended: ABORT with ``code`` sent, staging discarded."""
        abort = abort_of(effects)
        self.assertEqual(abort.code, code)
        self.assertIn(fx.Discard(), effects)
        self.assertEqual(effects[-1].outcome, fx.Outcome.ABORTED)
        self.assertTrue(self.d.conn.session.finished)
        self.assertEqual(self.d.conn.error.code, code)  # type: ignore[union-attr]
        return abort

    def test_stream_message_on_control_with_a_data_channel(self) -> None:
        """STREAM_BEGIN on the control connection, a data channel offered."""
        self.d.accept_key()
        abort = self.assertFailed(self.d.control(wire.StreamBegin(0)), ErrorCode.UNEXPECTED_MESSAGE)
        self.assertIn("StreamBegin on the control connection", abort.reason)

    def test_control_message_inside_a_record(self) -> None:
        """A COMMIT sealed into a genuine record: the channel binds (the
        record authenticated), then the migration fails."""
        self.d.accept_key()
        channel = self.d.connect()
        effects = self.d.data(channel, self.d.record(wire.encode(wire.Commit())))
        abort = self.assertFailed(effects, ErrorCode.UNEXPECTED_MESSAGE)
        self.assertIn("Commit on the data channel", abort.reason)
        self.assertIs(self.d.conn.data_channel, channel)

    def test_oversize_frame_in_a_record(self) -> None:
        """A DATA frame over the chunk size, inside a record within its bound."""
        self.d.accept_key()
        channel = self.d.connect()
        begin, data = stream_frames(b"x" * (CHUNK + 1))[:2]
        effects = self.d.data(channel, self.d.record(begin) + self.d.record(data))
        self.assertFailed(effects, ErrorCode.FRAME_TOO_LARGE)

    def test_record_after_end(self) -> None:
        """The whole stream, END, then one more genuine record."""
        self.d.accept_key()
        channel = self.d.connect()
        records_ = [self.d.record(f) for f in stream_frames(b"d" * CHUNK)]
        effects = self.d.data(channel, b"".join(records_) + b"".join(self.d.sealer.end()))
        self.assertEqual(
            [type(e) for e in effects],
            [DataChannelBound, fx.OpenStream, fx.WriteChunk, fx.CloseStream, fx.Prepare],
        )
        effects = self.d.data(channel, self.d.record(wire.encode(wire.StreamBegin(0))))
        self.assertFailed(effects, ErrorCode.RECORD_REFUSED)

    def test_second_data_channel(self) -> None:
        """A second connection with a genuine record (a second sealer starts
        at sequence 0 too) is dropped; the first stays the channel and the
        migration goes on."""
        self.d.accept_key()
        first, second = self.d.connect(), self.d.connect()
        begin = wire.encode(wire.StreamBegin(0))
        self.assertEqual(
            [type(e) for e in self.d.data(first, self.d.record(begin))],
            [DataChannelBound, fx.OpenStream],
        )
        # The channel bound: every other connection is let go at once.
        self.assertEqual(self.d.conn.take_drops(), [(second, "the data channel is bound")])
        self.assertTrue(second.dropped)
        other = Sealer(CIPHER, self.d.key, MID)
        self.assertEqual(self.d.data(second, self.d.record(begin, sealer=other)), [])
        self.assertIs(self.d.conn.data_channel, first)
        self.assertFalse(self.d.conn.session.finished)
        self.assertEqual(self.d.data(second, b"more"), [])
        self.assertEqual(self.d.conn.data_connection_lost(second), [])
        data = self.d.record(wire.data_header(CHUNK) + b"d" * CHUNK)
        self.assertEqual([type(e) for e in self.d.data(first, data)], [fx.WriteChunk])

    def test_stranger_dropped_migration_goes_on(self) -> None:
        """Anyone can connect to the port: a connection whose first record
        does not authenticate is dropped and fails nothing."""
        self.d.accept_key()
        stranger = self.d.connect()
        stream = b"".join(self.d.record(f) for f in stream_frames(b"d" * CHUNK))
        stream += b"".join(self.d.sealer.end())
        forged = self.d.record(b"x", sealer=Sealer(CIPHER, os.urandom(32), MID))
        [dropped] = self.d.data(stranger, forged)
        self.assertIsInstance(dropped, DropDataConnection)
        self.assertIn("does not authenticate", dropped.reason)
        self.assertEqual(self.d.conn.data_connection_lost(stranger), [])
        self.assertFalse(self.d.conn.session.finished)
        channel = self.d.connect()
        self.assertEqual(
            [type(e) for e in self.d.data(channel, stream)],
            [DataChannelBound, fx.OpenStream, fx.WriteChunk, fx.CloseStream, fx.Prepare],
        )

    def test_channel_cut_before_end(self) -> None:
        self.d.accept_key()
        channel = self.d.connect()
        self.d.data(channel, self.d.record(wire.encode(wire.StreamBegin(0))))
        effects = self.d.conn.data_connection_lost(channel)
        abort = self.assertFailed(effects, ErrorCode.RECORD_REFUSED)
        self.assertIn("truncated", abort.reason)

    def test_tampered_record_on_the_bound_channel(self) -> None:
        self.d.accept_key()
        channel = self.d.connect()
        self.d.data(channel, self.d.record(wire.encode(wire.StreamBegin(0))))
        record = bytearray(self.d.record(wire.data_header(4) + b"abcd"))
        record[-3] ^= 0x80
        self.assertFailed(self.d.data(channel, bytes(record)), ErrorCode.RECORD_REFUSED)

    def test_no_data_connection_after_the_end(self) -> None:
        self.d.conn.fail(ProtocolError(ErrorCode.CANCELLED, "stop"))
        self.assertIsNone(self.d.conn.data_connection(CIPHER, self.d.key, MID))

    def test_no_data_connection_without_an_offer(self) -> None:
        conn = DestinationConnection(DestinationSession(secure=True))
        conn.start(0.0)
        conn.receive_data(wire.encode(make_hello()), 0.0)
        drain(conn)
        self.assertIsNone(conn.data_connection(CIPHER, os.urandom(32), MID))

    def test_stream_frames_on_control_without_a_data_channel(self) -> None:
        """With no data channel offered (--tls-data), images come on the
        control connection, bounded by the chunk size HELLO set."""
        conn = DestinationConnection(DestinationSession())
        conn.start(0.0)
        conn.receive_data(wire.encode(make_hello((4,))), 0.0)
        self.assertEqual([type(e) for e in drain(conn)], [fx.Admit])
        conn.session.admitted(MID)
        conn.receive_data(wire.encode(wire.StreamBegin(0)) + wire.data_header(4) + b"abcd", 0.0)
        self.assertEqual([type(e) for e in drain(conn)], [fx.OpenStream, fx.WriteChunk])
        conn.receive_data(wire.data_header(wire.MIN_CHUNK_SIZE + 1), 0.0)
        self.assertEqual(abort_of(drain(conn)).code, ErrorCode.FRAME_TOO_LARGE)

    def test_data_before_hello_refused_by_its_header(self) -> None:
        """No chunk size agreed: a DATA frame is refused from its header."""
        conn = DestinationConnection(DestinationSession())
        conn.start(0.0)
        conn.receive_data(wire.data_header(4), 0.0)
        self.assertEqual(abort_of(drain(conn)).code, ErrorCode.UNEXPECTED_MESSAGE)


class DataChannelOrderTests(SynchronousTestCase):
    """The data channel is not read before the wrapped key is accepted."""

    def setUp(self) -> None:
        self.d = SecureDestination()

    def test_first_record_before_wrapped_key(self) -> None:
        """The first records arrive while WRAPPED_KEY is still on its way:
        they wait unread, and are read the moment it is accepted."""
        channel = self.d.connect()
        self.assertTrue(self.d.conn.data_channel_held)
        first = self.d.record(wire.encode(wire.StreamBegin(0)))
        self.assertEqual(self.d.data(channel, first), [])
        self.assertFalse(channel.bound)
        self.assertEqual(self.d.conn.session.phase, "awaitWrappedKey")
        self.d.accept_key()
        self.assertFalse(self.d.conn.data_channel_held)
        self.assertEqual(
            [type(e) for e in self.d.data(channel, b"")], [DataChannelBound, fx.OpenStream]
        )

    def test_held_bytes_bounded_by_one_record(self) -> None:
        """A data connection that sends more than one largest record while
        the key is pending (a transport that ignores the pause) is dropped,
        unread: nothing is ever buffered without bound."""
        channel = self.d.connect()
        limit = records.max_record(CHUNK)
        self.assertEqual(self.d.data(channel, b"\0" * limit), [])
        [dropped] = self.d.data(channel, b"\0")
        self.assertIsInstance(dropped, DropDataConnection)
        self.assertIn("before the vTPM key was accepted", dropped.reason)
        self.assertFalse(self.d.conn.session.finished)
        self.d.accept_key()
        self.assertEqual(self.d.data(channel, b""), [])

    def test_failure_while_held(self) -> None:
        """The migration fails while a data connection waits: nothing more
        is read from it."""
        channel = self.d.connect()
        self.d.data(channel, self.d.record(wire.encode(wire.StreamBegin(0))))
        self.d.control(wire.Abort(ErrorCode.CANCELLED, "operator"))
        self.assertTrue(self.d.conn.session.finished)
        self.assertEqual(self.d.data(channel, b""), [])
        self.assertEqual(self.d.conn.data_connection_lost(channel), [])


class TimerTests(SynchronousTestCase):
    """Idle timeout, deadline and close grace as handle_timer(now)."""

    def connection(self) -> DestinationConnection:
        conn = DestinationConnection(DestinationSession(), idle_timeout=10.0, deadline=100.0)
        self.assertIsNone(conn.get_timer())
        conn.start(1000.0)
        return conn

    def test_idle_timeout(self) -> None:
        conn = self.connection()
        conn.receive_data(wire.encode(make_hello((8,))), 1000.0)
        drain(conn)
        conn.session.admitted(MID)
        self.assertEqual(conn.get_timer(), 1010.0)
        self.assertEqual(conn.handle_timer(1009.9), [])
        effects = list(conn.handle_timer(1010.0))
        abort = abort_of(effects)
        self.assertEqual(abort.code, ErrorCode.TIMEOUT)
        self.assertEqual(abort.reason, "no progress for 10 s in phase awaitStream")
        self.assertIn(fx.Discard(), effects)

    def test_progress_restarts_idle(self) -> None:
        conn = self.connection()
        conn.progress(1008.0)
        self.assertEqual(conn.get_timer(), 1018.0)
        self.assertEqual(conn.handle_timer(1010.0), [])
        conn.receive_data(b"\x01", 1015.0)  # a partial header is progress too
        self.assertEqual(conn.get_timer(), 1025.0)

    def test_deadline(self) -> None:
        """Progress every 5 s never makes it idle; the deadline still ends it."""
        conn = self.connection()
        now = 1000.0
        while conn.get_timer() != 1100.0:
            now += 5.0
            self.assertEqual(conn.handle_timer(now), [])
            conn.progress(now)
        abort = abort_of(list(conn.handle_timer(1100.0)))
        self.assertEqual(abort.code, ErrorCode.TIMEOUT)
        self.assertEqual(abort.reason, "migration ran past its deadline of 100 s")

    def test_close_grace(self) -> None:
        """After the end: no idle timer or deadline; once the shell half-closed,
        the close grace, then CloseNow."""
        conn = self.connection()
        conn.fail(ProtocolError(ErrorCode.CANCELLED, "stop"))
        self.assertIsNone(conn.get_timer())
        conn.closing(1001.0)
        self.assertEqual(conn.get_timer(), 1001.0 + CLOSE_GRACE)
        self.assertEqual(conn.handle_timer(1001.0 + CLOSE_GRACE - 1), [])
        self.assertEqual(conn.handle_timer(1001.0 + CLOSE_GRACE), [CloseNow()])
        self.assertIsNone(conn.get_timer())

    def test_no_timer_after_the_connection_is_lost(self) -> None:
        """Lost while committing: the session goes on, but no clock runs."""
        conn = self.connection()
        conn.receive_data(wire.encode(make_hello((4,))), 1000.0)
        drain(conn)
        conn.session.admitted(MID)
        conn.receive_data(
            b"".join(
                [
                    wire.encode(wire.StreamBegin(0)),
                    wire.data_header(4) + b"abcd",
                    wire.encode(wire.StreamEnd(b"x" * 32)),
                ]
            ),
            1000.0,
        )
        drain(conn)
        conn.session.prepared()
        conn.receive_data(wire.encode(wire.Commit()), 1000.0)
        self.assertEqual(drain(conn), [fx.CommitInPlace()])
        self.assertEqual(conn.connection_lost(), [])
        self.assertEqual(conn.session.phase, "committing")
        self.assertIsNone(conn.get_timer())
        self.assertEqual(conn.handle_timer(5000.0), [])

    def test_bytes_after_the_end_are_dropped(self) -> None:
        conn = self.connection()
        conn.fail(ProtocolError(ErrorCode.CANCELLED, "stop"))
        conn.receive_data(b"garbage", 1001.0)
        self.assertIsNone(conn.next_batch())


class SourceDataChannelTests(SynchronousTestCase):
    """The destination's reason wins over the end of the data channel."""

    def streaming(self) -> SourceConnection:
        session = SourceSession(make_hello((CHUNK,)))
        conn = SourceConnection(session, idle_timeout=60.0, deadline=3600.0, data_channel_grace=5.0)
        conn.start(0.0)
        session.start()
        conn.receive_data(wire.encode(wire.Welcome(MID)), 0.0)
        self.assertEqual(drain(conn), [fx.StartStreams()])
        return conn

    def test_abort_after_the_data_channel_closed(self) -> None:
        """The data channel is cut, then the destination's ABORT arrives on
        the control connection: the outcome carries its code and reason."""
        conn = self.streaming()
        conn.data_channel_lost("Connection was reset", 1.0)
        self.assertEqual(conn.get_timer(), 6.0)
        self.assertEqual(conn.handle_timer(5.9), [])
        self.assertFalse(conn.session.finished)
        conn.receive_data(wire.encode(wire.Abort(ErrorCode.DISK_FULL, "staging: no space")), 2.0)
        effects = drain(conn)
        self.assertEqual(
            effects,
            [
                fx.RollBack(),
                fx.Finished(
                    fx.Outcome.ABORTED,
                    ErrorCode.DISK_FULL,
                    "destination: staging: no space",
                    peer_settled=True,
                ),
            ],
        )
        self.assertIsNone(conn.get_timer())

    def test_no_abort_within_the_grace(self) -> None:
        """No ABORT follows: CONNECTION_LOST, naming the data channel."""
        conn = self.streaming()
        conn.data_channel_lost("Connection was reset", 1.0)
        effects = list(conn.handle_timer(6.0))
        abort = abort_of(effects)
        self.assertEqual(abort.code, ErrorCode.CONNECTION_LOST)
        self.assertIn("the data channel closed: Connection was reset", abort.reason)
        self.assertEqual(effects[-1].code, ErrorCode.CONNECTION_LOST)

    def test_lost_after_the_end_changes_nothing(self) -> None:
        conn = self.streaming()
        conn.fail(ProtocolError(ErrorCode.CANCELLED, "stop"))
        conn.data_channel_lost("closed", 1.0)
        self.assertIsNone(conn.get_timer())

    def test_source_refuses_data_frames(self) -> None:
        """The source never agreed to receive DATA: refused from its header."""
        conn = self.streaming()
        conn.receive_data(wire.data_header(4), 0.0)
        self.assertEqual(abort_of(drain(conn)).code, ErrorCode.UNEXPECTED_MESSAGE)


class StrangerTests(SynchronousTestCase):
    """Connections to the data port that never prove themselves: a short
    clock from when they can be read, a first record of STREAM_BEGIN's
    size, a cap, and all let go when the channel binds or the session ends."""

    def setUp(self) -> None:
        self.d = SecureDestination()

    def connect(self, now: float) -> DataConnection:
        connection = self.d.conn.data_connection(CIPHER, self.d.key, MID, now)
        assert connection is not None
        return connection

    def test_no_clock_while_held(self) -> None:
        """Before the key is accepted nothing can be read, so no stranger's
        clock runs; it starts when the key is accepted."""
        stranger = self.connect(1.0)
        self.assertEqual(self.d.conn.get_timer(), 10.0)  # the idle timer only
        self.d.control(WRAPPED, now=3.0)
        self.assertEqual(self.d.conn.get_timer(), 3.0 + FIRST_RECORD_TIMEOUT)
        self.assertEqual(self.d.conn.handle_timer(3.0 + FIRST_RECORD_TIMEOUT), [])
        [(dropped, reason)] = self.d.conn.take_drops()
        self.assertIs(dropped, stranger)
        self.assertIn("no authenticated record", reason)
        self.assertFalse(self.d.conn.session.finished)

    def test_idle_and_partial_first_record(self) -> None:
        """An idle stranger and one with half a record: both dropped at their deadline."""
        self.d.control(WRAPPED, now=0.0)
        idle, partial = self.connect(1.0), self.connect(2.0)
        half = self.d.record(wire.encode(wire.StreamBegin(0)))[:10]
        self.assertEqual(self.d.data(partial, half, now=2.5), [])
        self.d.conn.handle_timer(1.0 + FIRST_RECORD_TIMEOUT)
        self.assertEqual(self.d.conn.take_drops()[0][0], idle)
        self.assertEqual(self.d.conn.get_timer(), 2.0 + FIRST_RECORD_TIMEOUT)
        self.d.conn.handle_timer(2.0 + FIRST_RECORD_TIMEOUT)
        self.assertEqual([c for c, _ in self.d.conn.take_drops()], [partial])
        self.assertEqual(self.d.conn.strangers, [])

    def test_stranger_bytes_are_no_progress(self) -> None:
        """A stranger's bytes do not keep the migration from its idle timeout."""
        self.d.control(WRAPPED, now=0.0)
        stranger = self.connect(0.0)
        self.d.data(stranger, b"\x00", now=9.0)
        self.assertEqual(self.d.conn.get_timer(), FIRST_RECORD_TIMEOUT)
        self.d.conn.handle_timer(FIRST_RECORD_TIMEOUT)
        abort_of(list(self.d.conn.handle_timer(10.0)))
        self.assertEqual(self.d.conn.error.code, ErrorCode.TIMEOUT)  # type: ignore[union-attr]

    def test_first_record_capped_before_buffering(self) -> None:
        """A first record announcing more than one STREAM_BEGIN is refused
        from its header: the stranger is dropped, nothing is buffered."""
        self.d.accept_key()
        stranger = self.connect(0.0)
        header = records.RECORD_HEADER.pack(records.Kind.FRAMES, 1 << 20)
        [dropped] = self.d.data(stranger, header)
        self.assertIsInstance(dropped, DropDataConnection)
        self.assertIn(f"at most {FIRST_RECORD_PLAINTEXT + records.TAG}", dropped.reason)
        self.assertFalse(self.d.conn.session.finished)

    def test_cap_drops_the_oldest(self) -> None:
        first = self.connect(0.0)
        for _ in range(MAX_PENDING_DATA_CONNECTIONS):
            self.connect(0.0)
        [(dropped, reason)] = self.d.conn.take_drops()
        self.assertIs(dropped, first)
        self.assertIn("waiting for a first record", reason)
        self.assertEqual(len(self.d.conn.strangers), MAX_PENDING_DATA_CONNECTIONS)

    def test_all_let_go_at_bind_and_at_the_end(self) -> None:
        self.d.accept_key()
        strangers = [self.connect(0.0) for _ in range(3)]
        channel = self.connect(0.0)
        self.d.data(channel, self.d.record(wire.encode(wire.StreamBegin(0))))
        self.assertEqual([c for c, _ in self.d.conn.take_drops()], strangers)
        self.assertIsNone(self.d.conn.data_connection(CIPHER, self.d.key, MID, 0.0))

    def test_all_let_go_when_the_session_ends(self) -> None:
        strangers = [self.connect(0.0) for _ in range(3)]
        self.d.conn.fail(ProtocolError(ErrorCode.INTERNAL, "test"))
        drops = self.d.conn.take_drops()
        self.assertEqual([c for c, _ in drops], strangers)
        self.assertEqual({r for _, r in drops}, {"the migration ended"})


class EndRecordTests(SynchronousTestCase):
    """The destination prepares only after the channel's authenticated END."""

    def setUp(self) -> None:
        self.d = SecureDestination()
        self.d.accept_key()
        self.channel = self.d.connect()
        stream = b"".join(self.d.record(f) for f in stream_frames(b"d" * CHUNK))
        self.assertEqual(
            [type(e) for e in self.d.data(self.channel, stream)],
            [DataChannelBound, fx.OpenStream, fx.WriteChunk, fx.CloseStream],
        )

    def test_prepare_after_end(self) -> None:
        self.assertEqual(self.d.data(self.channel, b"".join(self.d.sealer.end())), [fx.Prepare()])

    def test_withheld_end_fails_when_the_channel_closes(self) -> None:
        abort = abort_of(self.d.conn.data_connection_lost(self.channel))
        self.assertEqual(abort.code, ErrorCode.RECORD_REFUSED)
        self.assertIn("without its END record", abort.reason)

    def test_withheld_end_on_an_open_channel_times_out(self) -> None:
        abort = abort_of(list(self.d.conn.handle_timer(10.0)))
        self.assertEqual(abort.code, ErrorCode.TIMEOUT)

    def test_altered_end_fails(self) -> None:
        end = bytearray(b"".join(self.d.sealer.end()))
        end[-1] ^= 1
        effects = self.d.data(self.channel, bytes(end))
        self.assertNotIn(fx.Prepare(), effects)
        self.assertEqual(abort_of(effects).code, ErrorCode.RECORD_REFUSED)


class PeerCheckTests(SynchronousTestCase):
    """Secure: no control byte is decoded before the peer's certificate passed."""

    def test_bytes_before_the_check_are_never_decoded(self) -> None:
        conn = DestinationConnection(DestinationSession(secure=True), check_peer=True)
        conn.start(0.0)
        conn.receive_data(wire.encode(make_hello((CHUNK,), chunk_size=CHUNK)), 0.0)
        self.assertEqual(conn.decoder.buffered, 0)
        abort = abort_of(drain(conn))
        self.assertEqual(abort.code, ErrorCode.POLICY_REFUSED)
        self.assertIsNone(conn.session.hello)

    def test_allowed_peer_is_decoded(self) -> None:
        conn = DestinationConnection(DestinationSession(secure=True), check_peer=True)
        conn.start(0.0)
        conn.peer_allowed()
        conn.receive_data(wire.encode(make_hello((CHUNK,), chunk_size=CHUNK)), 0.0)
        self.assertEqual([type(e) for e in drain(conn)], [fx.Admit])


class BackendAdmissionTests(SynchronousTestCase):
    """HELLO says what the VM is; a destination whose backend cannot run it
    refuses at admission (BACKEND_MISMATCH, a reason naming both backends),
    before WELCOME and so before attestation or any byte of the VM.  Two
    connection objects joined by their bytes; the shell's admission is stood
    in by the registry's rule (:func:`securemig.hypervisor.backends.refusal`)."""

    def exchange(self, hello: wire.Hello, backend: str) -> tuple[list[Any], list[Any]]:
        """The source's effects and the destination's, once HELLO was answered
        by a destination whose backend is ``backend``."""
        source = SourceConnection(
            SourceSession(hello, secure=True),
            idle_timeout=60.0,
            deadline=3600.0,
            data_channel_grace=5.0,
        )
        source.start(0.0)
        destination = DestinationConnection(DestinationSession(secure=True), 10.0, 100.0)
        destination.start(0.0)
        for effect in source.session.start():
            assert isinstance(effect, fx.Send), effect
            destination.receive_data(wire.encode(effect.message), 0.0)
        [admit] = drain(destination)
        assert isinstance(admit, fx.Admit), admit
        said = admit.hello
        why = backends.refusal(
            backend, said.backend, live=said.mode is wire.Mode.LIVE, guest=said.guest,
            vtpm=bool(said.vtpm),
        )  # fmt: skip
        answer = (
            destination.session.admitted(MID)
            if why is None
            else destination.session.refused(ErrorCode.BACKEND_MISMATCH, why)
        )
        for effect in answer:
            if isinstance(effect, fx.Send):
                source.receive_data(wire.encode(effect.message), 0.0)
        return drain(source), answer

    def live_qemu_hello(self, **kw: Any) -> wire.Hello:
        return make_hello(
            (), variant=wire.Variant.SHARED_STORAGE, mode=wire.Mode.LIVE, memory_mib=128,
            guest="linux", backend="qemu", vtpm=1, **kw,
        )  # fmt: skip

    def assertRefusedBefore(self, src: list[Any], dst: list[Any], *names: str) -> None:
        sent = [e.message for e in dst if isinstance(e, fx.Send)]
        self.assertEqual([type(m) for m in sent], [wire.Abort])
        self.assertEqual(sent[0].code, ErrorCode.BACKEND_MISMATCH)
        for name in names:
            self.assertIn(name, sent[0].reason)
        end = [e for e in src if isinstance(e, fx.Finished)]
        self.assertEqual(len(end), 1, src)
        self.assertEqual((end[0].outcome, end[0].code), (fx.Outcome.ABORTED, sent[0].code))
        # The source rolls back (its VM goes on) and never starts a stream.
        self.assertIn(fx.RollBack(), src)
        self.assertFalse([e for e in src if isinstance(e, fx.StartStreams | fx.StartLive)])

    def test_live_qemu_vm_refused_by_an_image_destination(self) -> None:
        src, dst = self.exchange(self.live_qemu_hello(), "image")
        self.assertRefusedBefore(src, dst, "backend is qemu", "destination's is image")

    def test_image_vm_refused_by_a_qemu_destination(self) -> None:
        src, dst = self.exchange(make_hello((CHUNK,), backend="image"), "qemu")
        self.assertRefusedBefore(src, dst, "backend is image", "destination's is qemu")

    def test_matching_backend_admitted(self) -> None:
        src, dst = self.exchange(self.live_qemu_hello(), "qemu")
        self.assertEqual([type(e.message) for e in dst if isinstance(e, fx.Send)], [wire.Welcome])
        self.assertFalse([e for e in src if isinstance(e, fx.Finished)])

    def test_version_one_source_is_not_judged(self) -> None:
        """A version-1 HELLO (an older source: no tail, so no backend) is
        admitted as before; its VM takes the destination's backend."""
        old = make_hello((CHUNK,), version=1, memory_mib=64)
        self.assertFalse(wire.has_tail(old))
        _, dst = self.exchange(old, "qemu")
        self.assertEqual([type(e.message) for e in dst if isinstance(e, fx.Send)], [wire.Welcome])

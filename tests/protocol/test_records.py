"""The data channel's record layer (:mod:`securemig.protocol.records`), without a
reactor; then its Twisted receiver over an in-memory transport.

Every way a record can be tampered with in transit — flipped, dropped,
reordered, repeated, replayed from another session or migration, cut short —
must be refused."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from securemig.protocol import records, wire
from securemig.protocol.errors import ErrorCode, ProtocolError
from securemig.protocol.records import AEADS, Kind, Opener, Sealer
from securemig.transport.destination import DataChannelReceiver

CIPHER = "TLS_AES_256_GCM_SHA384"
CHUNK = 4096
MID = bytes(range(16))


def pair(cipher: str = CIPHER, mid: bytes = MID, key: bytes | None = None) -> tuple[Sealer, Opener]:
    key = key if key is not None else os.urandom(records.key_length(cipher))
    return Sealer(cipher, key, mid), Opener(cipher, key, mid, records.max_plaintext(CHUNK))


def frames() -> list[bytes]:
    """A stream as the source sends it: STREAM_BEGIN, DATA, DATA, STREAM_END."""
    data = os.urandom(2 * CHUNK)
    return [
        wire.encode(wire.StreamBegin(0)),
        wire.data_header(CHUNK) + data[:CHUNK],
        wire.data_header(CHUNK) + data[CHUNK:],
        wire.encode(wire.StreamEnd(wire.UNHASHED)),
    ]


def sealed(sealer: Sealer, plain: list[bytes]) -> list[bytes]:
    """One record per frame, then END; each record as one bytes object."""
    out = [b"".join(sealer.seal([f])) for f in plain]
    return [*out, b"".join(sealer.end())]


def open_all(opener: Opener, data: bytes) -> list[bytes]:
    opener.feed(data)
    out = []
    while (plain := opener.next_record()) is not None:
        out.append(bytes(plain))
    return out


class RecordTests(TestCase):
    def assertRefused(self, opener: Opener, data: bytes, code: ErrorCode) -> None:
        with self.assertRaises(ProtocolError) as caught:
            open_all(opener, data)
        self.assertEqual(caught.exception.code, code)

    def test_round_trip_every_cipher(self) -> None:
        """What is sealed opens, in order, then the END record ends it."""
        for cipher in AEADS:
            sealer, opener = pair(cipher)
            plain = frames()
            self.assertEqual(open_all(opener, b"".join(sealed(sealer, plain))), plain)
            self.assertTrue(opener.ended)
            opener.closed()  # ended properly: no error

    def test_one_byte_at_a_time(self) -> None:
        sealer, opener = pair()
        plain = frames()
        got = []
        for byte in b"".join(sealed(sealer, plain)):
            got += open_all(opener, bytes([byte]))
        self.assertEqual(got, plain)

    def test_flipped_bit_refused(self) -> None:
        """A flipped bit in a record's ciphertext or tag."""
        for position in (records.RECORD_HEADER.size, -1):
            sealer, opener = pair()
            stream = sealed(sealer, frames())
            record = bytearray(stream[1])
            record[position] ^= 1
            self.assertRefused(
                opener, stream[0] + bytes(record) + stream[2], ErrorCode.RECORD_REFUSED
            )

    def test_kind_changed_refused(self) -> None:
        """A FRAMES record relabelled END (to cut the stream short)."""
        sealer, opener = pair()
        stream = sealed(sealer, frames())
        forged = bytes([Kind.END]) + stream[1][1:]
        self.assertRefused(opener, stream[0] + forged, ErrorCode.RECORD_REFUSED)

    def test_dropped_record_refused(self) -> None:
        sealer, opener = pair()
        stream = sealed(sealer, frames())
        self.assertRefused(opener, stream[0] + stream[2], ErrorCode.RECORD_REFUSED)

    def test_reordered_records_refused(self) -> None:
        sealer, opener = pair()
        stream = sealed(sealer, frames())
        self.assertRefused(opener, stream[0] + stream[2] + stream[1], ErrorCode.RECORD_REFUSED)

    def test_repeated_record_refused(self) -> None:
        sealer, opener = pair()
        stream = sealed(sealer, frames())
        self.assertRefused(opener, stream[0] + stream[1] + stream[1], ErrorCode.RECORD_REFUSED)

    def test_replay_from_another_session_refused(self) -> None:
        """Records of another TLS session (another exported key), even for
        the same migration id, do not open here."""
        other_sealer, _ = pair()
        _, opener = pair()
        self.assertRefused(opener, sealed(other_sealer, frames())[0], ErrorCode.RECORD_REFUSED)

    def test_replay_from_another_migration_refused(self) -> None:
        """The same key with another migration id (bound in the AD)."""
        key = os.urandom(32)
        sealer, _ = pair(key=key, mid=bytes(16))
        _, opener = pair(key=key)
        self.assertRefused(opener, sealed(sealer, frames())[0], ErrorCode.RECORD_REFUSED)

    def test_truncated_channel_refused(self) -> None:
        """Closed after whole records but before END, or inside a record."""
        for cut in (2, 3):
            sealer, opener = pair()
            stream = sealed(sealer, frames())
            open_all(opener, b"".join(stream[:cut]))
            with self.assertRaises(ProtocolError) as caught:
                opener.closed()
            self.assertEqual(caught.exception.code, ErrorCode.RECORD_REFUSED)
        sealer, opener = pair()
        stream = sealed(sealer, frames())
        open_all(opener, stream[0] + stream[1][:100])
        self.assertRaises(ProtocolError, opener.closed)

    def test_data_after_end_refused(self) -> None:
        sealer, opener = pair()
        stream = sealed(sealer, frames())
        self.assertRefused(opener, b"".join(stream) + b"x", ErrorCode.RECORD_REFUSED)

    def test_data_after_end_in_a_later_read_refused(self) -> None:
        """Bytes arriving after the END record was read: feed() takes them
        (it never raises, so a caller may hold bytes unread) and the next
        read refuses them."""
        sealer, opener = pair()
        open_all(opener, b"".join(sealed(sealer, frames())))
        self.assertTrue(opener.ended)
        opener.feed(b"x")
        self.assertEqual(opener.buffered, 1)
        with self.assertRaises(ProtocolError) as caught:
            opener.next_record()
        self.assertEqual(caught.exception.code, ErrorCode.RECORD_REFUSED)

    def test_oversize_record_refused_from_its_header(self) -> None:
        """Refused on the header alone: nothing of it is buffered first."""
        _, opener = pair()
        header = records.RECORD_HEADER.pack(Kind.FRAMES, records.max_plaintext(CHUNK) + 17)
        self.assertRefused(opener, header, ErrorCode.FRAME_TOO_LARGE)

    def test_unknown_kind_refused(self) -> None:
        _, opener = pair()
        self.assertRefused(opener, records.RECORD_HEADER.pack(7, 32), ErrorCode.RECORD_REFUSED)

    def test_unknown_tls_cipher(self) -> None:
        with self.assertRaises(ProtocolError) as caught:
            records.key_length("TLS_AES_128_CCM_SHA256")
        self.assertEqual(caught.exception.code, ErrorCode.BAD_PARAMETER)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300))
    def test_random_bytes_only_raise_protocol_error(self, data: bytes) -> None:
        _, opener = pair()
        try:
            open_all(opener, data)
            opener.closed()
        except ProtocolError:
            pass
        else:
            self.fail("random bytes made a complete channel")


class FakeControl:
    """Test double of the destination's control protocol: what the data
    channel receiver needs from it, recording what it is told."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.messages: list[Any] = []
        self.failures: list[ProtocolError] = []
        self.bound: Any = None
        self.session = self

    # the session's part
    finished = False
    hello = wire.Hello(
        wire.PROTOCOL_VERSION, wire.Variant.FULL, "vm1", CHUNK, (wire.ImageInfo("ram", CHUNK),), ""
    )

    def data_opener(self) -> Opener:
        return Opener(CIPHER, self.key, MID, records.max_plaintext(CHUNK))

    def bind_data_channel(self, channel: Any) -> bool:
        if self.bound is not None:
            return False
        self.bound = channel
        return True

    def stream_message(self, message: Any) -> None:
        self.messages.append(message)

    def fail(self, error: ProtocolError) -> None:
        self.failures.append(error)
        self.finished = True


class ReceiverTests(TestCase):
    """The Twisted receiver of the data channel, over an in-memory transport."""

    def setUp(self) -> None:
        self.key = os.urandom(32)
        self.control = FakeControl(self.key)

    def connect(self) -> tuple[DataChannelReceiver, StringTransport]:
        receiver = DataChannelReceiver(self.control)  # type: ignore[arg-type]
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        receiver.makeConnection(transport)
        return receiver, transport

    def test_stranger_is_dropped_and_the_migration_goes_on(self) -> None:
        """Anyone can connect to the port: a connection whose first record
        does not authenticate is closed, and fails nothing."""
        stranger, transport = self.connect()
        stranger.dataReceived(sealed(Sealer(CIPHER, os.urandom(32), MID), frames())[0])
        self.assertTrue(transport.disconnecting or transport.disconnected)
        self.assertEqual((self.control.failures, self.control.bound), ([], None))
        receiver, _ = self.connect()
        stream = sealed(Sealer(CIPHER, self.key, MID), frames())
        receiver.dataReceived(b"".join(stream))
        self.assertIs(self.control.bound, receiver)
        self.assertEqual(
            [type(m) for m in self.control.messages],
            [wire.StreamBegin, wire.Data, wire.Data, wire.StreamEnd],
        )
        self.assertEqual(self.control.failures, [])

    def test_tampered_record_on_bound_channel_fails_migration(self) -> None:
        receiver, _ = self.connect()
        stream = sealed(Sealer(CIPHER, self.key, MID), frames())
        record = bytearray(stream[1])
        record[-3] ^= 0x80
        receiver.dataReceived(stream[0] + bytes(record))
        self.assertEqual([e.code for e in self.control.failures], [ErrorCode.RECORD_REFUSED])
        self.assertEqual(len(self.control.messages), 1)  # STREAM_BEGIN only

    def test_truncated_channel_fails_migration(self) -> None:
        receiver, _ = self.connect()
        stream = sealed(Sealer(CIPHER, self.key, MID), frames())
        receiver.dataReceived(b"".join(stream[:3]))
        receiver.connectionLost()
        self.assertEqual([e.code for e in self.control.failures], [ErrorCode.RECORD_REFUSED])
        self.assertIn("truncated", self.control.failures[0].reason)

    def test_connection_after_the_migration_ended_closed(self) -> None:
        self.control.finished = True
        receiver, transport = self.connect()
        receiver.dataReceived(b"".join(sealed(Sealer(CIPHER, self.key, MID), frames())))
        self.assertTrue(transport.disconnecting)
        self.assertEqual((self.control.messages, self.control.bound), ([], None))

    def test_second_channel_refused(self) -> None:
        first, _ = self.connect()
        sealer = Sealer(CIPHER, self.key, MID)
        first.dataReceived(b"".join(sealer.seal([frames()[0]])))
        second, transport = self.connect()
        # A valid record (a second sealer starts at sequence 0 too) cannot
        # open a second channel.
        second.dataReceived(b"".join(Sealer(CIPHER, self.key, MID).seal([frames()[0]])))
        self.assertTrue(transport.disconnecting or transport.disconnected)
        self.assertIs(self.control.bound, first)


class ControlConnectionTests(TestCase):
    def test_images_on_control_connection_refused(self) -> None:
        """Once a data channel is offered, stream frames on the control
        connection are refused (they would bypass the records); other
        messages are not."""
        from twisted.internet.task import Clock

        from securemig.transport.destination import DestinationProtocol
        from securemig.transport.executor import InlineExecutor

        control = DestinationProtocol(None, Clock(), InlineExecutor)
        for message in (wire.StreamBegin(0), wire.StreamEnd(wire.UNHASHED)):
            control.check_control(message)  # no data channel: allowed
        control.data_offered = True
        for message in (wire.StreamBegin(0), wire.StreamEnd(wire.UNHASHED)):
            with self.assertRaises(ProtocolError) as caught:
                control.check_control(message)
            self.assertEqual(caught.exception.code, ErrorCode.UNEXPECTED_MESSAGE)
        control.check_control(wire.Commit())

    def test_control_messages_on_data_channel_refused(self) -> None:
        """Only stream frames may come in records: a COMMIT (or HELLO) sealed
        into the data channel is refused before the session sees it."""
        from twisted.internet.task import Clock

        from securemig.transport.destination import DestinationProtocol
        from securemig.transport.executor import InlineExecutor

        control = DestinationProtocol(None, Clock(), InlineExecutor)
        for message in (wire.Commit(), FakeControl.hello):
            with self.assertRaises(ProtocolError) as caught:
                control.stream_message(message)
            self.assertEqual(caught.exception.code, ErrorCode.UNEXPECTED_MESSAGE)
            self.assertEqual(control.session.phase, "awaitHello")

    def test_destination_sending_on_data_channel_fails_source(self) -> None:
        """The data channel is one-way: bytes from the destination end the
        source's migration."""
        from securemig.transport.source import DataChannelSender

        control = FakeControl(b"")
        sender = DataChannelSender(control)  # type: ignore[arg-type]
        sender.makeConnection(StringTransport())
        sender.dataReceived(b"x")
        self.assertEqual([e.code for e in control.failures], [ErrorCode.UNEXPECTED_MESSAGE])

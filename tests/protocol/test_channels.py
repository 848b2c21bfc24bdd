"""Which messages each channel may carry, when the data channel may be read,
and the data channel's reader (:mod:`securemig.protocol.channels`), without
a reactor: each check fed exactly the input it refuses."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from securemig.protocol import channels, records, wire
from securemig.protocol.channels import DataChannelReader
from securemig.protocol.destination import DestinationSession, State
from securemig.protocol.errors import ErrorCode, PeerViolation
from securemig.protocol.records import Opener, Sealer
from tests.support.messages import EVIDENCE, OFFER, WRAPPED, make_hello

CIPHER = "TLS_AES_128_GCM_SHA256"
CHUNK = wire.MIN_CHUNK_SIZE
MID = b"M" * 16
STREAM = [
    wire.encode(wire.StreamBegin(0)),
    wire.data_header(CHUNK) + b"d" * CHUNK,
    wire.encode(wire.StreamEnd(wire.UNHASHED)),
]


def reader_and_sealer() -> tuple[DataChannelReader, Sealer]:
    key = os.urandom(16)
    opener = Opener(CIPHER, key, MID, records.max_plaintext(CHUNK))
    return DataChannelReader(opener, CHUNK), Sealer(CIPHER, key, MID)


def messages(reader: DataChannelReader, data: bytes) -> list[wire.Message]:
    reader.feed(data)
    out = []
    while (message := reader.next_message()) is not None:
        out.append(message)
    return out


class ChannelRuleTests(SynchronousTestCase):
    def test_stream_frames_on_control_refused_with_a_data_channel(self) -> None:
        """Offered a data channel, the control connection carries no image
        frame (it would bypass the records); without one it does."""
        for message in (wire.StreamBegin(0), wire.Data.of(b"x"), wire.StreamEnd(wire.UNHASHED)):
            channels.check_control(message, data_channel_offered=False)
            with self.assertRaises(PeerViolation) as caught:
                channels.check_control(message, data_channel_offered=True)
            self.assertEqual(caught.exception.code, ErrorCode.UNEXPECTED_MESSAGE)
            self.assertIn("on the control connection", caught.exception.reason)
        channels.check_control(wire.Commit(), data_channel_offered=True)

    def test_only_stream_frames_on_the_data_channel(self) -> None:
        """A COMMIT or a HELLO on the data channel is refused; stream frames pass."""
        for message in (wire.StreamBegin(0), wire.Data.of(b"x"), wire.StreamEnd(wire.UNHASHED)):
            channels.check_data_channel(message)
        for message in (wire.Commit(), make_hello()):
            with self.assertRaises(PeerViolation) as caught:
                channels.check_data_channel(message)
            self.assertEqual(caught.exception.code, ErrorCode.UNEXPECTED_MESSAGE)

    def test_key_pending_until_wrapped_key_accepted(self) -> None:
        """A secure destination holds the data channel in every phase from
        admission until WRAPPED_KEY is accepted, and not after."""
        d = DestinationSession(secure=True)
        seen = []
        steps = [
            lambda: d.receive(make_hello((4,))),
            lambda: d.admitted(MID),
            lambda: d.receive(wire.Challenge(b"c" * 32)),
            lambda: d.attested(EVIDENCE),
            lambda: d.receive(EVIDENCE),
            lambda: d.peer_verified(),
            lambda: d.key_offered(OFFER),
        ]
        for step in steps:
            step()
            seen.append(d.phase)
            self.assertTrue(d.phase.key_pending, d.phase)
        self.assertEqual(set(seen), {state for state in State if state.key_pending})
        d.receive(WRAPPED)
        self.assertEqual(d.phase, "awaitStream")
        self.assertFalse(d.phase.key_pending)
        d.receive(wire.StreamBegin(0))
        self.assertFalse(d.phase.key_pending)


class DataChannelReaderTests(SynchronousTestCase):
    """Bytes in, stream messages out; everything else raises with its code."""

    def assertRefused(self, reader: DataChannelReader, data: bytes, code: ErrorCode) -> None:
        with self.assertRaises(PeerViolation) as caught:
            messages(reader, data)
        self.assertEqual(caught.exception.code, code)

    def test_records_to_messages(self) -> None:
        """One frame per record (as the source sends), then END."""
        reader, sealer = reader_and_sealer()
        data = b"".join(b"".join(sealer.seal([f])) for f in STREAM) + b"".join(sealer.end())
        self.assertFalse(reader.authenticated)
        got = messages(reader, data)
        self.assertEqual(
            got, [wire.StreamBegin(0), wire.Data.of(b"d" * CHUNK), wire.StreamEnd(wire.UNHASHED)]
        )
        self.assertTrue(reader.authenticated and reader.ended)
        reader.closed()

    def test_one_byte_at_a_time(self) -> None:
        reader, sealer = reader_and_sealer()
        data = b"".join(b"".join(sealer.seal([f])) for f in STREAM) + b"".join(sealer.end())
        got = []
        for byte in data:
            got += messages(reader, bytes([byte]))
        self.assertEqual(len(got), 3)
        self.assertEqual(reader.buffered, 0)

    def test_control_message_in_a_record(self) -> None:
        """A COMMIT sealed into a genuine record is still refused."""
        reader, sealer = reader_and_sealer()
        record = b"".join(sealer.seal([wire.encode(wire.Commit())]))
        self.assertRefused(reader, record, ErrorCode.UNEXPECTED_MESSAGE)
        self.assertTrue(reader.authenticated)

    def test_oversize_frame_in_a_record(self) -> None:
        """A DATA frame over the chunk size inside a record that is itself
        within the record bound: the frame's own bound refuses it."""
        reader, sealer = reader_and_sealer()
        frame = wire.data_header(CHUNK + 1) + b"x" * (CHUNK + 1)
        self.assertLessEqual(len(frame), records.max_plaintext(CHUNK))
        record = b"".join(sealer.seal([wire.encode(wire.StreamBegin(0)), frame]))
        self.assertRefused(reader, record, ErrorCode.FRAME_TOO_LARGE)

    def test_record_after_end(self) -> None:
        """A genuine record sealed after END (the next sequence number) is refused."""
        reader, sealer = reader_and_sealer()
        messages(reader, b"".join(sealer.seal([STREAM[0]])) + b"".join(sealer.end()))
        self.assertTrue(reader.ended)
        self.assertRefused(reader, b"".join(sealer.seal([STREAM[2]])), ErrorCode.RECORD_REFUSED)

    def test_cut_before_end(self) -> None:
        reader, sealer = reader_and_sealer()
        messages(reader, b"".join(sealer.seal([STREAM[0]])))
        with self.assertRaises(PeerViolation) as caught:
            reader.closed()
        self.assertEqual(caught.exception.code, ErrorCode.RECORD_REFUSED)

    def test_feed_never_parses(self) -> None:
        """Bytes may be held unread: feed() takes garbage without a word;
        only reading refuses it."""
        reader, _ = reader_and_sealer()
        reader.feed(b"\xff" * 100)
        self.assertEqual(reader.buffered, 100)
        self.assertRefused(reader, b"", ErrorCode.RECORD_REFUSED)

    def test_hold_limit_is_one_largest_record(self) -> None:
        reader, _ = reader_and_sealer()
        self.assertEqual(
            reader.hold_limit,
            records.RECORD_HEADER.size + records.max_plaintext(CHUNK) + records.TAG,
        )

"""The data channel's record layer (:mod:`securemig.protocol.records`), without a
reactor.  What the records may carry, and which connection is the channel:
``test_channels`` and ``test_connection``; the Twisted ends:
``tests/transport/test_data_channel.py``.

Every way a record can be tampered with in transit — flipped, dropped,
reordered, repeated, replayed from another session or migration, cut short —
must be refused."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from securemig.protocol import records, wire
from securemig.protocol.errors import ErrorCode, ProtocolError
from securemig.protocol.records import AEADS, Kind, Opener, Sealer

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

    def test_seal_into_is_seal(self) -> None:
        """Sealing into a reused buffer gives the very bytes of :meth:`Sealer.seal`
        (the records on the wire do not change), for every cipher and kind, and
        writes nothing past the record."""
        for cipher in AEADS:
            key = os.urandom(records.key_length(cipher))
            a, b = Sealer(cipher, key, MID), Sealer(cipher, key, MID)
            out = bytearray(b"\xee" * records.max_record(CHUNK))
            for plain, kind in [*((f, Kind.FRAMES) for f in frames()), (b"", Kind.END)]:
                n = b.seal_into(memoryview(plain), memoryview(out), kind)
                self.assertEqual(bytes(out[:n]), b"".join(a.seal([plain], kind)))
                self.assertEqual(n, records.RECORD_HEADER.size + len(plain) + records.TAG)
                self.assertEqual(out[n:], b"\xee" * (len(out) - n))
                out[:] = b"\xee" * len(out)
            self.assertEqual(a.sequence, b.sequence)

    def test_seal_into_a_short_buffer_refused(self) -> None:
        """A buffer without room for the tag is refused, not overrun."""
        sealer = pair()[0]
        plain = frames()[1]
        out = bytearray(records.RECORD_HEADER.size + len(plain) + records.TAG - 1)
        with self.assertRaises(ValueError):
            sealer.seal_into(memoryview(plain), memoryview(out))

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

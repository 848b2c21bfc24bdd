"""Tests for securemig.protocol.wire: framing, codecs, bounds, hostile bytes."""

from __future__ import annotations

import struct
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from securemig.protocol import wire
from securemig.protocol.errors import ErrorCode, ProtocolError
from securemig.protocol.wire import FrameDecoder

names = st.from_regex(wire.IMAGE_NAME_RE, fullmatch=True)
vm_names = st.from_regex(wire.VM_NAME_RE, fullmatch=True)
images = st.lists(
    st.builds(wire.ImageInfo, names, st.integers(0, wire.MAX_IMAGE_SIZE)),
    max_size=wire.MAX_IMAGES,
).map(tuple)
hellos = st.builds(
    wire.Hello,
    st.integers(0, 0xFFFF),
    st.sampled_from(wire.Variant),
    vm_names,
    st.integers(0, wire.MAX_CHUNK_SIZE),
    images,
    st.text(max_size=200),
)
control_messages = st.one_of(
    hellos,
    st.builds(wire.Welcome, st.binary(min_size=16, max_size=16)),
    st.builds(wire.StreamBegin, st.integers(0, wire.MAX_IMAGES - 1)),
    st.builds(wire.StreamEnd, st.binary(min_size=32, max_size=32)),
    st.just(wire.Prepared()),
    st.just(wire.Commit()),
    st.just(wire.Done()),
    st.builds(wire.Abort, st.sampled_from(ErrorCode), st.text(max_size=300)),
)


def decode_all(data: bytes, max_data: int | None = None) -> list[wire.Message]:
    """Every message in ``data``; the decoder must end with nothing left over."""
    decoder = FrameDecoder(max_data)
    decoder.feed(data)
    out = []
    while (message := decoder.next_message()) is not None:
        out.append(message)
    return out


def frame(code: int, payload: bytes) -> bytes:
    return wire.HEADER.pack(code, len(payload)) + payload


def hello(**kw: object) -> wire.Hello:
    args: dict[str, object] = dict(
        version=1,
        variant=wire.Variant.FULL,
        vm_name="vm1",
        chunk_size=1 << 20,
        images=(wire.ImageInfo("ram", 10),),
        shared_disk="",
    )
    args.update(kw)
    return wire.Hello(**args)  # type: ignore[arg-type]


class RoundTripTests(SynchronousTestCase):
    """Every declared message decodes to what was encoded."""

    @given(control_messages)
    def test_round_trip(self, message: wire.Message) -> None:
        """Encoding then decoding any control message gives it back."""
        self.assertEqual(decode_all(wire.encode(message)), [message])

    def test_every_type_is_in_the_table_once(self) -> None:
        """Each message class has exactly one code and codes are unique."""
        self.assertEqual(len(set(wire.MESSAGES.values())), len(wire.MESSAGES))
        self.assertEqual(wire.TYPE_CODES[wire.Hello], 0x01)

    def test_data_frame(self) -> None:
        """A DATA frame carries its chunk verbatim."""
        chunk = bytes(range(256)) * 64
        data = wire.data_header(len(chunk)) + chunk
        self.assertEqual(decode_all(data, max_data=len(chunk)), [wire.Data.of(chunk)])

    def test_encode_refuses_data(self) -> None:
        """DATA is never encoded through the control path (it would copy the chunk)."""
        self.assertRaises(TypeError, wire.encode, wire.Data.of(b"x"))

    def test_one_byte_at_a_time(self) -> None:
        """A stream fed one byte at a time yields the same messages."""
        messages = [hello(), wire.Welcome(b"m" * 16), wire.StreamBegin(0)]
        stream = b"".join(wire.encode(m) for m in messages)
        stream += wire.data_header(10) + b"0123456789"
        stream += wire.encode(wire.StreamEnd(b"d" * 32))
        decoder = FrameDecoder(max_data=10)
        out = []
        for i in range(len(stream)):
            decoder.feed(stream[i : i + 1])
            while (message := decoder.next_message()) is not None:
                out.append(message)
        self.assertEqual(out, [*messages, wire.Data.of(b"0123456789"), wire.StreamEnd(b"d" * 32)])
        self.assertEqual(decoder.buffered, 0)

    def test_large_frame_in_pieces(self) -> None:
        """A 4 MiB DATA frame in 16 KiB pieces decodes once, leaving nothing buffered."""
        chunk = b"\xab" * wire.MAX_CHUNK_SIZE
        stream = wire.data_header(len(chunk)) + chunk
        decoder = FrameDecoder(max_data=wire.MAX_CHUNK_SIZE)
        got = []
        for i in range(0, len(stream), 16384):
            decoder.feed(stream[i : i + 16384])
            if (m := decoder.next_message()) is not None:
                got.append(m)
        self.assertEqual(got, [wire.Data.of(chunk)])
        self.assertEqual(decoder.buffered, 0)


class RejectionTests(SynchronousTestCase):
    """Hostile or broken input raises ProtocolError with the right code."""

    def assertRefused(self, code: ErrorCode, data: bytes, max_data: int | None = None) -> None:
        with self.assertRaises(ProtocolError) as cm:
            decode_all(data, max_data)
        self.assertEqual(cm.exception.code, code)

    @settings(max_examples=500)
    @given(st.binary(max_size=2048))
    def test_random_bytes_only_raise_protocol_error(self, data: bytes) -> None:
        """Arbitrary bytes either decode or raise ProtocolError, nothing else."""
        self.assertDecodesOrRefuses(data)

    @settings(max_examples=300)
    @given(control_messages, st.integers(0, 10_000), st.binary(min_size=1, max_size=4))
    def test_mutated_frames_only_raise_protocol_error(
        self, message: wire.Message, where: int, junk: bytes
    ) -> None:
        """A valid frame with some bytes overwritten never crashes the decoder."""
        raw = bytearray(wire.encode(message))
        at = where % len(raw)
        raw[at : at + len(junk)] = junk
        self.assertDecodesOrRefuses(bytes(raw))

    def assertDecodesOrRefuses(self, data: bytes) -> None:
        """Decode ``data``: a refusal must carry a defined code; whatever
        decodes must be a well-formed message that encodes back to itself."""
        try:
            messages = decode_all(data, max_data=1024)
        except ProtocolError as e:
            self.assertIsInstance(e.code, ErrorCode)
            return
        for message in messages:
            if not isinstance(message, wire.Data):
                self.assertEqual(decode_all(wire.encode(message)), [message])

    def test_oversize_control_frame_refused_from_header(self) -> None:
        """A control frame longer than 64 KiB is refused on its header alone,
        before any payload is buffered."""
        decoder = FrameDecoder()
        decoder.feed(wire.HEADER.pack(0x01, wire.MAX_CONTROL_PAYLOAD + 1))
        with self.assertRaises(ProtocolError) as cm:
            decoder.next_message()
        self.assertEqual(cm.exception.code, ErrorCode.FRAME_TOO_LARGE)

    def test_huge_length_refused(self) -> None:
        """A 4 GiB length is refused, not allocated."""
        self.assertRefused(ErrorCode.FRAME_TOO_LARGE, wire.HEADER.pack(0x3F, 0xFFFFFFFF))

    def test_control_frame_at_limit_accepted(self) -> None:
        """Exactly 64 KiB is still a valid length (then the payload must parse)."""
        decoder = FrameDecoder()
        decoder.feed(wire.HEADER.pack(0x3F, wire.MAX_CONTROL_PAYLOAD))
        self.assertIsNone(decoder.next_message())

    def test_data_over_chunk_size_refused(self) -> None:
        """A DATA frame longer than the agreed chunk size is refused."""
        self.assertRefused(ErrorCode.FRAME_TOO_LARGE, wire.data_header(1025), max_data=1024)

    def test_data_before_chunk_size_refused(self) -> None:
        """DATA before HELLO fixed a chunk size is refused."""
        self.assertRefused(ErrorCode.UNEXPECTED_MESSAGE, wire.data_header(1) + b"x")

    def test_unknown_type(self) -> None:
        """An undefined frame type is refused."""
        self.assertRefused(ErrorCode.UNKNOWN_TYPE, frame(0x7E, b""))

    def test_truncated_payload(self) -> None:
        """A frame whose fields run past its length is malformed."""
        payload = wire.encode(hello())[wire.HEADER.size :]
        self.assertRefused(ErrorCode.MALFORMED, frame(0x01, payload[:-3]))

    def test_truncated_stream_waits(self) -> None:
        """An incomplete frame is not an error: more bytes may come."""
        raw = wire.encode(hello())
        self.assertEqual(decode_all(raw[:-1]), [])

    def test_trailing_bytes(self) -> None:
        """Bytes after the last field are malformed."""
        self.assertRefused(ErrorCode.MALFORMED, frame(0x30, b"\x00"))

    def test_path_in_vm_name(self) -> None:
        """A VM name that could escape a directory is refused."""
        for bad in ("../etc", "a/b", ".hidden", "", "x" * 65):
            raw = bytearray(wire.encode(hello(vm_name="placeholder")))
            raw = raw.replace(b"\x00\x0bplaceholder", struct.pack("!H", len(bad)) + bad.encode())
            raw[1:5] = struct.pack("!I", len(raw) - 5)
            with self.subTest(name=bad):
                self.assertRefused(ErrorCode.BAD_PARAMETER, bytes(raw))

    def test_bad_image_name(self) -> None:
        """Image names become file names: only [a-z][a-z0-9_-]* is allowed."""
        raw = wire.encode(hello(images=(wire.ImageInfo("ram", 1),)))
        raw = raw.replace(b"\x00\x03ram", b"\x00\x03../")
        self.assertRefused(ErrorCode.BAD_PARAMETER, raw)

    def test_unknown_guest_and_unprintable_cmdline(self) -> None:
        """HELLO's guest is "" or "linux" and its command line printable
        ASCII (it reaches QEMU's -append): anything else is refused."""
        for field, bad in (("guest", "linux"), ("guest_cmdline", "quiet")):
            raw = wire.encode(hello(**{field: bad}))
            replacement = {"guest": b"\x00\x05linuz", "guest_cmdline": b"\x00\x05qu\net"}[field]
            with self.subTest(field=field):
                self.assertRefused(
                    ErrorCode.BAD_PARAMETER, raw.replace(b"\x00\x05" + bad.encode(), replacement)
                )

    def test_unknown_variant(self) -> None:
        """A variant this version does not define is refused."""
        raw = bytearray(wire.encode(hello()))
        raw[5 + 2] = 9  # after the header and the u16 version
        self.assertRefused(ErrorCode.BAD_PARAMETER, bytes(raw))

    def test_too_many_images(self) -> None:
        """More images than MAX_IMAGES is refused while decoding the count."""
        raw = bytearray(wire.encode(hello(images=())))
        # header, version u16, variant u8, vm_name (u16 length + "vm1"), chunk_size u32
        count_at = wire.HEADER.size + 2 + 1 + 2 + 3 + 4
        self.assertEqual(raw[count_at], 0)
        raw[count_at] = wire.MAX_IMAGES + 1
        self.assertRefused(ErrorCode.BAD_PARAMETER, bytes(raw))

    def test_unknown_abort_code(self) -> None:
        """ABORT with an undefined error code is refused, not guessed."""
        raw = bytearray(wire.encode(wire.Abort(ErrorCode.TIMEOUT, "")))
        raw[5:7] = b"\xff\xff"
        self.assertRefused(ErrorCode.BAD_PARAMETER, bytes(raw))

    def test_error_codes_are_stable(self) -> None:
        """Error codes are part of the protocol: their numbers never change."""
        self.assertEqual(ErrorCode.MALFORMED, 1)
        self.assertEqual(ErrorCode.STREAM_MISMATCH, 10)
        self.assertEqual(ErrorCode.RESUME_FAILED, 17)


class VersionOneStabilityTests(SynchronousTestCase):
    """What a version-1 peer (an older securemig) can decode."""

    def test_error_codes_are_version_one(self) -> None:
        """A version-1 receiver refuses an unknown ABORT code (and loses the
        reason): the codes stay exactly 1-20 within version 1.  (Two codes
        added in a restructuring were found by an old peer this way.)  21,
        LIVE_FAILED, is raised only in live mode, a version-2 session; 22,
        BACKEND_MISMATCH, only to a source whose HELLO named its backend."""
        self.assertEqual(sorted(int(c) for c in ErrorCode), list(range(1, 23)))
        self.assertEqual(ErrorCode.LIVE_FAILED, 21)
        self.assertEqual(ErrorCode.BACKEND_MISMATCH, 22)

    def test_message_types_of_a_migration_are_version_one(self) -> None:
        """A migration uses only version-1 types; RESOLVE/RESOLVED/ASK
        (0x40-0x42) travel only on recovery connections, which an older
        destination refuses as an unknown first frame without harm (ASK is
        sent only for a libvirt live migration, which no older release
        makes); LIVE_READY (0x50) only in live mode (version 2)."""
        self.assertEqual(
            sorted(wire.MESSAGES),
            [1, 2, 16, 17, 18, 19, 20, 32, 33, 34, 48, 49, 50, 63, 64, 65, 66, 80],
        )

    def test_version_one_hello_is_unchanged(self) -> None:
        """A HELLO that needs none of version 2 is encoded without its tail,
        byte for byte what a version-1 peer sends and reads; one that needs
        it carries the tail and decodes to itself."""
        plain = hello(version=1, memory_mib=64)
        raw = wire.encode(plain)
        self.assertTrue(raw.endswith(struct.pack("!I", 64)))
        self.assertEqual(decode_all(raw), [plain])
        live = hello(version=2, guest="linux", guest_cmdline="quiet", mode=wire.Mode.LIVE)
        self.assertEqual(decode_all(wire.encode(live)), [live])
        self.assertGreater(len(wire.encode(live)), len(raw))


class QuoteRequestWireTests(SynchronousTestCase):
    """CHALLENGE carries the verifier's PCR selection and whether it wants
    the event log; EVIDENCE values of any bank and the log, bounded."""

    def assertRefused(self, code: ErrorCode, data: bytes) -> None:
        with self.assertRaises(ProtocolError) as cm:
            decode_all(data)
        self.assertEqual(cm.exception.code, code)

    def test_round_trip(self) -> None:
        request = wire.QuoteRequest(
            (
                wire.PcrBank.of(wire.HashAlg.SHA1, [0]),
                wire.PcrBank.of(wire.HashAlg.SHA256, [0, 1, 2, 3, 4, 5, 7, 23]),
            ),
            1,
        )
        challenge = wire.Challenge(b"n" * 32, request)
        self.assertEqual(decode_all(wire.encode(challenge)), [challenge])
        self.assertEqual(request.banks[1].indices, (0, 1, 2, 3, 4, 5, 7, 23))
        evidence = wire.Evidence(
            b"a",
            b"s",
            (wire.PcrValue(0, b"\x01" * 20, wire.HashAlg.SHA1), wire.PcrValue(7, b"\x07" * 32)),
            b"k",
            b"c",
            b"log" * 30000,
        )
        self.assertEqual(decode_all(wire.encode(evidence)), [evidence])

    def test_default_request(self) -> None:
        """What a verifier without a policy asks: SHA-256 PCRs 0-4 and 7, no log."""
        self.assertEqual(wire.Challenge(b"n" * 32).request, wire.DEFAULT_QUOTE_REQUEST)
        (bank,) = wire.DEFAULT_QUOTE_REQUEST.banks
        self.assertEqual((bank.alg, bank.indices), (wire.HashAlg.SHA256, (0, 1, 2, 3, 4, 7)))
        self.assertEqual(wire.DEFAULT_QUOTE_REQUEST.event_log, 0)

    def test_unknown_bank_refused(self) -> None:
        payload = b"n" * 32 + bytes((1,)) + struct.pack("!HI", 0x0001, 1) + b"\x00"
        self.assertRefused(ErrorCode.BAD_PARAMETER, frame(0x10, payload))

    def test_pcr_over_23_refused(self) -> None:
        payload = b"n" * 32 + bytes((1,)) + struct.pack("!HI", 0x000B, 1 << 24) + b"\x00"
        self.assertRefused(ErrorCode.BAD_PARAMETER, frame(0x10, payload))

    def test_more_banks_than_algorithms_refused(self) -> None:
        bank = struct.pack("!HI", 0x000B, 1)
        payload = b"n" * 32 + bytes((len(wire.HashAlg) + 1,)) + bank * 6 + b"\x00"
        self.assertRefused(ErrorCode.BAD_PARAMETER, frame(0x10, payload))

    def test_event_log_flag_is_a_bit(self) -> None:
        payload = b"n" * 32 + bytes((1,)) + struct.pack("!HI", 0x000B, 1) + b"\x02"
        self.assertRefused(ErrorCode.BAD_PARAMETER, frame(0x10, payload))

    def test_event_log_over_its_bound_refused(self) -> None:
        """A log length over MAX_EVENT_LOG is refused from the length field,
        and a frame over EVIDENCE's limit from the header."""
        head = wire.encode(wire.Evidence(b"", b"", (), b"", b""))[wire.HEADER.size : -4]
        payload = head + struct.pack("!I", wire.MAX_EVENT_LOG + 1)
        self.assertRefused(ErrorCode.BAD_PARAMETER, frame(0x11, payload))
        limit = wire.MAX_CONTROL_PAYLOAD + wire.MAX_EVENT_LOG
        self.assertRefused(ErrorCode.FRAME_TOO_LARGE, wire.HEADER.pack(0x11, limit + 1))
        # Other control frames keep the 64 KiB bound.
        self.assertRefused(
            ErrorCode.FRAME_TOO_LARGE, wire.HEADER.pack(0x10, wire.MAX_CONTROL_PAYLOAD + 1)
        )
        with self.assertRaises(ValueError):
            wire.encode(wire.Evidence(b"", b"", (), b"", b"", b"x" * (wire.MAX_EVENT_LOG + 1)))

    def test_clear_key_takes_a_whole_libvirt_secret(self) -> None:
        """CLEAR_KEY carries up to 128 bytes (a libvirt domain's secret, or
        a vTPM key and identity); a length field over that is refused."""
        key = wire.ClearKey(bytes(range(128)))
        self.assertEqual(decode_all(wire.encode(key)), [key])
        payload = struct.pack("!H", 129) + b"k" * 129
        self.assertRefused(ErrorCode.BAD_PARAMETER, frame(0x14, payload))
        with self.assertRaises(ValueError):
            wire.encode(wire.ClearKey(b"k" * 129))


class HelloTailTests(SynchronousTestCase):
    """HELLO's version-2 tail says what the VM is (backend, vTPM); a tail that
    ends early (the first version-2 sources) leaves them at their defaults."""

    def test_backend_and_vtpm_round_trip(self) -> None:
        said = hello(version=2, memory_mib=64, backend="qemu", vtpm=1)
        self.assertTrue(wire.has_tail(said))
        self.assertEqual(decode_all(wire.encode(said)), [said])

    def test_tail_without_backend_decodes_to_unknown(self) -> None:
        """The bytes of a first version-2 HELLO (its tail ends after ``mode``)
        decode with ``backend`` "" (not said) and no vTPM: admitted as before."""
        full = hello(version=2, guest="linux", guest_cmdline="quiet", mode=wire.Mode.LIVE)
        raw = wire.encode(replace(full, backend="qemu"))
        # Without backend text(16) (u16 length + 4 bytes) and vtpm u8.
        payload = raw[wire.HEADER.size : -(2 + 4 + 1)]
        old = wire.HEADER.pack(wire.TYPE_CODES[wire.Hello], len(payload)) + payload
        self.assertEqual(decode_all(old), [full])

    def test_backend_info_round_trips_and_is_left_out_when_empty(self) -> None:
        """``backend_info`` (a libvirt domain's description) comes last and
        only when not empty: a HELLO without it is byte for byte what a
        destination before it reads (ending with ``vtpm``), one with it
        decodes to itself, and one over its bound is refused."""
        plain = hello(version=2, backend="qemu", vtpm=1)
        self.assertTrue(wire.encode(plain).endswith(b"qemu\x01"))
        said = replace(plain, backend="libvirt", backend_info=b'{"domain": "d"}')
        raw = wire.encode(said)
        self.assertTrue(raw.endswith(b'\x00\x0f{"domain": "d"}'))
        self.assertEqual(decode_all(raw), [said])
        with self.assertRaises(ValueError):
            wire.encode(replace(said, backend_info=b"x" * (wire.MAX_BACKEND_INFO + 1)))
        over = raw[: -(2 + 15)] + struct.pack("!H", wire.MAX_BACKEND_INFO + 1)
        over += b"x" * (wire.MAX_BACKEND_INFO + 1)
        payload = over[wire.HEADER.size :]
        with self.assertRaises(ProtocolError) as cm:
            decode_all(wire.HEADER.pack(wire.TYPE_CODES[wire.Hello], len(payload)) + payload)
        self.assertEqual(cm.exception.code, ErrorCode.BAD_PARAMETER)

    def test_backend_names_are_bounded(self) -> None:
        """A backend name is a short lowercase word, like a registered kind."""
        for bad in ("QEMU", "q" * 17, "../x", "1abc"):
            raw = wire.encode(hello(version=2, backend="image"))
            payload = raw[wire.HEADER.size : -(2 + 5 + 1)] + struct.pack("!H", len(bad))
            payload += bad.encode() + b"\x00"
            with self.assertRaises(ProtocolError, msg=bad) as cm:
                decode_all(wire.HEADER.pack(wire.TYPE_CODES[wire.Hello], len(payload)) + payload)
            self.assertEqual(cm.exception.code, ErrorCode.BAD_PARAMETER)

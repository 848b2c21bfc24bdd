"""
The securemig wire format: frames, messages, limits and error codes.

This module is sans-IO: it turns messages into bytes and bytes into messages
and knows nothing of sockets or reactors.  ``doc/protocol.rst`` is the
normative description; this module is its one implementation.

Every frame is a 5-byte header followed by a payload::

    +--------+--------+--------+--------+--------+----------------------+
    |  type  |        payload length (big endian, u32)   |  payload ...   |
    +--------+--------+--------+--------+--------+----------------------+

Control messages have a payload of at most :data:`MAX_CONTROL_PAYLOAD`
bytes, encoded field by field from the declarations below; a DATA frame's
payload is one raw chunk of an image stream, at most the chunk size agreed
in HELLO.  The length is checked against the bound for its type as soon as
the header has arrived, before the payload is buffered or allocated.

Every message type is declared exactly once, as a dataclass whose fields
carry their codec in ``metadata``; :data:`MESSAGES` maps type codes to those
classes, and the generic :func:`encode` / :class:`FrameDecoder` follow from
them.  There is no per-message parsing code.
"""

from __future__ import annotations

import enum
import re
import struct
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeAlias

from securemig.protocol.errors import ErrorCode, PeerViolation

#: The newest protocol version; a destination speaks every one of :data:`VERSIONS`.
#: Version 2 adds HELLO's tail (``guest``, ``guest_cmdline``, ``mode``, then
#: ``backend`` and ``vtpm``: what the VM is and needs), live mode (LIVE_READY,
#: ``LIVE_FAILED``) and ``BACKEND_MISMATCH``; the tail's last field,
#: ``backend_info``, came with libvirt domains (issue 23).  A tail may end early (the fields
#: it leaves out take their defaults): the first version-2 sources sent no
#: ``backend``.  A source that names its VM's backend says version 2.
PROTOCOL_VERSION = 2
VERSIONS = (1, 2)

#: Frame header: type (u8) and payload length (u32), network order.
HEADER = struct.Struct("!BI")

#: Largest payload of any frame other than DATA.
MAX_CONTROL_PAYLOAD = 64 * 1024
#: Bounds and default of the chunk size a source may propose in HELLO.
MIN_CHUNK_SIZE = 4 * 1024
MAX_CHUNK_SIZE = 4 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 1024 * 1024
#: At most this many images (streams) per migration.
MAX_IMAGES = 8
#: Largest image a HELLO may announce (16 TiB).
MAX_IMAGE_SIZE = 1 << 44
#: Length of the destination-chosen migration id.
MIGRATION_ID_SIZE = 16
DIGEST_SIZE = 32
MAX_REASON = 1024
MAX_PATH = 1024
#: A guest kernel command line: printable ASCII, bounded as Linux bounds it on x86.
MAX_CMDLINE = 2048
CMDLINE_RE = re.compile(r"[ -~]*")
GUEST_RE = re.compile(r"|linux")
#: A backend kind as HELLO names it ("" when the source does not say).
BACKEND_RE = re.compile(r"|[a-z][a-z0-9_]{0,15}")
NONCE_SIZE = 32
#: Largest ``backend_info`` a HELLO may carry.
MAX_BACKEND_INFO = 4096
#: TPM structures (public areas, attestations, signatures) and certificates.
MAX_TPM_BLOB = 2048
MAX_CERTIFICATE = 8192
MAX_WRAPPED_KEY = 1024
#: PCRs of a TPM 2.0 PC client bank (0..23), as a CHALLENGE's bitmaps name them.
PCR_COUNT = 24
#: Largest measured-boot event log an EVIDENCE may carry (a PC's log is
#: typically 10-60 KB); only EVIDENCE frames may exceed MAX_CONTROL_PAYLOAD,
#: by this much.
MAX_EVENT_LOG = 256 * 1024

#: VM names: also used as directory names on both hosts, hence this strict form.
VM_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Image names: also file names (``NAME.img``) in a bundle.
IMAGE_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")


class Variant(enum.IntEnum):
    """What travels: RAM and disk (full) or RAM only (shared storage)."""

    FULL = 1
    SHARED_STORAGE = 2


class Mode(enum.IntEnum):
    """How the VM moves: suspended (its images stream, then it resumes) or
    live (QEMU's own pre-copy stream while the guest runs; secure variant,
    QEMU only)."""

    SUSPENDED = 1
    LIVE = 2


# --------------------------------------------------------------------------
# Field codecs.  Each knows how to append a value's bytes to a list and how to
# read one value from a memoryview at an offset, checking every bound first.


class Codec:
    """Encodes and decodes one field; subclasses define one wire type each."""

    def encode(self, value: Any, out: list[bytes]) -> None:
        raise NotImplementedError

    def decode(self, view: memoryview, offset: int) -> tuple[Any, int]:
        raise NotImplementedError

    @staticmethod
    def _need(view: memoryview, offset: int, n: int) -> None:
        if offset + n > len(view):
            raise PeerViolation(ErrorCode.MALFORMED, "field runs past the end of the frame")


class UInt(Codec):
    """An unsigned big-endian integer of 1, 2, 4 or 8 bytes."""

    _FORMATS: ClassVar[dict[int, str]] = {1: "!B", 2: "!H", 4: "!I", 8: "!Q"}

    def __init__(self, size: int, maximum: int | None = None) -> None:
        self.struct = struct.Struct(self._FORMATS[size])
        self.maximum = (1 << (8 * size)) - 1 if maximum is None else maximum

    def encode(self, value: Any, out: list[bytes]) -> None:
        if not 0 <= int(value) <= self.maximum:
            raise ValueError(f"{value} outside 0..{self.maximum}")
        out.append(self.struct.pack(int(value)))

    def decode(self, view: memoryview, offset: int) -> tuple[Any, int]:
        self._need(view, offset, self.struct.size)
        (value,) = self.struct.unpack_from(view, offset)
        if value > self.maximum:
            raise PeerViolation(ErrorCode.BAD_PARAMETER, f"value {value} over {self.maximum}")
        return value, offset + self.struct.size


class Enum(UInt):
    """An IntEnum carried as an unsigned integer; unknown values are refused."""

    def __init__(self, enum_type: type[enum.IntEnum], size: int = 1) -> None:
        super().__init__(size)
        self.enum_type = enum_type

    def encode(self, value: Any, out: list[bytes]) -> None:
        super().encode(self.enum_type(value), out)

    def decode(self, view: memoryview, offset: int) -> tuple[Any, int]:
        raw, offset = super().decode(view, offset)
        try:
            return self.enum_type(raw), offset
        except ValueError:
            name = self.enum_type.__name__
            raise PeerViolation(ErrorCode.BAD_PARAMETER, f"unknown {name} {raw}") from None


class Fixed(Codec):
    """Exactly ``size`` opaque bytes (digests, ids)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def encode(self, value: Any, out: list[bytes]) -> None:
        if len(value) != self.size:
            raise ValueError(f"need {self.size} bytes, got {len(value)}")
        out.append(bytes(value))

    def decode(self, view: memoryview, offset: int) -> tuple[Any, int]:
        self._need(view, offset, self.size)
        return bytes(view[offset : offset + self.size]), offset + self.size


class Blob(Codec):
    """Opaque bytes with a u16 length prefix, at most ``maximum`` long (the
    length is checked before anything is sliced)."""

    _LEN = struct.Struct("!H")

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum

    def encode(self, value: Any, out: list[bytes]) -> None:
        if len(value) > self.maximum:
            raise ValueError(f"{len(value)} bytes over {self.maximum}")
        out.append(self._LEN.pack(len(value)))
        out.append(bytes(value))

    def decode(self, view: memoryview, offset: int) -> tuple[Any, int]:
        self._need(view, offset, self._LEN.size)
        (n,) = self._LEN.unpack_from(view, offset)
        if n > self.maximum:
            raise PeerViolation(ErrorCode.BAD_PARAMETER, f"field of {n} bytes over {self.maximum}")
        offset += self._LEN.size
        self._need(view, offset, n)
        return bytes(view[offset : offset + n]), offset + n


class LongBlob(Blob):
    """Opaque bytes with a u32 length prefix (the event log), at most
    ``maximum`` long."""

    _LEN = struct.Struct("!I")


class Text(Blob):
    """UTF-8 text with a u16 length prefix, optionally matching a pattern."""

    def __init__(self, maximum: int, pattern: re.Pattern[str] | None = None) -> None:
        super().__init__(maximum)
        self.pattern = pattern

    def encode(self, value: Any, out: list[bytes]) -> None:
        super().encode(value.encode("utf-8"), out)

    def decode(self, view: memoryview, offset: int) -> tuple[Any, int]:
        raw, offset = super().decode(view, offset)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PeerViolation(ErrorCode.MALFORMED, "text field is not UTF-8") from None
        if self.pattern is not None and not self.pattern.fullmatch(text):
            raise PeerViolation(ErrorCode.BAD_PARAMETER, f"name {text!r} is not allowed")
        return text, offset


class Nested(Codec):
    """A nested dataclass whose fields carry codecs, like a message's."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def encode(self, value: Any, out: list[bytes]) -> None:
        for f in fields(value):
            if f.metadata.get("tail") and not has_tail(value):
                break
            if f.metadata.get("optional") and not any(
                g.metadata.get("optional") and getattr(value, g.name) != g.default
                for g in fields(value)
            ):
                # The tail's optional end, all defaults: not sent, so the
                # message is byte for byte what a peer before them sent.
                break
            f.metadata["codec"].encode(getattr(value, f.name), out)

    def decode(self, view: memoryview, offset: int) -> tuple[Any, int]:
        values = {}
        for f in fields(self.cls):
            if f.metadata.get("tail") and offset == len(view):
                break  # a message without its (version-2) tail: the defaults
            values[f.name], offset = f.metadata["codec"].decode(view, offset)
        return self.cls(**values), offset


class Sequence(Codec):
    """A u8 count followed by that many items of one codec, at most ``maximum``."""

    def __init__(self, item: Codec, maximum: int) -> None:
        self.item = item
        self.maximum = maximum

    def encode(self, value: Any, out: list[bytes]) -> None:
        if len(value) > self.maximum:
            raise ValueError(f"{len(value)} items over {self.maximum}")
        out.append(bytes((len(value),)))
        for item in value:
            self.item.encode(item, out)

    def decode(self, view: memoryview, offset: int) -> tuple[Any, int]:
        self._need(view, offset, 1)
        n = view[offset]
        if n > self.maximum:
            raise PeerViolation(ErrorCode.BAD_PARAMETER, f"{n} items over {self.maximum}")
        offset += 1
        items = []
        for _ in range(n):
            item, offset = self.item.decode(view, offset)
            items.append(item)
        return tuple(items), offset


def wire(codec: Codec, tail: bool = False, optional: bool = False, **kwargs: Any) -> Any:
    """Declare a dataclass field together with its wire codec.  ``tail``:
    one of a top-level message's last fields, sent only when one of them
    differs from its default (what a version-1 peer never sends nor reads).
    ``optional`` (the tail's very last fields, added later): sent only when
    one of them differs from its default, so a message that needs none of
    them is what an older peer of the same version reads."""
    return field(
        metadata={"codec": codec, "tail": tail or optional, "optional": optional}, **kwargs
    )


def has_tail(message: Any) -> bool:
    """Whether any tail field of ``message`` differs from its default."""
    return any(
        f.metadata.get("tail") and getattr(message, f.name) != f.default for f in fields(message)
    )


# --------------------------------------------------------------------------
# Messages.  One declaration each; the table below gives them their codes.


@dataclass(frozen=True)
class ImageInfo:
    """One image of the manifest in HELLO: its name and exact size in bytes."""

    name: str = wire(Text(32, IMAGE_NAME_RE))
    size: int = wire(UInt(8, MAX_IMAGE_SIZE))


@dataclass(frozen=True)
class Hello:
    """Source → destination, first: what is about to move, and how."""

    version: int = wire(UInt(2))
    variant: Variant = wire(Enum(Variant))
    vm_name: str = wire(Text(64, VM_NAME_RE))
    chunk_size: int = wire(UInt(4, MAX_CHUNK_SIZE))
    images: tuple[ImageInfo, ...] = wire(Sequence(Nested(ImageInfo), MAX_IMAGES))
    #: Shared-storage variant: the disk's absolute path on the shared storage ("" if none).
    shared_disk: str = wire(Text(MAX_PATH))
    #: Guest memory in MiB for hypervisors that need it to resume (QEMU); 0 if none.
    memory_mib: int = wire(UInt(4), default=0)
    #: The QEMU guest kind ("linux": the built Linux guest; "" for firmware only) and
    #: its kernel command line: the destination's QEMU must be started as the source's.
    #: (Version 2, the tail.)
    guest: str = wire(Text(16, GUEST_RE), tail=True, default="")
    guest_cmdline: str = wire(Text(MAX_CMDLINE, CMDLINE_RE), tail=True, default="")
    mode: Mode = wire(Enum(Mode), tail=True, default=Mode.SUSPENDED)
    #: What the VM is: its hypervisor backend's kind ("" from a source that
    #: does not say, whose VM takes the destination's backend), and whether it
    #: has a vTPM its backend must run (1) or not (0).  The destination
    #: refuses a VM its backend cannot run (BACKEND_MISMATCH) at admission.
    backend: str = wire(Text(16, BACKEND_RE), tail=True, default="")
    vtpm: int = wire(UInt(1, 1), tail=True, default=0)
    #: What the VM's backend says of it to the destination's, opaque here
    #: (at most MAX_BACKEND_INFO bytes; empty for a backend that needs none):
    #: a libvirt domain's name, UUIDs and disks.  The destination's backend
    #: parses and checks it; a live migration of a backend that carries
    #: several sockets needs it.
    backend_info: bytes = wire(Blob(MAX_BACKEND_INFO), optional=True, default=b"")


@dataclass(frozen=True)
class Welcome:
    """Destination → source: HELLO accepted; names this migration."""

    migration_id: bytes = wire(Fixed(MIGRATION_ID_SIZE))
    #: Secure variant: the TCP port of this migration's data channel (see
    #: :mod:`securemig.protocol.records`); 0: images travel on this connection.
    data_port: int = wire(UInt(2, 65535), default=0)


@dataclass(frozen=True)
class StreamBegin:
    """Source → destination: the next DATA frames belong to image ``index``."""

    index: int = wire(UInt(1, MAX_IMAGES - 1))


@dataclass(frozen=True, eq=False)
class Data:
    """One chunk of the current stream.  Its payload is the raw chunk.

    The decoder hands the chunk over as the pieces it arrived in (views of
    the buffers it was fed: the received bytes on the control connection,
    an opened record's plaintext on the data channel), so the decoder never
    copies it; the disk thread writes them piece by piece, and hashes them
    only where the stream's SHA-256 is checked (the secure variant's control
    connection: a data channel's records are authenticated one by one, and
    the insecure twin checks sizes only).
    """

    parts: tuple[bytes | memoryview, ...]

    @classmethod
    def of(cls, chunk: bytes) -> Data:
        """A DATA message holding one contiguous chunk."""
        return cls((chunk,))

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def tobytes(self) -> bytes:
        """The chunk as one bytes object (a copy; for tests and small data)."""
        return b"".join(self.parts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Data) and self.tobytes() == other.tobytes()

    __hash__ = None  # type: ignore[assignment]


#: STREAM_END's digest on the data channel, where records are authenticated,
#: and in the insecure variant, which does no cryptography.
UNHASHED = bytes(32)


@dataclass(frozen=True)
class StreamEnd:
    """Source → destination: the current stream is complete; its SHA-256."""

    sha256: bytes = wire(Fixed(DIGEST_SIZE))


@dataclass(frozen=True)
class LiveReady:
    """Destination → source, live mode: the destination's QEMU waits paused
    for the stream, whose sealed records go to TCP ``port`` (see
    :mod:`securemig.protocol.records`, :data:`~securemig.protocol.records.LIVE_EXPORTER_LABEL`)."""

    port: int = wire(UInt(2, 65535))


@dataclass(frozen=True)
class Prepared:
    """Destination → source: every image is verified and durable in staging."""


@dataclass(frozen=True)
class Commit:
    """Source → destination: the source has committed and given the VM up."""


@dataclass(frozen=True)
class Done:
    """Destination → source: the VM is in place and resumed at the destination."""


@dataclass(frozen=True)
class Abort:
    """Either way, any time: the sender gives up, with a code and a reason."""

    code: ErrorCode = wire(Enum(ErrorCode, size=2))
    reason: str = wire(Text(MAX_REASON))


class HashAlg(enum.IntEnum):
    """The PCR banks a CHALLENGE may name, by their TPM_ALG_ID, and
    (:data:`DIGEST_SIZES`) the size of their values."""

    SHA1 = 0x0004
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D
    SM3_256 = 0x0012


#: The size of a PCR value of each bank.
DIGEST_SIZES: dict[HashAlg, int] = {
    HashAlg.SHA1: 20,
    HashAlg.SHA256: 32,
    HashAlg.SHA384: 48,
    HashAlg.SHA512: 64,
    HashAlg.SM3_256: 32,
}


@dataclass(frozen=True)
class PcrBank:
    """One bank of a PCR selection: its hash algorithm and the PCRs chosen in
    it, as a bitmap (bit n: PCR n)."""

    alg: HashAlg = wire(Enum(HashAlg, size=2))
    pcrs: int = wire(UInt(4, (1 << PCR_COUNT) - 1))

    @property
    def indices(self) -> tuple[int, ...]:
        """The chosen PCR indices, ascending."""
        return tuple(p for p in range(PCR_COUNT) if self.pcrs >> p & 1)

    @classmethod
    def of(cls, alg: HashAlg, pcrs: tuple[int, ...] | list[int]) -> PcrBank:
        """The bank ``alg`` with ``pcrs`` chosen."""
        return cls(alg, sum(1 << p for p in set(pcrs)))


@dataclass(frozen=True)
class QuoteRequest:
    """What a verifier asks the attester to quote: the PCR selection of its
    policy for that peer, and whether to send the measured-boot event log."""

    banks: tuple[PcrBank, ...] = wire(Sequence(Nested(PcrBank), len(HashAlg)))
    event_log: int = wire(UInt(1, 1), default=0)


#: What a verifier without a policy for its peer asks (trust on first use):
#: SHA-256 PCRs 0-4 and 7 (``doc/attestation.rst`` says what they cover).
DEFAULT_QUOTE_REQUEST = QuoteRequest((PcrBank.of(HashAlg.SHA256, (0, 1, 2, 3, 4, 7)),))


@dataclass(frozen=True)
class Challenge:
    """Secure variant, either way: a fresh nonce the peer's quote must cover,
    and what it must quote."""

    nonce: bytes = wire(Fixed(NONCE_SIZE))
    request: QuoteRequest = wire(Nested(QuoteRequest), default=DEFAULT_QUOTE_REQUEST)


@dataclass(frozen=True)
class PcrValue:
    """One reported PCR value, of the bank ``alg``."""

    index: int = wire(UInt(1, PCR_COUNT - 1))
    value: bytes = wire(Blob(max(DIGEST_SIZES.values())))
    alg: HashAlg = wire(Enum(HashAlg, size=2), default=HashAlg.SHA256)


@dataclass(frozen=True)
class Evidence:
    """Secure variant, either way: a quote over the challenged nonce bound to
    this TLS session, the PCR values it covers, the AK with its certificate,
    and the measured-boot event log when the challenge asked for it (empty:
    none sent)."""

    attest: bytes = wire(Blob(MAX_TPM_BLOB))
    signature: bytes = wire(Blob(MAX_TPM_BLOB))
    pcrs: tuple[PcrValue, ...] = wire(Sequence(Nested(PcrValue), PCR_COUNT * len(HashAlg)))
    ak_public: bytes = wire(Blob(MAX_TPM_BLOB))
    ak_certificate: bytes = wire(Blob(MAX_CERTIFICATE))
    event_log: bytes = wire(LongBlob(MAX_EVENT_LOG), default=b"")


@dataclass(frozen=True)
class KeyOffer:
    """Secure variant, destination → source: the migration key's public area
    and its TPM2_Certify by the attested AK, bound to this session."""

    public: bytes = wire(Blob(MAX_TPM_BLOB))
    attest: bytes = wire(Blob(MAX_TPM_BLOB))
    signature: bytes = wire(Blob(MAX_TPM_BLOB))


@dataclass(frozen=True)
class WrappedKey:
    """Secure variant, source → destination: the VM's vTPM key, wrapped to the
    migration key (ECDH with an ephemeral P-256 key, HKDF-SHA256, AES-256-GCM
    with the migration id as associated data)."""

    ephemeral: bytes = wire(Fixed(65))  # uncompressed P-256 point
    nonce: bytes = wire(Fixed(12))
    ciphertext: bytes = wire(Blob(MAX_WRAPPED_KEY))


@dataclass(frozen=True)
class ClearKey:
    """Insecure variant only, source → destination, before the first stream:
    the vTPM key and the vTPM's identity, in the clear (what the secure
    variant wraps; the insecure twin exists to measure what that costs), or
    a libvirt domain's whole secret (1 to 128 bytes)."""

    material: bytes = wire(Blob(128))


class Decision(enum.IntEnum):
    """The coordinator's decision on a migration, as RESOLVE carries it."""

    COMMITTED = 1  #: the source journaled COMMITTED: the VM is the destination's
    ABORTED = 2  #: the source never committed: the VM stays at the source


class Settled(enum.IntEnum):
    """What a destination did for a RESOLVE, as RESOLVED carries it."""

    DONE = 1  #: the VM is in place here (moved and resumed now, or already)
    ABORTED = 2  #: nothing is kept here (staging discarded now, or already)
    UNKNOWN = 3  #: this destination has no record of that migration
    REFUSED = 4  #: the RESOLVE does not come from the source of that migration
    FAILED = 5  #: the decision could not be carried out here (the reason says why)
    #: A live arrival whose QEMU ended before its guest ever ran here, journaled
    #: here: nothing is kept and the guest never runs here (the source, which
    #: kept its paused QEMU, continues it).
    LOST = 6
    #: To ASK only: a live arrival its hypervisor completed here (the whole
    #: guest, paused), held in doubt until the source decides.
    HELD = 7


@dataclass(frozen=True)
class Resolve:
    """Source → destination, alone on a fresh connection (recovery): the
    coordinator's decision for a migration that ended without DONE."""

    migration_id: bytes = wire(Fixed(MIGRATION_ID_SIZE))
    decision: Decision = wire(Enum(Decision))


@dataclass(frozen=True)
class Ask:
    """Source → destination, alone on a fresh connection (recovery): a
    carried live departure the source cannot decide alone (its guest gone
    there, PREPARED never seen): what does the destination hold?  Answered
    with RESOLVED, and nothing is changed there."""

    migration_id: bytes = wire(Fixed(MIGRATION_ID_SIZE))


@dataclass(frozen=True)
class Resolved:
    """Destination → source, the answer to RESOLVE (what it did) or to ASK
    (what it holds)."""

    migration_id: bytes = wire(Fixed(MIGRATION_ID_SIZE))
    settled: Settled = wire(Enum(Settled))
    reason: str = wire(Text(MAX_REASON))


Message: TypeAlias = (
    Hello
    | Welcome
    | Challenge
    | Evidence
    | KeyOffer
    | WrappedKey
    | ClearKey
    | StreamBegin
    | Data
    | StreamEnd
    | Prepared
    | Commit
    | Done
    | Abort
    | Resolve
    | Resolved
    | Ask
    | LiveReady
)

#: The one table of message types.  0x10-0x1F: the secure variant's
#: attestation and key transfer; 0x40-0x4F: recovery; 0x50-0x5F: live mode.
MESSAGES: dict[int, type] = {
    0x01: Hello,
    0x02: Welcome,
    0x10: Challenge,
    0x11: Evidence,
    0x12: KeyOffer,
    0x13: WrappedKey,
    0x14: ClearKey,
    0x20: StreamBegin,
    0x21: Data,
    0x22: StreamEnd,
    0x30: Prepared,
    0x31: Commit,
    0x32: Done,
    0x3F: Abort,
    0x40: Resolve,
    0x41: Resolved,
    0x42: Ask,
    0x50: LiveReady,
}
TYPE_CODES: dict[type, int] = {cls: code for code, cls in MESSAGES.items()}
DATA_TYPE = TYPE_CODES[Data]


def payload_limit(code: int) -> int:
    """The largest payload of a control frame of type ``code``: EVIDENCE may
    carry an event log on top of :data:`MAX_CONTROL_PAYLOAD`."""
    if MESSAGES[code] is Evidence:
        return MAX_CONTROL_PAYLOAD + MAX_EVENT_LOG
    return MAX_CONTROL_PAYLOAD


def encode(message: Any) -> bytes:
    """Encode a control message as one frame (header and payload)."""
    cls = type(message)
    if cls is Data:
        raise TypeError("DATA frames are written with data_header() and the raw chunk")
    parts: list[bytes] = []
    Nested(cls).encode(message, parts)
    payload = b"".join(parts)
    if len(payload) > payload_limit(TYPE_CODES[cls]):
        raise ValueError(f"{cls.__name__} payload of {len(payload)} bytes over the limit")
    return HEADER.pack(TYPE_CODES[cls], len(payload)) + payload


def data_header(length: int) -> bytes:
    """The header of a DATA frame carrying ``length`` bytes.

    Senders write it and the chunk with ``writeSequence`` so the chunk is
    never copied into a frame buffer.
    """
    return HEADER.pack(DATA_TYPE, length)


def decode_payload(code: int, payload: bytes) -> Message:
    """Decode one frame's payload; the whole payload must be consumed."""
    cls = MESSAGES[code]
    if cls is Data:
        return Data.of(payload)
    message: Message
    # Any: a Nested codec returns whatever dataclass it was built for (cls).
    message, end = Nested(cls).decode(memoryview(payload), 0)
    if end != len(payload):
        trailing = len(payload) - end
        raise PeerViolation(ErrorCode.MALFORMED, f"{trailing} trailing bytes in {cls.__name__}")
    return message


class ByteQueue:
    """Received bytes kept as a queue of memoryviews and consumed from the
    front: a byte is never copied while it waits, and never quadratically."""

    def __init__(self) -> None:
        self._pieces: deque[memoryview] = deque()
        self.available = 0

    def feed(self, data: bytes) -> None:
        """Append received bytes (kept by reference, not copied)."""
        if data:
            self._pieces.append(memoryview(data))
            self.available += len(data)

    def take(self, n: int) -> list[memoryview]:
        """Remove exactly ``n`` buffered bytes from the front, as views."""
        out = []
        self.available -= n
        while n:
            piece = self._pieces[0]
            if len(piece) <= n:
                out.append(piece)
                self._pieces.popleft()
                n -= len(piece)
            else:
                out.append(piece[:n])
                self._pieces[0] = piece[n:]
                n = 0
        return out


class FrameDecoder:
    """Turns a byte stream into messages, checking every bound first.

    Bytes go in with :meth:`feed`; :meth:`next_message` returns the next
    whole message or ``None`` when more bytes are needed.  Received buffers
    are kept as a queue of memoryviews and consumed from the front, so a
    byte is never copied while it waits: a control payload is joined once
    when whole, and a DATA payload is handed on as views of the buffers it
    arrived in (see :class:`Data`).  Nothing is ever copied quadratically.

    ``max_data`` is the largest DATA payload accepted; ``None`` (the
    default, before a chunk size is agreed) refuses DATA frames outright.
    """

    def __init__(self, max_data: int | None = None) -> None:
        self.max_data = max_data
        self._queue = ByteQueue()
        self._header: tuple[int, int] | None = None

    def feed(self, data: bytes) -> None:
        """Append received bytes (kept by reference, not copied)."""
        self._queue.feed(data)

    @property
    def buffered(self) -> int:
        """How many received bytes are not yet returned as messages."""
        return self._queue.available

    def next_message(self) -> Message | None:
        """The next complete message, or None; raises :class:`ProtocolError`."""
        if self._header is None:
            if self._queue.available < HEADER.size:
                return None
            code, length = HEADER.unpack(b"".join(self._queue.take(HEADER.size)))
            self._check_header(code, length)
            self._header = (code, length)
        code, length = self._header
        if self._queue.available < length:
            return None
        self._header = None
        parts = self._queue.take(length)
        if code == DATA_TYPE:
            return Data(tuple(parts))
        return decode_payload(code, b"".join(parts))

    def _check_header(self, code: int, length: int) -> None:
        if code not in MESSAGES:
            raise PeerViolation(ErrorCode.UNKNOWN_TYPE, f"unknown frame type 0x{code:02x}")
        if code == DATA_TYPE:
            if self.max_data is None:
                raise PeerViolation(
                    ErrorCode.UNEXPECTED_MESSAGE, "DATA before a chunk size was agreed"
                )
            limit = self.max_data
        else:
            limit = payload_limit(code)
        if length > limit:
            raise PeerViolation(
                ErrorCode.FRAME_TOO_LARGE,
                f"{MESSAGES[code].__name__} frame of {length} bytes over the limit of {limit}",
            )

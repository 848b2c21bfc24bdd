"""
Measured-boot event logs (the TCG PC Client binary format), parsed with every
length bounded, replayed, and held to a policy of named events.

The format is that of ``/sys/kernel/security/tpm0/binary_bios_measurements``
(TCG PC Client Platform Firmware Profile, section 10): a first event in the
old SHA-1 layout (``TCG_PCR_EVENT``) whose data is the ``Spec ID Event03``
structure naming the log's hash algorithms and their digest sizes, then
crypto-agile ``TCG_PCR_EVENT2`` entries::

    TCG_PCR_EVENT   pcrIndex u32 | eventType u32 | digest[20] | eventSize u32 | event
    TCG_PCR_EVENT2  pcrIndex u32 | eventType u32 | count u32 |
                    count x (hashAlg u16 | digest[size of hashAlg]) | eventSize u32 | event

All integers are little endian.  A peer sends the log, so the parser trusts
none of it: each length is checked against what is left of the log and
against its own bound (:data:`MAX_EVENTS`, :data:`MAX_EVENT_DATA`) before a
byte is sliced, the algorithms must be ones this verifier knows with their
real digest sizes, and every event must carry a digest for each of them.

Replaying the log extends a software PCR bank event by event (EV_NO_ACTION
events are not extended; a ``StartupLocality`` one sets PCR 0's initial
value, as the TCG specifies).  The verifier then requires the replay to equal
the PCR values the TPM *quoted*: only then do the events say what happened,
and the policy can judge named events (an allowed set of digests for each PCR
and event type, e.g. the boot loaders and kernels a site allows) instead of
raw PCR values, which change with every kernel update.  The Keylime way.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from securemig.protocol.wire import DIGEST_SIZES, PCR_COUNT, HashAlg
from securemig.trust.attest import AttestationError, Check

#: At most this many events in a log (a PC's has a few hundred).
MAX_EVENTS = 4096
#: The largest event data of one event (secure boot variables run to a few KB).
MAX_EVENT_DATA = 64 * 1024

_U32 = struct.Struct("<I")
_HEAD = struct.Struct("<II")  # pcrIndex, eventType
_ALG = struct.Struct("<HH")  # algorithmId, digestSize
_SPEC_SIGNATURE = b"Spec ID Event03\0"
_LOCALITY_SIGNATURE = b"StartupLocality\0"

#: Event types by name (TCG PC Client PFP, 10.4.1), for policies and messages.
EVENT_TYPES: dict[str, int] = {
    "EV_PREBOOT_CERT": 0x0,
    "EV_POST_CODE": 0x1,
    "EV_NO_ACTION": 0x3,
    "EV_SEPARATOR": 0x4,
    "EV_ACTION": 0x5,
    "EV_EVENT_TAG": 0x6,
    "EV_S_CRTM_CONTENTS": 0x7,
    "EV_S_CRTM_VERSION": 0x8,
    "EV_CPU_MICROCODE": 0x9,
    "EV_PLATFORM_CONFIG_FLAGS": 0xA,
    "EV_TABLE_OF_DEVICES": 0xB,
    "EV_COMPACT_HASH": 0xC,
    "EV_IPL": 0xD,
    "EV_IPL_PARTITION_DATA": 0xE,
    "EV_NONHOST_CODE": 0xF,
    "EV_NONHOST_CONFIG": 0x10,
    "EV_NONHOST_INFO": 0x11,
    "EV_OMIT_BOOT_DEVICE_EVENTS": 0x12,
    "EV_EFI_VARIABLE_DRIVER_CONFIG": 0x80000001,
    "EV_EFI_VARIABLE_BOOT": 0x80000002,
    "EV_EFI_BOOT_SERVICES_APPLICATION": 0x80000003,
    "EV_EFI_BOOT_SERVICES_DRIVER": 0x80000004,
    "EV_EFI_RUNTIME_SERVICES_DRIVER": 0x80000005,
    "EV_EFI_GPT_EVENT": 0x80000006,
    "EV_EFI_ACTION": 0x80000007,
    "EV_EFI_PLATFORM_FIRMWARE_BLOB": 0x80000008,
    "EV_EFI_HANDOFF_TABLES": 0x80000009,
    "EV_EFI_PLATFORM_FIRMWARE_BLOB2": 0x8000000A,
    "EV_EFI_HANDOFF_TABLES2": 0x8000000B,
    "EV_EFI_VARIABLE_BOOT2": 0x8000000C,
    "EV_EFI_HCRTM_EVENT": 0x80000010,
    "EV_EFI_VARIABLE_AUTHORITY": 0x800000E0,
    "EV_EFI_SPDM_FIRMWARE_BLOB": 0x800000E1,
    "EV_EFI_SPDM_FIRMWARE_CONFIG": 0x800000E2,
}
_TYPE_NAMES = {v: k for k, v in EVENT_TYPES.items()}
EV_NO_ACTION = EVENT_TYPES["EV_NO_ACTION"]

#: The names policies use for the banks.
BANK_NAMES: dict[str, HashAlg] = {a.name.lower(): a for a in HashAlg}
_HASHES = {
    HashAlg.SHA1: "sha1",
    HashAlg.SHA256: "sha256",
    HashAlg.SHA384: "sha384",
    HashAlg.SHA512: "sha512",
    HashAlg.SM3_256: "sm3",
}


def type_name(event_type: int) -> str:
    """An event type's TCG name, or its number in hex."""
    return _TYPE_NAMES.get(event_type, f"0x{event_type:08x}")


def event_type(name: str) -> int:
    """The number of an event type given by its TCG name (or a number)."""
    if name in EVENT_TYPES:
        return EVENT_TYPES[name]
    try:
        return int(name, 0)
    except ValueError:
        raise ValueError(f"unknown event type {name!r}") from None


def new_hash(alg: HashAlg) -> Any:
    """A hash object of bank ``alg`` (SM3 only where OpenSSL has it)."""
    try:
        return hashlib.new(_HASHES[alg])
    except ValueError:
        raise AttestationError(Check.EVENT_LOG, f"no {alg.name} hash here") from None


class EventLogError(AttestationError):
    """An event log that does not parse, or breaks a bound."""

    def __init__(self, detail: str) -> None:
        super().__init__(Check.EVENT_LOG, detail)


@dataclass(frozen=True)
class Event:
    """One measured event: its number in the log, PCR, type, the digest of
    each bank, and its data."""

    number: int
    pcr: int
    type: int
    digests: Mapping[HashAlg, bytes]
    data: bytes

    def describe(self) -> str:
        """How messages name this event."""
        return f"event {self.number} (PCR {self.pcr}, {type_name(self.type)})"


@dataclass(frozen=True)
class EventLog:
    """A parsed log: its banks (from the Spec ID event), its events, and the
    locality the platform started in."""

    algorithms: tuple[HashAlg, ...]
    events: tuple[Event, ...]
    startup_locality: int = 0

    def replay(self, alg: HashAlg) -> dict[int, bytes]:
        """The value of every PCR the log extends in bank ``alg``, replayed."""
        if alg not in self.algorithms:
            raise EventLogError(f"the log has no {alg.name} digests")
        size = DIGEST_SIZES[alg]
        pcrs: dict[int, bytes] = {}
        for event in self.events:
            if event.type == EV_NO_ACTION:
                continue
            start = pcrs.get(event.pcr)
            if start is None:
                start = self.initial(event.pcr, size)
            h = new_hash(alg)
            h.update(start + event.digests[alg])
            pcrs[event.pcr] = h.digest()
        return pcrs

    def initial(self, pcr: int, size: int) -> bytes:
        """A PCR's value before the first event: zero, but PCR 0 holds the
        startup locality (PC Client PFP 10.4.5.3)."""
        if pcr == 0 and self.startup_locality:
            return bytes(size - 1) + bytes((self.startup_locality,))
        return bytes(size)


class _Reader:
    """Reads a log front to back, every length checked against what is left."""

    def __init__(self, raw: bytes) -> None:
        self.view = memoryview(raw)
        self.offset = 0

    def left(self) -> int:
        return len(self.view) - self.offset

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise EventLogError(f"log truncated in {what} at byte {self.offset}")
        out = bytes(self.view[self.offset : self.offset + n])
        self.offset += n
        return out

    def unpack(self, s: struct.Struct, what: str) -> tuple[int, ...]:
        return s.unpack(self.take(s.size, what))

    def data(self, what: str) -> bytes:
        (size,) = self.unpack(_U32, what)
        if size > MAX_EVENT_DATA:
            raise EventLogError(f"{what} of {size} bytes over the limit of {MAX_EVENT_DATA}")
        return self.take(size, what)


def parse(raw: bytes) -> EventLog:
    """Parse a crypto-agile event log; raises :class:`EventLogError`
    naming what is wrong (truncated, over a bound, malformed)."""
    r = _Reader(raw)
    pcr, kind = r.unpack(_HEAD, "the Spec ID event")
    r.take(20, "the Spec ID event")
    spec = r.data("the Spec ID event")
    if kind != EV_NO_ACTION or pcr != 0 or not spec.startswith(_SPEC_SIGNATURE):
        raise EventLogError("not a crypto-agile log (no Spec ID Event03 first)")
    algorithms = _spec_algorithms(spec)
    events: list[Event] = []
    locality = 0
    while r.left():
        if len(events) >= MAX_EVENTS:
            raise EventLogError(f"more than {MAX_EVENTS} events")
        number = len(events) + 1
        pcr, kind = r.unpack(_HEAD, f"event {number}")
        if pcr >= PCR_COUNT:
            raise EventLogError(f"event {number} extends PCR {pcr}, not one of 0..23")
        (count,) = r.unpack(_U32, f"event {number}")
        if count != len(algorithms):
            raise EventLogError(
                f"event {number} has {count} digests, the log's banks are {len(algorithms)}"
            )
        digests: dict[HashAlg, bytes] = {}
        for _ in range(count):
            (alg_id,) = struct.unpack("<H", r.take(2, f"event {number}"))
            alg = next((a for a in algorithms if a == alg_id), None)
            if alg is None or alg in digests:
                raise EventLogError(
                    f"event {number} has a digest of bank 0x{alg_id:04x} twice "
                    "or outside the log's banks"
                )
            digests[alg] = r.take(DIGEST_SIZES[alg], f"event {number}")
        data = r.data(f"event {number}'s data")
        if kind == EV_NO_ACTION and data.startswith(_LOCALITY_SIGNATURE) and len(data) == 17:
            locality = data[16]
        events.append(Event(number, pcr, kind, digests, data))
    return EventLog(algorithms, tuple(events), locality)


def _spec_algorithms(spec: bytes) -> tuple[HashAlg, ...]:
    r = _Reader(spec)
    r.take(len(_SPEC_SIGNATURE) + 4 + 4, "the Spec ID event")  # platformClass, versions, uintn
    (n,) = r.unpack(_U32, "the Spec ID event")
    if not 0 < n <= len(HashAlg):
        raise EventLogError(f"the Spec ID event names {n} banks")
    algorithms: list[HashAlg] = []
    for _ in range(n):
        alg_id, size = r.unpack(_ALG, "the Spec ID event")
        try:
            alg = HashAlg(alg_id)
        except ValueError:
            raise EventLogError(f"the log uses an unknown bank 0x{alg_id:04x}") from None
        if DIGEST_SIZES[alg] != size or alg in algorithms:
            raise EventLogError(f"the Spec ID event gives bank {alg.name} twice or a wrong size")
        algorithms.append(alg)
    return tuple(algorithms)


# --------------------------------------------------------------------------
# Policy over events.


@dataclass(frozen=True)
class EventRule:
    """Events of ``type`` in PCR ``pcr`` must have one of ``digests`` (in
    the bank being checked); at least one such event must be in the log."""

    pcr: int
    type: int
    digests: frozenset[bytes]

    def describe(self) -> str:
        """How messages name this rule."""
        return f"PCR {self.pcr} {type_name(self.type)}"


@dataclass(frozen=True)
class EventLogPolicy:
    """What a policy says of event logs: the PCRs the replayed log must
    account for (their quoted values are then judged by the events, not by
    fixed values) and the rules on named events."""

    pcrs: tuple[int, ...]
    rules: tuple[EventRule, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """The stored form."""
        return {
            "pcrs": list(self.pcrs),
            "rules": [
                {
                    "pcr": r.pcr,
                    "type": type_name(r.type),
                    "digests": sorted(d.hex() for d in r.digests),
                }
                for r in self.rules
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> EventLogPolicy:
        """Parse the stored form."""
        pcrs = tuple(sorted({int(p) for p in _list(data.get("pcrs"), "event_log.pcrs")}))
        if not pcrs or any(not 0 <= p < PCR_COUNT for p in pcrs):
            raise ValueError("event_log.pcrs must name PCRs 0..23")
        rules = []
        for rule in _list(data.get("rules", []), "event_log.rules"):
            if not isinstance(rule, dict):
                raise ValueError("each event_log rule is an object")
            pcr = int(rule["pcr"])
            if pcr not in pcrs:
                raise ValueError(f"an event_log rule names PCR {pcr}, not in event_log.pcrs")
            digests = frozenset(bytes.fromhex(d) for d in _list(rule.get("digests"), "digests"))
            rules.append(EventRule(pcr, event_type(str(rule["type"])), digests))
        return cls(pcrs, tuple(rules))

    def check(self, raw: bytes, alg: HashAlg, quoted: Mapping[int, bytes]) -> None:
        """Parse ``raw``, require its replay in bank ``alg`` to equal the
        ``quoted`` value of each of :attr:`pcrs`, then every rule.  Raises
        :class:`AttestationError` (check ``event-log``) naming the PCR, or
        the event, at fault."""
        if not raw:
            raise EventLogError("the policy needs the measured-boot event log; none was sent")
        log = parse(raw)
        replayed = log.replay(alg)
        size = DIGEST_SIZES[alg]
        differ = [
            p
            for p in self.pcrs
            if p not in quoted
            or not hmac.compare_digest(replayed.get(p, log.initial(p, size)), quoted[p])
        ]
        if differ:
            raise EventLogError(
                f"the log does not replay to the quoted {alg.name.lower()} PCRs {differ}"
            )
        for rule in self.rules:
            matching = [e for e in log.events if e.pcr == rule.pcr and e.type == rule.type]
            if not matching:
                raise EventLogError(f"no {rule.describe()} event in the log")
            for event in matching:
                if event.digests[alg] not in rule.digests:
                    raise EventLogError(
                        f"{event.describe()} digest {event.digests[alg].hex()[:16]}... "
                        f"is not one the policy allows"
                    )


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list")
    return value


# --------------------------------------------------------------------------
# Writing logs: what a test (or a simulated host) extends its TPM with.


def spec_id_event(algorithms: Iterable[HashAlg]) -> bytes:
    """The first event of a log (TCG_PCR_EVENT with the Spec ID Event03)."""
    algs = list(algorithms)
    spec = (
        _SPEC_SIGNATURE
        + struct.pack("<IBBBB", 0, 0, 2, 0, 2)  # platformClass, minor, major, errata, uintnSize
        + _U32.pack(len(algs))
        + b"".join(_ALG.pack(a, DIGEST_SIZES[a]) for a in algs)
        + b"\0"  # vendorInfoSize
    )
    return _HEAD.pack(0, EV_NO_ACTION) + bytes(20) + _U32.pack(len(spec)) + spec


def event2(pcr: int, kind: int, digests: Mapping[HashAlg, bytes], data: bytes) -> bytes:
    """One TCG_PCR_EVENT2 entry."""
    return (
        _HEAD.pack(pcr, kind)
        + _U32.pack(len(digests))
        + b"".join(struct.pack("<H", a) + d for a, d in digests.items())
        + _U32.pack(len(data))
        + data
    )

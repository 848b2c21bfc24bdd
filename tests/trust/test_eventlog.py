"""Measured-boot event logs, the Keylime way: real swtpm host TPMs are
extended with the events a test writes into a TCG crypto-agile log; the
verifier replays the log sent with the quote, requires it to equal the
quoted PCRs, and judges named events instead of raw PCR values."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase, TestCase

from securemig.protocol import wire
from securemig.trust import eventlog
from securemig.trust.attest import AttestationError, Check
from securemig.trust.attestor import Attestor
from securemig.trust.eventlog import EVENT_TYPES, EventLogError, EventLogPolicy, EventRule
from securemig.trust.pki import Authority
from securemig.trust.policy import Policy
from securemig.trust.tpm import swtpm
from securemig.trust.tpm.tpm import TPM
from tests.support.tpm import shared_tpm
from tests.support.trust import attester, exchange

SHA256 = wire.HashAlg.SHA256
BOOT_APP = EVENT_TYPES["EV_EFI_BOOT_SERVICES_APPLICATION"]
SEPARATOR = EVENT_TYPES["EV_SEPARATOR"]

#: What the firmware of the lab's hosts measures: (PCR, type, what is
#: measured, event data).  PCR 4 holds the boot chain a policy names.
FIRMWARE = [
    (0, EVENT_TYPES["EV_S_CRTM_VERSION"], b"securemig lab firmware 1.0", b"1.0\0"),
    (0, EVENT_TYPES["EV_EFI_PLATFORM_FIRMWARE_BLOB"], b"firmware volume", b"\0" * 16),
    (1, EVENT_TYPES["EV_EFI_VARIABLE_BOOT"], b"BootOrder 0000", b"BootOrder"),
    (7, EVENT_TYPES["EV_EFI_VARIABLE_DRIVER_CONFIG"], b"SecureBoot=1", b"SecureBoot"),
    *[(p, SEPARATOR, b"\0\0\0\0", b"\0\0\0\0") for p in range(8)],
    (4, BOOT_APP, b"shimx64.efi 15.8", b"\\EFI\\debian\\shimx64.efi"),
    (4, BOOT_APP, b"grubx64.efi 2.12", b"\\EFI\\debian\\grubx64.efi"),
]
KERNEL = (4, BOOT_APP, b"vmlinuz-6.1.0-28-amd64", b"\\vmlinuz-6.1.0-28-amd64")
OTHER_KERNEL = (4, BOOT_APP, b"vmlinuz-6.1.0-rootkit", b"\\vmlinuz-6.1.0-28-amd64")


def digest(measured: bytes) -> bytes:
    return hashlib.sha256(measured).digest()


def write_log(events: list[tuple[int, int, bytes, bytes]]) -> bytes:
    """A crypto-agile log (SHA-256 bank) of ``events``."""
    return eventlog.spec_id_event([SHA256]) + b"".join(
        eventlog.event2(pcr, kind, {SHA256: digest(measured)}, data)
        for pcr, kind, measured, data in events
    )


def boot(tpm: TPM, events: list[tuple[int, int, bytes, bytes]]) -> bytes:
    """Extend ``tpm`` with each event's digest, as firmware does; its log."""
    for pcr, _, measured, _ in events:
        tpm.pcr_extend_digests(pcr, {int(SHA256): digest(measured)})
    return write_log(events)


_booted: dict[str, Any] = {}


def booted_host(name: str, kernel: tuple[int, int, bytes, bytes]) -> tuple[TPM, bytes]:
    """A fresh swtpm (PCRs as after power-on) booted with the lab's firmware
    and ``kernel``, once per test process; its TPM and its honest log."""
    if name not in _booted:
        import atexit
        import shutil
        import tempfile

        _, _, base = shared_tpm()
        work = Path(tempfile.mkdtemp(prefix=f"securemig-test-{name}-"))
        atexit.register(shutil.rmtree, work, True)
        swtpm.provision(work / "tpm", base / "ca")
        process = swtpm.start(work / "tpm")
        atexit.register(process.stop)
        tpm = TPM(process.tcti)
        _booted[name] = (tpm, boot(tpm, [*FIRMWARE, kernel]))
    return _booted[name]  # type: ignore[no-any-return]


def boot_policy() -> Policy:
    """The site's policy, Keylime style: PCRs 0-7 quoted and judged by the
    log (no fixed values); PCR 4's boot applications must be the allowed
    shim, GRUB and kernels; secure boot's configuration event must be there."""
    allowed = frozenset(digest(m) for _, _, m, _ in [*FIRMWARE[-2:], KERNEL])
    secure_boot = frozenset({digest(b"SecureBoot=1")})
    rules = (
        EventRule(4, BOOT_APP, allowed),
        EventRule(7, EVENT_TYPES["EV_EFI_VARIABLE_DRIVER_CONFIG"], secure_boot),
    )
    return Policy(
        (wire.PcrBank.of(SHA256, list(range(8))),),
        {},
        EventLogPolicy(tuple(range(8)), rules),
        name="lab-boot",
        hosts=("host-*",),
    )


class EventLogPolicyTests(TestCase):
    """Attestor to attestor, through the wire codec, on booted swtpms."""

    def setUp(self) -> None:
        self.pca = Authority.create("test privacy CA")
        self.verifier = attester(self, shared_tpm()[1], "verifier", self.pca)
        self.verifier.policy.add_class(boot_policy())

    def host(self, which: str, log: bytes | None) -> Attestor:
        """A host on the good (allowed kernel) or other (other kernel) TPM
        that sends ``log`` (the TPM's honest log if None)."""
        tpm, honest = booted_host(which, KERNEL if which == "good" else OTHER_KERNEL)
        host = attester(self, tpm, "host-1", self.pca)
        host.event_log = Path(self.mktemp())
        host.event_log.write_bytes(honest if log is None else log)
        return host

    def assertRefused(self, host: Attestor, *reason: str) -> AttestationError:
        with self.assertRaises(AttestationError) as cm:
            exchange(self.verifier, host)
        self.assertEqual(cm.exception.check, Check.EVENT_LOG, str(cm.exception))
        for text in reason:
            self.assertIn(text, str(cm.exception))
        return cm.exception

    def test_honest_log_accepted(self) -> None:
        """The request asks for PCRs 0-7 and the log; the log replays to
        the quoted values and every named event is allowed."""
        request = self.verifier.request_for("host-1")
        self.assertEqual(request, wire.QuoteRequest((wire.PcrBank.of(SHA256, list(range(8))),), 1))
        values = exchange(self.verifier, self.host("good", None))
        self.assertEqual(sorted(values), list(range(8)))

    def test_other_kernel_refused_by_name(self) -> None:
        """A host that booted another kernel and says so honestly (its log
        replays to its PCRs): refused, naming that event and only it."""
        number = len(FIRMWARE) + 1
        error = self.assertRefused(
            self.host("other", None),
            f"event {number} (PCR 4, EV_EFI_BOOT_SERVICES_APPLICATION) digest "
            f"{digest(OTHER_KERNEL[2]).hex()[:16]}",
            "is not one the policy allows",
        )
        self.assertEqual(str(error).count("event "), 1)

    def test_one_event_altered_refused(self) -> None:
        """The other host's log with its kernel event altered to the allowed
        kernel's digest (a lie): it no longer replays to the quoted PCR 4."""
        lie = write_log([*FIRMWARE, KERNEL])
        error = self.assertRefused(
            self.host("other", lie), "the log does not replay to the quoted sha256 PCRs [4]"
        )
        self.assertNotIn("[0", str(error))

    def test_log_of_another_host_refused(self) -> None:
        """A log that does not replay to the quoted PCRs: the good host's
        honest log with the secure boot event left out."""
        without = [e for e in FIRMWARE if e[0] != 7 or e[1] == SEPARATOR]
        self.assertRefused(
            self.host("good", write_log([*without, KERNEL])), "does not replay", "PCRs [7]"
        )

    def test_no_log_sent(self) -> None:
        """A host with no event log to send, under a policy that needs one."""
        host = self.host("good", None)
        host.event_log = None
        self.assertRefused(host, "needs the measured-boot event log; none was sent")

    def test_truncated_log_refused(self) -> None:
        _, honest = booted_host("good", KERNEL)
        self.assertRefused(self.host("good", honest[:-7]), "log truncated in event")

    def test_log_over_the_protocol_limit_not_sent(self) -> None:
        """The attester does not send a log over MAX_EVENT_LOG (its own
        error, which says so) rather than a frame the peer must refuse."""
        host = self.host("good", b"\0" * (wire.MAX_EVENT_LOG + 1))
        with self.assertRaises(Exception) as cm:
            host.evidence(os.urandom(32), self.verifier.request_for("host-1"))
        self.assertIn("over the protocol's limit", str(cm.exception))

    def test_policy_file_round_trip(self) -> None:
        """The event-log rules are data, as the rest of a policy."""
        policy = boot_policy()
        data = json.loads(json.dumps(policy.to_dict()))
        self.assertEqual(data["event_log"]["rules"][0]["type"], "EV_EFI_BOOT_SERVICES_APPLICATION")
        self.assertEqual(Policy.from_dict(data), policy)


class ParserBoundsTests(SynchronousTestCase):
    """A hostile peer writes the log: every length is bounded before use,
    and every failure is an EventLogError (an attestation refusal)."""

    honest = write_log([*FIRMWARE, KERNEL])

    def assertBad(self, raw: bytes, reason: str) -> None:
        with self.assertRaises(EventLogError) as cm:
            eventlog.parse(raw)
        self.assertIn(reason, str(cm.exception))
        self.assertEqual(cm.exception.check, Check.EVENT_LOG)

    def test_honest_log_parses_and_replays(self) -> None:
        log = eventlog.parse(self.honest)
        self.assertEqual(len(log.events), len(FIRMWARE) + 1)
        self.assertEqual(log.algorithms, (SHA256,))
        pcr4 = bytes(32)
        for pcr, _, measured, _ in [*FIRMWARE, KERNEL]:
            if pcr == 4:
                pcr4 = hashlib.sha256(pcr4 + digest(measured)).digest()
        self.assertEqual(log.replay(SHA256)[4], pcr4)

    def test_every_truncation(self) -> None:
        """Each prefix of the log either parses (it ends between events) or
        is refused as truncated: never another exception."""
        boundaries = 0
        for n in range(len(self.honest)):
            try:
                eventlog.parse(self.honest[:n])
                boundaries += 1
            except EventLogError as e:
                self.assertTrue(
                    "truncated" in str(e) or "not a crypto-agile" in str(e) or "banks" in str(e),
                    str(e),
                )
        self.assertEqual(boundaries, len(FIRMWARE) + 1)  # after the Spec ID event and each event

    def test_oversized_event_data(self) -> None:
        """An event whose length says 4 GiB: refused from the length field."""
        event = struct.pack("<III", 4, BOOT_APP, 1) + struct.pack("<H", SHA256) + bytes(32)
        self.assertBad(
            eventlog.spec_id_event([SHA256]) + event + struct.pack("<I", 0xFFFFFFFF),
            "over the limit of 65536",
        )

    def test_data_longer_than_the_log(self) -> None:
        event = struct.pack("<III", 4, BOOT_APP, 1) + struct.pack("<H", SHA256) + bytes(32)
        self.assertBad(
            eventlog.spec_id_event([SHA256]) + event + struct.pack("<I", 100) + b"x",
            "truncated in event 1's data",
        )

    def test_too_many_events(self) -> None:
        event = eventlog.event2(16, SEPARATOR, {SHA256: bytes(32)}, b"")
        self.assertBad(
            eventlog.spec_id_event([SHA256]) + event * (eventlog.MAX_EVENTS + 1),
            f"more than {eventlog.MAX_EVENTS} events",
        )

    def test_digest_counts_and_banks(self) -> None:
        spec = eventlog.spec_id_event([SHA256])
        two = eventlog.event2(4, BOOT_APP, {SHA256: bytes(32), wire.HashAlg.SHA1: bytes(20)}, b"")
        self.assertBad(spec + two, "has 2 digests, the log's banks are 1")
        sha1 = eventlog.event2(4, BOOT_APP, {wire.HashAlg.SHA1: bytes(20)}, b"")
        self.assertBad(spec + sha1, "outside the log's banks")
        self.assertBad(spec + eventlog.event2(24, SEPARATOR, {SHA256: bytes(32)}, b""), "PCR 24")

    def test_spec_id_event(self) -> None:
        self.assertBad(b"", "truncated in the Spec ID event")
        self.assertBad(struct.pack("<II", 0, SEPARATOR) + self.honest[8:], "not a crypto-agile log")
        spec = bytearray(eventlog.spec_id_event([SHA256]))
        # numberOfAlgorithms (after the 32-byte header, signature and 8 bytes)
        struct.pack_into("<I", spec, 32 + 16 + 8, 1000)
        self.assertBad(bytes(spec), "names 1000 banks")
        spec = bytearray(eventlog.spec_id_event([SHA256]))
        struct.pack_into("<H", spec, 32 + 16 + 12 + 2, 20)  # SHA-256 said to be 20 bytes
        self.assertBad(bytes(spec), "wrong size")

    def test_startup_locality(self) -> None:
        """A StartupLocality event sets PCR 0's initial value (PC Client PFP)."""
        locality = eventlog.event2(
            0, eventlog.EV_NO_ACTION, {SHA256: bytes(32)}, b"StartupLocality\0\x03"
        )
        pcr, kind, measured, data = FIRMWARE[0]
        crtm = eventlog.event2(pcr, kind, {SHA256: digest(measured)}, data)
        log = eventlog.parse(eventlog.spec_id_event([SHA256]) + locality + crtm)
        self.assertEqual(log.startup_locality, 3)
        start = bytes(31) + b"\x03"
        expected = hashlib.sha256(start + digest(measured)).digest()
        self.assertEqual(log.replay(SHA256)[0], expected)


class ReferenceParserTests(SynchronousTestCase):
    """Checked against an outside tool: tpm2-tools' `tpm2_eventlog` reads
    the logs this module writes, and replays them to the same PCR values."""

    def test_replay_agrees_with_tpm2_eventlog(self) -> None:
        tool = shutil.which("tpm2_eventlog")
        if tool is None:
            self.fail("tpm2_eventlog not found: install the Debian package tpm2-tools")
        banks = [wire.HashAlg.SHA1, SHA256]
        events = [
            (0, EVENT_TYPES["EV_S_CRTM_VERSION"], b"1.0\0"),
            (0, EVENT_TYPES["EV_POST_CODE"], b"POST CODE"),
            (4, EVENT_TYPES["EV_EFI_ACTION"], b"Calling EFI Application from Boot Option"),
            *[(p, SEPARATOR, b"\0\0\0\0") for p in range(8)],
            (8, EVENT_TYPES["EV_IPL"], b"grub_cmd: linux /vmlinuz root=/dev/sda1\0"),
        ]
        raw = eventlog.spec_id_event(banks) + b"".join(
            eventlog.event2(p, t, {a: _hash(a, d) for a in banks}, d) for p, t, d in events
        )
        path = Path(self.mktemp())
        path.write_bytes(raw)
        result = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
        self.assertEqual(result.returncode, 0, result.stderr)
        theirs: dict[str, dict[int, str]] = {}
        bank = ""
        for line in result.stdout.split("\npcrs:\n", 1)[1].splitlines():
            if line.strip().endswith(":") and not line.strip()[0].isdigit():
                bank = line.strip()[:-1]
            elif ":" in line:
                pcr, value = line.split(":")
                theirs.setdefault(bank, {})[int(pcr)] = value.strip().removeprefix("0x")
        log = eventlog.parse(raw)
        for alg in banks:
            ours = {p: v.hex() for p, v in log.replay(alg).items()}
            self.assertEqual(ours, theirs[alg.name.lower()])
        self.assertEqual(sorted(theirs), ["sha1", "sha256"])


def _hash(alg: wire.HashAlg, data: bytes) -> bytes:
    h = eventlog.new_hash(alg)
    h.update(data)
    return h.digest()  # type: ignore[no-any-return]

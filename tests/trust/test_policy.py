"""Golden values: recorded, trusted on first use, then enforced."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase, TestCase

from securemig.lab import processes
from securemig.protocol import wire
from securemig.protocol.errors import ErrorCode, PeerViolation
from securemig.trust import attest
from securemig.trust.attest import AttestationError, Check, ClockState
from securemig.trust.attestor import check_request
from securemig.trust.pki import Authority
from securemig.trust.policy import (
    Golden,
    Policy,
    PolicyStore,
    format_selection,
    parse_selection,
)
from securemig.trust.tpm import swtpm
from securemig.trust.tpm.tpm import TPM, TPMError
from tests.support.tpm import shared_tpm
from tests.support.trust import attester, exchange

PCRS = [0, 7, 16]
#: TPM names of two AKs (nameAlg SHA-256 || digest).
AK1 = b"\x00\x0b" + b"\x01" * 32
AK2 = b"\x00\x0b" + b"\x02" * 32


def values(seed: bytes) -> dict[int, bytes]:
    return {p: hashlib.sha256(seed + bytes([p])).digest() for p in PCRS}


def keyed(by_pcr: dict[int, bytes]) -> dict[tuple[int, int], bytes]:
    """SHA-256 values by (bank, PCR)."""
    return {(int(wire.HashAlg.SHA256), p): v for p, v in by_pcr.items()}


#: A host file as format 2 wrote it (before policies had selections).
FORMAT_2 = json.dumps(
    {
        "format": 2,
        "host": "host-a",
        "bank": "sha256",
        "pcrs": {str(p): v.hex() for p, v in values(b"old").items()},
        "recorded": 7.0,
        "recorded_on_first_use": False,
        "aks": {AK1.hex(): {"reset_count": 3, "restart_count": 1}},
    }
)


class PolicyStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = PolicyStore(Path(self.mktemp()))

    def test_unknown_host_without_tofu_refused(self) -> None:
        with self.assertRaises(AttestationError) as cm:
            self.store.expected("host-a", tofu=False)
        self.assertEqual(cm.exception.check, Check.GOLDEN_VALUES)

    def test_tofu_records_then_enforces(self) -> None:
        """First use records the values, marked as such; a later difference
        does not replace them; the counters are kept per AK."""
        self.assertIsNone(self.store.expected("host-a", tofu=True))
        self.assertTrue(self.store.seen("host-a", AK1, values(b"good"), ClockState(1, 0)))
        policy = self.store.expected("host-a", tofu=True)
        assert policy is not None
        self.assertEqual(policy.banks, (wire.PcrBank.of(wire.HashAlg.SHA256, PCRS),))
        self.assertTrue(policy.first_use)
        golden = self.store.get("host-a")
        assert golden is not None
        self.assertEqual(golden.pcrs, values(b"good"))
        self.assertFalse(self.store.seen("host-a", AK1, values(b"evil"), ClockState(2, 0)))
        golden = self.store.get("host-a")
        assert golden is not None
        self.assertEqual(golden.pcrs, values(b"good"))
        self.assertEqual(golden.clocks, {AK1: ClockState(2, 0)})

    def test_counters_per_ak(self) -> None:
        """A second AK of the host gets a history of its own; the first AK's
        stays; the golden values are the host's."""
        self.store.record("host-a", values(b"good"))
        self.store.seen("host-a", AK1, values(b"good"), ClockState(900, 7))
        self.store.seen("host-a", AK2, values(b"good"), ClockState(3, 0))
        self.assertEqual(self.store.previous("host-a", AK1), ClockState(900, 7))
        self.assertEqual(self.store.previous("host-a", AK2), ClockState(3, 0))
        self.assertIsNone(self.store.previous("host-a", b"\x00\x0b" + b"\x03" * 32))
        self.assertIsNone(self.store.previous("host-b", AK1))
        self.assertEqual(self.store.get("host-a").pcrs, values(b"good"))  # type: ignore

    def test_record_keeps_counters_and_clears_first_use(self) -> None:
        """Recording known-good values replaces values trusted on first use
        (no longer marked) and keeps what was seen of the host's TPM."""
        self.store.seen("host-a", AK1, values(b"first"), ClockState(5, 1))
        golden = self.store.record("host-a", values(b"known-good"))
        self.assertFalse(golden.first_use)
        self.assertEqual(golden.clocks, {AK1: ClockState(5, 1)})
        self.assertNotIn(b"recorded on first use (--tofu)", golden.to_json())

    def test_first_use_is_marked_in_the_file(self) -> None:
        """What `policy show` prints says the values were never verified."""
        self.store.seen("host-a", AK1, values(b"first"), ClockState(5, 1))
        shown = json.loads((self.store.directory / "host-a.json").read_bytes())
        self.assertIs(shown["policy"]["recorded_on_first_use"], True)
        self.assertIn("not verified", shown["policy"]["warning"])
        self.assertEqual(shown["aks"], {AK1.hex(): {"reset_count": 5, "restart_count": 1}})

    def test_format_1_is_read(self) -> None:
        """A file written before counters were per AK: its values are kept,
        its host-wide counters (seen through some unknown AK) dropped, and
        the next save writes format 3."""
        old = {
            "host": "host-a",
            "bank": "sha256",
            "pcrs": {str(p): v.hex() for p, v in values(b"x").items()},
            "clock": {"reset_count": 4000000000, "restart_count": 9},
            "recorded": 5.0,
        }
        (self.store.directory / "host-a.json").write_text(json.dumps(old))
        golden = self.store.get("host-a")
        assert golden is not None
        self.assertEqual((golden.pcrs, golden.recorded, golden.clocks), (values(b"x"), 5.0, {}))
        self.assertIsNone(self.store.previous("host-a", AK1))
        self.store.seen("host-a", AK1, values(b"x"), ClockState(1, 0))
        saved = json.loads((self.store.directory / "host-a.json").read_bytes())
        self.assertEqual(saved["format"], 3)
        self.assertNotIn("clock", saved)

    def test_unknown_format_refused(self) -> None:
        golden = Golden("host-a", Policy.recorded_now(keyed(values(b"x"))))
        bad = json.loads(golden.to_json())
        bad["format"] = 4
        self.assertRaises(ValueError, Golden.from_json, json.dumps(bad).encode())

    def test_forget(self) -> None:
        self.store.record("host-a", values(b"x"))
        self.assertTrue(self.store.forget("host-a"))
        self.assertIsNone(self.store.get("host-a"))
        self.assertFalse(self.store.forget("host-a"))

    def test_host_name_is_not_a_path(self) -> None:
        self.assertRaises(ValueError, self.store.get, "../../etc/passwd")

    def test_round_trip_and_bad_bank(self) -> None:
        policy = Policy.recorded_now(keyed(values(b"x")), first_use=True)
        golden = Golden("host-a", policy, {AK1: ClockState(3, 4)})
        self.assertEqual(Golden.from_json(golden.to_json()), golden)
        bad = json.loads(golden.to_json())
        bad["policy"]["selection"] = {"md5": [0]}
        self.assertRaises(ValueError, Golden.from_json, json.dumps(bad).encode())
        old = json.loads(FORMAT_2)
        old["bank"] = "sha1"
        self.assertRaises(ValueError, Golden.from_json, json.dumps(old).encode())


class RecordedFromTPMTests(TestCase):
    """`securemig policy record` reads a real TPM; a PCR extended later is
    refused by the verifier against those values."""

    def test_record_then_extend(self) -> None:
        _, tpm, _ = shared_tpm()
        policy_dir = Path(self.mktemp())
        result = processes.securemig(
            "policy",
            "record",
            "--policy-dir",
            str(policy_dir),
            "--host",
            "host-a",
            "--tpm",
            tpm.tcti,
            "--pcrs",
            "0,7,16",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        golden = PolicyStore(policy_dir).get("host-a")
        assert golden is not None
        ak = tpm.create_ak()
        tpm.pcr_extend(16, b"unexpected software")
        quote = tpm.quote(ak, PCRS, b"n" * 32)
        with self.assertRaises(AttestationError) as cm:
            attest.verify_quote(
                ak.public,
                quote.attest,
                quote.signature,
                qualifying=b"n" * 32,
                pcrs=PCRS,
                values=tpm.pcr_read(PCRS),
                golden=golden.pcrs,
            )
        self.assertEqual(cm.exception.check, Check.GOLDEN_VALUES)
        shown = processes.securemig("policy", "show", "--policy-dir", str(policy_dir))
        self.assertIn('"host": "host-a"', shown.stdout)


class PolicyDirectoryGoneTests(SynchronousTestCase):
    def test_directory_removed_under_a_store(self) -> None:
        """An identity replaced under a running daemon takes IDENTITY/policy
        aside: the store starts a new one rather than failing."""
        directory = Path(self.mktemp())
        store = PolicyStore(directory)
        directory.rmdir()
        store.seen("host-a", AK1, values(b"x"), ClockState(1, 0))
        self.assertIsNotNone(PolicyStore(directory).get("host-a"))


# --------------------------------------------------------------------------
# Policies as data: the selection travels in the challenge, classes of hosts.

SHA256 = int(wire.HashAlg.SHA256)
SHA1 = int(wire.HashAlg.SHA1)


class RecordedSelectionTests(TestCase):
    """The done-when cases of issue 13: a policy recorded with `securemig
    policy record` on an unchanged host accepts it whatever PCRs it selects;
    a PCR outside the selection is ignored, one inside named."""

    def setUp(self) -> None:
        _, self.tpm, _ = shared_tpm()
        self.pca = Authority.create("test privacy CA")
        self.host = attester(self, self.tpm, "host-b", self.pca)
        self.verifier = attester(self, self.tpm, "host-a", self.pca)

    def record(self, pcrs: str, *extra: str) -> None:
        result = processes.securemig(
            "policy",
            "record",
            "--policy-dir",
            str(self.verifier.policy.directory),
            "--host",
            "host-b",
            "--tpm",
            self.tpm.tcti,
            "--pcrs",
            pcrs,
            *extra,
        )
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_0_to_5_and_7_accepts_the_unchanged_host(self) -> None:
        """Before, PCRs 0-4,7 were quoted whatever was recorded: "PCRs [5] differ"."""
        self.record("0-5,7")
        request = self.verifier.request_for("host-b")
        self.assertEqual(
            request.banks, (wire.PcrBank.of(wire.HashAlg.SHA256, [0, 1, 2, 3, 4, 5, 7]),)
        )
        self.assertEqual(sorted(exchange(self.verifier, self.host)), [0, 1, 2, 3, 4, 5, 7])

    def test_0_and_7_accepts_the_unchanged_host(self) -> None:
        """Before: "PCRs [1, 2, 3, 4] differ"."""
        self.record("0,7")
        self.assertEqual(sorted(exchange(self.verifier, self.host)), [0, 7])

    def test_outside_the_selection_ignored_inside_named(self) -> None:
        """PCR 23 changes: a policy of 0,7 does not even ask for it; one of
        0,7,16,23 names PCR 23 and only it (16 unchanged)."""
        self.record("0,7")
        self.tpm.pcr_extend(23, b"outside the selection " + os.urandom(8))
        exchange(self.verifier, self.host)
        self.record("0,7,16,23")
        self.tpm.pcr_extend(23, b"inside the selection " + os.urandom(8))
        with self.assertRaises(AttestationError) as cm:
            exchange(self.verifier, self.host)
        self.assertEqual(cm.exception.check, Check.GOLDEN_VALUES)
        self.assertIn("PCRs sha256:23 of host-b differ", str(cm.exception))
        for other in ("sha256:0", "sha256:7", "sha256:16"):
            self.assertNotIn(other, str(cm.exception))

    def test_bank_the_tpm_lacks_refused_by_the_attester(self) -> None:
        """This swtpm has the SHA-256 bank only: a request for SHA-1 PCRs is
        refused by the TPM, naming the bank, before anything is quoted."""
        sha1 = wire.QuoteRequest((wire.PcrBank.of(wire.HashAlg.SHA1, [0]),))
        with self.assertRaises(TPMError) as cm:
            self.host.evidence(os.urandom(32), sha1)
        self.assertIn("sha1", str(cm.exception))


class SillySelectionTests(SynchronousTestCase):
    """The attester refuses requests no sensible verifier makes (the wire
    codec already refuses unknown banks, PCRs over 23 and more banks than
    there are algorithms: tests/protocol/test_wire.py)."""

    def assertSilly(self, request: wire.QuoteRequest, reason: str) -> None:
        with self.assertRaises(PeerViolation) as cm:
            check_request(request)
        self.assertEqual(cm.exception.code, ErrorCode.BAD_PARAMETER)
        self.assertIn(reason, str(cm.exception))

    def test_refused(self) -> None:
        b = wire.PcrBank
        self.assertSilly(wire.QuoteRequest(()), "no PCR bank")
        sha256 = b.of(wire.HashAlg.SHA256, [0])
        self.assertSilly(wire.QuoteRequest((sha256, sha256)), "a PCR bank twice")
        self.assertSilly(wire.QuoteRequest((b(wire.HashAlg.SHA256, 0),)), "a bank with no PCR")
        sha1 = b.of(wire.HashAlg.SHA1, [0])
        self.assertSilly(wire.QuoteRequest((sha256, sha1)), "out of order")
        check_request(wire.QuoteRequest((sha1, sha256)))  # and a sensible one passes


class TwoBankTests(TestCase):
    """A TPM with SHA-1 and SHA-256 banks: a policy may select PCRs of both
    (the quote covers both, in the policy's order); a change is named per bank."""

    def setUp(self) -> None:
        _, _, base = shared_tpm()
        work = Path(self.mktemp())
        swtpm.provision(work / "tpm", base / "ca", pcr_banks="sha1,sha256")
        process = swtpm.start(work / "tpm")
        self.addCleanup(process.stop)
        self.tpm = TPM(process.tcti)
        self.addCleanup(self.tpm.close)
        self.pca = Authority.create("test privacy CA")
        self.host = attester(self, self.tpm, "host-b", self.pca)
        self.verifier = attester(self, self.tpm, "host-a", self.pca)

    def test_both_banks(self) -> None:
        banks = parse_selection("sha1:0,16+sha256:0-4,7,16")
        self.verifier.policy.record("host-b", Policy.recorded_now(self.tpm.pcr_values(banks)))
        request = self.verifier.request_for("host-b")
        self.assertEqual([b.alg for b in request.banks], [wire.HashAlg.SHA1, wire.HashAlg.SHA256])
        exchange(self.verifier, self.host)
        self.tpm.pcr_extend_digests(16, {SHA1: bytes(20), SHA256: bytes(32)})
        with self.assertRaises(AttestationError) as cm:
            exchange(self.verifier, self.host)
        self.assertIn("PCRs sha1:16, sha256:16 of host-b differ", str(cm.exception))


class ClassPolicyTests(SynchronousTestCase):
    """Policies attach to classes of hosts; the most specific wins."""

    def setUp(self) -> None:
        self.store = PolicyStore(Path(self.mktemp()))

    def policy(self, name: str, seed: bytes, **kw: Any) -> Policy:
        return Policy.recorded_now(keyed(values(seed)), name=name, **kw)

    def test_precedence(self) -> None:
        self.store.add_class(self.policy("all", b"a", hosts=("*",)))
        self.store.add_class(self.policy("compute", b"c", hosts=("compute-*",)))
        self.store.add_class(self.policy("gpu", b"g", labels=("gpu",)))
        (self.store.directory / "labels.json").write_text('{"render-1": ["gpu"]}')
        self.assertEqual(self.store.policy_for("compute-07").name, "compute")  # type: ignore
        self.assertEqual(self.store.policy_for("storage-1").name, "all")  # type: ignore
        # A name pattern (even "*") is more specific than a label.
        self.assertEqual(self.store.policy_for("render-1").name, "all")  # type: ignore
        self.store.forget_class("all")
        self.assertEqual(self.store.policy_for("render-1").name, "gpu")  # type: ignore
        self.assertIsNone(self.store.policy_for("storage-1"))
        # An exact name beats any pattern; the host's own policy beats both.
        self.store.add_class(self.policy("special", b"s", hosts=("compute-07",)))
        self.assertEqual(self.store.policy_for("compute-07").name, "special")  # type: ignore
        self.store.record("compute-07", values(b"own"))
        own = self.store.policy_for("compute-07")
        assert own is not None
        self.assertEqual(own.values[(SHA256, 0)], {values(b"own")[0]})

    def test_equal_policies_refused_naming_both(self) -> None:
        self.store.add_class(self.policy("one", b"1", hosts=("compute-?",)))
        self.store.add_class(self.policy("two", b"2", hosts=("compute?1",)))
        with self.assertRaises(AttestationError) as cm:
            self.store.expected("compute-1", tofu=True)
        self.assertIn("'one' and 'two' apply to compute-1 equally", str(cm.exception))

    def test_class_judges_without_first_use(self) -> None:
        """A host a class policy covers is judged by it: nothing is recorded
        on first use, only its counters."""
        self.store.add_class(self.policy("compute", b"c", hosts=("compute-*",)))
        self.assertFalse(self.store.seen("compute-1", AK1, values(b"c"), ClockState(1, 0)))
        golden = self.store.get("compute-1")
        assert golden is not None
        self.assertIsNone(golden.policy)
        self.assertEqual(golden.clocks, {AK1: ClockState(1, 0)})

    def test_a_policy_judges_only_what_it_names(self) -> None:
        policy = Policy.recorded_now(keyed(values(b"x")))
        changed = keyed(values(b"x"))
        changed[(SHA256, 16)] = bytes(32)
        changed[(SHA256, 5)] = bytes(32)  # not in the policy: ignored
        with self.assertRaises(AttestationError) as cm:
            policy.check(changed, b"", "host-a")
        self.assertIn("PCRs sha256:16 of host-a differ", str(cm.exception))
        self.assertNotIn("5", str(cm.exception).replace("sha256", ""))

    def test_several_accepted_values(self) -> None:
        """A class may accept each of a platform's firmware versions."""
        data = Policy.recorded_now(keyed(values(b"v1"))).to_dict()
        data["pcrs"]["sha256"]["0"] = [values(b"v1")[0].hex(), values(b"v2")[0].hex()]  # type: ignore
        policy = Policy.from_dict(data)
        policy.check({**keyed(values(b"v1")), (SHA256, 0): values(b"v2")[0]}, b"", "h")

    def test_bad_policies_refused(self) -> None:
        good = Policy.recorded_now(keyed(values(b"x"))).to_dict()
        for change, reason in (
            ({"selection": {"sha256": [0, 7, 16, 17]}}, "PCR 17 is selected but has no"),
            ({"selection": {"md5": [0]}}, "unknown PCR bank"),
            ({"selection": {"sha256": [0, 7, 16, 24]}}, "must name PCRs 0..23"),
            ({"selection": {"sha256": [0, 7]}}, "PCR 16 has a value but is not selected"),
            ({"pcrs": {"sha256": {"0": "00", "7": "00", "16": "00"}}}, "wrong size"),
        ):
            with self.assertRaises(ValueError) as cm:
                Policy.from_dict({**good, **change})
            self.assertIn(reason, str(cm.exception))
        with self.assertRaises(ValueError):
            self.store.add_class(Policy.recorded_now(keyed(values(b"x")), name="nobody"))

    def test_format_2_is_read(self) -> None:
        """A format 2 file: its values become the host's own policy selecting
        exactly those PCRs; its counters stay."""
        (self.store.directory / "host-a.json").write_text(FORMAT_2)
        golden = self.store.get("host-a")
        assert golden is not None and golden.policy is not None
        self.assertEqual(golden.policy.banks, (wire.PcrBank.of(wire.HashAlg.SHA256, PCRS),))
        self.assertEqual((golden.pcrs, golden.recorded), (values(b"old"), 7.0))
        self.assertEqual(golden.clocks, {AK1: ClockState(3, 1)})

    def test_selection_text(self) -> None:
        banks = parse_selection("sha256:0-5,7+sha1:0")
        self.assertEqual(format_selection(banks), "sha1:0+sha256:0,1,2,3,4,5,7")
        self.assertEqual(parse_selection("0,7"), parse_selection("sha256:7,0"))
        for bad in ("md5:0", "sha256:", "sha256:x", "sha256:0-30"):
            self.assertRaises(ValueError, parse_selection, bad)


class ExportImportTests(TestCase):
    """Record a class policy from a host's own TPM on that host, export it,
    import it elsewhere: it judges every host of the class."""

    def test_record_own_export_import(self) -> None:
        _, tpm, _ = shared_tpm()
        pca = Authority.create("test privacy CA")
        host = attester(self, tpm, "compute-01", pca)
        (host.identity.directory / "host.json").write_text(
            json.dumps({"name": "compute-01", "tpm": tpm.tcti})
        )
        own = str(host.identity.directory)
        steps = [
            [
                "record",
                "--identity",
                own,
                "--class",
                "compute",
                "--hosts",
                "compute-*",
                "--pcrs",
                "0-5,7,16",
            ],
            ["export", "--identity", own, "--class", "compute", "--out", str(self.mktemp())],
        ]
        results = [processes.securemig("policy", *step) for step in steps]
        for result in results:
            self.assertEqual(result.returncode, 0, result.stderr)
        exported = Path(steps[1][-1])
        data = json.loads(exported.read_bytes())
        self.assertEqual(data["recorded_from"], "compute-01")
        self.assertEqual(data["applies_to"]["hosts"], ["compute-*"])
        self.assertNotIn("aks", data)
        verifier = attester(self, tpm, "other", pca)
        imported = processes.securemig(
            "policy", "import", "--policy-dir", str(verifier.policy.directory), str(exported)
        )
        self.assertEqual(imported.returncode, 0, imported.stderr)
        self.assertEqual(sorted(exchange(verifier, host)), [0, 1, 2, 3, 4, 5, 7, 16])
        shown = processes.securemig(
            "policy", "show", "--policy-dir", str(verifier.policy.directory)
        )
        self.assertIn('"class": "compute"', shown.stdout)


class BrokenPolicyFileTests(SynchronousTestCase):
    def test_unreadable_class_policy_refuses(self) -> None:
        """A class policy file an operator broke: peers are refused (fail
        closed) with a reason naming the file, not a crash."""
        store = PolicyStore(Path(self.mktemp()))
        store.classes_dir.mkdir()
        (store.classes_dir / "compute.json").write_text('{"selection": {"sha256": "0"}}')
        with self.assertRaises(AttestationError) as cm:
            store.expected("compute-1", tofu=True)
        self.assertEqual(cm.exception.check, Check.GOLDEN_VALUES)
        self.assertIn("compute.json", str(cm.exception))

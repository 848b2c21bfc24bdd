"""Golden values: recorded, trusted on first use, then enforced."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase, TestCase

from securemig.lab import processes
from securemig.trust import attest
from securemig.trust.attest import AttestationError, Check, ClockState
from securemig.trust.policy import Golden, PolicyStore

from ..helpers import shared_tpm

PCRS = [0, 7, 16]
#: TPM names of two AKs (nameAlg SHA-256 || digest).
AK1 = b"\x00\x0b" + b"\x01" * 32
AK2 = b"\x00\x0b" + b"\x02" * 32


def values(seed: bytes) -> dict[int, bytes]:
    return {p: hashlib.sha256(seed + bytes([p])).digest() for p in PCRS}


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
        golden = self.store.expected("host-a", tofu=True)
        assert golden is not None
        self.assertEqual(golden.pcrs, values(b"good"))
        self.assertTrue(golden.first_use)
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
        self.assertIs(shown["recorded_on_first_use"], True)
        self.assertIn("not verified", shown["warning"])
        self.assertEqual(shown["aks"], {AK1.hex(): {"reset_count": 5, "restart_count": 1}})

    def test_format_1_is_read(self) -> None:
        """A file written before counters were per AK: its values are kept,
        its host-wide counters (seen through some unknown AK) dropped, and
        the next save writes format 2."""
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
        self.assertEqual(saved["format"], 2)
        self.assertNotIn("clock", saved)

    def test_unknown_format_refused(self) -> None:
        golden = Golden("host-a", values(b"x"))
        bad = json.loads(golden.to_json())
        bad["format"] = 3
        self.assertRaises(ValueError, Golden.from_json, json.dumps(bad).encode())

    def test_forget(self) -> None:
        self.store.record("host-a", values(b"x"))
        self.assertTrue(self.store.forget("host-a"))
        self.assertIsNone(self.store.get("host-a"))
        self.assertFalse(self.store.forget("host-a"))

    def test_host_name_is_not_a_path(self) -> None:
        self.assertRaises(ValueError, self.store.get, "../../etc/passwd")

    def test_round_trip_and_bad_bank(self) -> None:
        golden = Golden("host-a", values(b"x"), 5.0, True, {AK1: ClockState(3, 4)})
        self.assertEqual(Golden.from_json(golden.to_json()), golden)
        bad = json.loads(golden.to_json())
        bad["bank"] = "sha1"
        self.assertRaises(ValueError, Golden.from_json, json.dumps(bad).encode())


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

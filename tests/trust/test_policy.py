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
        """First use records the values; a later difference is refused."""
        self.assertIsNone(self.store.expected("host-a", tofu=True))
        self.store.seen("host-a", values(b"good"), ClockState(1, 0))
        golden = self.store.expected("host-a", tofu=True)
        assert golden is not None
        self.assertEqual(golden.pcrs, values(b"good"))
        self.store.seen("host-a", values(b"evil"), ClockState(2, 0))
        self.assertEqual(self.store.get("host-a").pcrs, values(b"good"))  # type: ignore
        self.assertEqual(self.store.get("host-a").clock, ClockState(2, 0))  # type: ignore

    def test_forget(self) -> None:
        self.store.record("host-a", values(b"x"))
        self.assertTrue(self.store.forget("host-a"))
        self.assertIsNone(self.store.get("host-a"))
        self.assertFalse(self.store.forget("host-a"))

    def test_host_name_is_not_a_path(self) -> None:
        self.assertRaises(ValueError, self.store.get, "../../etc/passwd")

    def test_round_trip_and_bad_bank(self) -> None:
        golden = Golden("host-a", values(b"x"), ClockState(3, 4), 5.0)
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

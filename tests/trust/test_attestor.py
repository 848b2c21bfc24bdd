"""The attestor's verifier over time: the clock counters are compared per AK
(a renewed AK starts a new history, a rolled-back TPM under the same AK is
refused), and trust on first use says so."""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from tpm2_pytss import TPMS_ATTEST
from twisted.logger import LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from securemig.lab import processes
from securemig.protocol import wire
from securemig.trust import attest
from securemig.trust.attest import AttestationError, Check, ClockState
from securemig.trust.attestor import (
    DEFAULT_PCRS,
    Attestor,
    FirstUse,
    log_first_use,
    warn_on_stderr,
)
from securemig.trust.identity import Identity
from securemig.trust.pki import Authority
from securemig.trust.policy import PolicyStore
from tests.support.tpm import shared_tpm
from tests.support.trust import Forger

PEER = "host-b"


class VerifierOverTimeTests(SynchronousTestCase):
    """Attestor.verify against quotes of a real swtpm, and against the same
    quote structures with chosen counters, re-signed by a software 'AK'
    (a genuine TPM never signs counters lower than it has)."""

    def setUp(self) -> None:
        _, self.tpm, _ = shared_tpm()
        self.pca = Authority.create("test privacy CA")
        self.first_uses: list[FirstUse] = []
        self.attestor = self.verifier(tofu=False)
        self.values = self.tpm.pcr_read(DEFAULT_PCRS)
        self.attestor.policy.record(PEER, self.values)

    def verifier(self, tofu: bool, policy: Path | None = None) -> Attestor:
        return Attestor(
            Identity(Path("unused"), "host-a", "unused"),
            self.tpm,
            PolicyStore(policy or Path(self.mktemp())),
            self.pca.cert,
            tofu,
            on_first_use=self.first_uses.append,
        )

    def certificate(self, ak_public: bytes, host: str = PEER) -> bytes:
        cert = self.pca.issue(attest.check_ak(ak_public), host, tls=False)
        return cert.public_bytes(Encoding.DER)

    def genuine(self, nonce: bytes) -> tuple[wire.Evidence, ClockState]:
        """A quote of the swtpm by a fresh AK, and the counters it shows."""
        ak = self.tpm.create_ak()
        quote = self.tpm.quote(ak, DEFAULT_PCRS, nonce)
        parsed, _ = TPMS_ATTEST.unmarshal(quote.attest)
        clock = ClockState(int(parsed.clockInfo.resetCount), int(parsed.clockInfo.restartCount))
        return self.evidence(quote.attest, quote.signature, ak.public), clock

    def evidence(self, attest_: bytes, signature: bytes, ak_public: bytes) -> wire.Evidence:
        return wire.Evidence(
            attest=attest_,
            signature=signature,
            pcrs=tuple(wire.PcrValue(p, v) for p, v in sorted(self.values.items())),
            ak_public=ak_public,
            ak_certificate=self.certificate(ak_public),
        )

    def forged(self, forger: Forger, nonce: bytes, reset: int, restart: int) -> wire.Evidence:
        """A genuine quote's structure for ``nonce`` with these counters,
        signed by ``forger`` (certified by the privacy CA like any AK)."""
        quote = self.tpm.quote(self.tpm.create_ak(), DEFAULT_PCRS, nonce)
        parsed, _ = TPMS_ATTEST.unmarshal(quote.attest)
        parsed.clockInfo.resetCount = reset
        parsed.clockInfo.restartCount = restart
        raw = bytes(parsed.marshal())
        return self.evidence(raw, forger.sign(raw), forger.public)

    def verify(
        self, evidence: wire.Evidence, nonce: bytes, attestor: Attestor | None = None
    ) -> Any:
        return (attestor or self.attestor).verify(evidence, nonce, PEER)

    def assertClockRefused(self, evidence: wire.Evidence, nonce: bytes) -> None:
        with self.assertRaises(AttestationError) as cm:
            self.verify(evidence, nonce)
        self.assertEqual(cm.exception.check, Check.CLOCK, str(cm.exception))
        self.assertIn("went backwards", str(cm.exception))

    def test_counters_kept_per_ak_name(self) -> None:
        """What is remembered is keyed by the AK's TPM name."""
        nonce = os.urandom(32)
        evidence, clock = self.genuine(nonce)
        self.assertEqual(self.verify(evidence, nonce), self.values)
        name = attest.ak_name(evidence.ak_public)
        self.assertEqual(self.attestor.policy.previous(PEER, name), clock)

    def test_renewed_ak_starts_a_new_history(self) -> None:
        """Five AKs of one TPM, each showing the counters through its own
        offset (some lower than the last AK's): all accepted, as after five
        `host renew`s; the golden values stay."""
        clocks = []
        for _ in range(5):
            nonce = os.urandom(32)
            evidence, clock = self.genuine(nonce)
            self.verify(evidence, nonce)
            clocks.append(clock)
        self.assertEqual(len(self.attestor.policy.get(PEER).clocks), 5)  # type: ignore
        self.assertEqual(self.attestor.policy.get(PEER).pcrs, self.values)  # type: ignore
        # The point of keying by AK: each shows the counters its own way
        # (lower ones deterministically: test_new_ak_with_lower_counters_accepted).
        self.assertEqual(len({c.reset_count for c in clocks}), 5)

    def test_new_ak_with_lower_counters_accepted(self) -> None:
        """The exact input the per-host check refused: a new AK whose
        counters are lower than the previous AK's."""
        high, low = Forger.create(), Forger.create()
        nonce = os.urandom(32)
        self.verify(self.forged(high, nonce, 1000, 5), nonce)
        nonce = os.urandom(32)
        self.verify(self.forged(low, nonce, 10, 0), nonce)

    def test_reset_count_rolled_back_under_same_ak_refused(self) -> None:
        """The same AK later showing a lower reset count (its TPM rolled back
        to an older state): refused."""
        ak = Forger.create()
        nonce = os.urandom(32)
        self.verify(self.forged(ak, nonce, 1000, 5), nonce)
        nonce = os.urandom(32)
        self.assertClockRefused(self.forged(ak, nonce, 999, 5), nonce)
        # Still refused after another AK was seen in between.
        nonce = os.urandom(32)
        self.verify(self.forged(Forger.create(), nonce, 1, 0), nonce)
        nonce = os.urandom(32)
        self.assertClockRefused(self.forged(ak, nonce, 999, 9), nonce)

    def test_restart_count_rolled_back_under_same_ak_refused(self) -> None:
        ak = Forger.create()
        nonce = os.urandom(32)
        self.verify(self.forged(ak, nonce, 1000, 5), nonce)
        nonce = os.urandom(32)
        self.assertClockRefused(self.forged(ak, nonce, 1000, 4), nonce)
        # Equal or higher is fine.
        nonce = os.urandom(32)
        self.verify(self.forged(ak, nonce, 1000, 5), nonce)
        nonce = os.urandom(32)
        self.verify(self.forged(ak, nonce, 1001, 0), nonce)

    def test_tofu_reports_the_first_use_once(self) -> None:
        """An unknown peer under tofu: its values are recorded and the
        report names the peer, the AK and the values; the next attestation
        is checked against them and reports nothing."""
        attestor = self.verifier(tofu=True)
        nonce = os.urandom(32)
        evidence, _ = self.genuine(nonce)
        self.verify(evidence, nonce, attestor)
        self.assertEqual(
            self.first_uses, [FirstUse(PEER, attest.ak_name(evidence.ak_public), self.values)]
        )
        self.assertTrue(attestor.policy.get(PEER).first_use)  # type: ignore
        nonce = os.urandom(32)
        evidence, _ = self.genuine(nonce)
        self.verify(evidence, nonce, attestor)
        self.assertEqual(len(self.first_uses), 1)

    def test_known_peer_reports_no_first_use(self) -> None:
        nonce = os.urandom(32)
        evidence, _ = self.genuine(nonce)
        self.verify(
            evidence, nonce, self.verifier(tofu=True, policy=self.attestor.policy.directory)
        )
        self.assertEqual(self.first_uses, [])

    def test_failed_attestation_records_nothing(self) -> None:
        """Under tofu, a quote that fails a check records no values."""
        attestor = self.verifier(tofu=True)
        nonce = os.urandom(32)
        evidence, _ = self.genuine(nonce)
        self.assertRaises(AttestationError, self.verify, evidence, os.urandom(32), attestor)
        self.assertIsNone(attestor.policy.get(PEER))
        self.assertEqual(self.first_uses, [])


class FirstUseReportTests(SynchronousTestCase):
    """The words trust on first use says, in the log and on stderr."""

    first_use = FirstUse(PEER, b"\x00\x0b" + bytes(range(32)), {0: b"\x11" * 32, 7: b"\x77" * 32})

    def test_text_names_peer_ak_and_values(self) -> None:
        text = "\n".join(self.first_use.lines())
        self.assertIn("trust on first use", text)
        self.assertIn("WITHOUT verifying", text)
        self.assertIn(PEER, text)
        self.assertIn("AK 000b000102030405", text)
        self.assertIn(f"PCR  0 sha256 {'11' * 32}", text)
        self.assertIn(f"PCR  7 sha256 {'77' * 32}", text)

    def test_logged_as_a_warning(self) -> None:
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        log_first_use(self.first_use)
        (event,) = [e for e in events if e.get("peer") == PEER]
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["ak_name"], self.first_use.ak_name.hex())
        self.assertEqual(event["pcrs"], {"0": "11" * 32, "7": "77" * 32})
        self.assertIn("trust on first use", event["detail"])

    def test_stderr(self) -> None:
        err = io.StringIO()
        with redirect_stderr(err):
            warn_on_stderr(self.first_use)
        lines = err.getvalue().splitlines()
        self.assertEqual(len(lines), 3)
        self.assertTrue(all(line.startswith("securemig: WARNING: ") for line in lines))


class PolicyShowTests(SynchronousTestCase):
    def test_show_marks_first_use(self) -> None:
        """`securemig policy show` prints which values nobody verified."""
        store = PolicyStore(Path(self.mktemp()))
        store.seen(PEER, b"\x00\x0b" + b"\x01" * 32, {0: b"\x00" * 32}, ClockState(1, 0))
        store.record("host-c", {0: b"\x00" * 32})
        shown = processes.securemig("policy", "show", "--policy-dir", str(store.directory))
        self.assertEqual(shown.returncode, 0, shown.stderr)
        by_host = {o["host"]: o for o in _objects(shown.stdout)}
        self.assertIs(by_host[PEER]["policy"]["recorded_on_first_use"], True)
        self.assertIn("not verified", by_host[PEER]["policy"]["warning"])
        self.assertIs(by_host["host-c"]["policy"]["recorded_on_first_use"], False)
        self.assertNotIn("warning", by_host["host-c"]["policy"])


def _objects(text: str) -> list[dict[str, Any]]:
    """The JSON objects printed one after another."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, end = decoder.raw_decode(text, i)
        out.append(obj)
        i = end
    return out

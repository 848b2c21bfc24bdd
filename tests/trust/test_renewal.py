"""End to end on a lab (two swtpm hosts, a real `twistd securemig-pca` over
HTTPS, `twistd securemig` destinations, `securemig migrate` sources): a
host renews its AK five times and still migrates both ways; `host init
--force` too; trust on first use says so on the source's stderr and in the
destination's log."""

from __future__ import annotations

from tpm2_pytss.constants import TPM2_ALG

from securemig.lab import processes
from securemig.lab.lab import DESTINATION, SOURCE
from securemig.trust.identity import kept_aside
from securemig.trust.policy import PolicyStore
from securemig.trust.tpm.tpm import KeyBlob
from tests.support.lab import LabBase

FIRST_USE = "securemig: WARNING: trust on first use: recorded the PCR values of"


class RenewalTests(LabBase):
    def test_five_renewals_each_followed_by_migrations_both_ways(self) -> None:
        """Counters per AK: each renewal gives source-a an AK whose counters
        dest-b has never seen (through a new offset, lower about half the
        time); every migration succeeds, no values are recorded again, the
        golden values stay."""
        self.round_trip()
        golden = PolicyStore(self.work / DESTINATION / "policy").get(SOURCE)
        assert golden is not None
        for i in range(5):
            result = self.renew()
            self.assertIn(f"host {SOURCE} renewed", result.stdout)
            self.assertIn("new attestation key", result.stdout)
            # Half the time the daemon keeps running: its quotes use the new
            # AK at once (TLS keeps the old, still valid, certificate).
            if i % 2:
                self.restart_home()
            out, back = self.round_trip()
            self.assertNotIn(FIRST_USE, out + back)
        self.assertEqual(len(kept_aside(self.work / SOURCE)), 5)
        # dest-b saw six AKs of source-a, as destination and as source alike.
        self.assertEqual(len(self.ak_names_seen(DESTINATION, SOURCE)), 6)
        after = PolicyStore(self.work / DESTINATION / "policy").get(SOURCE)
        assert after is not None
        self.assertEqual((after.pcrs, after.recorded), (golden.pcrs, golden.recorded))
        # source-a's own view of dest-b moved along with each renewal.
        self.assertEqual(len(self.ak_names_seen(SOURCE, DESTINATION)), 1)

    def test_host_init_force_then_migrations(self) -> None:
        """`host init` again on an initialised host: refused; with --force,
        a new identity (new AK) that peers accept; the old one aside."""
        self.round_trip()
        args = self.source_init_args()
        before = (self.work / SOURCE / "ak.blob").read_bytes()
        refused = processes.securemig(*args)
        self.assertEqual(refused.returncode, 1, refused.stderr)
        self.assertIn("already holds an identity", refused.stderr)
        self.assertEqual((self.work / SOURCE / "ak.blob").read_bytes(), before)
        forced = processes.securemig(*args, "--force")
        self.assertEqual(forced.returncode, 0, forced.stderr)
        (aside,) = kept_aside(self.work / SOURCE)
        self.assertIn(str(aside), forced.stdout)
        self.assertEqual((aside / "ak.blob").read_bytes(), before)
        self.restart_home()
        out, _ = self.round_trip()
        # A replaced identity starts without golden values of its peers
        # (they went aside with the old one): trusted on first use again.
        self.assertIn(f"{FIRST_USE} {DESTINATION}", out)
        self.assertEqual(len(self.ak_names_seen(DESTINATION, SOURCE)), 2)


class TrustOnFirstUseTests(LabBase):
    def test_tofu_migration_says_so(self) -> None:
        """The first secure migration between two hosts that know nothing of
        each other: the source prints a warning naming the destination, its
        AK and the values; the destination logs one naming the source; the
        policy files say so; the next migration warns no more."""
        out, back = self.round_trip()
        lines = out.splitlines()
        (first,) = [line for line in lines if line.startswith(FIRST_USE)]
        self.assertIn(f"{FIRST_USE} {DESTINATION} (AK 000b", first)
        self.assertIn("WITHOUT verifying them", first)
        golden = PolicyStore(self.work / SOURCE / "policy").get(DESTINATION)
        assert golden is not None and golden.first_use
        for pcr, value in golden.pcrs.items():
            self.assertIn(f"securemig: WARNING:   PCR {pcr:2d} sha256 {value.hex()}", lines)
        (ak,) = golden.clocks
        self.assertIn(f"(AK {ak.hex()[:16]})", first)
        log = self.at[DESTINATION].log()
        self.assertIn(f"trust on first use: recorded the PCR values of {SOURCE} (AK 000b", log)
        # On the way back each side already knows the other: a host's source
        # and destination share its policy directory (IDENTITY/policy).
        self.assertNotIn("trust on first use", back + self.at[SOURCE].log())
        shown = processes.securemig(
            "policy", "show", "--policy-dir", str(self.work / SOURCE / "policy")
        )
        self.assertIn('"recorded_on_first_use": true', shown.stdout)
        out, back = self.round_trip()
        self.assertNotIn("trust on first use", out + back)


class AlgorithmTests(LabBase):
    def test_pss_ak_end_to_end(self) -> None:
        """source-a re-initialised with an RSASSA-PSS AK (`host init --force
        --ak rsa-pss`): enrolled over HTTPS, its quotes accepted by dest-b
        and its view of dest-b intact, both ways; `host renew` keeps PSS."""
        self.round_trip()
        args = [*self.source_init_args(), "--force", "--ak", "rsa-pss"]
        forced = processes.securemig(*args)
        self.assertEqual(forced.returncode, 0, forced.stderr)
        self.assertEqual(self.ak_scheme(), "rsapss")
        self.restart_home()
        self.round_trip()
        self.renew()
        self.assertEqual(self.ak_scheme(), "rsapss")
        self.round_trip()

    def ak_scheme(self) -> str:
        blob = KeyBlob.from_bytes((self.work / SOURCE / "ak.blob").read_bytes())
        area = blob.public_area.publicArea
        return str(TPM2_ALG(area.parameters.rsaDetail.scheme.scheme))

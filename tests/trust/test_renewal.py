"""End to end on a lab (two swtpm hosts, a real `twistd securemig-pca` over
HTTPS, `twistd securemig` destinations, `securemig migrate` sources): a
host renews its AK five times and still migrates both ways; `host init
--force` too; trust on first use says so on the source's stderr and in the
destination's log."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tpm2_pytss.constants import TPM2_ALG
from twisted.trial.unittest import TestCase

from securemig.lab import processes
from securemig.lab.lab import DESTINATION, SOURCE, Lab
from securemig.trust.identity import kept_aside
from securemig.trust.policy import PolicyStore
from securemig.trust.tpm.tpm import KeyBlob

FIRST_USE = "securemig: WARNING: trust on first use: recorded the PCR values of"


class LabBase(TestCase):
    """A lab per test, a destination on each host, one secure VM at source-a."""

    #: More options of both hosts' ``twistd securemig``.
    daemon_options: tuple[str, ...] = ()

    def setUp(self) -> None:
        self.work = Path(self.mktemp()).absolute()
        self.work.mkdir(parents=True)
        self.lab = Lab(self.work)
        self.addCleanup(self.lab.stop)
        self.lab.start()
        self.pca_url = f"https://localhost:{int((self.work / 'pca.port').read_text())}"
        self.at = {
            DESTINATION: self.lab.start_destination(extra=self.daemon_options),
            SOURCE: self.lab.start_destination(host=SOURCE, keep=False, extra=self.daemon_options),
        }
        self.addCleanup(lambda: self.at[SOURCE].stop())
        self.lab.create_vm("vm1", 4, 2, secure=True)
        self.vm_dir = {SOURCE: self.lab.vm_dir}

    def migrate(self, source: str, to: str) -> subprocess.CompletedProcess[str]:
        """`securemig migrate` vm1 from wherever it is at ``source`` to the
        destination daemon of ``to``, secure, with --tofu (as the lab does)."""
        result = self.try_migrate(source, to)
        destination = self.at[to]
        self.assertEqual(
            result.returncode, 0, f"{source} -> {to}: {result.stderr}{destination.log()[-3000:]}"
        )
        self.assertEqual(json.loads(result.stdout)["outcome"], "done")
        self.vm_dir[to] = destination.state_dir / "vms"
        return result

    def try_migrate(self, source: str, to: str, *extra: str) -> subprocess.CompletedProcess[str]:
        """:meth:`migrate`, whatever its outcome, with ``extra`` options."""
        destination = self.at[to]
        return processes.securemig(
            "migrate",
            "vm1",
            "--vm-dir",
            str(self.vm_dir[source]),
            "--to",
            f"127.0.0.1:{destination.port}",
            "--destination-name",
            to,
            "--tofu",
            "--json",
            "--no-progress",
            "--state-dir",
            str(self.work / f"{source}-state"),
            "--identity",
            str(self.work / source),
            *extra,
        )

    def source_init_args(self) -> list[str]:
        """`securemig host init` of the source host, as the lab made it
        (its TPM, site CA and privacy CA)."""
        return [
            "host",
            "init",
            "--dir",
            str(self.work / SOURCE),
            "--name",
            SOURCE,
            "--tpm",
            json.loads((self.work / SOURCE / "host.json").read_text())["tpm"],
            "--site-ca",
            str(self.work / "site-ca"),
            "--pca",
            self.pca_url,
            "--pca-ca",
            str(self.work / "pca" / "ca.pem"),
        ]

    def round_trip(self) -> tuple[str, str]:
        """vm1 to dest-b and back; the two sources' stderr."""
        out = self.migrate(SOURCE, DESTINATION)
        back = self.migrate(DESTINATION, SOURCE)
        return out.stderr, back.stderr

    def restart_home(self) -> None:
        """Restart source-a's daemon (to serve its new TLS certificate)."""
        self.at[SOURCE].stop()
        self.at[SOURCE] = self.lab.start_destination(
            host=SOURCE, keep=False, extra=self.daemon_options
        )

    def renew(self) -> Any:
        result = processes.securemig(
            "host",
            "renew",
            "--identity",
            str(self.work / SOURCE),
            "--site-ca",
            str(self.work / "site-ca"),
            "--pca",
            self.pca_url,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return result

    def ak_names_seen(self, at: str, of: str) -> list[str]:
        golden = PolicyStore(self.work / at / "policy").get(of)
        assert golden is not None
        return sorted(name.hex() for name in golden.clocks)


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

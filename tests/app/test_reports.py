"""What ``securemig`` reports when a migration does not go through, and the
misuse cases that need a real host TPM (issue 24): each feeds exactly the
input that once gave a wrong or misleading answer, against the real
processes (the secure world of :mod:`tests.transport.test_secure`)."""

from __future__ import annotations

import json
import socket
import time

from cryptography.hazmat.primitives import serialization

from securemig.host import storage
from securemig.host.journal import Journal
from securemig.hypervisor.bundle import Bundle, create_image_vm, set_disk_owner
from securemig.lab import processes
from securemig.trust.pki import Authority
from tests.support.bundles import bundle_digests
from tests.support.commands import migrate_vm
from tests.support.secure import SecureBase


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class ReportTests(SecureBase):
    def source_records(self) -> list[object]:
        return Journal(self.vm_dir / ".securemig" / "journal.sqlite").records(10)

    def assertVMHere(self, bundle: Bundle, before: dict[str, str]) -> None:
        self.assertEqual(bundle_digests(Bundle.find(self.vm_dir, bundle.name)), before)
        self.assertFalse(storage.is_locked(bundle.lock_path))

    def test_aborted_json_reports_what_moved(self) -> None:
        """An aborted migration's --json gives the bytes sent before it ended
        (and the rate of those), not the VM's total size."""
        destination = processes.start_destination(self.base / "dst")
        self.addCleanup(destination.stop)
        create_image_vm(self.vm_dir, "big", 48)
        result = migrate_vm(
            self.vm_dir,
            destination.address,
            "--insecure",
            "--bandwidth",
            "8",
            "--deadline",
            "2",
            "--json",
            "--no-progress",
            name="big",
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        summary = json.loads(result.stdout)
        self.assertEqual(summary["outcome"], "aborted")
        self.assertTrue(summary["error"].startswith("TIMEOUT"), summary)
        self.assertEqual(summary["total_bytes"], 48 << 20)
        # About 2 s at 8 MiB/s: some, far from all.
        self.assertGreater(summary["bytes"], 1 << 20)
        self.assertLess(summary["bytes"], 32 << 20)
        rate = summary["bytes"] / (1 << 20) / summary["seconds"]
        self.assertLess(abs(summary["throughput_mibps"] - rate), 0.2, summary)
        self.assertLess(summary["throughput_mibps"], 12)

    def test_key_that_does_not_unseal(self) -> None:
        """The vTPM key cannot be unsealed here (another host's TPM): --json
        still prints the summary, and the message says the VM is still here."""
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        result = migrate_vm(
            self.vm_dir,
            f"127.0.0.1:{closed_port()}",
            "--identity",
            str(self.dst_id),
            "--tofu",
            "--json",
            "--no-progress",
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIn("a key does not load into this TPM", result.stderr)
        self.assertIn("the VM is still here, unlocked", result.stderr)
        summary = json.loads(result.stdout)
        self.assertEqual(summary["outcome"], "aborted")
        self.assertIn("a key does not load into this TPM", summary["error"])
        self.assertTrue(summary["vm_here"])
        self.assertEqual(summary["bytes"], 0)
        self.assertVMHere(bundle, before)

    def test_wrong_destination_name_is_coded(self) -> None:
        """A certificate for another name: ATTESTATION_FAILED with the
        sentence, not CONNECTION_LOST in an internal phase."""
        destination = self.start_destination("--tofu")
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        result = self.migrate(destination, "--tofu", name="host-z")
        self.assertEqual(result.returncode, 1, result.stderr)
        summary = json.loads(result.stdout)
        self.assertTrue(summary["error"].startswith("ATTESTATION_FAILED: "), summary)
        self.assertIn("the destination's TLS certificate is not for 'host-z'", summary["error"])
        self.assertNotIn("awaitWelcome", result.stdout + result.stderr)
        self.assertNotIn("CONNECTION_LOST", result.stdout + result.stderr)
        self.assertVMHere(bundle, before)
        record = self.source_records()[0]
        self.assertEqual(record.outcome, "aborted")  # type: ignore[attr-defined]
        self.assertTrue(record.error.startswith("ATTESTATION_FAILED"))  # type: ignore[attr-defined]

    def test_per_address_cap_refusal_is_said(self) -> None:
        """A source refused by the destination's per-address cap is told why
        the connection closed before TLS, not just CONNECTION_LOST."""
        destination = self.start_destination("--tofu", "--per-source-max-startups", "1")
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        # One pending connection (no handshake) from 127.0.0.1 fills the cap.
        squatter = socket.create_connection(("127.0.0.1", destination.port))
        self.addCleanup(squatter.close)
        time.sleep(0.2)
        result = self.migrate(destination, "--tofu")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("before the TLS handshake completed", result.stderr)
        self.assertIn("cap of pending connections from this address", result.stderr)
        self.assertVMHere(bundle, before)
        deadline = time.monotonic() + 5
        while "refused (per address, max 1)" not in destination.log():
            self.assertLess(time.monotonic(), deadline, destination.log())
            time.sleep(0.1)

    def test_live_on_a_stopped_vm_closes_its_record(self) -> None:
        """migrate --live of a stopped QEMU VM is refused and its journal
        record is closed as aborted with the reason (it was left
        ``started``, later settled as a restarted source)."""
        result = processes.securemig(
            "vm",
            "create",
            "vm1",
            "--dir",
            str(self.vm_dir),
            "--ram-mib",
            "16",
            "--backend",
            "qemu",
            "--identity",
            str(self.src_id),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        result = migrate_vm(
            self.vm_dir,
            f"127.0.0.1:{closed_port()}",
            "--identity",
            str(self.src_id),
            "--tofu",
            "--live",
            "--destination-name",
            "dest-b",
            "--no-progress",
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("is not running: live migration moves a running guest", result.stderr)
        (record,) = self.source_records()
        self.assertEqual(record.outcome, "aborted")  # type: ignore[attr-defined]
        self.assertIn("is not running", record.error)  # type: ignore[attr-defined]
        status = processes.securemig("status", "--vm-dir", str(self.vm_dir))
        self.assertNotIn("source restarted", status.stdout + status.stderr)
        self.assertFalse(storage.is_locked(Bundle.find(self.vm_dir, "vm1").lock_path))

    def test_shared_disk_of_another_host_closes_its_record(self) -> None:
        destination = self.start_destination("--tofu")
        shared = self.base / "shared"
        shared.mkdir()
        self.create_vm("--shared-disk", str(shared / "vm1.disk"))
        set_disk_owner(shared / "vm1.disk", "host-c")
        result = self.migrate(destination, "--tofu", "--shared-storage")
        self.assertEqual(result.returncode, 1, result.stderr)
        (record,) = self.source_records()
        self.assertEqual(record.outcome, "aborted")  # type: ignore[attr-defined]
        self.assertIn("belongs to host-c", record.error)  # type: ignore[attr-defined]

    def test_host_init_with_the_privacy_ca_down(self) -> None:
        """host init when nothing answers at --pca: a sentence naming the
        privacy CA and its URL, not ``<urlopen error ...>``."""
        site = self.base / "site-ca"
        Authority.create("site").save(site)
        pca_pem = self.base / "pca.pem"
        pca_pem.write_bytes(Authority.create("pca").cert.public_bytes(serialization.Encoding.PEM))
        url = f"https://localhost:{closed_port()}"
        tcti = json.loads((self.src_id / "host.json").read_text())["tpm"]
        result = processes.securemig(
            "host",
            "init",
            "--dir",
            str(self.base / "host-x"),
            "--name",
            "host-x",
            "--tpm",
            tcti,
            "--site-ca",
            str(site),
            "--pca",
            url,
            "--pca-ca",
            str(pca_pem),
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn(f"cannot reach the privacy CA at {url}: ", result.stderr)
        self.assertIn("Connection refused", result.stderr)
        self.assertNotIn("urlopen error", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

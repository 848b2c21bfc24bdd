"""The operator's view of secure migrations between real processes: the
data channel's port range (``--data-ports``), what the journals record of
the peer and of refusals, and job control (``securemig jobs``, ``abort``)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from typing import Any

from securemig.host import storage
from securemig.hypervisor.bundle import Bundle
from securemig.lab import processes
from securemig.protocol import wire
from tests.support.bundles import bundle_digests
from tests.support.commands import migrate_vm
from tests.support.secure import SecureBase, staging_left


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DataPortsTests(SecureBase):
    def test_data_channel_in_range(self) -> None:
        """The data channel listens on the one port --data-ports allows."""
        port = free_port()
        destination = self.start_destination("--tofu", "--data-ports", f"{port}-{port}")
        self.create_vm()
        result = self.migrate(destination, "--tofu")
        self.assertEqual(result.returncode, 0, result.stderr)
        ports = re.findall(r"data channel of migration \w+ on port (\d+)", destination.log())
        self.assertEqual(ports, [str(port)])
        # Both journals name the peer by the name it attested, not its address.
        [departure] = status("--vm-dir", str(self.vm_dir))
        [arrival] = status("--state-dir", str(destination.state_dir))
        self.assertEqual((departure["peer_name"], arrival["peer_name"]), ("dest-b", "source-a"))
        self.assertEqual(departure["total"], arrival["total"])
        self.assertEqual(departure["bytes"], departure["total"])

    def test_range_exhausted(self) -> None:
        """Its one port taken: the migration fails with a sentence naming the
        range, and the VM stays at the source, intact and unlocked."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        destination = self.start_destination("--tofu", "--data-ports", f"{port}-{port}")
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        result = self.migrate(destination, "--tofu")
        self.assertStaysAtSource(
            bundle, before, result, f"all of {port}-{port} (--data-ports) are in use"
        )
        self.assertEqual(staging_left(destination), [])
        self.assertNoUnhandledError(destination)

    def test_bad_range_is_a_usage_error(self) -> None:
        from tests.support.commands import twistd

        result = twistd(
            "--state-dir",
            str(self.base / "st"),
            "--listen",
            "tcp:0",
            "--identity",
            str(self.dst_id),
            "--data-ports",
            "9000-8000",
            log_file=self.base / "t.log",
        )
        self.assertEqual(result.returncode, 1)
        self.assertIn("--data-ports '9000-8000': ports are 1-65535", result.stderr + result.stdout)


def status(*where: str) -> Any:
    result = processes.securemig("status", *where, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class RefusalJournalTests(SecureBase):
    def test_refused_arrival_journaled_with_reason(self) -> None:
        """An arrival refused at HELLO (the VM is already there) leaves no
        migration behind but a refusal row: who (attested name), which VM, why."""
        destination = self.start_destination("--tofu")
        (destination.state_dir / "vms" / "vm1").mkdir(parents=True)
        self.create_vm()
        result = self.migrate(destination, "--tofu")
        self.assertEqual(result.returncode, 1, result.stderr)
        shown = processes.securemig("status", "--state-dir", str(destination.state_dir))
        self.assertEqual(shown.returncode, 0, shown.stderr)
        self.assertRegex(
            shown.stdout,
            r"refused arrivals:\n.*VM vm1 from source-a \(127\.0\.0\.1:\d+\): "
            r"VM_BUSY: VM vm1 is already present here",
        )

    def test_source_not_allowed_journaled(self) -> None:
        """Refused at the TLS handshake by --allow-source: journaled with the
        source's attested name, no VM named (its HELLO was never read)."""
        destination = self.start_destination("--tofu", "--allow-source", "someone-else")
        self.create_vm()
        result = self.migrate(destination, "--tofu")
        self.assertEqual(result.returncode, 1, result.stderr)
        shown = processes.securemig("status", "--state-dir", str(destination.state_dir))
        self.assertRegex(
            shown.stdout,
            r"VM \? from source-a \(127\.0\.0\.1:\d+\): POLICY_REFUSED: source source-a "
            r"is not allowed to migrate here",
        )
        self.assertIn("no migrations recorded", shown.stdout)


class JobControlTests(SecureBase):
    def test_jobs_live_and_abort(self) -> None:
        """`securemig jobs` shows a running migration's bytes rising (on both
        hosts); `securemig abort` from another process ends it: the
        destination is told and discards its staging, the VM stays at the
        source, byte-identical and unlocked."""
        destination = self.start_destination("--tofu")
        bundle = self.create_vm("--ram-mib", "32")
        before = bundle_digests(bundle)
        total = sum(i.size for i in bundle.streamed_images(wire.Variant.FULL))
        state = self.base / "src-state"
        migrate = subprocess.Popen(
            [
                processes.script("securemig"),
                "migrate",
                "vm1",
                "--vm-dir",
                str(self.vm_dir),
                "--to",
                destination.address,
                "--identity",
                str(self.src_id),
                "--policy-dir",
                str(self.src_policy),
                "--destination-name",
                "dest-b",
                "--tofu",
                "--no-progress",
                "--state-dir",
                str(state),
                # About 32 s for the images: time to look on both hosts
                # (each look a process start, several seconds on a loaded
                # machine: at 2 MiB/s it finished first under load), then
                # abort; the abort ends it early.
                "--bandwidth",
                "1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(lambda: migrate.poll() is None and migrate.kill())
        seen: list[int] = []
        deadline = time.monotonic() + 60
        while len(seen) < 2:
            self.assertIsNone(migrate.poll(), "migrate ended before jobs saw it stream")
            self.assertLess(time.monotonic(), deadline)
            # (No journal yet until migrate has started.)
            jobs = jobs_of("--state-dir", str(state)) if (state / "journal.sqlite").exists() else []
            if jobs and jobs[0]["phase"] == "streaming" and jobs[0]["bytes"] > max(seen, default=0):
                seen.append(jobs[0]["bytes"])
            time.sleep(0.3)
        [job] = jobs
        self.assertEqual((job["role"], job["vm"], job["total"]), ("source", "vm1", total))
        self.assertTrue(job["peer"].startswith("dest-b ("), job)
        self.assertLess(job["bytes"], total)
        self.assertGreater(job["rate_mibps"], 0)
        [arriving] = jobs_of("--state-dir", str(destination.state_dir))
        self.assertEqual((arriving["role"], arriving["total"]), ("destination", total))
        self.assertTrue(arriving["peer"].startswith("source-a ("), arriving)
        text = processes.securemig("jobs", "--state-dir", str(state))
        self.assertIn(f"{job['id'][:12]}  source      vm1", text.stdout)
        self.assertIn(f"/ {total / (1 << 20):.1f} MiB", text.stdout)

        abort = processes.securemig("abort", job["id"][:8], "--state-dir", str(state))
        self.assertEqual(abort.returncode, 0, abort.stderr)
        self.assertIn(
            f"migration {job['id'][:12]} of VM vm1 aborted: the VM stays here", abort.stdout
        )
        _, err = migrate.communicate(timeout=60)
        self.assertEqual(migrate.returncode, 1, err)
        self.assertIn("CANCELLED: aborted by the operator (securemig abort)", err)
        self.assertEqual(bundle_digests(Bundle.load(bundle.path)), before)
        self.assertTrue(bundle.vtpm_key_path.exists())
        self.assertFalse(storage.is_locked(bundle.lock_path))
        # The ABORT reached the destination: it ended the arrival as cancelled.
        deadline = time.monotonic() + 20
        while True:
            [arrival] = status("--state-dir", str(destination.state_dir))
            if arrival["outcome"] is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.assertEqual(arrival["outcome"], "aborted")
        self.assertIn("CANCELLED", arrival["error"])
        self.assertEqual(staging_left(destination), [])
        self.assertFalse((destination.state_dir / "vms" / "vm1").exists())
        self.assertEqual(jobs_of("--state-dir", str(state)), [])
        again = processes.securemig("abort", job["id"], "--state-dir", str(state))
        self.assertEqual(again.returncode, 1)
        self.assertIn("has already ended: aborted", again.stderr)


def jobs_of(*where: str) -> Any:
    result = processes.securemig("jobs", *where, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class NameMismatchTests(SecureBase):
    def test_address_without_destination_name(self) -> None:
        """--to IP:PORT and no --destination-name: the destination's
        certificate names a host, not that address; one sentence says so
        and what to give (not a VerificationError repr)."""
        destination = self.start_destination("--tofu")
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        result = migrate_vm(
            self.vm_dir,
            destination.address,
            "--identity",
            str(self.src_id),
            "--policy-dir",
            str(self.src_policy),
            "--tofu",
            "--no-progress",
        )
        self.assertNotIn("VerificationError", result.stderr)
        self.assertStaysAtSource(
            bundle,
            before,
            result,
            "the destination's TLS certificate names a host, not the address 127.0.0.1: "
            "give --destination-name HOST",
        )

    def test_wrong_destination_name(self) -> None:
        destination = self.start_destination("--tofu")
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        result = self.migrate(destination, "--tofu", name="host-z")
        self.assertNotIn("VerificationError", result.stderr)
        self.assertStaysAtSource(
            bundle, before, result, "the destination's TLS certificate is not for 'host-z'"
        )

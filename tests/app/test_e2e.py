"""End to end: a real ``twistd securemig`` and a real ``securemig migrate``,
separate processes talking TCP on loopback."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

from securemig.host import storage
from securemig.hypervisor.bundle import Bundle
from securemig.lab import processes
from tests.support.bundles import bundle_digests


def start_migrate(case: TestCase, vm_dir: Path, to: str) -> subprocess.Popen[str]:
    """Start ``securemig migrate vm1 --insecure`` in the background; the test
    ends it if it is still running."""
    migrate = subprocess.Popen(
        [
            processes.script("securemig"),
            "migrate",
            "vm1",
            "--vm-dir",
            str(vm_dir),
            "--to",
            to,
            "--insecure",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    case.addCleanup(lambda: migrate.poll() is None and migrate.kill())
    return migrate


class EndToEndTests(TestCase):
    """Real processes; each test ends every process it started."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.vm_dir = self.base / "src"
        self.state_dir = self.base / "dst"
        self.destination = processes.start_destination(self.state_dir)
        self.addCleanup(self.destination.stop)

    def create_vm(self, *extra: str, name: str = "vm1") -> Bundle:
        result = processes.securemig("vm", "create", name, "--dir", str(self.vm_dir), *extra)
        self.assertEqual(result.returncode, 0, result.stderr)
        return Bundle.find(self.vm_dir, name)

    def migrate(
        self, *extra: str, name: str = "vm1", to: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return processes.securemig(
            "migrate",
            name,
            "--vm-dir",
            str(self.vm_dir),
            "--to",
            to or self.destination.address,
            "--insecure",
            "--json",
            *extra,
        )

    def status(self, *where: str) -> list[dict[str, object]]:
        result = processes.securemig("status", *where, "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        records: list[dict[str, object]] = json.loads(result.stdout)
        return records

    def test_full_variant(self) -> None:
        """RAM and disk arrive identical; the source copy is gone; both
        journals record the migration as done."""
        bundle = self.create_vm("--ram-mib", "8", "--disk-mib", "4")
        before = bundle_digests(bundle)
        result = self.migrate()
        self.assertEqual(result.returncode, 0, result.stderr)
        summary = json.loads(result.stdout)
        self.assertEqual((summary["outcome"], summary["bytes"]), ("done", 12 << 20))
        arrived = Bundle.load(self.state_dir / "vms" / "vm1")
        self.assertEqual(bundle_digests(arrived), before)
        self.assertFalse(bundle.path.exists())
        dst = self.status("--state-dir", str(self.state_dir))
        src = self.status("--vm-dir", str(self.vm_dir))
        self.assertEqual([(r["role"], r["outcome"]) for r in dst], [("destination", "done")])
        self.assertEqual([(r["role"], r["outcome"]) for r in src], [("source", "done")])
        self.assertEqual(dst[0]["migration_id"], src[0]["migration_id"])

    def test_shared_storage_variant(self) -> None:
        """Only the RAM image travels; the shared disk is untouched."""
        shared = self.base / "shared"
        shared.mkdir(parents=True)
        bundle = self.create_vm("--ram-mib", "4", "--shared-disk", str(shared / "vm1.disk"))
        ram = bundle_digests(bundle)
        disk_before = (shared / "vm1.disk").read_bytes()
        result = self.migrate("--shared-storage")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["bytes"], 4 << 20)
        arrived = Bundle.load(self.state_dir / "vms" / "vm1")
        self.assertEqual(bundle_digests(arrived), ram)
        self.assertEqual(arrived.manifest.shared_disk, str(shared / "vm1.disk"))
        self.assertEqual((shared / "vm1.disk").read_bytes(), disk_before)

    def test_wrong_variant_refused(self) -> None:
        """A VM whose disk is in the bundle cannot use --shared-storage."""
        self.create_vm("--ram-mib", "1", "--disk-mib", "1")
        result = self.migrate("--shared-storage")
        self.assertEqual(result.returncode, 1)
        self.assertIn("without --shared-storage", result.stderr)

    def test_locked_vm_refused(self) -> None:
        """A VM locked by another migration is refused before anything is sent."""
        bundle = self.create_vm("--ram-mib", "1")
        with storage.Lock(bundle.lock_path):
            result = self.migrate()
        self.assertEqual(result.returncode, 1)
        self.assertIn("locked by another migration", result.stderr)
        # Held by that migration: never said to be unlocked.
        self.assertIn("still here, untouched", result.stderr)
        self.assertNotIn("unlocked", result.stderr)
        self.assertEqual(list((self.state_dir / "vms").iterdir()), [])
        self.assertEqual(self.status("--state-dir", str(self.state_dir)), [])

    def test_destination_killed_mid_stream(self) -> None:
        """The destination dies while images flow: the VM stays at the source,
        intact and unlocked; a restarted destination removes the staging."""
        bundle = self.create_vm("--ram-mib", "128")
        before = bundle_digests(bundle)
        migrate = start_migrate(self, self.vm_dir, self.destination.address)
        staging = self.state_dir / "staging"
        deadline = time.monotonic() + 30
        while not any(staging.iterdir()):
            self.assertLess(time.monotonic(), deadline, "the migration never started")
            time.sleep(0.002)
        # Freeze it at once (admitted, nowhere near PREPARED), then kill it.
        self.destination.process.send_signal(signal.SIGSTOP)
        staged = [p.name for p in staging.iterdir()]
        self.destination.stop(signal.SIGKILL)
        _, err = migrate.communicate(timeout=60)
        self.assertEqual(migrate.returncode, 1, err)
        self.assertIn("still at the source", err)
        self.assertEqual(bundle_digests(Bundle.load(bundle.path)), before)
        self.assertFalse(storage.is_locked(bundle.lock_path))
        self.assertEqual(self.status("--vm-dir", str(self.vm_dir))[0]["outcome"], "aborted")
        # The killed destination could clean nothing; its restart does.
        self.assertEqual([p.name for p in staging.iterdir()], staged)
        restarted = processes.start_destination(self.state_dir)
        self.addCleanup(restarted.stop)
        self.assertEqual(list(staging.iterdir()), [])
        record = self.status("--state-dir", str(self.state_dir))[0]
        self.assertEqual((record["id"], record["outcome"]), (staged[0], "aborted"))
        # And the VM can then be migrated for real.
        result = processes.securemig(
            "migrate",
            "vm1",
            "--vm-dir",
            str(self.vm_dir),
            "--to",
            restarted.address,
            "--insecure",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(bundle_digests(Bundle.load(self.state_dir / "vms" / "vm1")), before)

    def test_unreachable_destination(self) -> None:
        """Nothing listening: a clear error, and the VM stays unlocked."""
        bundle = self.create_vm("--ram-mib", "1")
        self.destination.stop()
        result = self.migrate(to=self.destination.address)
        self.assertEqual(result.returncode, 1)
        self.assertIn("cannot connect", result.stderr)
        self.assertFalse(storage.is_locked(bundle.lock_path))

    def test_variant_must_be_chosen(self) -> None:
        """Neither --identity nor --insecure: the command asks for a choice
        (a usage error: exit status 2)."""
        self.create_vm("--ram-mib", "1")
        result = processes.securemig(
            "migrate", "vm1", "--vm-dir", str(self.vm_dir), "--to", self.destination.address
        )
        self.assertEqual(result.returncode, 2)
        self.assertIn("--insecure", result.stderr)
        self.assertTrue((self.vm_dir / "vm1").exists())


class CommandLineTests(TestCase):
    """Operator errors get clear messages and non-zero exits."""

    def test_twistd_needs_state_dir(self) -> None:
        result = subprocess.run(
            [
                processes.script("twistd"),
                "-n",
                "--pidfile=",
                "securemig",
                "--insecure-listen",
                "tcp:0",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--state-dir is required", result.stdout + result.stderr)

    def test_bad_vm_name(self) -> None:
        result = processes.securemig(
            "vm", "create", "../evil", "--dir", self.mktemp(), "--ram-mib", "1"
        )
        self.assertEqual(result.returncode, 2)
        self.assertIn("bad VM name", result.stderr)

    def test_unknown_vm(self) -> None:
        vm_dir = Path(self.mktemp())
        vm_dir.mkdir()
        result = processes.securemig(
            "migrate", "nope", "--vm-dir", str(vm_dir), "--to", "127.0.0.1:1", "--insecure"
        )
        self.assertEqual(result.returncode, 1)
        self.assertIn("no VM bundle", result.stderr)


class DiskFullTests(TestCase):
    """The destination's disk fills mid-stream: a clear DISK_FULL, staging
    removed, the VM intact and unlocked at the source.

    The destination runs in its own mount namespace on a 256 MiB tmpfs
    (``unshare``, as root), so filling it touches nothing else; the test
    reaches into that namespace through ``/proc/PID/root``.
    """

    def test_disk_full_mid_stream(self) -> None:
        base = Path(self.mktemp()).absolute()
        state = base / "dst"
        state.mkdir(parents=True)
        mount = f'mount -t tmpfs -o size=256m securemig-test "{state}" && exec "$@"'
        destination = processes.start_destination(
            state,
            port_file=base / "port",
            log_file=base / "twistd.log",
            wrapper=("unshare", "-m", "--propagation", "private", "sh", "-c", mount, "sh"),
        )
        self.addCleanup(destination.stop)
        inside = Path(f"/proc/{destination.process.pid}/root") / state.relative_to("/")
        vm_dir = base / "src"
        result = processes.securemig(
            "vm", "create", "vm1", "--dir", str(vm_dir), "--ram-mib", "128"
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        bundle = Bundle.find(vm_dir, "vm1")
        before = bundle_digests(bundle)
        migrate = start_migrate(self, vm_dir, destination.address)
        deadline = time.monotonic() + 30
        while not any(p.stat().st_size for p in (inside / "staging").glob("*/ram.img")):
            self.assertLess(time.monotonic(), deadline, "the stream never started")
            time.sleep(0.001)
        # Admitted (128 MiB + margin fitted) and streaming: fill the disk under it.
        destination.process.send_signal(signal.SIGSTOP)
        with open(inside / "filler", "wb") as f:
            f.truncate(0)
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
        destination.process.send_signal(signal.SIGCONT)
        _, err = migrate.communicate(timeout=60)
        self.assertEqual(migrate.returncode, 1, err)
        self.assertIn("DISK_FULL", err)
        self.assertEqual(bundle_digests(Bundle.load(bundle.path)), before)
        self.assertFalse(storage.is_locked(bundle.lock_path))
        self.assertEqual(list((inside / "staging").iterdir()), [])
        # SQLite cannot read a live WAL through /proc/PID/root: ask from inside.
        status = subprocess.run(
            [
                "nsenter",
                "-t",
                str(destination.process.pid),
                "-m",
                processes.script("securemig"),
                "status",
                "--state-dir",
                str(state),
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        record = json.loads(status.stdout)[0]
        self.assertEqual(record["outcome"], "aborted")
        self.assertIn("DISK_FULL", record["error"])


class DemoTests(TestCase):
    """`securemig demo` (what `make demo` runs): secure there, insecure back,
    every check true."""

    def test_demo(self) -> None:
        result = processes.securemig("demo", "--json", "--size-mib", "8")
        self.assertEqual(result.returncode, 0, result.stderr)
        report = json.loads(result.stdout)
        self.assertEqual(
            report["checks"],
            {
                "images_identical": True,
                "vtpm_key_released_to_destination_tpm": True,
                "same_vtpm_at_destination": True,
                "vtpm_back_at_source": True,
                "source_copies_removed": True,
                "refused_after_a_pcr_change_vm_intact_at_source": True,
            },
        )
        self.assertEqual(
            (report["secure"]["protocol"], report["insecure"]["protocol"]), ("secure", "insecure")
        )
        self.assertIn("attest source", report["secure"]["phases"])
        # It shows what was attested (by trust on first use, and says so)
        # and that a changed PCR is refused by name.
        seen = report["attested"]["source-a saw dest-b"]
        self.assertEqual(sorted(seen["pcrs"]), ["0", "1", "2", "3", "4", "7"])
        self.assertTrue(seen["first_use"])
        self.assertIn("PCRs sha256:7 of dest-b differ", report["refusal"])
        self.assertEqual(report["backend"], "image")

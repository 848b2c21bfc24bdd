"""``securemig vm stop`` and ``vm delete`` with a real QEMU guest: a stop
saves the guest (vm start resumes it), --force ends it, delete refuses a
running VM and removes a stopped one (issue 24)."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import TestCase

from securemig.lab import processes


class VMLifecycleTests(TestCase):
    def vm(self, *argv: str, status: int = 0) -> str:
        result = processes.securemig("vm", *argv, "vm1", "--dir", str(self.dir))
        self.assertEqual(result.returncode, status, result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        return result.stdout + result.stderr

    def test_stop_start_delete(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        result = processes.securemig(
            "vm", "create", "vm1", "--dir", str(self.dir), "--ram-mib", "32", "--backend", "qemu"
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.addCleanup(
            lambda: processes.securemig("vm", "stop", "vm1", "--dir", str(self.dir), "--force")
        )
        self.assertIn("vm1: running", self.vm("start"))
        self.assertIn("is running: securemig vm stop it first", self.vm("delete", status=1))
        self.assertIn("vm1: suspended (securemig vm start resumes it)", self.vm("stop"))
        self.assertIn("vm1: suspended", self.vm("status"))
        self.assertTrue((self.dir / "vm1" / "ram.img").stat().st_size > 0)
        self.assertIn("vm1: running", self.vm("start"))
        self.assertIn("vm1: stopped (ended; its memory is lost)", self.vm("stop", "--force"))
        self.assertIn("vm1: stopped", self.vm("status"))
        self.assertIn("deleted VM vm1", self.vm("delete"))
        self.assertFalse((self.dir / "vm1").exists())

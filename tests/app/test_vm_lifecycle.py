"""``securemig vm stop`` and ``vm delete`` with a real QEMU guest: a stop
saves the guest (vm start resumes it), --force ends it, delete refuses a
running VM and removes a stopped one (issue 24)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

from securemig.hypervisor import guest as linux_guest
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


class ConsoleTests(TestCase):
    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        result = processes.securemig(*argv)
        self.assertNotIn("Traceback", result.stderr)
        return result

    def test_console_of_a_linux_guest(self) -> None:
        """``vm console --follow``, started before the VM, prints what a real
        Linux guest writes on its serial console from its first line on;
        ``vm console`` then prints it, and only the last --lines of it."""
        linux_guest.find()
        vm_dir = Path(self.mktemp()).absolute()
        created = self.cli(
            "vm", "create", "vm1", "--dir", str(vm_dir), "--ram-mib", "128",
            "--backend", "qemu", "--guest", "linux",
        )  # fmt: skip
        self.assertEqual(created.returncode, 0, created.stderr)
        follow = subprocess.Popen(
            [processes.script("securemig"), "vm", "console", "vm1", "--dir", str(vm_dir),
             "--follow"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.addCleanup(lambda: follow.poll() is None and follow.kill())
        self.addCleanup(
            lambda: processes.securemig("vm", "stop", "vm1", "--dir", str(vm_dir), "--force")
        )
        self.assertEqual(self.cli("vm", "start", "vm1", "--dir", str(vm_dir)).returncode, 0)
        console = vm_dir / "vm1" / "console.log"
        deadline = time.monotonic() + 120
        while not (console.exists() and b"securemig-guest: running" in console.read_bytes()):
            self.assertLess(time.monotonic(), deadline, "the guest never said it runs")
            time.sleep(1)
        time.sleep(1)
        follow.send_signal(signal.SIGINT)
        out, err = follow.communicate(timeout=30)
        self.assertEqual(follow.returncode, 0, err)
        self.assertNotIn(b"Traceback", err)
        self.assertIn(b"securemig-guest: running", out)
        shown = self.cli("vm", "console", "vm1", "--dir", str(vm_dir), "--lines", "100000")
        self.assertEqual(shown.returncode, 0, shown.stderr)
        # (Text mode reads the guest's CRLF as one newline.)
        self.assertEqual(shown.stdout.splitlines(), console.read_text().splitlines())
        last = self.cli("vm", "console", "vm1", "--dir", str(vm_dir), "--lines", "2")
        self.assertEqual(last.returncode, 0, last.stderr)
        self.assertEqual(len(last.stdout.splitlines()), 2, last.stdout)
        self.assertTrue(shown.stdout.endswith(last.stdout), last.stdout)

    def test_console_refusals(self) -> None:
        """A firmware guest keeps no console: one sentence, exit 1; a
        negative --lines is a usage error (2); an unknown VM is named."""
        vm_dir = Path(self.mktemp()).absolute()
        created = self.cli(
            "vm", "create", "vm1", "--dir", str(vm_dir), "--ram-mib", "32", "--backend", "qemu"
        )
        self.assertEqual(created.returncode, 0, created.stderr)
        none = self.cli("vm", "console", "vm1", "--dir", str(vm_dir))
        self.assertEqual(none.returncode, 1, none.stderr)
        self.assertIn("has no console kept by securemig on this host", none.stderr)
        bad = self.cli("vm", "console", "vm1", "--dir", str(vm_dir), "--lines", "-1")
        self.assertEqual(bad.returncode, 2, bad.stderr)
        self.assertIn("is not a number of lines", bad.stderr)
        unknown = self.cli("vm", "console", "vm9", "--dir", str(vm_dir))
        self.assertEqual(unknown.returncode, 1)
        self.assertIn("vm9", unknown.stderr)


class DaemonRestartTests(TestCase):
    def test_guest_survives_the_daemons_stop_and_restart(self) -> None:
        """What ``KillMode=process`` gives under systemd, shown without it: a
        guest that arrived at ``twistd securemig --backend qemu`` runs in its
        own session (QEMU daemonizes), not the daemon's process group, and
        stopping the daemon (SIGTERM to its process, as systemctl restart
        sends it) leaves it running; the restarted daemon finds it running."""
        base = Path(self.mktemp()).absolute()
        src = base / "src"
        result = processes.securemig(
            "vm", "create", "vm1", "--dir", str(src), "--ram-mib", "32", "--backend", "qemu"
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(processes.securemig("vm", "start", "vm1", "--dir", str(src)).returncode, 0)
        state = base / "dst"
        first = processes.start_destination(state, "--backend", "qemu")
        self.addCleanup(first.stop)
        arrived = state / "vms"
        self.addCleanup(
            lambda: processes.securemig("vm", "stop", "vm1", "--dir", str(arrived), "--force")
        )
        result = processes.securemig(
            "migrate",
            "vm1",
            "--vm-dir",
            str(src),
            "--to",
            first.address,
            "--insecure",
            "--no-progress",
        )
        self.assertEqual(result.returncode, 0, result.stderr + first.log()[-2000:])
        pid = int((arrived / "vm1" / "qemu.pid").read_text())
        self.assertNotEqual(os.getsid(pid), os.getsid(first.process.pid))
        self.assertNotEqual(os.getpgid(pid), os.getpgid(first.process.pid))
        first.stop()
        os.kill(pid, 0)  # still running
        status = processes.securemig("vm", "status", "vm1", "--dir", str(arrived))
        self.assertIn("vm1: running", status.stdout)
        second = processes.start_destination(state, "--backend", "qemu")
        self.addCleanup(second.stop)
        second.stop()
        os.kill(pid, 0)
        self.assertIn(
            "vm1: running",
            processes.securemig("vm", "status", "vm1", "--dir", str(arrived)).stdout,
        )

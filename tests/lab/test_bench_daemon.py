"""``securemig bench --protocols secure-daemon``: the secure migration
driven by the source host's daemon (``migrate --daemon``), measured with
the daemon's share of CPU and its memory; real processes, tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

from securemig.host.journal import Journal
from securemig.lab import processes
from securemig.lab.bench.driven import driver

#: A child that burns about this much CPU, then waits to be read and ended.
BURN = 0.3


class CpuSecondsTests(TestCase):
    def test_agrees_with_wait4(self) -> None:
        """What /proc/PID/stat says a live child used is what wait4 then
        reports (the daemon's share of a run is read this way); gone: None."""
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import time\nt = time.process_time()\nwhile time.process_time() - t < {BURN}:"
                "\n    pass\nprint('burnt', flush=True)\ntime.sleep(60)\n",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(lambda: child.poll() is None and child.kill())
        assert child.stdout is not None
        self.assertEqual(child.stdout.readline().strip(), "burnt")
        time.sleep(0.05)
        live = processes.cpu_seconds(child.pid)
        assert live is not None
        usage = processes.end_process(child)
        self.assertGreaterEqual(live, BURN - 0.02)
        self.assertLess(abs(live - usage.cpu_s), 0.05)
        self.assertIsNone(processes.cpu_seconds(child.pid))


class CpuShareTests(TestCase):
    def test_counts_only_what_follows(self) -> None:
        """A process's share over an interval leaves out what it used
        before (a daemon's start-up before the clock), and a process gone
        by then counts nothing rather than a negative figure."""
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, time\n"
                "def burn():\n"
                "    t = time.process_time()\n"
                f"    while time.process_time() - t < {BURN}:\n"
                "        pass\n"
                "    print('burnt', flush=True)\n"
                "burn()\n"
                "sys.stdin.readline()\n"
                "burn()\n"
                "time.sleep(60)\n",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(lambda: child.poll() is None and child.kill())
        assert child.stdin is not None and child.stdout is not None
        self.assertEqual(child.stdout.readline().strip(), "burnt")
        time.sleep(0.05)
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        share = processes.CpuShare([child.pid, gone.pid])
        gone.wait()
        child.stdin.write("go\n")
        child.stdin.flush()
        self.assertEqual(child.stdout.readline().strip(), "burnt")
        time.sleep(0.05)
        used = share.used()
        processes.end_process(child)
        self.assertGreaterEqual(used, BURN - 0.02)
        self.assertLess(used, 2 * BURN - 0.1)


class DriverTests(TestCase):
    def test_the_journal_names_the_driver(self) -> None:
        """Who drove a migration is read from the source's journal: the
        process that began its newest source record (a daemon there, with
        the daemon's pid), never a destination record."""
        path = Path(self.mktemp()) / "journal.sqlite"
        journal = Journal(path)
        self.addCleanup(journal.close)
        self.assertEqual(driver(path, os.getpid()), "none")
        journal.begin(role="destination", vm="vm1", peer="a", variant="full", protocol="secure")
        self.assertEqual(driver(path, os.getpid()), "none")
        journal.begin(role="source", vm="vm1", peer="b", variant="full", protocol="secure")
        # Begun by this process: the daemon if it is this pid, else another.
        self.assertEqual(driver(path, os.getpid()), "daemon")
        self.assertEqual(driver(path, os.getpid() + 1), "command")


class BenchDaemonTests(TestCase):
    timeout = 300

    def test_secure_daemon_record(self) -> None:
        """A secure-daemon record beside the secure one: the VM moved, the
        source's CPU and memory are the daemon's that drove it (its peak RSS
        a whole securemig process's, not the thin client's; the source's
        journal names the daemon as the driver), the destination's CPU is
        its daemon's over the run only (less than the idle destination's
        start and stop, which the secure series' includes), the records and
        the summary say so, compared with the insecure twin."""
        out = Path(self.mktemp()).absolute()
        result = processes.securemig(
            "bench",
            "--sizes",
            "4",
            "--repeat",
            "1",
            "--protocols",
            "insecure,secure,secure-daemon",
            "--json",
            str(out / "b.json"),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        records = json.loads((out / "b.json").read_text())
        [daemon] = [r for r in records if r["protocol"] == "secure-daemon"]
        [secure] = [r for r in records if r["protocol"] == "secure"]
        self.assertEqual(daemon["bytes"], secure["bytes"])
        self.assertGreaterEqual(daemon["bytes"], 4 << 20)
        self.assertGreater(daemon["cpu_s"]["source"], 0)
        # The daemon's VmHWM: Twisted, cryptography and the TSS loaded.
        self.assertGreater(daemon["peak_rss_mib"]["source"], 30)
        self.assertIn("secure-daemon vs insecure", result.stdout)
        self.assertEqual(daemon["driven_by"], "daemon")
        self.assertNotIn("driven_by", secure)
        [idle] = [r for r in records if r["protocol"] == "idle-destination"]
        self.assertGreater(daemon["cpu_s"]["destination"], 0)
        self.assertLess(daemon["cpu_s"]["destination"], idle["cpu_s"]["destination"])
        self.assertIn("over the run only", daemon["cpu_counted"])
        self.assertNotIn("cpu_counted", secure)
        self.assertIn("secure-daemon: CPU of the command (wait4) plus", result.stdout)
        self.assertIn("secure-daemon: CPU of the command", (out / "b-report.md").read_text())

"""``securemig bench --protocols secure-daemon``: the secure migration
driven by the source host's daemon (``migrate --daemon``), measured with
the daemon's share of CPU and its memory; real processes, tiny sizes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

from securemig.lab import processes

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

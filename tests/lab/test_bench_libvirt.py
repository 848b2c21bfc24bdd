"""`securemig bench --libvirt`: a domain of two real libvirtds moved live by
``virsh migrate --tls`` (libvirt's own TLS, peers verified) and plain
``virsh migrate``, alternating, each record with its numbers and the guest
never restarted; the securemig arm said not run while the libvirt backend
does not migrate live."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase, TestCase

from securemig.hypervisor.backends import capabilities
from securemig.lab import processes
from securemig.lab.bench import libvirt as libvirt_bench
from securemig.lab.bench.libvirt import KIND, PROTOCOLS, CPUSampler, _report


class LibvirtBenchTests(TestCase):
    """One round, as an operator runs it."""

    timeout = 900

    def test_one_round(self) -> None:
        """Each native protocol once on a small domain: a record per
        protocol with libvirt's downtime, the guest's, CPU and bytes; the
        guest's heartbeat in sequence through each; the TLS arm really used
        TLS (its CPU above the plain arm's is not asserted: too noisy), and
        the ratios and the arm not run are in the report."""
        out = Path(self.mktemp()).absolute()
        result = processes.securemig(
            "bench", "--libvirt", "--repeat", "1", "--libvirt-mib", "128",
            "--dirty-mib-s", "8", "--disk-mib", "16", "--json", str(out),
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        report = json.loads(out.read_text())
        records = report["records"]
        expected = ["libvirt-tls", "libvirt-plain"]
        if capabilities(KIND).live:
            expected.insert(0, "secure-libvirt")
        self.assertEqual([r["protocol"] for r in records], expected)
        for record in records:
            for field in ("total_s", "downtime_ms", "guest_downtime_ms", "cpu_s", "memory_bytes"):
                self.assertGreater(record[field], 0, (field, record))
            self.assertTrue(record["guest_kept_running"], record)
            self.assertIn("git_commit", record["provenance"])
        for record in records:
            outside = record["outside_migration_s"]
            self.assertGreater(record["own_cpu_s"], 0, record)
            self.assertLess(record["own_cpu_s"], record["cpu_s"], record)
            if record["protocol"] == "secure-libvirt":
                # securemig migrate's start-up and exit: some, not all, of it.
                self.assertGreater(outside, 0, record)
                self.assertLess(outside, record["total_s"], record)
                self.assertGreater(record["daemons_cpu_s"], 0, record)
            else:
                self.assertIsNone(outside, record)
                self.assertIsNone(record["daemons_cpu_s"], record)
        # securemig measured as installed: its modules byte-compiled first
        # (a source tree run with PYTHONDONTWRITEBYTECODE compiles them in
        # every `securemig migrate` otherwise).
        self.assertTrue(Path(importlib.util.cache_from_source(libvirt_bench.__file__)).exists())
        # Each move went the other way: the domain alternates hosts.
        self.assertNotEqual(records[0]["from"], records[1]["from"])
        self.assertIn("libvirt-tls / libvirt-plain", report["ratios"])
        self.assertIn("libvirt-tls / libvirt-plain: total_s", result.stdout)
        if not capabilities(KIND).live:
            self.assertIn("secure-libvirt", report["not_run"])
            self.assertIn("secure-libvirt: not run", result.stdout)

    def test_daemon_series(self) -> None:
        """--protocols secure-libvirt,secure-libvirt-daemon,libvirt-tls: the
        daemon's series moved the domain through the source host's daemon
        (its journal names the daemon, the in-process series' the command),
        the command itself cost a bare interpreter's CPU and the daemons'
        share over the move is in the series' CPU; both against
        libvirt-tls, and what their CPU counts said."""
        # Never skipped: a backend that stopped migrating live fails here.
        self.assertTrue(capabilities(KIND).live, "the libvirt backend does not migrate live")
        out = Path(self.mktemp()).absolute()
        result = processes.securemig(
            "bench", "--libvirt", "--repeat", "1", "--libvirt-mib", "128",
            "--dirty-mib-s", "8", "--disk-mib", "16", "--json", str(out),
            "--protocols", "secure-libvirt,secure-libvirt-daemon,libvirt-tls",
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        report = json.loads(out.read_text())
        by = {r["protocol"]: r for r in report["records"]}
        self.assertEqual(list(by), ["secure-libvirt", "secure-libvirt-daemon", "libvirt-tls"])
        daemon, alone = by["secure-libvirt-daemon"], by["secure-libvirt"]
        self.assertEqual(daemon["driven_by"], "daemon")
        self.assertEqual(alone["driven_by"], "command")
        self.assertIsNone(by["libvirt-tls"]["driven_by"])
        # The domain went on alternating hosts: each move the other way.
        self.assertNotEqual(daemon["from"], alone["from"])
        for record in (daemon, alone):
            self.assertTrue(record["guest_kept_running"], record)
            self.assertGreaterEqual(
                record["cpu_s"] + 0.02, record["own_cpu_s"] + record["daemons_cpu_s"], record
            )
        self.assertLess(daemon["own_cpu_s"], alone["own_cpu_s"] / 2, (daemon, alone))
        self.assertGreater(daemon["daemons_cpu_s"], 2 * daemon["own_cpu_s"], daemon)
        self.assertIn("secure-libvirt-daemon / libvirt-tls", report["ratios"])
        self.assertIn("over the run only", report["cpu_counted"]["secure-libvirt-daemon"])
        self.assertIn("secure-libvirt-daemon / libvirt-tls: total_s", result.stdout)


class ReportTests(SynchronousTestCase):
    """The report's arithmetic, from records made up here."""

    def test_medians_and_ratios(self) -> None:
        """Medians per protocol over the runs (None where libvirt gave no
        number), ratios of the medians, rounded; an arm not run is named."""
        rows = [
            ("libvirt-tls", 2.0, 100, 300, 4.0),
            ("libvirt-tls", 4.0, 300, 500, 6.0),
            ("libvirt-tls", 3.0, None, 400, 5.0),
            ("libvirt-plain", 1.0, 100, 200, 2.0),
            ("libvirt-plain", 2.0, 200, 200, 2.5),
            ("libvirt-plain", 1.5, 150, 200, 3.0),
        ]
        records = [
            {
                "protocol": p,
                "total_s": t,
                "downtime_ms": d,
                "guest_downtime_ms": g,
                "cpu_s": c,
                "memory_bytes": 1 << 20,
                "disk_bytes": None,
            }
            for p, t, d, g, c in rows
        ]
        out = Path(self.mktemp())
        info = {"git_commit": "x", "load_average": [1.0, 1.0, 1.0]}
        _report(records, ("libvirt-tls", "libvirt-plain"), 128, 8, 16, 3, out, info)
        report = json.loads(out.read_text())
        self.assertEqual(report["medians"]["libvirt-tls"]["total_s"], 3.0)
        self.assertEqual(report["medians"]["libvirt-tls"]["downtime_ms"], 200)
        self.assertIsNone(report["medians"]["libvirt-tls"]["disk_bytes"])
        self.assertEqual(
            report["ratios"]["libvirt-tls / libvirt-plain"],
            {"total_s": 2.0, "downtime_ms": 1.33, "guest_downtime_ms": 2.0, "cpu_s": 2.0},
        )
        self.assertIn("secure-libvirt", report["not_run"])

    def test_time_outside_the_migration(self) -> None:
        """securemig's arm: the median of the time its process spent outside
        the migration, reported and said; the native arms have none."""
        records = [
            {
                "protocol": p,
                "total_s": t,
                "downtime_ms": 100,
                "guest_downtime_ms": 300,
                "cpu_s": 2.0,
                "memory_bytes": 1 << 20,
                "disk_bytes": None,
                "outside_migration_s": o,
            }
            for p, t, o in (
                ("secure-libvirt", 9.0, 3.0),
                ("secure-libvirt", 8.0, 2.0),
                ("secure-libvirt", 10.0, 4.5),
                ("libvirt-tls", 6.0, None),
                ("libvirt-plain", 4.0, None),
            )
        ]
        out = Path(self.mktemp())
        info = {"git_commit": "x", "load_average": [1.0, 1.0, 1.0]}
        _report(records, PROTOCOLS, 128, 8, 16, 3, out, info)
        medians = json.loads(out.read_text())["medians"]
        self.assertEqual(medians["secure-libvirt"]["outside_migration_s"], 3.0)
        self.assertIsNone(medians["libvirt-tls"]["outside_migration_s"])


class CPUSamplerTests(SynchronousTestCase):
    """CPU of processes that come and go during the interval."""

    def test_a_process_that_ends_still_counts(self) -> None:
        """A busy child started after the sampler and ended before it stops
        is counted (about its CPU time, not zero)."""
        pids: list[int] = []
        sampler = CPUSampler(lambda: list(pids))
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import time\nt=time.process_time()\nwhile time.process_time()-t<0.6: pass",
            ]
        )
        pids.append(child.pid)
        child.wait()
        time.sleep(0.3)
        used = sampler.stop()
        self.assertGreater(used, 0.3)
        self.assertLess(used, 5.0)
        # The part of one process: all of it here, none of a pid not seen.
        self.assertEqual(sampler.used([child.pid]), used)
        self.assertEqual(sampler.used([1 << 30]), 0)

"""`securemig bench --live`: the three ways of moving a running Linux guest
(securemig's secure live migration, QEMU's TLS migration, QEMU's plain
one) in one run, each record with its numbers and the guest never
restarted."""

from __future__ import annotations

import json
from pathlib import Path

from twisted.trial.unittest import TestCase

from securemig.hypervisor import guest
from securemig.hypervisor.qemu import qemu_binary
from securemig.lab import processes
from tests.support.qemu import under_tcg


class LiveBenchTests(TestCase):
    def test_one_round(self) -> None:
        """One round of each protocol on a small guest: the JSON has a
        record per protocol with every field, the guest's heartbeat went
        on through each, and the ratios against qemu-tls."""
        qemu_binary()
        guest.find()
        under_tcg(self)
        out = Path(self.mktemp()).absolute()
        result = processes.securemig(
            "bench", "--live", "--repeat", "1", "--live-mib", "128", "--dirty-mib-s", "8",
            "--json", str(out),
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        report = json.loads(out.read_text())
        records = report["records"]
        self.assertEqual(
            [r["protocol"] for r in records], ["secure-live", "qemu-tls", "qemu-plain"]
        )
        for record in records:
            for field in (
                "total_s", "qemu_total_ms", "downtime_ms", "guest_downtime_ms", "cpu_s",
                "wire_bytes",
            ):  # fmt: skip
                self.assertGreater(record[field], 0, record)
            self.assertTrue(record["guest_kept_running"], record)
        self.assertEqual(
            set(report["secure_live_vs_qemu_tls"]),
            {"total_s", "qemu_total_ms", "downtime_ms", "guest_downtime_ms", "cpu_s"},
        )
        self.assertIn("secure-live / qemu-tls", result.stdout)

    def test_parallel_round(self) -> None:
        """--parallel 2: every protocol ran on QEMU's multifd channels (QEMU
        says it sent on them: secure-live through its sealed channels,
        qemu-tls and qemu-plain with multifd-channels 2 on both QEMUs), the
        guest went on through each, and the report says 2 channels."""
        qemu_binary()
        guest.find()
        under_tcg(self)
        out = Path(self.mktemp()).absolute()
        result = processes.securemig(
            "bench", "--live", "--repeat", "1", "--live-mib", "128", "--dirty-mib-s", "8",
            "--parallel", "2", "--json", str(out),
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        report = json.loads(out.read_text())
        self.assertEqual(report["parallel"], 2)
        for record in report["records"]:
            self.assertGreater(record["multifd_bytes"], 16 << 20, record)
            self.assertTrue(record["guest_kept_running"], record)
        self.assertIn("2 multifd channels each", result.stdout)

    def test_daemon_series(self) -> None:
        """--protocols secure-live,secure-live-daemon,qemu-tls: the daemon's
        series moved the guest live through the source host's daemon (its
        journal names the daemon as the driver; the in-process series' the
        command), the command itself used a bare interpreter's CPU while
        the daemons' share over the move is counted in its CPU, and the
        report has its ratios against qemu-tls and says what its CPU
        counts."""
        qemu_binary()
        guest.find()
        under_tcg(self)
        out = Path(self.mktemp()).absolute()
        result = processes.securemig(
            "bench", "--live", "--repeat", "1", "--live-mib", "128", "--dirty-mib-s", "8",
            "--protocols", "secure-live-daemon,qemu-tls,secure-live", "--json", str(out),
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        report = json.loads(out.read_text())
        # In the bench's own order, whatever the order asked.
        by = {r["protocol"]: r for r in report["records"]}
        self.assertEqual(list(by), ["secure-live", "secure-live-daemon", "qemu-tls"])
        daemon, alone = by["secure-live-daemon"], by["secure-live"]
        self.assertEqual(daemon["driven_by"], "daemon")
        self.assertEqual(alone["driven_by"], "command")
        for record in (daemon, alone):
            self.assertTrue(record["guest_kept_running"], record)
            self.assertGreater(record["wire_bytes"], 16 << 20, record)
            # cpu_s has the command's and the daemons' in it.
            self.assertGreaterEqual(
                record["cpu_s"] + 0.02, record["own_cpu_s"] + record["daemons_cpu_s"], record
            )
        # The client imports no Twisted, TLS or TSS: a fraction of the
        # in-process command's CPU; the daemon that did the work is counted.
        self.assertLess(daemon["own_cpu_s"], alone["own_cpu_s"] / 2, (daemon, alone))
        self.assertGreater(daemon["daemons_cpu_s"], 2 * daemon["own_cpu_s"], daemon)
        self.assertEqual(
            set(report["secure_live_daemon_vs_qemu_tls"]),
            {"total_s", "qemu_total_ms", "downtime_ms", "guest_downtime_ms", "cpu_s"},
        )
        self.assertIn("over the run only", report["cpu_counted"]["secure-live-daemon"])
        self.assertIn("secure-live-daemon / qemu-tls", result.stdout)
        self.assertNotIn("qemu-plain", result.stdout)


class SwitchoverTests(TestCase):
    def test_switchover_from_journals_and_heartbeats(self) -> None:
        """Each commit step's time is counted from the source's last
        heartbeat before the largest gap (monotonic, turned into the
        journals' wall clock), by role and phase; the destination's first
        heartbeat ends it; a missing record gives nothing."""
        import time

        from securemig.host.journal import Journal
        from securemig.hypervisor.heartbeat import Beat
        from securemig.lab.bench.live import switchover_times

        base = Path(self.mktemp())
        base.mkdir()
        journals = {role: Journal(base / f"{role}.sqlite") for role in ("source", "destination")}
        now = time.monotonic()
        beats = [Beat(now - 2 + i * 0.02, i, "00", 0) for i in range(10)]
        last = beats[-1]
        beats.append(Beat(last.at + 0.5, 10, "00", 1))
        stopped = last.at + time.time() - time.monotonic()
        steps = {
            ("destination", "prepared"): 0.1,
            ("source", "committed"): 0.15,
            ("destination", "committed"): 0.2,
            ("destination", "continuing"): 0.25,
            ("destination", "resumed"): 0.3,
            ("source", "prepared"): 9.0,  # not a step of the switchover
        }
        for role, journal in journals.items():
            mid = journal.begin(role=role, vm="vm1", peer="h:1", variant="full", protocol="x")
            for (who, phase), after in steps.items():
                if who == role:
                    journal._db.execute(
                        "INSERT INTO events VALUES (?, ?, ?)", (mid, phase, stopped + after)
                    )
            journal.close()

        class Watched:
            def __init__(self, beats: list[Beat]) -> None:
                self.beats = beats

        got = switchover_times(Watched(beats), base / "source.sqlite", base / "destination.sqlite")  # type: ignore[arg-type]
        want = {
            "dst_prepared": 100,
            "src_committed": 150,
            "dst_committed": 200,
            "dst_continuing": 250,
            "dst_resumed": 300,
            "first_beat": 500,
        }
        self.assertEqual(set(got), set(want))
        for name, ms in want.items():
            self.assertAlmostEqual(got[name], ms, delta=5, msg=name)
        self.assertEqual(
            switchover_times(Watched(beats), base / "source.sqlite", base / "none.sqlite"),
            {},  # type: ignore[arg-type]
        )

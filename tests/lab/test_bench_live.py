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

"""The benchmark's report, CSV and plots from records (synthetic numbers)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from securemig.lab.bench import report


def record(protocol: str, size: int, total: float, repeat: int = 0) -> dict[str, Any]:
    return {
        "protocol": protocol,
        "variant": "full",
        "cipher": None,
        "size_mib": size,
        "repeat": repeat,
        "phases": {"streams": total * 0.9} if protocol != "plain-copy" else {},
        "total_s": total,
        "cpu_s": {"source": total / 2, "destination": total / 2},
        "peak_rss_mib": {"source": 60.0, "destination": 65.0},
        "wire_bytes": size << 20,
        "throughput_mibps": size / total,
    }


RECORDS = [
    record("plain-copy", 256, 1.0),
    record("insecure", 256, 1.5),
    record("secure", 256, 3.0),
    record("plain-copy", 256, 1.2, 1),
    record("insecure", 256, 1.7, 1),
    record("secure", 256, 3.2, 1),
]


class ReportTests(SynchronousTestCase):
    def test_ratios(self) -> None:
        """The ratio table is computed from medians of the same size."""
        text = report.report(RECORDS)
        # medians: plain 1.1, insecure 1.6, secure 3.1
        self.assertIn("| 256 | secure | 1.45 | 2.82 | 1.94 | 1.94 |", text)
        self.assertIn("| 256 | secure | 3.100 (3.000-3.200)", text)

    def test_outputs(self) -> None:
        out = Path(self.mktemp())
        written = report.write_all(RECORDS, out)
        names = sorted(p.name for p in written)
        self.assertEqual(
            names,
            [
                "cpu.png",
                "memory.png",
                "records.csv",
                "records.json",
                "report.md",
                "throughput.png",
                "time.png",
            ],
        )
        with open(out / "records.csv") as f:
            rows = list(csv.DictReader(f))
        self.assertEqual(len(rows), len(RECORDS))
        self.assertEqual(rows[2]["cpu_s_destination"], "1.5")
        self.assertTrue((out / "time.png").read_bytes().startswith(b"\x89PNG"))

    def test_ssh_baselines(self) -> None:
        """The ssh baselines are rows of their own, after the plain copy,
        and every migration is compared with them."""
        records = [*RECORDS, record("ssh-aes128-gcm", 256, 2.5), record("ssh-chacha20", 256, 3.1)]
        for r in records[-2:]:
            r["phases"], r["wire_bytes"] = {}, None
        self.assertEqual(
            report.protocols_of(records),
            ["plain-copy", "ssh-aes128-gcm", "ssh-chacha20", "insecure", "secure"],
        )
        text = report.report(records)
        # 2.5 s at 256 MiB; CPU 2.5 s for 0.25 GiB.
        self.assertIn("| 256 | ssh-aes128-gcm | 2.500 (2.500-2.500) |", text)
        self.assertIn("| 10.00 |", text)
        # secure's median 3.1 s: ssh-aes128-gcm takes 0.81 of it, chacha20 1.00.
        self.assertIn("| 256 | secure | 0.81 | 1.00 |", text)
        self.assertIn("| 256 | insecure | 1.56 | 1.94 |", text)
        self.assertIn("secure ≥ 1.3 x ssh aes128-gcm, 256 MiB (whole-process time) | 0.81 x", text)

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
        # Half a second of interpreter start-up outside the migration.
        "in_process_s": total - 0.5,
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
        # Whole process 3.1 / 1.6; in process 2.6 / 1.1: two ratios, two names.
        self.assertIn("| 256 | secure | 1.45 | 2.82 | 1.94 | 2.36 | 1.94 |", text)
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


class ConcurrencyTableTests(SynchronousTestCase):
    def together(self) -> dict[str, Any]:
        r = record("secure", 256, 4.2)
        r.update(
            concurrency=4,
            per_migration_s=[3.0, 3.5, 4.0, 4.2],
            cpu_s={"source": 4.0, "destination": 2.0},
        )
        return r

    def test_against_one_alone(self) -> None:
        """Four at once against the median of one alone (3.1 s): aggregate
        MiB/s of all four, each one's time over the one alone, CPU per GiB
        of all the bytes the four moved."""
        text = report.report([*RECORDS, self.together()])
        self.assertIn("## Migrations at once", text)
        # 4 x 256 MiB in 4.2 s: 244 MiB/s; alone 256 / 3.1 = 83; each 3.75 s / 3.1.
        self.assertIn(
            "| 256 | 4 x secure | 4.200 (4.200-4.200) | 3.750 (3.000-4.200) | 3.100 "
            "| 1.21 | 244 | 83 | 2.95 | 4.00 | 2.00 | 6.00 |",
            text,
        )

    def test_kept_out_of_the_single_tables(self) -> None:
        """Runs at once are not runs alone: not a series of the main table,
        the ratios or the targets."""
        records = [*RECORDS, self.together()]
        self.assertEqual(report.protocols_of(records), report.protocols_of(RECORDS))
        self.assertEqual(report.series(records[-1]), "secure x4")
        self.assertEqual(report.targets(records), report.targets(RECORDS))
        self.assertEqual(report.concurrency_table(RECORDS), [])


class ThesisTableTests(SynchronousTestCase):
    def test_our_numbers_beside_the_thesis(self) -> None:
        """Client and server CPU per size, disk image and cipher; secure /
        insecure beside it; the thesis's 1024 MB numbers where we have them,
        and "not in the repository" where we do not (never invented)."""
        records = [
            *RECORDS,
            record("insecure", 1024, 4.0),
            record("secure", 1024, 5.0),
        ]
        records[-1]["cipher"] = "TLS_AES_128_GCM_SHA256"
        text = "\n".join(report.thesis_table(records))
        # 256 MiB: medians 1.6 s (0.8 + 0.8 CPU) and 3.1 s (1.55 + 1.55).
        self.assertIn(
            "| 256 | 0 | insecure | none | 0.80 | 0.80 | - | - "
            "| not in the repository | not in the repository | - |",
            text,
        )
        self.assertIn(
            "| 256 | 0 | secure | default (OpenSSL's choice) | 1.55 | 1.55 | 2.36 | 1.94 |", text
        )
        self.assertIn("| 1024 | 0 | insecure | none | 2.00 | 2.00 | - | - | 13.1 | 18.3 |", text)
        self.assertIn(
            "| 1024 | 0 | secure | TLS_AES_128_GCM_SHA256 | 2.50 | 2.50 | 1.29 | 1.25 "
            "| 25.8 | 36.5 | time ~1.10 (above 512 MB), CPU 1.98",
            text,
        )

    def test_disk_image_rows_apart(self) -> None:
        """With a disk image the rows are their own, compared with the twin
        that moved the same disk, and the thesis's numbers are not claimed."""
        with_disk = [record("insecure", 1024, 6.0), record("secure", 1024, 9.0)]
        for r in with_disk:
            r["disk_mib"] = 64
        text = "\n".join(
            report.thesis_table(
                [record("insecure", 1024, 4.0), record("secure", 1024, 5.0), *with_disk]
            )
        )
        self.assertIn(
            "| 1024 | 64 | secure | default (OpenSSL's choice) | 4.50 | 4.50 | 1.55 | 1.50 "
            "| not in the repository |",
            text,
        )
        self.assertIn(
            "| 1024 | 0 | secure | default (OpenSSL's choice) | 2.50 | 2.50 | 1.29 | 1.25 | 25.8 |",
            text,
        )

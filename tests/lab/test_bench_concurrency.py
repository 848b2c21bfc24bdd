"""``securemig bench --concurrency N``: N secure migrations of distinct VMs
at once into one destination, real processes, tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

from twisted.trial.unittest import TestCase

from securemig.lab import processes
from securemig.lab.bench import report


class BenchConcurrencyTests(TestCase):
    def test_two_at_once(self) -> None:
        """A record of two migrations at once: both moved their VM (bytes of
        two), each one's time within the wall time of both, the CPU of both
        sources; the report compares it with one alone."""
        out = Path(self.mktemp()).absolute()
        result = processes.securemig(
            "bench",
            "--sizes",
            "4",
            "--repeat",
            "1",
            "--protocols",
            "secure",
            "--concurrency",
            "2",
            "--json",
            str(out / "b.json"),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        records = json.loads((out / "b.json").read_text())
        alone = [r for r in records if r["protocol"] == "secure" and "concurrency" not in r]
        [together] = [r for r in records if r.get("concurrency") == 2]
        self.assertEqual(len(alone), 1)
        self.assertEqual(together["size_mib"], 4)
        self.assertGreaterEqual(together["bytes"], 2 * (4 << 20))
        self.assertLess(together["bytes"], 2 * alone[0]["bytes"] + 1)
        self.assertEqual(len(together["per_migration_s"]), 2)
        for seconds in together["per_migration_s"]:
            self.assertGreater(seconds, 0)
            self.assertLessEqual(seconds, together["total_s"])
        # Two source processes: more CPU than the one alone's source.
        self.assertGreater(together["cpu_s"]["source"], alone[0]["cpu_s"]["source"])
        self.assertEqual(report.series(together), "secure x2")
        self.assertNotIn("secure x2", report.protocols_of(records))
        text = (out / "b-report.md").read_text()
        self.assertIn("## Migrations at once", text)
        self.assertIn("| 4 | 2 x secure |", text)
        self.assertIn("migrations at once:", result.stdout)

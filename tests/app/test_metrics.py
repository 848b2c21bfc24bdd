"""``twistd securemig --metrics``: a Prometheus endpoint scraped during and
after a real secure migration, after a refused arrival and after a
connection refused by the per-address cap (issue 24)."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from securemig.app.metrics_service import JournalCollector
from securemig.host.journal import Journal
from securemig.lab import processes
from tests.support.secure import SecureBase


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def scrape(port: int) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """The endpoint's text and its samples by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        v for (n, have), v in samples.items() if n == name and set(labels.items()) <= set(have)
    )


class MetricsTests(SecureBase):
    def test_scrape_during_and_after_a_migration_and_refusals(self) -> None:
        port = free_port()
        destination = self.start_destination(
            "--tofu",
            "--metrics",
            f"tcp:{port}:interface=127.0.0.1",
            "--per-source-max-startups",
            "1",
        )
        self.assertIn(f"metrics tcp:{port}", destination.log())
        _, before = scrape(port)
        self.assertEqual(value(before, "securemig_migrations_started_total"), 0)
        self.assertEqual(value(before, "securemig_preauth_pending"), 0)
        self.create_vm("--ram-mib", "24")
        migrate = subprocess.Popen(
            [
                processes.script("securemig"),
                "migrate",
                "vm1",
                "--vm-dir",
                str(self.vm_dir),
                "--to",
                destination.address,
                "--identity",
                str(self.src_id),
                "--policy-dir",
                str(self.src_policy),
                "--destination-name",
                "dest-b",
                "--tofu",
                "--bandwidth",
                "6",
                "--no-progress",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(lambda: migrate.poll() is None and migrate.kill())
        # During: one arrival under way.
        deadline = time.monotonic() + 30
        while True:
            _, during = scrape(port)
            if value(during, "securemig_migrations_running", role="destination") == 1:
                break
            self.assertLess(time.monotonic(), deadline, "no migration seen running")
            time.sleep(0.2)
        self.assertEqual(
            value(
                during, "securemig_migrations_started_total", role="destination", mode="suspended"
            ),
            1,
        )
        self.assertEqual(value(during, "securemig_migrations_ended_total"), 0)
        _, err = migrate.communicate(timeout=60)
        self.assertEqual(migrate.returncode, 0, err)
        # After: done, its bytes and duration; the TPM was waited for.
        text, after = scrape(port)
        labels = {"role": "destination", "variant": "full", "protocol": "secure"}
        self.assertEqual(value(after, "securemig_migrations_running", role="destination"), 0)
        self.assertEqual(
            value(after, "securemig_migrations_ended_total", outcome="done", code="", **labels), 1
        )
        self.assertGreaterEqual(value(after, "securemig_migration_bytes_total", **labels), 24 << 20)
        self.assertEqual(value(after, "securemig_migration_duration_seconds_count", **labels), 1)
        self.assertGreater(value(after, "securemig_migration_duration_seconds_sum", **labels), 1.0)
        self.assertGreater(value(after, "securemig_tpm_queue_wait_seconds_count"), 0)
        self.assertEqual(value(after, "securemig_migrations_in_doubt"), 0)
        # A refused arrival: vm1 is already there.
        self.create_vm()
        result = self.migrate(destination, "--tofu")
        self.assertEqual(result.returncode, 1, result.stderr)
        _, refused = scrape(port)
        self.assertEqual(value(refused, "securemig_refusals_total", code="VM_BUSY"), 1)
        # The per-address cap: one pending connection, a second one refused.
        squatter = socket.create_connection(("127.0.0.1", destination.port))
        self.addCleanup(squatter.close)
        deadline = time.monotonic() + 10
        while value(scrape(port)[1], "securemig_preauth_pending") != 1:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.1)
        second = socket.create_connection(("127.0.0.1", destination.port))
        self.addCleanup(second.close)
        second.settimeout(10)
        self.assertEqual(second.recv(1), b"")  # closed at accept
        text, last = scrape(port)
        self.assertEqual(value(last, "securemig_preauth_refused_total"), 1)
        self.assertEqual(value(last, "securemig_preauth_pending"), 1)
        # The source's own journal, as the daemon of the source host serves it.
        source = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for m in JournalCollector(self.vm_dir / ".securemig" / "journal.sqlite").collect()
            for s in m.samples
        }
        self.assertEqual(
            value(source, "securemig_migrations_ended_total", role="source", outcome="done"), 1
        )
        self.assertEqual(
            value(
                source,
                "securemig_migrations_ended_total",
                role="source",
                outcome="aborted",
                code="VM_BUSY",
            ),
            1,
        )
        # Kept beside the test's other files, to be read.
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "scrape.txt").write_text(text)


class DowntimeHistogramTests(SynchronousTestCase):
    def test_live_downtime_from_the_journal(self) -> None:
        """A live migration whose source journaled QEMU's downtime (120 ms)
        is one observation of securemig_migration_downtime_seconds, in the
        0.2 s bucket and not the 0.1 s one; a suspended migration, with no
        downtime journaled, is none."""
        path = Path(self.mktemp()) / "journal.sqlite"
        path.parent.mkdir()
        journal = Journal(path)
        live = journal.begin(
            role="source", vm="vm1", peer="127.0.0.1:1", variant="shared", protocol="secure"
        )
        journal.phase(live, "live")
        journal.set_downtime(live, 120)
        journal.finish(live, "done")
        suspended = journal.begin(
            role="source", vm="vm2", peer="127.0.0.1:1", variant="full", protocol="secure"
        )
        journal.finish(suspended, "done")
        journal.close()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for m in JournalCollector(path).collect()
            for s in m.samples
        }
        name = "securemig_migration_downtime_seconds"
        self.assertEqual(value(samples, name + "_count"), 1)
        self.assertEqual(value(samples, name + "_count", mode="live"), 1)
        self.assertAlmostEqual(value(samples, name + "_sum"), 0.12)
        self.assertEqual(value(samples, name + "_bucket", le="0.1"), 0)
        self.assertEqual(value(samples, name + "_bucket", le="0.2"), 1)
        self.assertEqual(value(samples, name + "_bucket", le="+Inf"), 1)

"""The benchmark's OpenSSH baseline: its own sshd on loopback, ended by pid.

These tests need Debian's openssh-server (``scripts/setup-debs.sh`` installs
it); without it they fail, naming the package, rather than skip."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from twisted.trial.unittest import TestCase

from securemig.lab import processes
from securemig.lab.bench import report
from securemig.lab.bench.ssh import CIPHERS, Sshd, SshError


def sshd_alive(pid: int) -> bool:
    """Whether ``pid`` is still an sshd (a reaped pid may be reused by anything)."""
    try:
        return b"sshd" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class SshdTests(TestCase):
    def test_missing_sshd_names_the_package(self) -> None:
        with self.assertRaises(SshError) as cm:
            Sshd(Path(self.mktemp()), sshd="/nonexistent/sshd")
        self.assertIn("openssh-server", str(cm.exception))

    def test_copy_with_each_cipher(self) -> None:
        """Each cipher copies the file intact; the sshd listens on loopback
        only and is gone afterwards."""
        work = Path(self.mktemp()).absolute()
        image = work / "image"
        work.mkdir()
        data = os.urandom(3 << 20)
        image.write_bytes(data)
        sshd = Sshd(work / "sshd")
        with sshd:
            pid = sshd.pid
            self.assertTrue(sshd_alive(pid))
            self.assertIn("ListenAddress 127.0.0.1\n", sshd.config.read_text())
            for cipher in CIPHERS.values():
                out = work / "out"
                copy = sshd.copy(image, out, cipher)
                self.assertEqual(out.read_bytes(), data)
                out.unlink()
                self.assertGreater(copy.seconds, 0)
                self.assertGreater(copy.client.cpu_s, 0)
                # At least the re-exec'd per-connection sshd's start-up.
                self.assertGreater(copy.server_cpu_s, 0)
                self.assertGreater(copy.server_peak_rss_mib, 1)
        self.assertFalse(sshd_alive(pid))

    def test_failed_copy_says_why(self) -> None:
        work = Path(self.mktemp()).absolute()
        work.mkdir()
        (work / "image").write_bytes(b"x" * 1000)
        with Sshd(work / "sshd") as sshd, self.assertRaises(SshError) as cm:
            sshd.copy(work / "image", work / "no" / "such" / "dir", CIPHERS["ssh-aes128-gcm"])
        self.assertIn("exited with", str(cm.exception))


class BenchWithSshTests(TestCase):
    def test_tiny_bench_has_ssh_records(self) -> None:
        """A tiny bench writes a record per ssh cipher with plausible fields,
        reports them beside the others, and leaves no sshd behind."""
        out = Path(self.mktemp()).absolute()
        result = processes.securemig(
            "bench", "--sizes", "4", "--repeat", "1", "--json", str(out / "b.json")
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        started = re.search(r"sshd \(pid (\d+)\) on 127\.0\.0\.1 port \d+", result.stderr)
        assert started is not None, result.stderr
        self.assertFalse(sshd_alive(int(started.group(1))))
        records = json.loads((out / "b.json").read_text())
        ssh = {r["protocol"]: r for r in records if r["protocol"].startswith("ssh-")}
        self.assertEqual(set(ssh), set(CIPHERS))
        for name, r in ssh.items():
            self.assertEqual(r["cipher"], CIPHERS[name])
            self.assertEqual(r["size_mib"], 4)
            self.assertGreater(r["total_s"], 0)
            self.assertLess(abs(r["throughput_mibps"] - 4 / r["total_s"]), 0.1, r)
            for side in ("source", "destination"):
                self.assertGreater(r["cpu_s"][side], 0, r)
                self.assertGreater(r["peak_rss_mib"][side], 1, r)
                self.assertLess(r["peak_rss_mib"][side], 200, r)
        text = (out / "b-report.md").read_text()
        for name in CIPHERS:
            self.assertIn(f"| 4 | {name} |", text)
        self.assertIn("## Against OpenSSH", text)
        self.assertIn("| 4 | secure |", text)
        self.assertIn("ssh-aes128-gcm", result.stdout)
        self.assertEqual(report.protocols_of(records)[:3], ["plain-copy", *CIPHERS])

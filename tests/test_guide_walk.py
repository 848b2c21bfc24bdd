"""``scripts/guide-walk.sh``, the operators' guide's one-machine site run
literally: it fails fast with a sentence when a port is taken, and leaves
nothing behind, whether it fails or succeeds (issue 24 item 8)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

ROOT = Path(__file__).resolve().parents[1]
WALK = ROOT / "scripts" / "guide-walk.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GuideWalkTests(TestCase):
    def walk(self, port: int, pca_port: int, timeout: float) -> subprocess.CompletedProcess[str]:
        self.tmp = Path(self.mktemp()).absolute()
        self.tmp.mkdir()
        env = {**os.environ, "TMPDIR": str(self.tmp), "PORT": str(port), "PCA_PORT": str(pca_port)}
        env.pop("KEEP", None)
        return subprocess.run(
            ["bash", str(WALK)], capture_output=True, text=True, env=env, timeout=timeout
        )

    def test_busy_port_fails_fast(self) -> None:
        """A listener on PORT: the walk stops at once, names the port, and
        creates nothing (before, it waited forever and left its directory)."""
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            for args in ((port, free_port()), (free_port(), port)):
                started = time.monotonic()
                done = self.walk(*args, timeout=30)
                self.assertLess(time.monotonic() - started, 10)
                self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
                self.assertIn(f"port {port} on 127.0.0.1 is in use", done.stderr)
                self.assertEqual(list(self.tmp.iterdir()), [])

    def test_walk_migrates_and_leaves_nothing(self) -> None:
        """The nine commands migrate vm1; afterwards no process of the walk
        runs and its temporary directory (TPM locks included) is gone."""
        done = self.walk(free_port(), free_port(), timeout=240)
        self.assertEqual(done.returncode, 0, done.stdout[-3000:] + done.stderr[-3000:])
        self.assertIn("VM vm1 migrated to", done.stdout + done.stderr)
        self.assertIn("### 9: securemig", done.stdout)
        self.assertEqual(list(self.tmp.iterdir()), [])

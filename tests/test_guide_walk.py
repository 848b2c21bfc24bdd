"""``scripts/guide-walk.sh``, the operators' guide's one-machine site run
literally: it fails fast with a sentence when a port is taken, and leaves
nothing behind, whether it fails or succeeds (issue 24 item 8)."""

from __future__ import annotations

import contextlib
import os
import signal
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

    def test_failed_walk_ends_what_it_started(self) -> None:
        """host-b's daemon dies before it listens (SIGKILLed here, as a
        daemon that fails to start): the walk fails saying so, and its
        cleanup still ends the privacy CA and the TPM simulators it started
        (the kill of the dead daemon once ended the cleanup early) and
        removes its directory."""
        self.tmp = Path(self.mktemp()).absolute()
        self.tmp.mkdir()
        env = {
            **os.environ,
            "TMPDIR": str(self.tmp),
            "PORT": str(free_port()),
            "PCA_PORT": str(free_port()),
        }
        env.pop("KEEP", None)
        walk = subprocess.Popen(
            ["bash", str(WALK)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        # Whatever happens to the test, every process of the walk (its own
        # group) is ended; SIGTERM lets the walk's cleanup run first.
        self.addCleanup(_end_group, walk)
        started: dict[str, int] = {}
        deadline = time.monotonic() + 180
        while "host-b" not in started:
            self.assertIsNone(walk.poll(), "the walk ended before host-b's daemon started")
            self.assertLess(time.monotonic(), deadline, "host-b's daemon never started")
            for pidfile in self.tmp.glob("securemig-walk-*/*.pid"):
                with contextlib.suppress(OSError, ValueError):
                    if pidfile.stem not in started:
                        started[pidfile.stem] = int(pidfile.read_text())
                        # Should the walk leave it running (the bug), ended.
                        self.addCleanup(_end, started[pidfile.stem])
            time.sleep(0.01)
        os.kill(started["host-b"], signal.SIGKILL)
        out, err = walk.communicate(timeout=120)
        self.assertEqual(walk.returncode, 1, out[-3000:] + err[-3000:])
        self.assertIn("host-b exited before it said", err)
        self.assertEqual(set(started), {"tpm", "pca", "host-b"})
        for name, pid in started.items():
            for _ in range(200):
                if not _alive(pid):
                    break
                time.sleep(0.05)
            self.assertFalse(_alive(pid), f"the walk left {name} (pid {pid}) running")
        self.assertEqual(list(self.tmp.iterdir()), [])


def _end_group(walk: subprocess.Popen[str]) -> None:
    """SIGTERM the walk's process group, then SIGKILL what is left of it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(walk.pid, sig)
        try:
            walk.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def _end(pid: int) -> None:
    """SIGTERM ``pid`` (a process of the walk) if it still runs."""
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"

"""`twistd securemig` as a service: one per state directory, and a port it
cannot bind is a failed start (exit status 1), not a healthy-looking idle
process."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from twisted.trial.unittest import TestCase

from securemig.lab import processes


def twistd(*args: str, log_file: Path) -> subprocess.CompletedProcess[str]:
    """Run ``twistd -n securemig ARGS`` to its end (it must not keep running)."""
    return subprocess.run(
        [
            processes.script("twistd"),
            "-n",
            "--pidfile=",
            "--logfile",
            str(log_file),
            "securemig",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class ServiceTests(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()

    def test_second_daemon_on_a_state_dir_refused(self) -> None:
        """While one daemon runs on a state directory, a second is refused
        before it touches anything (it used to delete the first one's staging)."""
        state = self.base / "state"
        first = processes.start_destination(state)
        self.addCleanup(first.stop)
        staged = state / "staging" / ("a" * 32)
        staged.mkdir(parents=True)
        result = twistd(
            "--state-dir",
            str(state),
            "--insecure-listen",
            "tcp:0:interface=127.0.0.1",
            log_file=self.base / "second.log",
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("another twistd securemig", result.stdout + result.stderr)
        self.assertTrue(staged.exists())
        self.assertIsNone(first.process.poll())

    def test_port_in_use_exits_1(self) -> None:
        """A port taken by someone else: a one-line CRITICAL and exit status 1."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log = self.base / "d.log"
        result = twistd(
            "--state-dir",
            str(self.base / "state"),
            "--insecure-listen",
            f"tcp:{port}:interface=127.0.0.1",
            log_file=log,
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        text = log.read_text()
        self.assertIn("cannot listen for insecure migrations", text)
        self.assertNotIn("Traceback", text)

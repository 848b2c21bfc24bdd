"""swtpm as a real part: the proof that a listener is the swtpm we started
(its pid owns the listening sockets), not whatever accepts on the port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

from securemig.trust.tpm import swtpm
from securemig.trust.tpm.tpm import TPM
from tests.support.tpm import shared_tpm


class OwnListenerTests(TestCase):
    def test_listens_on_is_by_pid(self) -> None:
        """The owner of a listening socket is told apart from others."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            self.assertTrue(swtpm.listens_on(os.getpid(), "127.0.0.1", port))
            process, _, _ = shared_tpm()
            self.assertFalse(swtpm.listens_on(process.process.pid, "127.0.0.1", port))
            self.assertTrue(swtpm.listens_on(process.process.pid, "127.0.0.1", process.port))
        # Closed: nobody listens there any more.
        self.assertFalse(swtpm.listens_on(os.getpid(), "127.0.0.1", port))

    def test_start_on_a_port_someone_holds(self) -> None:
        """A port another process listens on is not taken for the swtpm's:
        start fails and says which ports, and why swtpm exited."""
        _, _, base = shared_tpm()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            with self.assertRaises(RuntimeError) as caught:
                swtpm.start(base / "tpm-other", port=port)
        self.assertIn(
            f"swtpm did not start on 127.0.0.1 ports {port} and {port + 1}", str(caught.exception)
        )
        self.assertIn("Address already in use", str(caught.exception))

    def test_started_swtpm_answers(self) -> None:
        """What start returns is a TPM that answers (a GetCapability round trip)."""
        process, _, _ = shared_tpm()
        with TPM(process.tcti) as tpm:
            self.assertTrue(tpm.ek_public())

    def test_check_tpm_dies_with_its_process(self) -> None:
        """A swtpm started ``dies_with_parent`` (the one a vTPM check starts)
        ends when the process that started it is SIGKILLed mid-check; one
        started without it outlives it (the orphan a killed daemon left)."""
        base = Path(self.mktemp())
        script = (
            "import sys, time; from pathlib import Path; from securemig.trust.tpm import swtpm\n"
            "for i, dies in enumerate((True, False)):\n"
            "    (state := Path(sys.argv[1]) / f'tpm-{i}').mkdir(parents=True)\n"
            "    p = swtpm.start(state, dies_with_parent=dies)\n"
            "    print(p.process.pid, flush=True)\n"
            "time.sleep(60)\n"
        )
        child = subprocess.Popen(
            [sys.executable, "-c", script, str(base)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None
        dying, staying = (int(child.stdout.readline()) for _ in range(2))
        self.addCleanup(lambda: _kill(staying))
        child.kill()
        child.wait()
        deadline = time.monotonic() + 10
        while _alive(dying) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse(_alive(dying))
        self.assertTrue(_alive(staying))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)

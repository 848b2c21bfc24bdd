"""swtpm as a real part: the proof that a listener is the swtpm we started
(its pid owns the listening sockets), not whatever accepts on the port."""

from __future__ import annotations

import os
import socket

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

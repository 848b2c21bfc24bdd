"""One queue per host TPM (``trust/tpm/tpm.py``: Turns): threads and
processes take turns on a TPM with three object slots, and a TSS failure
is a TPMError with a wire code, never a bare TSS2_Exception."""

from __future__ import annotations

import fcntl
import os
import threading
import time

from twisted.trial.unittest import TestCase

from securemig.protocol.errors import ErrorCode, MigrationError
from securemig.trust.tpm.tpm import TPM, TPMError, Turns, lock_path
from tests.support.tpm import shared_tpm


class TurnsTests(TestCase):
    """The queue, on the shared swtpm."""

    def setUp(self) -> None:
        self.process, self.tpm, _ = shared_tpm()

    def test_threads_take_turns(self) -> None:
        """Certify needs all three object slots of swtpm (SRK, key, AK): four
        threads certifying at once on their own connections would run out
        of object contexts; through the queue every one succeeds."""
        ak = self.tpm.create_ak()
        key = self.tpm.create_ak()
        errors: list[BaseException] = []

        def certify_many() -> None:
            tpm = TPM(self.process.tcti)
            try:
                for _ in range(5):
                    tpm.certify(key, ak, b"nonce")
            except BaseException as e:  # reported below
                errors.append(e)
            finally:
                tpm.close()

        threads = [threading.Thread(target=certify_many) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])

    def test_another_process_holds_the_turn(self) -> None:
        """The turn is an flock on the TPM's lock file: while another open
        file (as another process's would) holds it, an operation waits."""
        fd = os.open(lock_path(self.process.tcti), os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        done = threading.Event()
        waited = Turns.of(self.process.tcti).waited

        def read() -> None:
            self.tpm.pcr_read([0])
            done.set()

        reader = threading.Thread(target=read)
        reader.start()
        self.assertFalse(done.wait(0.5))
        fcntl.flock(fd, fcntl.LOCK_UN)
        self.assertTrue(done.wait(10))
        reader.join()
        self.assertGreater(Turns.of(self.process.tcti).waited, waited)

    def test_turn_is_reentrant(self) -> None:
        turns = Turns.of(self.process.tcti)
        with turns.turn(), turns.turn():
            self.tpm.pcr_read([0])
        started = time.monotonic()
        self.tpm.pcr_read([0])
        self.assertLess(time.monotonic() - started, 5)

    def test_tss_failure_is_a_tpm_error_with_a_code(self) -> None:
        """A key blob the TPM cannot load (garbage private part) fails as a
        TPMError, a LocalFault with a wire code."""
        ak = self.tpm.create_ak()
        broken = type(ak)(ak.private[:2] + bytes(len(ak.private) - 2), ak.public)
        with self.assertRaises(TPMError) as caught:
            self.tpm.quote(broken, [0], b"nonce")
        self.assertIsInstance(caught.exception, MigrationError)
        self.assertEqual(caught.exception.code, ErrorCode.ATTESTATION_FAILED)
        self.assertIn("does not load", str(caught.exception))
        with self.assertRaises(TPMError):
            self.tpm.pcr_extend(99, b"no such PCR")

"""``securemig bench --tpm`` (:mod:`securemig.lab.bench.tpm`): what it leaves
on the machine."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from twisted.trial.unittest import TestCase

from securemig import runtime
from securemig.lab import processes


class LeftoverTests(TestCase):
    timeout = 180

    def test_fresh_swtpm_leaves_no_lock_file_behind(self) -> None:
        """With no TPM lock directory chosen, the fresh swtpm's lock file
        goes to the benchmark's own run directory and goes with it: the
        temporary directory is as it was (it used to keep one
        ``securemig-tpm-HASH.lock`` per run, by the thousand)."""
        tmp = Path(tempfile.mkdtemp(prefix="smbt-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        env = {k: v for k, v in os.environ.items() if k != runtime.TPM_LOCK_ENV}
        env["TMPDIR"] = str(tmp)
        result = processes.securemig("bench", "--tpm", "--repeat", "1", env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("TPM timed: a fresh swtpm", result.stdout)
        self.assertEqual(sorted(p.name for p in tmp.iterdir()), [])

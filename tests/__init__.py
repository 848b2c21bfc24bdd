"""securemig tests (trial)."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# The suite runs on its own settings, never the machine's: a host that has an
# /etc/securemig/securemig.toml (or a $SECUREMIG_CONFIG) would otherwise
# change what every `securemig` the tests start does.  An empty file is no
# configuration; tests of the configuration file set their own.
os.environ["SECUREMIG_CONFIG"] = str(Path(__file__).with_name("no-config.toml"))

# Everything the suite and the programs it starts put in the temporary
# directory (a runtime directory per long state directory, sockets, lock
# files, the tests' own temporary trees, and what a SIGKILLed process left)
# goes in one directory of the suite's own, removed when the suite ends: the
# machine's /tmp keeps nothing of a run.  Short (``/tmp/smt-XXXXXXXX``): UNIX
# socket paths are built in it.  Workers of ``trial -j`` inherit it.
if "SECUREMIG_TEST_TMP" not in os.environ:
    _tmp = tempfile.mkdtemp(prefix="smt-")
    os.environ["SECUREMIG_TEST_TMP"] = os.environ["TMPDIR"] = _tmp
    atexit.register(shutil.rmtree, _tmp, ignore_errors=True)
tempfile.tempdir = os.environ["SECUREMIG_TEST_TMP"]

# Each simulator the tests start has its own TCTI and so its own TPM lock file
# (trust/tpm/tpm.py, lock_path); in the machine's temporary directory they
# would stay by the thousand.  This test process and every process it starts
# (they inherit the variable) keep them in one directory, removed at exit.
if "SECUREMIG_TPM_LOCK_DIR" not in os.environ:
    _locks = tempfile.mkdtemp(prefix="securemig-test-locks-")
    os.environ["SECUREMIG_TPM_LOCK_DIR"] = _locks
    atexit.register(shutil.rmtree, _locks, ignore_errors=True)

# The same for the runtime directory (securemig/runtime.py) of whatever the
# test process starts itself (a QEMU of a backend test) and of the commands
# that have no state directory; a command or daemon with one uses that
# directory's own, as in production.
if "SECUREMIG_RUNTIME_DIR" not in os.environ:
    _run = tempfile.mkdtemp(prefix="securemig-test-run-")
    os.environ["SECUREMIG_RUNTIME_DIR"] = _run
    atexit.register(shutil.rmtree, _run, ignore_errors=True)

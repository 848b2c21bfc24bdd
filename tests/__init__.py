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

"""A real swtpm shared by the TPM tests of one test process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_shared_tpm: Any = None


def shared_tpm() -> Any:
    """A provisioned, running swtpm and an open TPM on it, started once per
    test process (provisioning takes about a second) and ended at exit.
    Raises, naming the Debian packages, when swtpm is not installed."""
    global _shared_tpm
    if _shared_tpm is None:
        import atexit
        import shutil
        import tempfile

        from securemig.trust.tpm import swtpm
        from securemig.trust.tpm.tpm import TPM

        base = Path(tempfile.mkdtemp(prefix="securemig-test-tpm-"))
        swtpm.provision(base / "tpm", base / "ca")
        atexit.register(shutil.rmtree, base, True)
        process = swtpm.start(base / "tpm")
        atexit.register(process.stop)
        _shared_tpm = (process, TPM(process.tcti), base)
    return _shared_tpm

"""``securemig`` and ``twistd securemig`` run as processes, and the
environment that makes one die at a crash point."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from securemig.lab import processes


def migrate_vm(vm_dir: Path, to: str, *extra: str, name: str = "vm1", **run: Any) -> Any:
    """Run ``securemig migrate NAME --vm-dir DIR --to TO EXTRA...`` as a
    process (``run``: more arguments of subprocess.run, e.g. ``env``)."""
    from securemig.lab import processes

    return processes.securemig("migrate", name, "--vm-dir", str(vm_dir), "--to", to, *extra, **run)


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


#: How often the source's daemon settles its departures in these tests.
RESOLVE_INTERVAL = "0.3"


def crash_env(point: str) -> dict[str, str]:
    """The environment that makes a process die at ``point``."""
    return {"SECUREMIG_CRASH_POINTS": "1", "SECUREMIG_CRASH_AT": point}

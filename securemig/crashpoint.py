"""
Named crash points, for the crash-point tests (SQLite's crash tests and
FoundationDB's "buggify" are the model).

The product calls :func:`reached` at each step of the commit and of recovery
where a crash matters.  A process started with both
``SECUREMIG_CRASH_POINTS=1`` and ``SECUREMIG_CRASH_AT=NAME[,NAME...]`` kills
itself with SIGKILL (no cleanup, no atexit, exactly as a power cut or the
OOM killer would) when it reaches one of those names.  Without both
variables nothing happens; no configuration file or flag can set them.
"""

from __future__ import annotations

import os
import signal
import sys

#: Every point the product defines, so a test (and a typo) can be checked.
POINTS = frozenset(
    {
        "destination-admitted",  # HELLO admitted and journaled, WELCOME not sent
        "destination-streaming",  # past half of the first image
        "destination-prepared",  # PREPARED journaled, not sent
        "destination-commit-journaled",  # COMMIT journaled, VM not moved into place
        "destination-resumed",  # VM moved and resumed, DONE not sent
        "source-prepared-received",  # PREPARED received, COMMITTED not journaled
        "source-committed",  # COMMITTED journaled, key and bundle still here, COMMIT not sent
        "source-released",  # key and bundle gone, COMMIT not sent
        "source-streaming",  # the first image bytes are written to the connection
        "source-attesting",  # secure: the destination's evidence arrived, not verified
        "source-key-wrapped",  # secure: WRAPPED_KEY about to be sent
        # Live mode (issue 16):
        "destination-incoming",  # its QEMU waits paused with the vTPM, LIVE_READY not sent
        "source-live-started",  # QEMU's pre-copy runs, the guest still runs here
        "source-live-ended",  # COMMITTED journaled, its QEMU and swtpm ended, key still here
        # libvirt domains (issue 23):
        "adopt-sealed",  # vm adopt: the sealed secret's bundle durable, libvirt's still defined
    }
)


def reached(name: str) -> None:
    """A crash point: die here if this test process was told to."""
    assert name in POINTS, name
    if os.environ.get("SECUREMIG_CRASH_POINTS") != "1":
        return
    if name in os.environ.get("SECUREMIG_CRASH_AT", "").split(","):
        sys.stderr.write(f"securemig: crash point {name} reached; killing this process\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

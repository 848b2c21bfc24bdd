"""
Named crash points, for the crash-point tests (SQLite's crash tests and
FoundationDB's "buggify" are the model).

The product calls :func:`reached` at each step of the commit and of recovery
where a crash matters.  A process started with both
``SECUREMIG_CRASH_POINTS=1`` and ``SECUREMIG_CRASH_AT=NAME[,NAME...]`` kills
itself with SIGKILL (no cleanup, no atexit, exactly as a power cut or the
OOM killer would) when it reaches one of those names.  Without both
variables nothing happens; no configuration file or flag can set them.

A name written ``NAME:guest`` kills, at that point only, the QEMU the point
passes (as ``SECUREMIG_CRASH_KILL=guest`` does at every listed point), so
that one run can kill a QEMU at one point and its process at a later one.

A name written ``NAME:other`` kills, at that point, the process whose pid
file ``SECUREMIG_CRASH_PIDFILE`` names instead: a destination's daemon can
so kill the source's QEMU at an exact step of the destination (both run on
one machine in the tests).  A pid file may name several processes (one pid
per line): all are killed at once, in that order (the source host's
``migrate``, libvirtd and QEMU, say, as a crash of that host would).
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import sys
import time
from pathlib import Path


class CrashPoint(enum.StrEnum):
    """A named step where a test build may kill the process (or a QEMU).

    A ``StrEnum``: the value is the name ``SECUREMIG_CRASH_AT`` lists and
    the message on stderr shows."""

    DESTINATION_ADMITTED = "destination-admitted"  #: HELLO admitted and journaled, WELCOME not sent
    DESTINATION_STREAMING = "destination-streaming"  #: past half of the first image
    DESTINATION_PREPARED = "destination-prepared"  #: PREPARED journaled, not sent
    #: COMMIT journaled, VM not moved into place
    DESTINATION_COMMIT_JOURNALED = "destination-commit-journaled"
    #: VM moved into place, not resumed (live: not continued)
    DESTINATION_IN_PLACE = "destination-in-place"
    DESTINATION_RESUMED = "destination-resumed"  #: VM moved and resumed, DONE not sent
    #: PREPARED received, COMMITTED not journaled
    SOURCE_PREPARED_RECEIVED = "source-prepared-received"
    #: COMMITTED journaled, key and bundle still here, COMMIT not sent
    SOURCE_COMMITTED = "source-committed"
    SOURCE_RELEASED = "source-released"  #: key and bundle gone, COMMIT not sent
    SOURCE_STREAMING = "source-streaming"  #: the first image bytes are written to the connection
    #: secure: the destination's evidence arrived, not verified
    SOURCE_ATTESTING = "source-attesting"
    SOURCE_KEY_WRAPPED = "source-key-wrapped"  #: secure: WRAPPED_KEY about to be sent
    # Live mode (issue 16):
    #: its QEMU waits paused with the vTPM, LIVE_READY not sent
    DESTINATION_INCOMING = "destination-incoming"
    SOURCE_LIVE_STARTED = "source-live-started"  #: QEMU's pre-copy runs, the guest still runs here
    #: DONE received, its paused QEMU and swtpm ended, key still here
    SOURCE_LIVE_ENDED = "source-live-ended"
    #: COMMIT received, its QEMU found ended, LOST not journaled
    DESTINATION_LIVE_LOST = "destination-live-lost"
    #: live: CONTINUING journaled (in place, its QEMU there), cont not sent
    DESTINATION_CONTINUING = "destination-continuing"
    # The source host's daemon (or a read command) settling a departure:
    #: an uncommitted departure journaled aborted, its guest not continued
    SOURCE_SETTLE_ABORTED = "source-settle-aborted"
    #: committed: the copy here destroyed, done not journaled
    SOURCE_SETTLE_RELEASED = "source-settle-released"
    #: live: reclaimed journaled, its paused QEMU not continued
    SOURCE_SETTLE_RECLAIMED = "source-settle-reclaimed"
    # Live through the hypervisor's own migration (carried sockets, issue 23):
    #: the hypervisor completed here (guest paused), PREPARED not journaled
    DESTINATION_LOADED = "destination-loaded"
    #: an arrival ended before PREPARED, not completed here, its staging
    #: (and what the hypervisor made of it) not yet removed
    DESTINATION_DISCARDING = "destination-discarding"
    # libvirt domains (issue 23):
    #: vm adopt: the sealed secret's bundle durable, libvirt's still defined
    ADOPT_SEALED = "adopt-sealed"
    #: --copy-storage: the disks to create listed in staging, none created
    DESTINATION_DISKS_LISTED = "destination-disks-listed"
    #: committed: the domain undefined and its stale disk copies deleted
    #: here, the bundle (with the sealed secret) not yet removed
    SOURCE_COPIES_REMOVED = "source-copies-removed"


#: Every point the product defines (each member is its name, a ``str``).
POINTS: frozenset[CrashPoint] = frozenset(CrashPoint)


def reached(point: CrashPoint, qemu: Path | None = None) -> None:
    """A crash point: die here if this test process was told to.

    With ``SECUREMIG_CRASH_KILL=guest`` as well (or the name listed as
    ``NAME:guest``), the process lives on and
    SIGKILLs instead the QEMU whose pid file ``qemu`` names (a point of a
    live migration passes its VM's), so that a test kills a QEMU at an exact
    step; a point reached without one does nothing then."""
    # Typed, and checked at run time too (an assert would be stripped by
    # -O): a name that is no point raises ValueError.
    name = CrashPoint(point)
    if os.environ.get("SECUREMIG_CRASH_POINTS") != "1":
        return
    at = os.environ.get("SECUREMIG_CRASH_AT", "").split(",")
    modes = dict(entry.partition(":")[::2] for entry in at)  # {name: mode}
    if name not in modes:
        return
    if modes[name] == "other":
        other = os.environ.get("SECUREMIG_CRASH_PIDFILE")
        if other:
            _kill(Path(other), name)
        return
    if modes[name] == "guest" or os.environ.get("SECUREMIG_CRASH_KILL") == "guest":
        if qemu is not None:
            _kill(qemu, name)
        return
    sys.stderr.write(f"securemig: crash point {name} reached; killing this process\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _kill(pidfile: Path, name: str) -> None:
    """SIGKILL the processes ``pidfile`` names (one pid per line), all
    first, then wait until each is gone."""
    try:
        pids = [int(word) for word in pidfile.read_text().split()]
    except (OSError, ValueError):
        return
    if not pids:
        return
    what = f"QEMU {pids[0]}" if len(pids) == 1 else "processes " + ", ".join(map(str, pids))
    sys.stderr.write(f"securemig: crash point {name} reached; killing {what}\n")
    sys.stderr.flush()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        _wait_gone(pid)


def _wait_gone(pid: int) -> None:
    """Until process ``pid`` is gone or a zombie (at most 5 s)."""
    for _ in range(500):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state == "Z":
            return
        time.sleep(0.01)

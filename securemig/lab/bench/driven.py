"""
Series driven by the source host's daemon (``securemig migrate --daemon``).

Every bench that has one (``secure-daemon``, ``secure-live-daemon``,
``secure-libvirt-daemon``) runs the same migration as its in-process
series, but the command only asks the daemon that keeps the source's
journal (:ref:`architecture:The control socket (migrate --daemon)`).
Those daemons, the source's and the destination's, run before the clock
as a deployed host's do, and their CPU is counted over the run only
(:class:`securemig.lab.processes.CpuShare`).

A bench must not report a series as daemon-driven on the command's word:
:func:`driver` reads who journaled the migration.
"""

from __future__ import annotations

from pathlib import Path

from securemig.host.journal import Journal

#: What a series driven by the source's daemon is called: its in-process
#: series' name and this.
SUFFIX = "-daemon"
#: What each daemon-driven series' CPU counts, for reports and records.
CPU_COUNTED = (
    "CPU of the command (wait4) plus that of both hosts' securemig daemons over the "
    "run only (each started before the clock, its start and stop not counted)"
)


def daemon_driven(series: str) -> bool:
    """Whether ``series`` is driven by the source host's daemon."""
    return series.endswith(SUFFIX)


def driver(journal_path: Path, daemon_pid: int) -> str:
    """Who drove the newest source migration journaled at ``journal_path``:
    ``"daemon"`` when the journal names the process ``daemon_pid`` as its
    owner, ``"command"`` for any other process, ``"none"`` when the journal
    holds no source migration."""
    journal = Journal(journal_path)
    try:
        record = next((r for r in journal.records(5) if r.role == "source"), None)
    finally:
        journal.close()
    if record is None:
        return "none"
    pid, _, _ = (record.owner or "").partition(":")
    return "daemon" if pid == str(daemon_pid) else "command"

"""Where and how a benchmark ran: stamped on every record and report.

A number without its machine, load and command line cannot be compared
with another; :func:`provenance` says what this process can find out
cheaply (no network, nothing that needs root)."""

from __future__ import annotations

import compileall
import os
import platform
import shlex
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import securemig


def _git_commit() -> str | None:
    """The commit of the checkout securemig runs from, if it is one."""
    top = Path(securemig.__file__).resolve().parent.parent
    if not (top / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(top), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    try:
        dirty = subprocess.run(
            ["git", "-C", str(top), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return f"{commit}-dirty" if dirty else commit


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """securemig's version and git commit, the date (UTC, ISO 8601), the host
    name, CPU model and count, kernel, load average and the command line."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "securemig_version": securemig.__version__,
        "git_commit": _git_commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": load,
        "command_line": shlex.join(sys.argv if argv is None else argv),
    }


def header_lines(info: dict[str, Any]) -> list[str]:
    """The provenance as Markdown list items, for a report's header."""
    load = info.get("load_average")
    return [
        f"- securemig {info.get('securemig_version')}, "
        f"commit {info.get('git_commit') or 'unknown'}",
        f"- date {info.get('date')}, host {info.get('hostname')}",
        f"- CPU {info.get('cpu_model')} ({info.get('cpus')} CPUs), kernel {info.get('kernel')}",
        "- load average at start " + (" ".join(str(x) for x in load) if load else "unknown"),
        f"- command line `{info.get('command_line')}`",
    ]


def one_line(info: dict[str, Any]) -> str:
    """The provenance on one line, for the top of a printed table."""
    load = info.get("load_average")
    return (
        f"securemig {info.get('securemig_version')} "
        f"(commit {(info.get('git_commit') or 'unknown')[:12]}), {info.get('date')}, "
        f"host {info.get('hostname')}, {info.get('cpu_model')} x{info.get('cpus')}, "
        f"kernel {info.get('kernel')}, load "
        + (" ".join(str(x) for x in load) if load else "unknown")
    )


def byte_compile() -> None:
    """Measure securemig as installed: byte-compiled, as pip leaves it.

    A source tree (an editable install) run with PYTHONDONTWRITEBYTECODE,
    as development shells often are, compiles its ~90 modules from source
    in every process: 0.15 CPU-s and more per ``securemig migrate`` and per
    daemon, measured as part of each migration.  Where the package cannot
    be written (a system install) it is compiled already; nothing is said.
    """
    compileall.compile_dir(Path(__file__).parents[2], quiet=2)

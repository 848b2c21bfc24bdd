"""
Starting and ending securemig processes on this machine.

Used by ``securemig demo``, ``securemig bench`` and the end-to-end tests:
they run a real ``twistd securemig`` and a real ``securemig migrate`` as
separate processes.  Every process is ended by its own pid, never by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: How long a destination may take to start listening.
START_TIMEOUT = 30.0


def script(name: str) -> str:
    """The path of one of our console scripts next to this Python."""
    candidate = Path(sys.executable).parent / name
    if not candidate.exists():
        raise FileNotFoundError(f"{candidate} not found; run `make setup`")
    return str(candidate)


def peak_rss_mib(pid: int | str = "self") -> float | None:
    """Peak resident memory of a live process (VmHWM), in MiB.

    ``wait4``'s ru_maxrss cannot be used for this: at exec the kernel folds
    the *parent's* memory high-water mark into the child's, so every child
    of a large parent appears at least as large as its parent."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) a live process has used so far
    (``/proc/PID/stat`` utime + stime); None once it is gone.  A daemon's
    share of one run is the difference over it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    # Fields 14 and 15 of proc(5), counted after the command's ")".
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuShare:
    """What processes that already run (daemons started before a bench's
    clock) spend over an interval: their CPU seconds (:func:`cpu_seconds`)
    when :meth:`used` is asked, less what they had used when this was made.
    Their start-up before it is not counted, as a deployed host's daemon
    has long started; one gone by either look counts nothing."""

    def __init__(self, pids: list[int]) -> None:
        self._before = {pid: cpu_seconds(pid) for pid in pids}

    def used(self) -> float:
        """CPU seconds the processes used since this was made."""
        total = 0.0
        for pid, before in self._before.items():
            now = cpu_seconds(pid)
            if before is not None and now is not None:
                total += now - before
        return total


@dataclass
class Rusage:
    """CPU seconds and peak memory of one ended child process."""

    cpu_s: float
    peak_rss_mib: float
    status: int


@dataclass
class Destination:
    """A running ``twistd -n securemig`` process."""

    process: subprocess.Popen[bytes]
    port: int
    state_dir: Path
    log_file: Path
    rusage: Rusage | None = field(default=None)
    #: The insecure listener's port, when it has both.
    insecure_port: int = 0

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> Rusage:
        """End the process (SIGTERM, then SIGKILL) and collect its usage."""
        if self.rusage is None:
            peak = peak_rss_mib(self.process.pid)
            self.rusage = end_process(self.process, sig, timeout)
            if peak is not None:
                self.rusage.peak_rss_mib = peak
        return self.rusage

    def log(self) -> str:
        """What the destination logged so far."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def start_twistd(
    plugin: str,
    *args: str,
    port_file: Path,
    log_file: Path,
    wrapper: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """Run ``twistd -n PLUGIN ARGS --port-file F`` and wait until it listens;
    returns the process and its port.  ``wrapper`` prefixes the command;
    ``env`` adds to this process's environment."""
    port_file.unlink(missing_ok=True)
    argv = [
        *wrapper,
        script("twistd"),
        "-n",
        "--pidfile=",
        "--logfile",
        str(log_file),
        plugin,
        *args,
        "--port-file",
        str(port_file),
    ]
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=None if env is None else {**os.environ, **env},
    )
    try:
        return process, wait_for_port(port_file, process)
    except RuntimeError as e:
        log = log_file.read_text(errors="replace") if log_file.exists() else ""
        raise RuntimeError(f"twistd {plugin}: {e}{log}") from None


def wait_for_port(port_file: Path, process: subprocess.Popen[bytes]) -> int:
    """The port our child writes into ``port_file`` once it listens."""
    deadline = time.monotonic() + START_TIMEOUT
    while not port_file.exists():
        if process.poll() is not None:
            err = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise RuntimeError(f"exited with {process.returncode}: {err}")
        if time.monotonic() > deadline:
            end_process(process, signal.SIGKILL)
            raise RuntimeError(f"did not listen within {START_TIMEOUT:g} s")
        time.sleep(0.02)
    return int(port_file.read_text())


def start_pca(pca_dir: Path, tls_dir: Path, work: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Run ``twistd securemig-pca`` over HTTPS on loopback with the key and
    certificate in ``tls_dir`` (``tls.key``, ``tls.pem``); port and log
    files go in ``work``."""
    endpoint = (
        f"ssl:0:privateKey={tls_dir / 'tls.key'}:certKey={tls_dir / 'tls.pem'}:interface=127.0.0.1"
    )
    return start_twistd(
        "securemig-pca",
        "--dir",
        str(pca_dir),
        "--listen",
        endpoint,
        port_file=work / "pca.port",
        log_file=work / "pca.log",
    )


def start_destination(
    state_dir: Path,
    *extra: str,
    log_file: Path | None = None,
    port_file: Path | None = None,
    wrapper: tuple[str, ...] = (),
    listen: str = "tcp:0:interface=127.0.0.1",
    env: dict[str, str] | None = None,
) -> Destination:
    """Start a destination on a free loopback port and wait until it listens.

    ``wrapper`` prefixes the command (the tests run it in a mount namespace
    with a small tmpfs); the port and log files must then lie outside
    ``state_dir``.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_file or state_dir / "twistd.log"
    process, port = start_twistd(
        "securemig",
        "--state-dir",
        str(state_dir),
        "--insecure-listen",
        listen,
        *extra,
        port_file=port_file or state_dir / "port",
        log_file=log_file,
        wrapper=wrapper,
        env=env,
    )
    return Destination(process, port, state_dir, log_file)


def end_process(
    process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0
) -> Rusage:
    """Signal our child by pid, wait for it, and return its resource usage."""
    if process.returncode is None:
        # Not yet reaped, so the pid is still ours (at worst a zombie).
        os.kill(process.pid, sig)
    return wait_process(process, timeout)


def wait_process(process: subprocess.Popen[Any], timeout: float | None = None) -> Rusage:
    """Wait for our child (SIGKILL after ``timeout``) and return its usage."""
    if process.returncode is not None:
        # Already reaped (by Popen.poll): its usage is gone with it.
        return Rusage(0.0, 0.0, process.returncode)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid == process.pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return Rusage(
                usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, process.returncode
            )
        if deadline is not None and time.monotonic() > deadline:
            os.kill(process.pid, signal.SIGKILL)
            deadline = None
        time.sleep(0.01)


def securemig(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run the ``securemig`` command to completion, capturing its output."""
    return subprocess.run(
        [script("securemig"), *args], capture_output=True, text=True, check=False, **kwargs
    )  # type: ignore[call-overload]

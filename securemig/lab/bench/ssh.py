"""
The OpenSSH baseline of ``securemig bench``: ``ssh -c CIPHER 'cat > F && sync F'``.

:class:`Sshd` runs an ``sshd`` of its own (Debian's ``openssh-server``) on
a free loopback port, with a throw-away host key, user key,
``authorized_keys`` and ``sshd_config`` in its work directory, in the
foreground (``-D -e``), so it is our child and is ended by its pid.  No
system service is started or configured.  Run as root, sshd needs its
privilege separation directory ``/run/sshd``; rather than create it on the
shared machine, sshd runs in a mount namespace of its own with a private
tmpfs on ``/run`` that holds it.

:meth:`Sshd.copy` pipes a file through ``ssh -c CIPHER`` into an fsynced
file on the same machine, the way one would move a VM's image with
OpenSSH, and measures wall time, the CPU of the ``ssh`` client (``wait4``)
and the CPU of the per-connection server processes (sshd, the shell,
``cat``, ``sync``: what the listening sshd reaped while the copy ran, from
its ``cutime`` and ``cstime``).
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from securemig.lab import processes

#: Where Debian's openssh-server installs the daemon.
SSHD = "/usr/sbin/sshd"
SERVER_PACKAGE = "openssh-server"
CLIENT_PACKAGE = "openssh-client"

#: Benchmark series → OpenSSH cipher.
CIPHERS = {
    "ssh-aes128-gcm": "aes128-gcm@openssh.com",
    "ssh-chacha20": "chacha20-poly1305@openssh.com",
}

#: How long sshd may take to listen, and the server side to end after a copy.
START_TIMEOUT = 30.0
SETTLE_TIMEOUT = 15.0

#: The client's options: no user or system configuration, no agent, no
#: forwarding, no known-hosts file (the host key is thrown away anyway).
CLIENT_OPTIONS = (
    "-F",
    "/dev/null",
    "-T",
    "-x",
    "-a",
    "-o",
    "BatchMode=yes",
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "GlobalKnownHostsFile=/dev/null",
    "-o",
    "IdentitiesOnly=yes",
    "-o",
    "IdentityAgent=none",
    "-o",
    "Compression=no",
    "-o",
    "LogLevel=ERROR",
)

_TICK = os.sysconf("SC_CLK_TCK")


class SshError(RuntimeError):
    """The ssh baseline could not run; the message says why."""


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SshError(f"{name} not found: install the Debian package {package}")
    return path


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The name is in parentheses and may hold spaces: split after its end.
    return text[text.rindex(")") + 2 :].split()


def _reaped_children_cpu(pid: int) -> float:
    """CPU seconds of the children ``pid`` waited for (cutime + cstime),
    each including its own waited-for children."""
    fields = _stat(pid)
    if fields is None:
        raise SshError(f"sshd (pid {pid}) is gone")
    # After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    return (int(fields[13]) + int(fields[14])) / _TICK


def descendants(pid: int) -> list[int]:
    """The pids of every live process below ``pid``."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


@dataclass
class Copy:
    """What one copy through ssh cost."""

    seconds: float
    #: The ``ssh`` client's CPU seconds and peak RSS.
    client: processes.Rusage
    #: CPU seconds of the per-connection server processes.
    server_cpu_s: float
    #: Largest peak RSS of one of them, as sampled during the copy.
    server_peak_rss_mib: float


class Sshd:
    """An sshd of our own, for the benchmark, in ``work``.

    ``address`` is where it listens (loopback unless the bench puts the
    destination side behind a link); ``wrapper`` prefixes its command (the
    link's network namespace).  Raises :class:`SshError`, naming the Debian
    package, when sshd or the client is not installed."""

    def __init__(
        self,
        work: Path,
        address: str = "127.0.0.1",
        wrapper: tuple[str, ...] = (),
        sshd: str = SSHD,
    ) -> None:
        if not os.access(sshd, os.X_OK):
            raise SshError(
                f"{sshd} not found: install the Debian package {SERVER_PACKAGE} "
                "(scripts/setup-debs.sh does; no system service is started)"
            )
        self.sshd = sshd
        self.ssh = _tool("ssh", CLIENT_PACKAGE)
        self.keygen = _tool("ssh-keygen", CLIENT_PACKAGE)
        self.work = work.absolute()
        self.address = address
        self.wrapper = wrapper
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.config = self.work / "sshd_config"
        self.log_file = self.work / "sshd.log"
        self.host_key = self.work / "host_key"
        self.user_key = self.work / "user_key"

    @property
    def pid(self) -> int:
        """The listening sshd's pid."""
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        """Make the keys and the configuration, start sshd and wait until it
        listens.  A port taken between our choice and sshd's bind is retried."""
        self.work.mkdir(parents=True, exist_ok=True)
        for key in (self.host_key, self.user_key):
            key.unlink(missing_ok=True)
            subprocess.run(
                [self.keygen, "-q", "-t", "ed25519", "-N", "", "-C", "securemig-bench", "-f", key],
                check=True,
                stdin=subprocess.DEVNULL,
            )
        authorized = self.work / "authorized_keys"
        shutil.copyfile(self.user_key.with_suffix(".pub"), authorized)
        error = ""
        for _ in range(3):
            self.port = _free_port()
            self._write_config(authorized)
            try:
                self._launch()
                return
            except SshError as e:
                error = str(e)
        raise SshError(error)

    def _write_config(self, authorized: Path) -> None:
        user = pwd.getpwuid(os.getuid()).pw_name
        self.config.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.address}",
                    f"Port {self.port}",
                    f"HostKey {self.host_key}",
                    f"AuthorizedKeysFile {authorized}",
                    f"PidFile {self.work / 'sshd.pid'}",
                    # Our files in a temporary directory: their modes are ours.
                    "StrictModes no",
                    "UsePAM no",
                    # Only our own key, only us.
                    f"AllowUsers {user}",
                    "AuthenticationMethods publickey",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    f"Ciphers {','.join(CIPHERS.values())}",
                    "X11Forwarding no",
                    "AllowTcpForwarding no",
                    "AllowAgentForwarding no",
                    "PermitTunnel no",
                    "PrintMotd no",
                    "PrintLastLog no",
                    "UseDNS no",
                    "Compression no",
                    "LogLevel INFO",
                    "",
                ]
            )
        )

    def _launch(self) -> None:
        argv = [self.sshd, "-f", str(self.config), "-D", "-e"]
        if os.geteuid() == 0:
            # sshd as root chroots its unprivileged child into /run/sshd;
            # give it one on a tmpfs only it sees.  sh execs sshd, so the pid
            # stays the one we end.
            setup = (
                "mount -t tmpfs -o mode=0755,size=1m securemig-sshd /run && "
                'mkdir -m 0755 /run/sshd && exec "$0" "$@"'
            )
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", setup, *argv]
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(
                [*self.wrapper, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + START_TIMEOUT
        listening = f"Server listening on {self.address} port {self.port}"
        while listening not in self.log():
            if self.process.poll() is not None:
                self.process = None
                raise SshError(f"sshd exited: {self.log().strip()}")
            if time.monotonic() > deadline:
                self.close()
                raise SshError(f"sshd did not listen within {START_TIMEOUT:g} s")
            time.sleep(0.02)

    def log(self) -> str:
        """What sshd logged so far."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def copy(self, source: Path, dest: Path, cipher: str) -> Copy:
        """Pipe ``source`` through ``ssh -c cipher`` into ``dest``, fsynced
        by the server side before ssh returns; measure both ends."""
        if self.process is None:
            raise SshError("sshd is not running")
        command = f"cat > {shlex.quote(str(dest))} && sync {shlex.quote(str(dest))}"
        argv = [
            self.ssh,
            *CLIENT_OPTIONS,
            "-c",
            cipher,
            "-i",
            str(self.user_key),
            "-p",
            str(self.port),
            self.address,
            command,
        ]
        self._settle()
        before = _reaped_children_cpu(self.pid)
        errors = self.work / "ssh.err"
        server_peak = 0.0
        with open(source, "rb") as stdin, open(errors, "wb") as stderr:
            started = time.monotonic()
            client = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.DEVNULL, stderr=stderr)
            client_peak = 0.0
            polls = 0
            while True:
                pid, status, usage = os.wait4(client.pid, os.WNOHANG)
                if pid == client.pid:
                    break
                if polls % 20 == 0:
                    # VmHWM only grows: the last sample is close to the peak.
                    client_peak = processes.peak_rss_mib(client.pid) or client_peak
                    for child in descendants(self.pid):
                        server_peak = max(server_peak, processes.peak_rss_mib(child) or 0.0)
                polls += 1
                time.sleep(0.01)
            seconds = time.monotonic() - started
        client.returncode = os.waitstatus_to_exitcode(status)
        if client.returncode != 0:
            raise SshError(
                f"ssh -c {cipher} exited with {client.returncode}: "
                f"{errors.read_text(errors='replace').strip()}\n{self.log()}"
            )
        self._settle()
        server_cpu = _reaped_children_cpu(self.pid) - before
        if dest.stat().st_size != source.stat().st_size:
            raise SshError(f"ssh -c {cipher}: {dest} has the wrong size")
        rusage = processes.Rusage(usage.ru_utime + usage.ru_stime, client_peak, 0)
        return Copy(seconds, rusage, server_cpu, server_peak)

    def _settle(self) -> None:
        """Wait until sshd has reaped every connection's processes, so its
        cutime holds all of their CPU."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while descendants(self.pid):
            if time.monotonic() > deadline:
                raise SshError(f"sshd's connection processes did not end: {self.log()}")
            time.sleep(0.01)

    def close(self) -> None:
        """End sshd, by its pid."""
        if self.process is not None:
            process, self.process = self.process, None
            processes.end_process(process, signal.SIGTERM)

    def __enter__(self) -> Sshd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _free_port() -> int:
    """A TCP port free on loopback just now (sshd binds it a moment later;
    :meth:`Sshd.start` retries should another process take it first)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

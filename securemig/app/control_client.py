"""
The client's side of the daemon's control socket: ``securemig migrate
--daemon`` asks this host's ``twistd securemig`` to drive a migration and
shows its progress.

Standard library only (and tqdm when a bar is drawn): the thin console
entry (:mod:`securemig.app.cli.entry`) imports this module and nothing
heavier, so asking the daemon costs no interpreter full of Twisted,
cryptography and the TSS.

The wire, one JSON object a line (newline-delimited JSON) on a UNIX stream
socket, ``STATE_DIR/control.sock`` (:func:`socket_path`)::

    client                                   daemon
    {"command": "migrate", "argv": [...],
     "cwd": "/...", "env": {...}}     -->
                                      <--    {"event": "start", "vm": ..., "expected": N,
                                              "bar": true}
                                      <--    {"event": "progress", "bytes": N}   (batched)
    {"command": "cancel"}             -->    (Ctrl-C: this migration only)
                                      <--    {"event": "result", "status": S,
                                              "stdout": "...", "stderr": "..."}

``argv`` is the command line as typed after ``securemig`` (global options
such as ``--config`` included, that one made absolute: :func:`client_paths`);
the daemon parses it with the same parser and resolves relative paths
against ``cwd``.  ``cancel`` may follow at once: it is honoured from the
moment the request is taken, once.  ``result`` carries exactly
what the in-process command would have printed and its exit status.  A
client that goes away does not cancel: the daemon finishes the migration.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

#: The control socket's name in the daemon's state directory.
SOCKET_NAME = "control.sock"
#: The longest line either side accepts (a request, an event): checked
#: before more is buffered.
MAX_LINE = 64 * 1024
#: The longest event the client accepts (a result carries the command's
#: whole output).
MAX_EVENT = 1 << 20
#: Seconds a client has, once connected, to send its whole request.
REQUEST_TIMEOUT = 5.0
#: Control connections the daemon holds at once; more are closed at once.
MAX_CONNECTIONS = 16
#: The client's environment variables that change what ``migrate`` does
#: (``securemig.app.config.CONFIG_ENV``, ``...cli.journal.STATE_DIR_ENV``).
PASSED_ENV = ("SECUREMIG_CONFIG", "SECUREMIG_STATE_DIR")
#: The bytes of a UNIX socket path, its terminating NUL excluded.
_SOCKET_PATH_MAX = 107

#: Exit statuses (as :mod:`securemig.app.cli.common`'s).
EXIT_FAILED = 1
EXIT_USAGE = 2


def socket_path(state_dir: Path) -> Path:
    """The daemon's control socket for the host state directory
    ``state_dir``: always ``STATE_DIR/control.sock`` (reached through
    :func:`socket_address` when that path is too long for a UNIX socket
    address)."""
    return Path(os.path.abspath(state_dir)) / SOCKET_NAME


@contextlib.contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """The address to bind or connect for the socket file ``path``: the
    path itself when it fits in a UNIX socket address (107 bytes), else
    ``/proc/self/fd/N/NAME`` through a descriptor of its directory, held
    open while the block runs (the kernel resolves that link at bind and
    connect; the socket is the same file, in the same state directory, so
    nothing lands in a shared temporary directory and a killed daemon
    leaves nothing outside its state)."""
    if len(os.fsencode(path)) <= _SOCKET_PATH_MAX:
        yield str(path)
        return
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{directory}/{path.name}"
    finally:
        os.close(directory)


#: Paths that name a file of the process that opens them (its own file
#: descriptors): the daemon would open its own, not the client's.
_OWN_FILES = ("/dev/fd/", "/dev/stdin", "/dev/stdout", "/dev/stderr", "/proc/self/")


class NotForTheDaemon(Exception):
    """The command line names something only this process can open."""


def client_paths(argv: list[str], env: dict[str, str], cwd: str) -> list[str]:
    """``argv`` with its configuration file (the global ``--config PATH``,
    before the command) made absolute against the client's ``cwd``: the
    daemon reads it from there, not from its own working directory
    (``SECUREMIG_CONFIG`` in ``env`` the daemon makes absolute itself).
    :class:`NotForTheDaemon` for a file the daemon cannot open as the
    client meant it (``/dev/fd/N``, ``/dev/stdin``, ``/proc/self/...``)."""
    out = list(argv)
    i = 0
    while i < len(out) and out[i].startswith("-"):
        word = out[i]
        if word == "--config" and i + 1 < len(out):
            out[i + 1] = _config_for_daemon(out[i + 1], cwd)
            i += 2
            continue
        if word.startswith("--config="):
            out[i] = "--config=" + _config_for_daemon(word.partition("=")[2], cwd)
        i += 1
    if env.get("SECUREMIG_CONFIG"):
        _config_for_daemon(env["SECUREMIG_CONFIG"], cwd)
    return out


def _config_for_daemon(path: str, cwd: str) -> str:
    absolute = os.path.normpath(os.path.join(cwd, path))
    mine = (*_OWN_FILES, "/proc/thread-self/", f"/proc/{os.getpid()}/")
    # The path, each link it follows (my.toml -> /dev/stdin), where it ends.
    seen, link = [absolute], absolute
    while len(seen) < 40 and os.path.islink(link):
        link = os.path.normpath(os.path.join(os.path.dirname(link), os.readlink(link)))
        seen.append(link)
    seen.append(os.path.realpath(absolute))
    if any(p.startswith(mine) for p in seen):
        raise NotForTheDaemon(
            f"the configuration file {path} is this command's own open file, which the "
            "daemon cannot read: give the path of a file, or run migrate without --daemon"
        )
    return absolute


def encode(message: dict[str, Any]) -> bytes:
    """One message as its line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class ProgressBar:
    """A progress bar of the bytes sent on stderr, if it is a terminal and
    the bar is wanted; otherwise nothing."""

    def __init__(self, description: str, shown: bool) -> None:
        self.description = description
        self.shown = shown
        self.bar: Any = None

    def start(self, expected: int) -> None:
        """The migration has started: ``expected`` bytes will travel (live:
        the guest's RAM, at least; 0: not known)."""
        if self.shown and sys.stderr.isatty():
            # tqdm is imported only when a bar is drawn.
            from tqdm import tqdm

            self.bar = tqdm(
                total=expected or None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=self.description,
                file=sys.stderr,
            )

    def update(self, n: int) -> None:
        """``n`` more bytes have been sent."""
        if self.bar is not None:
            if self.bar.total and self.bar.n + n > self.bar.total:
                # Live: pages dirtied during the pre-copy travel again.
                self.bar.total = self.bar.n + n
            self.bar.update(n)

    def close(self) -> None:
        """The migration has ended."""
        if self.bar is not None:
            self.bar.close()


class DaemonGone(Exception):
    """The daemon cannot be asked, or stopped answering; the message says
    what to do."""


def ask(
    state_dir: Path,
    argv: list[str],
    out: TextIO | None = None,
    err: TextIO | None = None,
    connect: Callable[[Path, Path], socket.socket] | None = None,
    hint: str | None = None,
) -> int:
    """Ask the daemon of ``state_dir`` to run ``securemig ARGV`` (a
    ``migrate``), show its progress, print what it printed and return its
    exit status.  Ctrl-C cancels the migration (Ctrl-C again: this client
    exits; the daemon ends the cancelled migration).  ``hint``: said after
    the reason when the daemon cannot be reached (why it was asked)."""
    out, err = out or sys.stdout, err or sys.stderr
    cwd = os.getcwd()
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    try:
        argv = client_paths(argv, env, cwd)
    except NotForTheDaemon as e:
        print(f"securemig: error: {e}", file=err)
        return EXIT_USAGE
    path = socket_path(state_dir)
    try:
        sock = (connect or _connect)(path, state_dir)
    except DaemonGone as e:
        print(f"securemig: error: {e}" + (f"; {hint}" if hint else ""), file=err)
        return EXIT_FAILED
    request = {"command": "migrate", "argv": argv, "cwd": cwd, "env": env}
    interrupts = 0

    def interrupted(signum: int, frame: object) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            print(
                "securemig: interrupted again: exiting now; the daemon ends the cancelled "
                "migration (see `securemig status`)",
                file=err,
            )
            err.flush()
            os._exit(EXIT_FAILED)
        print(
            "securemig: interrupted: cancelling the migration, unless it already committed "
            "or its hypervisor already completed it (its result below says where the VM is; "
            "Ctrl-C again to exit at once)",
            file=err,
        )
        with contextlib.suppress(OSError):
            sock.sendall(encode({"command": "cancel"}))

    previous = signal.signal(signal.SIGINT, interrupted)
    bar: ProgressBar | None = None
    try:
        sock.sendall(encode(request))
        for event in _events(sock, path):
            kind = event.get("event")
            if kind == "start":
                bar = ProgressBar(f"migrating {event.get('vm', '')}", bool(event.get("bar")))
                bar.start(int(event.get("expected") or 0))
            elif kind == "progress" and bar is not None:
                bar.update(int(event.get("bytes") or 0))
            elif kind == "result":
                if bar is not None:
                    bar.close()
                out.write(str(event.get("stdout", "")))
                err.write(str(event.get("stderr", "")))
                status = event.get("status")
                return status if isinstance(status, int) else EXIT_FAILED
        raise DaemonGone(
            f"the daemon on {path} closed the connection before the migration ended; "
            "`securemig status` with the same --state-dir shows where it is"
        )
    except (DaemonGone, OSError) as e:
        if bar is not None:
            bar.close()
        message = e if isinstance(e, DaemonGone) else f"the daemon on {path}: {e.strerror or e}"
        print(f"securemig: error: {message}", file=err)
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGINT, previous)
        sock.close()


def _connect(path: Path, state_dir: Path) -> socket.socket:
    """A connection to the control socket at ``path`` of the daemon of
    ``state_dir``, or :class:`DaemonGone` saying why not."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with socket_address(path) as address:
            sock.connect(address)
    except (FileNotFoundError, NotADirectoryError, ConnectionRefusedError):
        sock.close()
        raise DaemonGone(
            f"no daemon listens on {path}: start this host's daemon "
            f"(twistd securemig --state-dir {state_dir} ...), or run migrate without --daemon"
        ) from None
    except PermissionError:
        sock.close()
        raise DaemonGone(
            f"may not use the daemon's control socket {path}: only root and the user the "
            "daemon runs as may"
        ) from None
    except OSError as e:
        sock.close()
        raise DaemonGone(f"cannot reach the daemon on {path}: {e.strerror or e}") from None
    # Only a daemon of root or of this user is asked (a socket in a shared
    # temporary directory could be anyone's).
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    uid = struct.unpack("3i", raw)[1]
    if uid not in (0, os.geteuid()):
        sock.close()
        raise DaemonGone(
            f"the process on {path} runs as uid {uid}, neither root nor this user: not asking it"
        )
    return sock


def _events(sock: socket.socket, path: Path) -> Any:
    """The daemon's events, one JSON object a line, until it closes."""
    buffer = bytearray()
    while True:
        data = sock.recv(65536)
        if not data:
            return
        buffer += data
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):
                raise DaemonGone(f"the daemon on {path} sent something that is no event") from None
            if isinstance(event, dict):
                yield event
        if len(buffer) > MAX_EVENT:
            raise DaemonGone(f"the daemon on {path} sent a line over {MAX_EVENT} bytes")

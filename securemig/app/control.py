"""
The daemon's control socket: ``securemig migrate --daemon`` asks this
host's ``twistd securemig`` to drive a migration, so that a migration pays
no interpreter start-up and imports of its own.

A new trust boundary, local only: a UNIX socket ``STATE_DIR/control.sock``
(:func:`~securemig.app.control_client.socket_path`), created fresh at start
with mode 0600, accepting only peers whose ``SO_PEERCRED`` uid is the
daemon's effective uid or root.  Until its request has arrived, a client
holds little: at most :data:`~.control_client.MAX_LINE` bytes (checked
before more is buffered), :data:`~.control_client.REQUEST_TIMEOUT` seconds,
one of :data:`~.control_client.MAX_CONNECTIONS` connections.  Only the
``migrate`` command is accepted, parsed by the command's own parser and run
by the command's own core (:mod:`securemig.app.cli.migrate`: the same
checks, the same journal, the same report); the wire is described in
:mod:`securemig.app.control_client`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import struct
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from securemig.app.cli import migrate as migrate_cmd
from securemig.app.cli.common import EXIT_USAGE, usage_error
from securemig.app.cli.main import exit_status, parse_for_daemon
from securemig.app.control_client import (
    MAX_CONNECTIONS,
    MAX_LINE,
    PASSED_ENV,
    REQUEST_TIMEOUT,
    NotForTheDaemon,
    client_paths,
    encode,
    socket_address,
    socket_path,
)
from securemig.host.arrival import DestinationHost
from securemig.host.departure import Departure
from securemig.transport.source import SourceProtocol

log = Logger()

#: Seconds between two progress events of one migration (they are batched).
PROGRESS_EVERY = 0.25


def peer_uid(transport: Any) -> int | None:
    """The uid of the process at the other end of a UNIX socket
    (``SO_PEERCRED``), None when it cannot be read."""
    try:
        raw = transport.getHandle().getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
        )
    except (OSError, AttributeError):
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


class ControlProtocol(Protocol):
    """One client of the control socket: its request, then the events of
    the migration it asked for."""

    #: Twisted's, typed loosely (it is declared through zope interfaces).
    transport: Any

    def __init__(self, factory: ControlFactory) -> None:
        self.factory = factory
        self.buffer = bytearray()
        self.request_timer: Any = None
        self.asked = False
        #: The connection is being dropped (its later lines are not read).
        self.dropped = False
        self.gone = False
        self.vm = "?"
        #: Set while a migration runs for this client.
        self.outcome: dict[str, Any] | None = None
        #: The client cancelled (Ctrl-C), at any time after its request.
        self.cancelled = False
        self.sessions: list[SourceProtocol] = []
        self.pending = 0
        self.flush_call: Any = None

    def connectionMade(self) -> None:
        """Admit the peer by its uid and the connection cap; start its clock."""
        factory = self.factory
        factory.open.add(self)
        uid = peer_uid(self.transport)
        if uid not in (os.geteuid(), 0):
            log.warn("control socket: refused a client of uid {uid}", uid=uid)
            self.transport.abortConnection()
            return
        if len(factory.open) > MAX_CONNECTIONS:
            log.warn(
                "control socket: {n} connections already; refused one more",
                n=MAX_CONNECTIONS,
            )
            self.transport.abortConnection()
            return
        self.request_timer = factory.reactor.callLater(REQUEST_TIMEOUT, self._too_slow)

    def _drop(self) -> None:
        self.dropped = True
        self.transport.abortConnection()

    def _too_slow(self) -> None:
        self.request_timer = None
        log.warn(
            "control socket: a client sent no whole request within {s:g} s; dropped",
            s=REQUEST_TIMEOUT,
        )
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        """Lines: first the request, then at most ``cancel``."""
        if len(self.buffer) + len(data) > MAX_LINE and b"\n" not in data:
            log.warn("control socket: a line over {n} bytes; dropped", n=MAX_LINE)
            self._drop()
            return
        self.buffer += data
        while not self.dropped and (end := self.buffer.find(b"\n")) >= 0:
            if end > MAX_LINE:
                log.warn("control socket: a line over {n} bytes; dropped", n=MAX_LINE)
                self._drop()
                return
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 1]
            self._line(line)
        if len(self.buffer) > MAX_LINE:
            log.warn("control socket: a line over {n} bytes; dropped", n=MAX_LINE)
            self._drop()

    def _line(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            # RecursionError: brackets nested deeper than the parser goes
            # (a line of "[" fits in MAX_LINE): as malformed as any.
            message = None
        command = message.get("command") if isinstance(message, dict) else None
        if not self.asked:
            self.asked = True
            if self.request_timer is not None and self.request_timer.active():
                self.request_timer.cancel()
            self.request_timer = None
            if command != "migrate" or not isinstance(message, dict):
                # The client's word, bounded (it goes to the log).
                named = repr(command)[:40] if isinstance(command, str) else "that"
                self._refuse(f"the daemon accepts only migrate, not {named}")
                return
            Deferred.fromCoroutine(self._migrate(message)).addErrback(self._failed)
        elif command == "cancel":
            # Honoured from the moment the request is taken: before the
            # migration starts it is not started (see _run); once it runs,
            # its session is cancelled (as soon as it exists).  Only the
            # first: the rest are ignored, unlogged.
            if self.cancelled:
                return
            self.cancelled = True
            log.info(
                "control socket: the client of the migration of VM {vm} cancels it", vm=self.vm
            )
            if self.outcome is not None:
                migrate_cmd.cancel(self.factory.reactor, self.outcome, self.sessions)
        else:
            # Only cancel follows a request: anything else ends this client's
            # connection (not its migration), so a client cannot fill the log.
            log.warn(
                "control socket: the client of the migration of VM {vm} sent something "
                "other than cancel; disconnected",
                vm=self.vm,
            )
            self._drop()

    def _refuse(self, sentence: str) -> None:
        said = f"securemig: error: {sentence}\n"
        self._send({"event": "result", "status": EXIT_USAGE, "stdout": "", "stderr": said})
        log.warn("control socket: {sentence}", sentence=sentence)
        self.transport.loseConnection()

    async def _migrate(self, request: dict[str, Any]) -> None:
        """Run the migration ``request`` asks for, as ``securemig migrate``
        would, and send its result."""
        out, err = io.StringIO(), io.StringIO()
        status = await self._run(request, out, err)
        self._flush()
        result = {"event": "result", "status": status, "stdout": out.getvalue()}
        result["stderr"] = err.getvalue()
        if self.gone:
            log.info(
                "control socket: the migration of VM {vm} ended with exit status {status} "
                "after its client left: {said}",
                vm=self.vm,
                status=status,
                said=" ".join((err.getvalue() or out.getvalue()).strip().splitlines()[-1:]),
            )
            return
        self._send(result)
        self.transport.loseConnection()

    async def _run(self, request: dict[str, Any], out: io.StringIO, err: io.StringIO) -> int:
        argv, cwd, env = request.get("argv"), request.get("cwd"), request.get("env") or {}
        if (
            not isinstance(argv, list)
            or not all(isinstance(a, str) for a in argv)
            or not isinstance(cwd, str)
            or not os.path.isabs(cwd)
            or not isinstance(env, dict)
            or not all(k in PASSED_ENV and isinstance(v, str) for k, v in env.items())
        ):
            return usage_error("a malformed request to the daemon", err)
        try:
            # The client made its --config absolute; an older or other
            # client's relative one means its directory too, never ours.
            argv = client_paths(argv, env, cwd)
        except NotForTheDaemon as e:
            return usage_error(str(e), err)
        parsed = parse_for_daemon(argv, _absolute(env.get("SECUREMIG_CONFIG"), cwd), out, err)
        if isinstance(parsed, int):
            return parsed
        args = parsed
        if args.command != "migrate":
            return usage_error(f"the daemon runs only migrate, not {args.command}", err)
        _resolve_paths(args, Path(cwd))
        self.vm = args.name
        host = self.factory.host
        try:
            if (status := migrate_cmd.check(args, err)) is not None:
                return status
            # The client's journal must be this daemon's (source_state_dir,
            # with the client's environment).
            wanted = args.state_dir or _absolute_path(
                Path(env.get("SECUREMIG_STATE_DIR") or args.vm_dir / ".securemig"), cwd
            )
            if not _same_dir(wanted, host.state_dir):
                return usage_error(
                    f"this daemon keeps its journal in {host.state_dir}, not "
                    f"{wanted}: give migrate --state-dir {host.state_dir}",
                    err,
                )
            if self.cancelled:
                return migrate_cmd.conclude(
                    args, host.journal, migrate_cmd.CANCELLED_EARLY, out, err
                )
            # Blocking (the identity read, the revocation list fetched over
            # HTTPS): off the reactor, which also serves arrivals.
            options = await deferToThread(migrate_cmd.prepare, args, err)
            if self.cancelled:
                return migrate_cmd.conclude(
                    args, host.journal, migrate_cmd.CANCELLED_EARLY, out, err
                )
            log.info(
                "control socket: migrating VM {vm} to {to} for a local client",
                vm=args.name,
                to=args.to,
            )
            # From here on a cancel reaches the migration through its
            # outcome (drive checks it before anything is touched) and its
            # session, once there is one.
            self.outcome = {}
            await migrate_cmd.drive(
                self.factory.reactor,
                args,
                options,
                host.journal,
                self.outcome,
                err=err,
                on_start=lambda d: self._start(d, args),
                on_progress=self._progress,
                on_protocol=self.sessions.append,
                off_reactor=True,
            )
            return migrate_cmd.conclude(args, host.journal, self.outcome, out, err)
        except Exception as e:
            log.failure("control socket: migrate of VM {vm}", Failure(), vm=args.name)
            return exit_status(e, err)

    def _start(self, departure: Departure, args: argparse.Namespace) -> None:
        self._send(
            {
                "event": "start",
                "vm": args.name,
                "expected": departure.expected_bytes or 0,
                "bar": not args.no_progress,
            }
        )

    def _progress(self, n: int) -> None:
        # Batched: one event every PROGRESS_EVERY seconds at most.
        self.pending += n
        if self.flush_call is None:
            self.flush_call = self.factory.reactor.callLater(PROGRESS_EVERY, self._flush)

    def _flush(self) -> None:
        if self.flush_call is not None and self.flush_call.active():
            self.flush_call.cancel()
        self.flush_call = None
        if self.pending:
            self._send({"event": "progress", "bytes": self.pending})
            self.pending = 0

    def _send(self, event: dict[str, Any]) -> None:
        if not self.gone:
            self.transport.write(encode(event))

    def _failed(self, failure: Failure) -> None:
        log.failure("control socket: a request failed", failure)
        self._send({"event": "result", "status": 1, "stdout": "", "stderr": ""})
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        """A client that leaves does not cancel: its migration goes on."""
        self.gone = True
        self.factory.open.discard(self)
        if self.request_timer is not None and self.request_timer.active():
            self.request_timer.cancel()
        if self.flush_call is not None and self.flush_call.active():
            self.flush_call.cancel()
        if self.outcome is not None and not self.outcome.get("over"):
            log.info(
                "control socket: the client of the migration of VM {vm} left; the "
                "migration goes on (journaled; `securemig status` shows how it ends)",
                vm=self.vm,
            )


class ControlFactory(Factory):
    """The control socket's connections."""

    def __init__(self, host: DestinationHost, reactor: Any) -> None:
        self.host = host
        self.reactor = reactor
        self.open: set[ControlProtocol] = set()

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        """A protocol for one client."""
        return ControlProtocol(self)


class ControlService(service.Service):
    """Listen on the control socket of ``host``'s state directory, created
    fresh (a stale one, left by a killed daemon, removed: the daemon's lock
    on the state directory says no other daemon uses it).  A socket that
    cannot be made costs ``migrate --daemon`` only, never the daemon: one
    error line in the log, and the daemon runs on without it."""

    def __init__(self, host: DestinationHost, reactor: Any) -> None:
        self.host = host
        self.reactor = reactor
        self.path = socket_path(host.state_dir)
        self.port: Any = None

    def startService(self) -> None:
        """Listen, mode 0600 from the start (umask), on a fresh socket; or
        say why not and go on without."""
        super().startService()
        try:
            self._listen()
        except (OSError, CannotListenError) as e:
            why = e.socketError if isinstance(e, CannotListenError) else e
            if isinstance(why, OSError):
                why = why.strerror or why
            log.error(
                "control socket {path}: cannot listen: {why}; migrate --daemon cannot ask "
                "this daemon (it runs on without it: arrivals, recovery)",
                path=str(self.path),
                why=str(why),
            )
            return
        log.info(
            "control socket {path}: migrate --daemon for uid {uid} and root",
            path=str(self.path),
            uid=os.geteuid(),
        )

    def _listen(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        previous = os.umask(0o177)
        # A state directory too long for a socket address is bound through
        # /proc/self/fd (socket_address): the socket file is still here.
        try:
            with socket_address(self.path) as address:
                self.port = self.reactor.listenUNIX(
                    address, ControlFactory(self.host, self.reactor), mode=0o600
                )
        finally:
            os.umask(previous)

    def stopService(self) -> Any:
        """Stop listening and remove the socket (only one it made)."""
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        return port.stopListening()


def _absolute(path: str | None, cwd: str) -> str | None:
    """``path`` made absolute against the client's ``cwd``."""
    return None if path is None else os.path.join(cwd, path)


def _absolute_path(path: Path, cwd: str) -> Path:
    return path if path.is_absolute() else Path(cwd) / path


def _resolve_paths(args: argparse.Namespace, cwd: Path) -> None:
    """The parsed command line's relative paths, as the client meant them:
    against its working directory."""
    for name, value in vars(args).items():
        if isinstance(value, Path) and not value.is_absolute():
            setattr(args, name, cwd / value)


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False

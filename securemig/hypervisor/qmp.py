"""
QEMU's QMP: JSON lines over a unix socket, with a Twisted client
(:class:`QMPProtocol`) and a blocking one (:func:`query`, for synchronous
callers) sharing one framing and parsing (:func:`encode`, :func:`decode`,
:func:`result`).

QEMU greets, the client negotiates capabilities, then each command carries
an ``id`` so replies can be matched even with asynchronous events in
between.  The failures follow ``qemu.qmp`` (QEMU's own client), all of
them a :class:`QMPError`:

- :class:`ExecuteError`: QEMU answered a command with an error; it carries
  QEMU's ``error_class`` and description;
- :class:`Interrupted`: the connection was lost (QEMU exited, or it broke
  the protocol) while the command waited for its reply;
- :class:`QMPProtocolError`: a line that is not a JSON object, or longer
  than :data:`MAX_LINE`; the connection is closed and every pending command
  fails with :class:`Interrupted`.

A reply whose ``id`` names no pending command is ignored (as ``qemu.qmp``
does); events are kept in a bounded backlog (:data:`EVENT_BACKLOG`, the
oldest dropped first and counted).
"""

from __future__ import annotations

import collections
import itertools
import json
import socket
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.protocols.basic import LineOnlyReceiver

from securemig.protocol.errors import ErrorCode, LocalFault

#: The longest line accepted from QEMU; query results are small.
MAX_LINE = 1 << 20
#: How many unclaimed events a connection keeps (the oldest are dropped).
EVENT_BACKLOG = 256


class QMPError(LocalFault, RuntimeError):
    """Any failure of a QMP command or connection."""

    # The hypervisor fails where a VM is resumed or loaded (the reason says which).
    default_code = ErrorCode.RESUME_FAILED


class ExecuteError(QMPError):
    """QEMU refused a command: its ``error_class`` and description."""

    def __init__(self, error_class: str, description: str, command: str = "") -> None:
        super().__init__(f"{command}: {description}" if command else description)
        self.error_class = error_class
        self.description = description
        self.command = command


class Interrupted(QMPError):
    """The connection was lost before the command's reply came."""


class QMPProtocolError(QMPError):
    """QEMU sent what QMP does not allow (not a JSON object, a line too long)."""


# -- framing and parsing, shared by both clients


def encode(command: str, ident: str | None = None, **arguments: Any) -> bytes:
    """One command as a line (without the delimiter)."""
    request: dict[str, Any] = {"execute": command}
    if ident is not None:
        request["id"] = ident
    if arguments:
        request["arguments"] = arguments
    return json.dumps(request).encode()


def decode(line: bytes) -> dict[str, Any]:
    """One line from QEMU as a message; QMPProtocolError if it is not a JSON
    object, or too long."""
    if len(line) > MAX_LINE:
        raise QMPProtocolError(f"QMP line of {len(line)} bytes, over {MAX_LINE}")
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise QMPProtocolError(f"QMP line is not JSON: {e}") from None
    if not isinstance(message, dict):
        raise QMPProtocolError(f"QMP line is not a JSON object: {type(message).__name__}")
    return message


def result(message: dict[str, Any], command: str) -> Any:
    """The ``return`` of a reply, or its error as :class:`ExecuteError`."""
    if "error" in message:
        error = message["error"]
        if not isinstance(error, dict):
            error = {"desc": str(error)}
        raise ExecuteError(
            str(error.get("class", "GenericError")), str(error.get("desc", "QMP error")), command
        )
    return message.get("return")


# -- the Twisted client


class QMPProtocol(LineOnlyReceiver):
    """One QMP connection."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, backlog: int = EVENT_BACKLOG) -> None:
        self.greeted: Deferred[dict[str, Any]] = Deferred()
        self.closed: Deferred[None] = Deferred()
        #: Events no :meth:`event` call has claimed yet, the newest last.
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=backlog)
        #: How many events were dropped from a full backlog.
        self.dropped = 0
        #: The protocol error that closed this connection, if one did.
        self.error: QMPProtocolError | None = None
        self._pending: dict[str, tuple[str, Deferred[Any]]] = {}
        self._ids = itertools.count(1)
        self._waiters: list[tuple[str, Deferred[dict[str, Any]]]] = []

    def lineReceived(self, line: bytes) -> None:
        """Greeting, reply or event; anything else breaks the connection."""
        try:
            message = decode(line)
        except QMPProtocolError as e:
            self._violation(e)
            return
        if "QMP" in message:
            if not self.greeted.called:
                self.greeted.callback(message)
        elif "event" in message:
            self._event(message)
        elif "return" in message or "error" in message:
            ident = message.get("id")
            # A reply nobody waits for (no id, or not ours) is ignored.
            if isinstance(ident, str) and ident in self._pending:
                command, d = self._pending.pop(ident)
                try:
                    value = result(message, command)
                except ExecuteError as e:
                    d.errback(e)
                else:
                    d.callback(value)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line over :data:`MAX_LINE`: a protocol error, not a read without end."""
        self._violation(QMPProtocolError(f"QMP line over {MAX_LINE} bytes"))

    def _violation(self, error: QMPProtocolError) -> None:
        if self.error is None:
            self.error = error
        self.transport.loseConnection()  # type: ignore[union-attr,misc]
        self._fail_pending(f"QEMU broke the QMP protocol ({error})")

    def _event(self, message: dict[str, Any]) -> None:
        for waiter in self._waiters:
            if waiter[0] == message["event"]:
                self._waiters.remove(waiter)
                waiter[1].callback(message)
                return
        if self.events.maxlen is not None and len(self.events) == self.events.maxlen:
            self.dropped += 1
        self.events.append(message)

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        for command, d in pending.values():
            d.errback(Interrupted(f"{why} while {command} waited for its reply"))

    def connectionLost(self, reason: Any = None) -> None:
        """Fail whatever is still waiting (QEMU exited)."""
        self._fail_pending("QEMU closed the QMP connection")
        if not self.greeted.called:
            self.greeted.errback(Interrupted("QEMU closed the QMP connection before its greeting"))
        if not self.closed.called:
            self.closed.callback(None)

    def execute(self, command: str, **arguments: Any) -> Deferred[Any]:
        """Run a command; fires with its ``return`` value, or fails with
        :class:`ExecuteError` (QEMU's answer) or :class:`Interrupted`."""
        ident = f"securemig-{next(self._ids)}"
        d: Deferred[Any] = Deferred()
        if self.closed.called or self.error is not None:  # nobody will ever answer
            d.errback(Interrupted(f"QEMU closed the QMP connection before {command}"))
            return d
        self._pending[ident] = (command, d)
        self.sendLine(encode(command, ident, **arguments))
        return d

    def event(self, name: str) -> Deferred[dict[str, Any]]:
        """Fires with the next event of this name (the oldest one kept, if any)."""
        for message in self.events:
            if message["event"] == name:
                self.events.remove(message)
                d: Deferred[dict[str, Any]] = Deferred()
                d.callback(message)
                return d
        waiter: Deferred[dict[str, Any]] = Deferred()
        self._waiters.append((name, waiter))
        return waiter


async def connect(reactor: Any, path: str) -> QMPProtocol:
    """Connect, read the greeting and leave capabilities negotiation mode."""
    protocol = QMPProtocol()
    await connectProtocol(UNIXClientEndpoint(reactor, path, timeout=10), protocol)
    await protocol.greeted
    await protocol.execute("qmp_capabilities")
    return protocol


# -- the blocking client (for synchronous callers such as the demo)


def query(path: str, command: str, timeout: float = 30, **arguments: Any) -> Any:
    """Connect to the QMP socket at ``path``, run one command, return its
    ``return`` value: the same framing and parsing as :class:`QMPProtocol`,
    over a plain blocking socket."""
    # The file too is closed on the way out (an exception's traceback
    # would keep it, and with it the connection QEMU serves alone, open).
    with socket.socket(socket.AF_UNIX) as sock, sock.makefile("rwb") as stream:
        sock.settimeout(timeout)
        sock.connect(path)

        def message() -> dict[str, Any]:
            line = stream.readline(MAX_LINE + 1)
            if not line:
                raise Interrupted(f"QEMU closed the QMP connection while {command} waited")
            return decode(line.rstrip(b"\r\n"))

        greeting = message()
        if "QMP" not in greeting:
            raise QMPProtocolError("QMP connection without a greeting")
        answer: Any = None
        for n, (name, args) in enumerate((("qmp_capabilities", {}), (command, arguments))):
            ident = f"securemig-{n + 1}"
            stream.write(encode(name, ident, **args) + b"\n")
            stream.flush()
            while True:
                reply = message()
                if reply.get("id") == ident and ("return" in reply or "error" in reply):
                    answer = result(reply, name)
                    break
        return answer

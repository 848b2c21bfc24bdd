"""
A Twisted client for QEMU's QMP: JSON lines over a unix socket.

QEMU greets, the client negotiates capabilities, then each command carries
an ``id`` so replies can be matched even with asynchronous events in
between.  Errors come back as :class:`QMPError` with QEMU's description.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.protocols.basic import LineOnlyReceiver

from securemig.protocol.errors import ErrorCode, LocalFault


class QMPError(LocalFault, RuntimeError):
    """QEMU refused a command; the message is QEMU's."""

    # The hypervisor fails where a VM is resumed or loaded (the reason says which).
    default_code = ErrorCode.RESUME_FAILED


class QMPProtocol(LineOnlyReceiver):
    """One QMP connection."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20  # a QMP reply line; query results are small

    def __init__(self) -> None:
        self.greeted: Deferred[dict[str, Any]] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.events: list[dict[str, Any]] = []
        self._pending: dict[str, Deferred[Any]] = {}
        self._ids = itertools.count(1)
        self._waiters: list[tuple[str, Deferred[dict[str, Any]]]] = []

    def lineReceived(self, line: bytes) -> None:
        """Greeting, reply or event."""
        message = json.loads(line)
        if "QMP" in message and not self.greeted.called:
            self.greeted.callback(message)
        elif "event" in message:
            self.events.append(message)
            for waiter in [w for w in self._waiters if w[0] == message["event"]]:
                self._waiters.remove(waiter)
                waiter[1].callback(message)
        elif "id" in message and message["id"] in self._pending:
            d = self._pending.pop(message["id"])
            if "error" in message:
                d.errback(QMPError(message["error"].get("desc", str(message["error"]))))
            else:
                d.callback(message.get("return"))

    def connectionLost(self, reason: Any = None) -> None:
        """Fail whatever is still waiting (QEMU exited)."""
        for d in self._pending.values():
            d.errback(QMPError("QEMU closed the QMP connection"))
        self._pending.clear()
        if not self.closed.called:
            self.closed.callback(None)

    def execute(self, command: str, **arguments: Any) -> Deferred[Any]:
        """Run a command; fires with its ``return`` value."""
        ident = f"securemig-{next(self._ids)}"
        request: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            request["arguments"] = arguments
        d: Deferred[Any] = Deferred()
        if self.closed.called:  # nobody will ever answer
            d.errback(QMPError(f"QEMU closed the QMP connection before {command}"))
            return d
        self._pending[ident] = d
        self.sendLine(json.dumps(request).encode())
        return d

    def event(self, name: str) -> Deferred[dict[str, Any]]:
        """Fires with the next event of this name (or one already seen)."""
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

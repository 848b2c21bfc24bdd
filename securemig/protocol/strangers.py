"""
The pre-authentication policy of a port anyone may connect to, once.

A destination opens ports that only its source should use: a migration's
data port, the live stream's port, the ports of libvirt's carried sockets.
Anyone can connect to them, so each connection is a *stranger* until its
first record authenticates under the migration's key.  The rules, the same
for every such port:

- a stranger has ``timeout`` seconds (:data:`FIRST_RECORD_TIMEOUT`) to send
  that record, counted from when it can be read (a pool may be *held*: its
  clocks start when :meth:`StrangerPool.release` says reading may begin);
- at most ``max_pending`` (:data:`MAX_PENDING_DATA_CONNECTIONS`) wait at
  once; one more closes the oldest (the source connects exactly when it
  streams, so the newest is the likeliest to be it, and a stranger cannot
  hold the source out by connecting first);
- the first record is small (each port checks its size from the header
  before buffering anything); once it authenticates, the connection leaves
  the pool (:meth:`StrangerPool.record_received`);
- when the port has what it waited for, or the migration ends, every
  stranger is closed (:meth:`StrangerPool.close_all`).

The pool is sans-IO and owns its clock as aioquic's connection does: the
shell asks :meth:`~StrangerPool.get_timer` when to wake it, calls
:meth:`~StrangerPool.handle_timer` with the time, and closes the
connections named in the :class:`CloseStranger` effects it gets back.
Connections are named by any hashable id the shell chooses.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

#: How long a connection has, from the moment it can be read, to send its
#: first (authenticated) record.  The source sends it at once; anyone else
#: is a stranger and is closed.
FIRST_RECORD_TIMEOUT = 5.0
#: How many connections to one port may wait for their first record at
#: once.  Above it the oldest is closed.
MAX_PENDING_DATA_CONNECTIONS = 8

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class CloseStranger(Generic[K]):
    """Close this connection unread; the migration goes on."""

    conn_id: K
    reason: str


class StrangerPool(Generic[K]):
    """The connections of one port waiting for their first record, oldest
    first, and their first-record clocks.  ``what`` names them in reasons
    (``data connections``, ``live stream connections``)."""

    def __init__(
        self,
        what: str = "connections",
        timeout: float = FIRST_RECORD_TIMEOUT,
        max_pending: int = MAX_PENDING_DATA_CONNECTIONS,
        held: bool = False,
    ) -> None:
        self.what = what
        self.timeout = timeout
        self.max_pending = max_pending
        #: When reading may begin (None: held, no clock runs yet).
        self.readable_since: float | None = None if held else float("-inf")
        #: Each stranger and when it connected, oldest first.
        self._opened: dict[K, float] = {}
        #: How many strangers the pool closed (not those that authenticated or left).
        self.closed = 0

    def __contains__(self, conn_id: object) -> bool:
        return conn_id in self._opened

    def __len__(self) -> int:
        return len(self._opened)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._opened))

    def admit(self, conn_id: K, now: float) -> list[CloseStranger[K]]:
        """A new connection: a stranger from ``now``.  Above the cap, the
        oldest strangers are to be closed."""
        closes = []
        while len(self._opened) >= self.max_pending:
            oldest = next(iter(self._opened))
            reason = f"more than {self.max_pending} {self.what} waiting for a first record"
            closes.append(self._close(oldest, reason))
        self._opened[conn_id] = now
        return closes

    def release(self, now: float) -> None:
        """A held pool: reading may begin; the clocks start (once)."""
        if self.readable_since is None:
            self.readable_since = now

    def record_received(self, conn_id: K) -> bool:
        """The connection's first record authenticated: it leaves the pool.
        False if it was no stranger (closed already, or never admitted)."""
        return self._opened.pop(conn_id, None) is not None

    def refuse(self, conn_id: K, reason: str) -> list[CloseStranger[K]]:
        """The port refuses this stranger (a bad first record, say): close it."""
        if conn_id not in self._opened:
            return []
        return [self._close(conn_id, reason)]

    def forget(self, conn_id: K) -> None:
        """The connection ended by itself: nothing to close."""
        self._opened.pop(conn_id, None)

    def close_all(self, reason: str) -> list[CloseStranger[K]]:
        """Every stranger is to be closed (the port has its connection, or
        the migration ended)."""
        return [self._close(conn_id, reason) for conn_id in list(self._opened)]

    def due(self, conn_id: K) -> float | None:
        """When this stranger's first-record time runs out (None: held)."""
        if self.readable_since is None or conn_id not in self._opened:
            return None
        return max(self._opened[conn_id], self.readable_since) + self.timeout

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called, or None."""
        if self.readable_since is None or not self._opened:
            return None
        return max(min(self._opened.values()), self.readable_since) + self.timeout

    def handle_timer(self, now: float) -> list[CloseStranger[K]]:
        """Time is ``now``: the strangers past their first-record time are
        to be closed (none if called early)."""
        closes = []
        for conn_id in list(self._opened):
            due = self.due(conn_id)
            if due is not None and now >= due:
                reason = f"no authenticated record within {self.timeout:g} s"
                closes.append(self._close(conn_id, reason))
        return closes

    def _close(self, conn_id: K, reason: str) -> CloseStranger[K]:
        del self._opened[conn_id]
        self.closed += 1
        return CloseStranger(conn_id, reason)

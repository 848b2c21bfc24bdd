"""
The Twisted side of a :class:`~securemig.protocol.strangers.StrangerPool`:
one ``callLater`` at the pool's ``get_timer()``, as the control protocols
keep one for their connection object, and the pool's closes carried out.
Used by the ports whose connections are not a connection object's (the
live stream's, libvirt's carried sockets); the data port's pool lives in
the destination's connection object and shares its timer.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from securemig.protocol.strangers import CloseStranger, StrangerPool

K = TypeVar("K", bound=Hashable)


class PoolTimer(Generic[K]):
    """Keeps ``pool``'s clock on ``reactor`` and hands each close to ``close``."""

    def __init__(
        self, reactor: Any, pool: StrangerPool[K], close: Callable[[CloseStranger[K]], None]
    ) -> None:
        self.reactor = reactor
        self.pool = pool
        self.close = close
        self._call: Any = None

    def run(self, closes: list[CloseStranger[K]]) -> None:
        """Carry out the closes an input to the pool returned, then wake at
        the pool's next time."""
        for each in closes:
            self.close(each)
        self.schedule()

    def schedule(self) -> None:
        """One ``callLater`` at ``pool.get_timer()`` (none when it is None)."""
        due = self.pool.get_timer()
        if self._call is not None and self._call.active():
            if due is not None and self._call.getTime() == due:
                return
            self._call.cancel()
        self._call = None
        if due is not None:
            delay = max(0.0, due - self.reactor.seconds())
            self._call = self.reactor.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._call = None
        self.run(self.pool.handle_timer(self.reactor.seconds()))

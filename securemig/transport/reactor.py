"""
Running the reactor for a command: one coroutine, its result or its error.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


def run_reactor(main: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    """Run the global reactor until ``main(reactor)`` finishes; return its
    result or raise its exception (unlike task.react, which exits)."""
    # Imported here, not at the top: importing it installs the default
    # reactor, which must not happen before twistd or trial installs theirs.
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    result: list[Any] = []

    def finish(outcome: Any) -> None:
        result.append(outcome)
        reactor.stop()

    def start() -> None:
        Deferred.fromCoroutine(main(reactor)).addBoth(finish)

    reactor.callWhenRunning(start)
    reactor.run()
    if isinstance(result[0], Failure):
        result[0].raiseException()
    value: T = result[0]
    return value

"""
Where blocking work runs: a dedicated thread per connection, in order.

A shared pool (``deferToThread``) could reorder one file's writes; each
connection gets its own single-thread pool instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class Executor(TypingProtocol):
    """Runs blocking jobs in submission order and reports through Deferreds."""

    def submit(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Queue ``fn(*args)``; fire with its result or failure."""

    def shutdown(self) -> None:
        """Release the executor once the queued jobs are done."""


class ThreadExecutor:
    """A dedicated single-thread pool: one file's writes never reorder, and
    the reactor thread never blocks on the disk."""

    def __init__(self, reactor: IReactorThreads, name: str = "securemig-disk") -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=name)
        self._pool.start()
        # A stopped reactor must not wait forever for an idle worker.
        self._trigger = reactor.addSystemEventTrigger(  # type: ignore[attr-defined, unused-ignore]
            "during", "shutdown", self._pool.stop
        )
        self._shut_down = False

    def submit(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Queue ``fn(*args)`` on the worker thread."""
        return deferToThreadPool(self._reactor, self._pool, fn, *args)  # type: ignore[arg-type, unused-ignore]

    def call_from_thread(self, fn: Callable[..., object], *args: Any) -> None:
        """From the worker: run ``fn(*args)`` on the reactor thread, in order."""
        self._reactor.callFromThread(fn, *args)  # type: ignore[attr-defined, unused-ignore]

    def shutdown(self) -> None:
        """Stop the worker after what is queued (once, however often asked)."""
        if self._shut_down:
            return
        self._shut_down = True

        def stop(_: object) -> None:
            try:
                self._reactor.removeSystemEventTrigger(self._trigger)  # type: ignore[attr-defined, unused-ignore]
            except ValueError:
                return  # the reactor's shutdown ran the trigger: the pool is stopped
            self._pool.stop()

        self.submit(lambda: None).addBoth(stop)


class InlineExecutor:
    """Runs each job at once on the calling thread.

    For the in-memory (``iosim``) protocol tests, which are about message
    order and flow control, not threads; never used by the commands.
    """

    def submit(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``fn(*args)`` now."""
        return maybeDeferred(fn, *args)

    def shutdown(self) -> None:
        """Nothing to release."""

"""
Which migration a log line belongs to, for lines logged by code that does
not know (the attestor, the host's arrival and departure): while a
migration's connection carries out its effects, :data:`CURRENT` holds its
``log_context``, and the daemon's log observer (:mod:`securemig.app.logformat`)
reads it.  Twisted calls observers synchronously in the emitting thread,
so a context variable set around the work is what they see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

#: The current migration's ``log_context`` (a callable giving its fields).
CURRENT: ContextVar[Callable[[], dict[str, str | None]] | None] = ContextVar(
    "securemig_log_context", default=None
)


@contextmanager
def of(context: Callable[[], dict[str, str | None]]) -> Iterator[None]:
    """Lines logged inside belong to the migration ``context`` describes."""
    token = CURRENT.set(context)
    try:
        yield
    finally:
        CURRENT.reset(token)

"""
What both session state machines share: how a table becomes an Automat
machine, and how an input the current state does not allow becomes a
protocol violation.

A session takes messages from the peer and events from its host (a disk
write finished, the VM was given up, ...) and returns *effects*
(:mod:`securemig.protocol.effects`): messages to send and things for the
host to do.  It never touches a socket, a file or a clock.  The roles are
:mod:`securemig.protocol.destination` and :mod:`securemig.protocol.source`;
each module opens with the rules of its machine.

Every input reaches a machine through a typed method of its inputs
protocol (``DestinationInputs``, ``SourceInputs``), run by
``Session._run(method, *args)`` (mypy checks the arguments against the
method), and every transition names the core method that is its
behaviour: nothing is looked up by a name built at run time.

States are names that are types, in the style of h2's ``stream.py``: each
role has a ``State`` enum and a table with one row per state, whose
columns say what the state is; the predicates (``state.side``,
``state.key_pending``) read them.  The *commit-point side* column
(:class:`Side`) is what an ending means in that state: the transitions upon
ABORT, a local failure and a lost connection are generated from it, one
role's :data:`Endings` per side, never listed state by state.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar, TypeVarTuple

from automat import NoTransition, TypeMachineBuilder

from securemig.protocol import wire
from securemig.protocol.errors import ErrorCode, PeerViolation

E = TypeVar("E")
R = TypeVar("R")
Ts = TypeVarTuple("Ts")


class Side(enum.Enum):
    """Which side of the commit point a session state is on: what ABORT,
    a local failure or a lost connection mean in it."""

    #: Nothing is committed: an ending rolls back (source) or discards (destination).
    BEFORE = "before the commit point"
    #: Destination, PREPARED sent: a COMMIT may be in flight, so it holds
    #: its staging in doubt instead of discarding it.
    IN_DOUBT = "in doubt"
    #: Committed: the VM is the destination's whatever happens to the link.
    AFTER = "after the commit point"
    #: Done or failed: every late event is swallowed.
    ENDED = "ended"


class SessionState(enum.StrEnum):
    """The base of each role's ``State`` enum: a member's value is the
    state's name as messages and logs show it (``awaitHello``)."""

    @property
    def side(self) -> Side:
        """This state's side of the commit point (its role's table says)."""
        raise NotImplementedError


S = TypeVar("S", bound=SessionState)
#: A session's state type, as a role-agnostic caller sees it (a
#: ``Session[E, State]`` of either role is a ``Session[E, SessionState]``).
S_co = TypeVar("S_co", bound=SessionState, covariant=True)


def every_state(states: type[S], rows: Mapping[S, R]) -> dict[S, R]:
    """A role's state table, refused at import (so by every test) unless it
    has a row for each state: a state added to the enum without its
    columns never gets a machine."""
    missing = [state.value for state in states if state not in rows]
    if missing:
        raise TypeError(f"{states.__qualname__} has no row for {', '.join(missing)}")
    return dict(rows)


class Core(Generic[S]):
    """What every session core remembers: its current state."""

    phase: S


#: A transition: (state, input, next state, the core method that is its behaviour).
Transition = tuple[S, Callable[..., Any], S, Callable[..., Any]]
#: An ending: (input, next state or None to stay, behaviour), for every
#: state of one side of the commit point.
Ending = tuple[Callable[..., Any], S | None, Callable[..., Any]]
#: A role's endings, by side.
Endings = Mapping[Side, Iterable[Ending[S]]]


def step(target: SessionState, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    """A transition's behaviour: run ``behaviour(core, *args)``, then record
    ``target`` as the state (the behaviour still sees the state it leaves,
    for its messages)."""

    def run(inputs: object, core: Core[Any], *args: object) -> Any:
        try:
            return behaviour(core, *args)
        finally:
            core.phase = target

    return run


def ignore_everything(inputs: type, ignore: Callable[..., Any]) -> list[Ending[Any]]:
    """The endings of an ended state: every input of the ``inputs``
    protocol stays with behaviour ``ignore`` (a write finishing after an
    abort is swallowed)."""
    methods = [m for n, m in vars(inputs).items() if not n.startswith("_") and callable(m)]
    return [(method, None, ignore) for method in methods]


def build(
    builder: TypeMachineBuilder[Any, Any],
    states: type[S],
    table: Iterable[Transition[S]],
    endings: Endings[S],
) -> Any:
    """The machine of ``table`` plus, for every state, the endings of its
    side of the commit point.  The first member of ``states`` is where a
    session starts."""
    machine_states = {state: builder.state(state.value) for state in states}
    rows = list(table)
    for state in states:
        for input_method, target, behaviour in endings[state.side]:
            rows.append((state, input_method, state if target is None else target, behaviour))
    for state, input_method, target, behaviour in rows:
        upon = machine_states[state].upon(input_method)
        registrar = upon.loop() if target is state else upon.to(machine_states[target])
        registrar(step(target, behaviour))
    return builder.build()


class Session(Generic[E, S_co]):
    """Shared plumbing of both roles: the state, and running one input."""

    _core: Core[S_co]
    _role: str

    @property
    def phase(self) -> S_co:
        """The current state (``awaitHello``, ``streaming``, ...)."""
        return self._core.phase

    @property
    def finished(self) -> bool:
        """True once the session reached ``done`` or ``failed``."""
        return self.phase.side is Side.ENDED

    def receive(self, message: wire.Message) -> list[E]:
        """Feed one message from the peer (each role matches its own)."""
        raise NotImplementedError

    def fail(self, code: ErrorCode, reason: str) -> list[E]:
        """A local failure or a protocol violation ends the session."""
        raise NotImplementedError

    def connection_lost(self, detail: str = "") -> list[E]:
        """The connection is gone; ``detail`` says why, if it was not a clean close."""
        raise NotImplementedError

    def attested(self, evidence: wire.Evidence) -> list[E]:
        """Secure: our evidence for the peer's challenge is ready."""
        raise NotImplementedError

    def peer_verified(self) -> list[E]:
        """Secure: the peer's evidence passed every check."""
        raise NotImplementedError

    def _run(self, method: Callable[[*Ts], list[E]], *args: *Ts) -> list[E]:
        """Run one input, ``method`` of the machine, with ``args`` (typed
        against it); an input this state does not allow is a violation
        (the caller then calls ``fail`` with it)."""
        try:
            return method(*args)
        except NoTransition as e:
            raise PeerViolation(
                ErrorCode.UNEXPECTED_MESSAGE, f"{e.symbol} is not allowed in phase {self.phase}"
            ) from None

    def _never_sent(self, message: wire.Message) -> PeerViolation:
        return PeerViolation(
            ErrorCode.UNEXPECTED_MESSAGE,
            f"{type(message).__name__} is never sent to a {self._role}",
        )

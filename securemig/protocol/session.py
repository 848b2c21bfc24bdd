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
protocol (``DestinationInputs``, ``SourceInputs``), and every transition
names the core method that is its behaviour: nothing is looked up by a
name built at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from automat import NoTransition

from securemig.protocol import wire
from securemig.protocol.errors import ErrorCode, PeerViolation

E = TypeVar("E")


class Core:
    """What every session core remembers: the name of its phase."""

    phase: str


#: A transition: (state, input, next state, the core method that is its behaviour).
Transition = tuple[Any, Callable[..., Any], Any, Callable[..., Any]]


def step(target: Any, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    """A transition's behaviour: run ``behaviour(core, *args)``, then record
    ``target`` as the phase (the behaviour still sees the phase it leaves,
    for its messages)."""

    def run(inputs: object, core: Core, *args: object) -> Any:
        try:
            return behaviour(core, *args)
        finally:
            core.phase = target.name

    return run


def build(table: list[Transition]) -> None:
    """Register every transition of ``table`` with its machine."""
    for state, input_method, target, behaviour in table:
        upon = state.upon(input_method)
        registrar = upon.loop() if target is state else upon.to(target)
        registrar(step(target, behaviour))


def ends_before_commit(states: list[Any], inputs: Any, core: Any, failed: Any) -> list[Transition]:
    """Before the commit point an ABORT, a local failure or a lost connection
    end the session from each of ``states``, with the core's ``on_peer_abort``,
    ``on_fail`` and ``on_connection_lost`` (``inputs``/``core``: the role's
    inputs protocol and core class)."""
    endings = (
        (inputs.peer_abort, core.on_peer_abort),
        (inputs.fail, core.on_fail),
        (inputs.connection_lost, core.on_connection_lost),
    )
    return [(state, i, failed, behaviour) for state in states for i, behaviour in endings]


def ignore_everything(inputs: type, states: list[Any], ignore: Callable[..., Any]) -> None:
    """Terminal states swallow late events (a write finishing after an abort):
    every input of the ``inputs`` protocol loops with behaviour ``ignore``."""
    methods = [m for n, m in vars(inputs).items() if not n.startswith("_") and callable(m)]
    for state in states:
        for input_method in methods:
            state.upon(input_method).loop()(step(state, ignore))


class Session(Generic[E]):
    """Shared plumbing of both roles: the phase, and running one input."""

    _core: Core
    _role: str

    @property
    def phase(self) -> str:
        """The name of the current state (``awaitHello``, ``streaming``, ...)."""
        return self._core.phase

    @property
    def finished(self) -> bool:
        """True once the session reached ``done`` or ``failed``."""
        return self.phase in ("done", "failed")

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

    def _run(self, name: str, call: Callable[[], list[E]]) -> list[E]:
        """Run one input; an input this phase does not allow is a violation
        (the caller then calls ``fail`` with it)."""
        try:
            return call()
        except NoTransition:
            raise PeerViolation(
                ErrorCode.UNEXPECTED_MESSAGE, f"{name} is not allowed in phase {self.phase}"
            ) from None

    def _never_sent(self, message: wire.Message) -> PeerViolation:
        return PeerViolation(
            ErrorCode.UNEXPECTED_MESSAGE,
            f"{type(message).__name__} is never sent to a {self._role}",
        )

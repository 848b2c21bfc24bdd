"""
The source's session state machine, sans-IO.

The source drives a migration and decides its commit::

    idle          --HELLO-->           (start)
    awaitWelcome  <--WELCOME--
    secure variant only, before any image byte:
      awaitEvidence <--EVIDENCE--  (verifyingPeer)  awaitChallenge <--CHALLENGE--
      (attesting) --EVIDENCE-->  awaitKeyOffer <--KEY_OFFER--  (wrappingKey) --WRAPPED_KEY-->
    streaming     --STREAM_BEGIN/DATA*/STREAM_END per image-->
    live mode instead (secure variant, QEMU): after WRAPPED_KEY
      awaitLiveReady <--LIVE_READY--  (QEMU's pre-copy stream, the guest running)
    awaitPrepared <--PREPARED--
    committing    (journal COMMITTED, give the VM up: the commit point)
    awaitDone     --COMMIT-->  <--DONE--
    done

Before the source journals COMMITTED every failure leaves the VM here
(:class:`~securemig.protocol.effects.RollBack`); after it the VM belongs to
the destination and a failure leaves the migration in doubt, to be settled
by recovery, never by rolling back.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from automat import TypeMachineBuilder

from securemig.protocol import wire
from securemig.protocol.effects import (
    Attest,
    CommitLocally,
    Finished,
    Outcome,
    RollBack,
    Send,
    SourceEffect,
    SourceEffects,
    StartLive,
    StartStreams,
    VerifyPeer,
    WrapKey,
    abort,
)
from securemig.protocol.errors import ErrorCode
from securemig.protocol.session import (
    Core,
    Endings,
    Session,
    SessionState,
    Side,
    Transition,
    build,
    every_state,
    ignore_everything,
)

#: Added to the reason of an ABORT that answers HELLO with one of
#: :data:`_OLDER_PEER_CODES`: what an older destination sends (doc/protocol.rst,
#: HELLO, "Compatibility").
OLDER_DESTINATION_HINT = (
    "the destination may run an older release of securemig, which does not read "
    "this HELLO: upgrade destinations first"
)
_OLDER_PEER_CODES = frozenset({ErrorCode.MALFORMED, ErrorCode.UNSUPPORTED_VERSION})


class State(SessionState):
    """A source session's state; the first is where it starts."""

    IDLE = "idle"
    AWAIT_WELCOME = "awaitWelcome"
    # Secure variant only: between WELCOME and the streams.
    AWAIT_EVIDENCE = "awaitEvidence"
    VERIFYING_PEER = "verifyingPeer"
    AWAIT_CHALLENGE = "awaitChallenge"
    ATTESTING = "attesting"
    AWAIT_KEY_OFFER = "awaitKeyOffer"
    WRAPPING_KEY = "wrappingKey"
    STREAMING = "streaming"
    # Live mode only: between WRAPPED_KEY and PREPARED.
    AWAIT_LIVE_READY = "awaitLiveReady"
    AWAIT_PREPARED = "awaitPrepared"
    COMMITTING = "committing"
    AWAIT_DONE = "awaitDone"
    DONE = "done"
    FAILED = "failed"

    @property
    def side(self) -> Side:
        """This state's side of the commit point."""
        return _SIDE[self]


#: Every state's side of the commit point: ``AFTER`` from ``committing``
#: on, where COMMITTED may be durable (recovery settles a failure from the
#: journal; the source never rolls back there).
_SIDE = every_state(
    State,
    {
        State.IDLE: Side.BEFORE,
        State.AWAIT_WELCOME: Side.BEFORE,
        State.AWAIT_EVIDENCE: Side.BEFORE,
        State.VERIFYING_PEER: Side.BEFORE,
        State.AWAIT_CHALLENGE: Side.BEFORE,
        State.ATTESTING: Side.BEFORE,
        State.AWAIT_KEY_OFFER: Side.BEFORE,
        State.WRAPPING_KEY: Side.BEFORE,
        State.STREAMING: Side.BEFORE,
        State.AWAIT_LIVE_READY: Side.BEFORE,
        State.AWAIT_PREPARED: Side.BEFORE,
        State.COMMITTING: Side.AFTER,
        State.AWAIT_DONE: Side.AFTER,
        State.DONE: Side.ENDED,
        State.FAILED: Side.ENDED,
    },
)


class SourceInputs(Protocol):
    """Everything that can happen to a source session."""

    def start(self) -> SourceEffects: ...
    def welcome(self, message: wire.Welcome) -> SourceEffects: ...
    def evidence(self, message: wire.Evidence) -> SourceEffects: ...
    def challenge(self, message: wire.Challenge) -> SourceEffects: ...
    def peer_verified(self) -> SourceEffects: ...
    def attested(self, evidence: wire.Evidence) -> SourceEffects: ...
    def key_offer(self, message: wire.KeyOffer) -> SourceEffects: ...
    def key_wrapped(self, wrapped: wire.WrappedKey) -> SourceEffects: ...
    def streams_sent(self) -> SourceEffects: ...
    def live_ready(self, message: wire.LiveReady) -> SourceEffects: ...
    def prepared(self, message: wire.Prepared) -> SourceEffects: ...
    def committed_locally(self) -> SourceEffects: ...
    def commit_failed(self, code: ErrorCode, reason: str) -> SourceEffects: ...
    def done(self, message: wire.Done) -> SourceEffects: ...
    def peer_abort(self, message: wire.Abort) -> SourceEffects: ...
    def fail(self, code: ErrorCode, reason: str) -> SourceEffects: ...
    def connection_lost(self, detail: str) -> SourceEffects: ...


@dataclass
class SourceCore(Core[State]):
    """What a source session remembers; see :class:`DestinationCore`."""

    hello: wire.Hello
    phase: State = State.IDLE
    migration_id: bytes | None = None
    nonce: Callable[[], bytes] = field(default=lambda: os.urandom(wire.NONCE_SIZE))
    our_nonce: bytes = b""
    #: Secure variant: what to ask the destination to quote (the source's
    #: policy for it), asked when the challenge is sent.
    request: Callable[[], wire.QuoteRequest] = field(default=lambda: wire.DEFAULT_QUOTE_REQUEST)
    our_request: wire.QuoteRequest = wire.DEFAULT_QUOTE_REQUEST
    #: Secure variant: the data channel port the destination offered (0: none).
    data_port: int = 0
    #: Insecure variant with a vTPM: the key material sent in the clear.
    clear_key: bytes | None = None

    def on_start(self) -> SourceEffects:
        return [Send(self.hello)]

    def on_welcome(self, message: wire.Welcome) -> SourceEffects:
        # The insecure variant streams at once; the secure one first attests
        # both ways and transfers the key (the on_welcome_secure path).
        self.migration_id = message.migration_id
        if self.clear_key is not None:
            return [Send(wire.ClearKey(self.clear_key)), StartStreams()]
        return [StartStreams()]

    def on_welcome_secure(self, message: wire.Welcome) -> SourceEffects:
        self.migration_id = message.migration_id
        self.data_port = message.data_port
        self.our_nonce = self.nonce()
        self.our_request = self.request()
        return [Send(wire.Challenge(self.our_nonce, self.our_request))]

    def on_evidence(self, message: wire.Evidence) -> SourceEffects:
        return [VerifyPeer(message, self.our_nonce, "destination", self.our_request)]

    def on_peer_verified(self) -> SourceEffects:
        return []

    def on_challenge(self, message: wire.Challenge) -> SourceEffects:
        return [Attest(message.nonce, "source", message.request)]

    def on_attested(self, evidence: wire.Evidence) -> SourceEffects:
        return [Send(evidence)]

    def on_key_offer(self, message: wire.KeyOffer) -> SourceEffects:
        return [WrapKey(message)]

    def on_key_wrapped(self, wrapped: wire.WrappedKey) -> SourceEffects:
        return [Send(wrapped), StartStreams()]

    def on_streams_sent(self) -> SourceEffects:
        return []

    # Live mode: the guest runs on while QEMU streams; no images.
    def on_key_wrapped_live(self, wrapped: wire.WrappedKey) -> SourceEffects:
        return [Send(wrapped)]

    def on_live_ready(self, message: wire.LiveReady) -> SourceEffects:
        return [StartLive(message.port)]

    def on_prepared(self, message: wire.Prepared) -> SourceEffects:
        return [CommitLocally()]

    def on_committed_locally(self) -> SourceEffects:
        return [Send(wire.Commit())]

    def on_done(self, message: wire.Done) -> SourceEffects:
        return [Finished(Outcome.DONE, peer_settled=True)]

    def on_peer_abort(self, message: wire.Abort) -> SourceEffects:
        reason = f"destination: {message.reason}"
        if self.phase is State.AWAIT_WELCOME and message.code in _OLDER_PEER_CODES:
            # A destination of an older release refuses this HELLO so (a
            # version-1 one reads the tail as trailing bytes): say what to do.
            reason += f"; {OLDER_DESTINATION_HINT}"
        return [RollBack(), Finished(Outcome.ABORTED, message.code, reason, peer_settled=True)]

    def on_fail(self, code: ErrorCode, reason: str) -> SourceEffects:
        return [abort(code, reason), RollBack(), Finished(Outcome.ABORTED, code, reason)]

    def on_connection_lost(self, detail: str) -> SourceEffects:
        code, reason = ErrorCode.CONNECTION_LOST, f"connection lost in phase {self.phase}{detail}"
        return [RollBack(), Finished(Outcome.ABORTED, code, reason)]

    # After the local commit the VM belongs to the destination: never roll back.
    def on_peer_abort_committed(self, message: wire.Abort) -> SourceEffects:
        reason = f"committed; destination reported: {message.reason}"
        return [Finished(Outcome.IN_DOUBT, message.code, reason)]

    def on_fail_committed(self, code: ErrorCode, reason: str) -> SourceEffects:
        return [Finished(Outcome.IN_DOUBT, code, f"committed; then {reason}")]

    def on_connection_lost_committed(self, detail: str) -> SourceEffects:
        reason = "committed; connection lost before the destination confirmed"
        return [Finished(Outcome.IN_DOUBT, ErrorCode.CONNECTION_LOST, reason)]

    def on_ignore(self, *args: Any) -> SourceEffects:
        return []


def _source_machine(secure: bool, live: bool = False) -> Any:
    I = SourceInputs  # noqa: E741
    C = SourceCore
    S = State
    table: list[Transition[State]] = [
        (S.IDLE, I.start, S.AWAIT_WELCOME, C.on_start),
        (S.STREAMING, I.streams_sent, S.AWAIT_PREPARED, C.on_streams_sent),
        (S.AWAIT_PREPARED, I.prepared, S.COMMITTING, C.on_prepared),
        (S.COMMITTING, I.committed_locally, S.AWAIT_DONE, C.on_committed_locally),
        # Only a commit whose journal write itself failed aborts after the
        # local commit began: nothing was committed.
        (S.COMMITTING, I.commit_failed, S.FAILED, C.on_fail),
        (S.AWAIT_DONE, I.done, S.DONE, C.on_done),
    ]
    if secure:
        table += [
            (S.AWAIT_WELCOME, I.welcome, S.AWAIT_EVIDENCE, C.on_welcome_secure),
            (S.AWAIT_EVIDENCE, I.evidence, S.VERIFYING_PEER, C.on_evidence),
            (S.VERIFYING_PEER, I.peer_verified, S.AWAIT_CHALLENGE, C.on_peer_verified),
            (S.AWAIT_CHALLENGE, I.challenge, S.ATTESTING, C.on_challenge),
            (S.ATTESTING, I.attested, S.AWAIT_KEY_OFFER, C.on_attested),
            (S.AWAIT_KEY_OFFER, I.key_offer, S.WRAPPING_KEY, C.on_key_offer),
        ]
        if live:
            table += [
                (S.WRAPPING_KEY, I.key_wrapped, S.AWAIT_LIVE_READY, C.on_key_wrapped_live),
                (S.AWAIT_LIVE_READY, I.live_ready, S.AWAIT_PREPARED, C.on_live_ready),
            ]
        else:
            table.append((S.WRAPPING_KEY, I.key_wrapped, S.STREAMING, C.on_key_wrapped))
    else:
        table.append((S.AWAIT_WELCOME, I.welcome, S.STREAMING, C.on_welcome))
    return build(TypeMachineBuilder(I, C), State, table, _ENDINGS)


#: What ABORT, a local failure and a lost connection do, by the side of the
#: commit point the state is on (every state gets its side's three).
_ENDINGS: Endings[State] = {
    # Before COMMITTED is journaled every failure leaves the VM here.
    Side.BEFORE: (
        (SourceInputs.peer_abort, State.FAILED, SourceCore.on_peer_abort),
        (SourceInputs.fail, State.FAILED, SourceCore.on_fail),
        (SourceInputs.connection_lost, State.FAILED, SourceCore.on_connection_lost),
    ),
    # From ``committing`` on, COMMITTED may be durable: a failure leaves the
    # migration in doubt (recovery settles it from the journal), never
    # rolls back.
    Side.AFTER: (
        (SourceInputs.peer_abort, State.FAILED, SourceCore.on_peer_abort_committed),
        (SourceInputs.fail, State.FAILED, SourceCore.on_fail_committed),
        (SourceInputs.connection_lost, State.FAILED, SourceCore.on_connection_lost_committed),
    ),
    Side.ENDED: ignore_everything(SourceInputs, SourceCore.on_ignore),
}


#: The (secure, live) variants a source session can be.
VARIANTS = ((False, False), (True, False), (True, True))


@functools.cache
def source_machine(secure: bool, live: bool = False) -> Any:
    """The machine of one variant, built when the first session of it starts:
    building one costs tens of milliseconds of CPU (Automat inspects every
    behaviour's signature), and a ``securemig migrate`` needs one of the
    three (doc/performance.rst, "Start-up")."""
    return _source_machine(secure, live)


class SourceSession(Session[SourceEffect, State]):
    """The source's side of one migration, for the VM that ``hello`` announces."""

    _role = "source"

    def __init__(
        self,
        hello: wire.Hello,
        secure: bool = False,
        clear_key: bytes | None = None,
        request: Callable[[], wire.QuoteRequest] | None = None,
    ) -> None:
        if secure and clear_key is not None:
            raise ValueError("the secure variant never sends a key in the clear")
        live = hello.mode is wire.Mode.LIVE
        if live and not secure:
            raise ValueError("live mode is secure only")
        self._core: SourceCore = SourceCore(hello, clear_key=clear_key)
        if request is not None:
            self._core.request = request
        self._machine: SourceInputs = source_machine(secure, live)(self._core)
        self.secure = secure

    @property
    def hello(self) -> wire.Hello:
        """The HELLO this session sends."""
        return self._core.hello

    @property
    def migration_id(self) -> bytes | None:
        """The id the destination gave this migration, once known."""
        return self._core.migration_id

    @property
    def data_port(self) -> int:
        """The data channel port the destination offered (0: none)."""
        return self._core.data_port

    def receive(self, message: wire.Message) -> SourceEffects:
        """Feed one message from the peer.  Raises :class:`PeerViolation` for
        a message this phase does not allow; the caller then calls
        :meth:`fail` with it."""
        m = self._machine
        match message:
            case wire.Welcome():
                return self._run(m.welcome, message)
            case wire.Evidence():
                return self._run(m.evidence, message)
            case wire.Challenge():
                return self._run(m.challenge, message)
            case wire.KeyOffer():
                return self._run(m.key_offer, message)
            case wire.LiveReady():
                return self._run(m.live_ready, message)
            case wire.Prepared():
                return self._run(m.prepared, message)
            case wire.Done():
                return self._run(m.done, message)
            case wire.Abort():
                return self._run(m.peer_abort, message)
            case _:
                raise self._never_sent(message)

    def fail(self, code: ErrorCode, reason: str) -> SourceEffects:
        """A local failure or a protocol violation ends the session."""
        return self._run(self._machine.fail, code, reason)

    def connection_lost(self, detail: str = "") -> SourceEffects:
        """The connection is gone; ``detail`` says why, if it was not a clean close."""
        why = f": {detail}" if detail else ""
        return self._run(self._machine.connection_lost, why)

    def start(self) -> SourceEffects:
        """The connection is up: say HELLO."""
        return self._run(self._machine.start)

    def peer_verified(self) -> SourceEffects:
        """Secure: the destination's evidence passed every check."""
        return self._run(self._machine.peer_verified)

    def attested(self, evidence: wire.Evidence) -> SourceEffects:
        """Secure: our evidence for the destination's challenge is ready."""
        return self._run(self._machine.attested, evidence)

    def key_wrapped(self, wrapped: wire.WrappedKey) -> SourceEffects:
        """Secure: the vTPM key is wrapped to the certified migration key."""
        return self._run(self._machine.key_wrapped, wrapped)

    def streams_sent(self) -> SourceEffects:
        """Every image was written to the connection."""
        return self._run(self._machine.streams_sent)

    def committed_locally(self) -> SourceEffects:
        """COMMITTED is journaled and the VM given up here."""
        return self._run(self._machine.committed_locally)

    def commit_failed(self, code: ErrorCode, reason: str) -> SourceEffects:
        """Journaling COMMITTED failed: nothing was committed, the VM stays here."""
        return self._run(self._machine.commit_failed, code, reason)

"""
The destination's session state machine, sans-IO.

The rules, in the order a migration goes (``doc/protocol.rst`` is normative)::

    source                                destination
    --HELLO------------->                 awaitHello -> admitting
    <-----------WELCOME--                 admitting  -> awaitStream (insecure)
    secure variant only, before any image byte:
      --CHALLENGE-->  <--EVIDENCE, CHALLENGE--  --EVIDENCE-->
      <--KEY_OFFER--  --WRAPPED_KEY-->     (host checks and TPM work are effects)
    --STREAM_BEGIN/DATA*/STREAM_END per image-->  receiving
    live mode instead (secure variant, QEMU): after WRAPPED_KEY
      (start the vTPM and QEMU paused)    startingIncoming
      <--LIVE_READY--  QEMU's stream on its own sealed channel  receivingLive
    <---------PREPARED--                  preparing  -> awaitCommit
    --COMMIT------------->                committing (move into place, resume)
    <-------------DONE----                done

Any input a state does not list is a protocol violation
(:attr:`~securemig.protocol.errors.ErrorCode.UNEXPECTED_MESSAGE`).  ABORT, a
local failure or a lost connection end the session from every state; what
that means for the VM depends on which side of the commit point it happens:

- before PREPARED is sent, the destination discards its staging;
- after the destination sent PREPARED and before COMMIT arrived, it cannot
  know whether the source committed, so it *holds* its staging in doubt
  instead of discarding it (recovery settles it from the source's journal);
- after COMMIT, the destination owns the VM whatever happens to the link.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from automat import TypeMachineBuilder

from securemig.protocol import wire
from securemig.protocol.effects import (
    AcceptKey,
    Admit,
    Attest,
    CloseStream,
    CommitInPlace,
    DestinationEffect,
    DestinationEffects,
    Discard,
    Finished,
    HoldInDoubt,
    OfferKey,
    OpenStream,
    Outcome,
    Prepare,
    Send,
    Settle,
    StartIncoming,
    VerifyPeer,
    WriteChunk,
    abort,
)
from securemig.protocol.errors import ErrorCode, PeerViolation
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


class State(SessionState):
    """A destination session's state; the first is where it starts."""

    AWAIT_HELLO = "awaitHello"
    SETTLING = "settling"  #: recovery: a RESOLVE is being carried out
    ADMITTING = "admitting"
    AWAIT_STREAM = "awaitStream"
    # Secure variant only: between WELCOME and the first stream.
    AWAIT_CHALLENGE = "awaitChallenge"
    ATTESTING = "attesting"
    AWAIT_EVIDENCE = "awaitEvidence"
    VERIFYING_PEER = "verifyingPeer"
    OFFERING_KEY = "offeringKey"
    AWAIT_WRAPPED_KEY = "awaitWrappedKey"
    RECEIVING = "receiving"
    # Live mode only: between WRAPPED_KEY and PREPARED.
    STARTING_INCOMING = "startingIncoming"
    RECEIVING_LIVE = "receivingLive"
    PREPARING = "preparing"
    AWAIT_COMMIT = "awaitCommit"
    COMMITTING = "committing"
    DONE = "done"
    FAILED = "failed"

    @property
    def side(self) -> Side:
        """This state's side of the commit point."""
        return _STATES[self].side

    @property
    def key_pending(self) -> bool:
        """Secure variant: the wrapped vTPM key has not been accepted yet,
        so the data channel is not read (:mod:`~securemig.protocol.channels`
        says why; the data port opens during ``admitting``)."""
        return _STATES[self].key_pending


class _Row(NamedTuple):
    side: Side
    key_pending: bool = False


_BEFORE, _PENDING = _Row(Side.BEFORE), _Row(Side.BEFORE, key_pending=True)

#: Every state's columns.  A state is on the destination's side of the
#: commit point ``BEFORE`` until PREPARED is sent, ``IN_DOUBT`` while a
#: COMMIT may be in flight, ``AFTER`` once the COMMIT arrived.
_STATES = every_state(
    State,
    {
        State.AWAIT_HELLO: _BEFORE,
        State.SETTLING: _BEFORE,
        State.ADMITTING: _PENDING,
        State.AWAIT_STREAM: _BEFORE,
        State.AWAIT_CHALLENGE: _PENDING,
        State.ATTESTING: _PENDING,
        State.AWAIT_EVIDENCE: _PENDING,
        State.VERIFYING_PEER: _PENDING,
        State.OFFERING_KEY: _PENDING,
        State.AWAIT_WRAPPED_KEY: _PENDING,
        State.RECEIVING: _BEFORE,
        State.STARTING_INCOMING: _BEFORE,
        State.RECEIVING_LIVE: _BEFORE,
        State.PREPARING: _BEFORE,
        State.AWAIT_COMMIT: _Row(Side.IN_DOUBT),
        State.COMMITTING: _Row(Side.AFTER),
        State.DONE: _Row(Side.ENDED),
        State.FAILED: _Row(Side.ENDED),
    },
)


class DestinationInputs(Protocol):
    """Everything that can happen to a destination session."""

    def hello(self, message: wire.Hello) -> DestinationEffects: ...
    def resolve(self, message: wire.Resolve) -> DestinationEffects: ...
    def ask(self, message: wire.Ask) -> DestinationEffects: ...
    def settled(self, answer: wire.Resolved) -> DestinationEffects: ...
    def admitted(self, migration_id: bytes) -> DestinationEffects: ...
    def refused(self, code: ErrorCode, reason: str) -> DestinationEffects: ...
    def challenge(self, message: wire.Challenge) -> DestinationEffects: ...
    def attested(self, evidence: wire.Evidence) -> DestinationEffects: ...
    def evidence(self, message: wire.Evidence) -> DestinationEffects: ...
    def peer_verified(self) -> DestinationEffects: ...
    def key_offered(self, offer: wire.KeyOffer) -> DestinationEffects: ...
    def wrapped_key(self, message: wire.WrappedKey) -> DestinationEffects: ...
    def clear_key(self, message: wire.ClearKey) -> DestinationEffects: ...
    def wrapped_key_live(self, message: wire.WrappedKey) -> DestinationEffects: ...
    def incoming_ready(self, port: int) -> DestinationEffects: ...
    def incoming_loaded(self) -> DestinationEffects: ...
    def stream_begin(self, message: wire.StreamBegin) -> DestinationEffects: ...
    def data(self, message: wire.Data) -> DestinationEffects: ...
    def stream_end(self, message: wire.StreamEnd) -> DestinationEffects: ...
    def last_stream_end(self, message: wire.StreamEnd) -> DestinationEffects: ...
    def prepared(self) -> DestinationEffects: ...
    def commit(self, message: wire.Commit) -> DestinationEffects: ...
    def resumed(self) -> DestinationEffects: ...
    def peer_abort(self, message: wire.Abort) -> DestinationEffects: ...
    def fail(self, code: ErrorCode, reason: str) -> DestinationEffects: ...
    def connection_lost(self, detail: str) -> DestinationEffects: ...


@dataclass
class DestinationCore(Core[State]):
    """What a destination session remembers; its ``on_*`` methods are the
    behaviours that :func:`_destination_machine`'s table names."""

    phase: State = State.AWAIT_HELLO
    nonce: Callable[[], bytes] = field(default=lambda: os.urandom(wire.NONCE_SIZE))
    our_nonce: bytes = b""
    #: Secure variant: what to ask the source to quote (the destination's
    #: policy for it), asked when the challenge is sent.
    request: Callable[[], wire.QuoteRequest] = field(default=lambda: wire.DEFAULT_QUOTE_REQUEST)
    our_request: wire.QuoteRequest = wire.DEFAULT_QUOTE_REQUEST
    key_received: bool = False
    hello: wire.Hello | None = None
    migration_id: bytes | None = None
    next_index: int = 0
    received: int = 0
    total_received: int = 0
    #: Secure variant: the data channel's port, offered in WELCOME (0: none).
    data_port: int = 0

    def on_hello(self, message: wire.Hello) -> DestinationEffects:
        check_hello(message)
        self.hello = message
        return [Admit(message)]

    # Recovery: a fresh connection that carries only the source's decision
    # (RESOLVE), or its question (ASK: what is held here).
    def on_resolve(self, message: wire.Resolve | wire.Ask) -> DestinationEffects:
        return [Settle(message)]

    def on_settled(self, answer: wire.Resolved) -> DestinationEffects:
        ok = answer.settled in (
            wire.Settled.DONE,
            wire.Settled.ABORTED,
            wire.Settled.LOST,
            wire.Settled.HELD,
        )
        outcome = Outcome.DONE if answer.settled is wire.Settled.DONE else Outcome.ABORTED
        code = None if ok else ErrorCode.POLICY_REFUSED
        return [Send(answer), Finished(outcome, code, f"resolve: {answer.reason}")]

    def on_admitted(self, migration_id: bytes) -> DestinationEffects:
        self.migration_id = migration_id
        return [Send(wire.Welcome(migration_id, self.data_port))]

    def on_refused(self, code: ErrorCode, reason: str) -> DestinationEffects:
        return [abort(code, reason), Finished(Outcome.ABORTED, code, reason)]

    # Secure variant: attestation both ways, then the key offer.
    def on_challenge(self, message: wire.Challenge) -> DestinationEffects:
        return [Attest(message.nonce, "destination", message.request)]

    def on_attested(self, evidence: wire.Evidence) -> DestinationEffects:
        self.our_nonce = self.nonce()
        self.our_request = self.request()
        return [Send(evidence), Send(wire.Challenge(self.our_nonce, self.our_request))]

    def on_evidence(self, message: wire.Evidence) -> DestinationEffects:
        return [VerifyPeer(message, self.our_nonce, "source", self.our_request)]

    def on_peer_verified(self) -> DestinationEffects:
        return [OfferKey()]

    def on_key_offered(self, offer: wire.KeyOffer) -> DestinationEffects:
        return [Send(offer)]

    def on_wrapped_key(self, message: wire.WrappedKey) -> DestinationEffects:
        return [AcceptKey(message)]

    # Live mode: the key starts the vTPM now; QEMU's stream replaces the images.
    def on_wrapped_key_live(self, message: wire.WrappedKey) -> DestinationEffects:
        return [AcceptKey(message), StartIncoming()]

    def on_incoming_ready(self, port: int) -> DestinationEffects:
        return [Send(wire.LiveReady(port))]

    def on_incoming_loaded(self) -> DestinationEffects:
        return [Prepare()]

    def on_clear_key(self, message: wire.ClearKey) -> DestinationEffects:
        # Insecure variant: once, and before the first stream.
        if self.next_index != 0 or self.key_received:
            raise PeerViolation(ErrorCode.UNEXPECTED_MESSAGE, "the vTPM key comes once, first")
        self.key_received = True
        return [AcceptKey(message)]

    def on_stream_begin(self, message: wire.StreamBegin) -> DestinationEffects:
        assert self.hello is not None
        if message.index != self.next_index:
            raise PeerViolation(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"stream {message.index} began; stream {self.next_index} was due",
            )
        self.received = 0
        return [OpenStream(message.index, self.hello.images[message.index])]

    def on_data(self, message: wire.Data) -> DestinationEffects:
        assert self.hello is not None
        size = self.hello.images[self.next_index].size
        n = len(message)
        self.received += n
        self.total_received += n
        if self.received > size:
            raise PeerViolation(
                ErrorCode.STREAM_MISMATCH,
                f"stream {self.next_index} ran past its announced size of {size} bytes",
            )
        return [WriteChunk(message)]

    def on_stream_end(self, message: wire.StreamEnd) -> DestinationEffects:
        assert self.hello is not None
        index = self.next_index
        size = self.hello.images[index].size
        if self.received != size:
            raise PeerViolation(
                ErrorCode.STREAM_MISMATCH,
                f"stream {index} ended after {self.received} of {size} bytes",
            )
        self.next_index += 1
        return [CloseStream(index, message.sha256)]

    def on_last_stream_end(self, message: wire.StreamEnd) -> DestinationEffects:
        return [*self.on_stream_end(message), Prepare()]

    def on_prepared(self) -> DestinationEffects:
        return [Send(wire.Prepared())]

    def on_commit(self, message: wire.Commit) -> DestinationEffects:
        return [CommitInPlace()]

    def on_resumed(self) -> DestinationEffects:
        return [Send(wire.Done()), Finished(Outcome.DONE)]

    def on_peer_abort(self, message: wire.Abort) -> DestinationEffects:
        # The source only aborts before it commits, so discarding is safe in
        # every phase up to and including awaitCommit.
        return [Discard(), Finished(Outcome.ABORTED, message.code, f"source: {message.reason}")]

    def on_fail(self, code: ErrorCode, reason: str) -> DestinationEffects:
        return [abort(code, reason), Discard(), Finished(Outcome.ABORTED, code, reason)]

    def on_connection_lost(self, detail: str) -> DestinationEffects:
        code, reason = ErrorCode.CONNECTION_LOST, f"connection lost in phase {self.phase}{detail}"
        return [Discard(), Finished(Outcome.ABORTED, code, reason)]

    # After PREPARED was sent, a COMMIT may be in flight: never discard.
    def on_fail_in_doubt(self, code: ErrorCode, reason: str) -> DestinationEffects:
        return [abort(code, reason), HoldInDoubt(), Finished(Outcome.IN_DOUBT, code, reason)]

    def on_connection_lost_in_doubt(self, detail: str) -> DestinationEffects:
        reason = "connection lost after PREPARED, before COMMIT"
        return [HoldInDoubt(), Finished(Outcome.IN_DOUBT, ErrorCode.CONNECTION_LOST, reason)]

    # After COMMIT, the destination owns the VM whatever happens to the link.
    def on_fail_committed(self, code: ErrorCode, reason: str) -> DestinationEffects:
        return [abort(code, reason), Finished(Outcome.RESUME_FAILED, code, reason)]

    def on_ignore(self, *args: Any) -> DestinationEffects:
        return []


def check_hello(message: wire.Hello) -> None:
    """Refuse a HELLO whose parameters no destination could accept."""
    if message.version not in wire.VERSIONS:
        raise PeerViolation(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {message.version}; this destination speaks "
            f"{', '.join(map(str, wire.VERSIONS))}",
        )
    if message.version == 1 and wire.has_tail(message):
        raise PeerViolation(ErrorCode.BAD_PARAMETER, "a version-1 HELLO with version-2 fields")
    if not wire.MIN_CHUNK_SIZE <= message.chunk_size <= wire.MAX_CHUNK_SIZE:
        raise PeerViolation(
            ErrorCode.BAD_PARAMETER,
            f"chunk size {message.chunk_size} outside {wire.MIN_CHUNK_SIZE}..{wire.MAX_CHUNK_SIZE}",
        )
    names = [image.name for image in message.images]
    if message.mode is wire.Mode.LIVE:
        # Live: guest memory and the vTPM travel inside QEMU's own stream.
        if names or message.variant is not wire.Variant.SHARED_STORAGE:
            raise PeerViolation(
                ErrorCode.BAD_PARAMETER, "a live migration streams no images and shares storage"
            )
        return
    if not names:
        raise PeerViolation(ErrorCode.BAD_PARAMETER, "HELLO announces no images")
    if len(set(names)) != len(names):
        raise PeerViolation(ErrorCode.BAD_PARAMETER, "HELLO names an image twice")


def _destination_machine(secure: bool) -> Any:
    I = DestinationInputs  # noqa: E741
    C = DestinationCore
    S = State
    table: list[Transition[State]] = [
        (S.AWAIT_HELLO, I.hello, S.ADMITTING, C.on_hello),
        (S.AWAIT_HELLO, I.resolve, S.SETTLING, C.on_resolve),
        (S.AWAIT_HELLO, I.ask, S.SETTLING, C.on_resolve),
        (S.SETTLING, I.settled, S.DONE, C.on_settled),
        (S.ADMITTING, I.admitted, S.AWAIT_CHALLENGE if secure else S.AWAIT_STREAM, C.on_admitted),
        (S.ADMITTING, I.refused, S.FAILED, C.on_refused),
        (S.AWAIT_STREAM, I.stream_begin, S.RECEIVING, C.on_stream_begin),
        (S.RECEIVING, I.data, S.RECEIVING, C.on_data),
        (S.RECEIVING, I.stream_end, S.AWAIT_STREAM, C.on_stream_end),
        (S.RECEIVING, I.last_stream_end, S.PREPARING, C.on_last_stream_end),
        (S.PREPARING, I.prepared, S.AWAIT_COMMIT, C.on_prepared),
        (S.AWAIT_COMMIT, I.commit, S.COMMITTING, C.on_commit),
        (S.COMMITTING, I.resumed, S.DONE, C.on_resumed),
    ]
    if secure:
        table += [
            (S.AWAIT_CHALLENGE, I.challenge, S.ATTESTING, C.on_challenge),
            (S.ATTESTING, I.attested, S.AWAIT_EVIDENCE, C.on_attested),
            (S.AWAIT_EVIDENCE, I.evidence, S.VERIFYING_PEER, C.on_evidence),
            (S.VERIFYING_PEER, I.peer_verified, S.OFFERING_KEY, C.on_peer_verified),
            (S.OFFERING_KEY, I.key_offered, S.AWAIT_WRAPPED_KEY, C.on_key_offered),
            (S.AWAIT_WRAPPED_KEY, I.wrapped_key, S.AWAIT_STREAM, C.on_wrapped_key),
            (S.AWAIT_WRAPPED_KEY, I.wrapped_key_live, S.STARTING_INCOMING, C.on_wrapped_key_live),
            (S.STARTING_INCOMING, I.incoming_ready, S.RECEIVING_LIVE, C.on_incoming_ready),
            (S.RECEIVING_LIVE, I.incoming_loaded, S.PREPARING, C.on_incoming_loaded),
        ]
    else:
        # Insecure: the vTPM key may come in the clear, before the first stream.
        table.append((S.AWAIT_STREAM, I.clear_key, S.AWAIT_STREAM, C.on_clear_key))
    return build(TypeMachineBuilder(I, C), State, table, _ENDINGS)


#: What ABORT, a local failure and a lost connection do, by the side of the
#: commit point the state is on (every state gets its side's three).
_ENDINGS: Endings[State] = {
    # Before PREPARED is sent, the destination discards its staging.
    Side.BEFORE: (
        (DestinationInputs.peer_abort, State.FAILED, DestinationCore.on_peer_abort),
        (DestinationInputs.fail, State.FAILED, DestinationCore.on_fail),
        (DestinationInputs.connection_lost, State.FAILED, DestinationCore.on_connection_lost),
    ),
    # After PREPARED was sent a COMMIT may be in flight: never discard on
    # a failure (the source only ever ABORTs before it commits).
    Side.IN_DOUBT: (
        (DestinationInputs.peer_abort, State.FAILED, DestinationCore.on_peer_abort),
        (DestinationInputs.fail, State.FAILED, DestinationCore.on_fail_in_doubt),
        (
            DestinationInputs.connection_lost,
            State.FAILED,
            DestinationCore.on_connection_lost_in_doubt,
        ),
    ),
    # After COMMIT, the destination owns the VM whatever happens to the link.
    Side.AFTER: (
        (DestinationInputs.peer_abort, None, DestinationCore.on_ignore),
        (DestinationInputs.fail, State.FAILED, DestinationCore.on_fail_committed),
        (DestinationInputs.connection_lost, None, DestinationCore.on_ignore),
    ),
    Side.ENDED: ignore_everything(DestinationInputs, DestinationCore.on_ignore),
}


@functools.cache
def destination_machine(secure: bool) -> Any:
    """The machine of one variant, built when the first session of it starts:
    a ``securemig migrate`` imports this module and never needs it, and a
    daemon needs only the variants it is asked for (doc/performance.rst,
    "Start-up")."""
    return _destination_machine(secure)


class DestinationSession(Session[DestinationEffect, State]):
    """The destination's side of one migration."""

    _role = "destination"

    def __init__(
        self, secure: bool = False, request: Callable[[], wire.QuoteRequest] | None = None
    ) -> None:
        self._core: DestinationCore = DestinationCore()
        if request is not None:
            self._core.request = request
        self._machine: DestinationInputs = destination_machine(secure)(self._core)
        self.secure = secure

    @property
    def hello(self) -> wire.Hello | None:
        """The accepted HELLO, once there is one."""
        return self._core.hello

    @property
    def bytes_received(self) -> int:
        """Image bytes received so far, over all streams."""
        return self._core.total_received

    def offer_data_port(self, port: int) -> None:
        """Secure variant: offer a data channel on ``port`` in WELCOME
        (call before :meth:`admitted`)."""
        if not self.secure:
            raise ValueError("only the secure variant has a data channel")
        self._core.data_port = port

    def receive(self, message: wire.Message) -> DestinationEffects:
        """Feed one message from the peer.  Raises :class:`PeerViolation` for
        a message this phase does not allow; the caller then calls
        :meth:`fail` with it."""
        m = self._machine
        match message:
            case wire.Hello():
                return self._run(m.hello, message)
            case wire.Challenge():
                return self._run(m.challenge, message)
            case wire.Evidence():
                return self._run(m.evidence, message)
            case wire.WrappedKey() if self.live:
                return self._run(m.wrapped_key_live, message)
            case wire.WrappedKey():
                return self._run(m.wrapped_key, message)
            case wire.ClearKey():
                return self._run(m.clear_key, message)
            case wire.StreamBegin():
                return self._run(m.stream_begin, message)
            case wire.Data():
                return self._run(m.data, message)
            case wire.StreamEnd() if self._is_last_stream():
                # After the last stream the destination prepares instead of
                # awaiting another one.
                return self._run(m.last_stream_end, message)
            case wire.StreamEnd():
                return self._run(m.stream_end, message)
            case wire.Commit():
                return self._run(m.commit, message)
            case wire.Abort():
                return self._run(m.peer_abort, message)
            case wire.Resolve():
                return self._run(m.resolve, message)
            case wire.Ask():
                return self._run(m.ask, message)
            case _:
                raise self._never_sent(message)

    @property
    def live(self) -> bool:
        """Whether the accepted HELLO asked for live mode."""
        hello = self._core.hello
        return hello is not None and hello.mode is wire.Mode.LIVE

    def incoming_ready(self, port: int) -> DestinationEffects:
        """Live: QEMU waits paused; the stream's records go to ``port``."""
        return self._run(self._machine.incoming_ready, port)

    def incoming_loaded(self) -> DestinationEffects:
        """Live: QEMU loaded the whole stream and waits paused."""
        return self._run(self._machine.incoming_loaded)

    def _is_last_stream(self) -> bool:
        hello = self._core.hello
        return hello is not None and self._core.next_index == len(hello.images) - 1

    def fail(self, code: ErrorCode, reason: str) -> DestinationEffects:
        """A local failure or a protocol violation ends the session."""
        return self._run(self._machine.fail, code, reason)

    def connection_lost(self, detail: str = "") -> DestinationEffects:
        """The connection is gone; ``detail`` says why, if it was not a clean close."""
        why = f": {detail}" if detail else ""
        return self._run(self._machine.connection_lost, why)

    def admitted(self, migration_id: bytes) -> DestinationEffects:
        """The host accepted the HELLO and reserved what it needs."""
        return self._run(self._machine.admitted, migration_id)

    def refused(self, code: ErrorCode, reason: str) -> DestinationEffects:
        """The host refused the HELLO."""
        return self._run(self._machine.refused, code, reason)

    def attested(self, evidence: wire.Evidence) -> DestinationEffects:
        """Secure: our evidence for the peer's challenge is ready."""
        return self._run(self._machine.attested, evidence)

    def peer_verified(self) -> DestinationEffects:
        """Secure: the peer's evidence passed every check."""
        return self._run(self._machine.peer_verified)

    def key_offered(self, offer: wire.KeyOffer) -> DestinationEffects:
        """Secure: the migration key is certified for this session."""
        return self._run(self._machine.key_offered, offer)

    def prepared(self) -> DestinationEffects:
        """Every stream is verified and durable; PREPARED is journaled."""
        return self._run(self._machine.prepared)

    def resumed(self) -> DestinationEffects:
        """The VM is in place and resumed here."""
        return self._run(self._machine.resumed)

    def settled(self, answer: wire.Resolved) -> DestinationEffects:
        """Recovery: the host carried out (or refused) a RESOLVE."""
        return self._run(self._machine.settled, answer)

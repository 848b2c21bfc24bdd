"""
Source and destination session state machines, sans-IO.

A session takes messages from the peer and events from its host (a disk
write finished, the VM was given up, ...) and returns *effects*: messages to
send and things for the host to do.  It never touches a socket, a file or a
clock; :mod:`securemig.transport.control` carries effects out and feeds the results
back in.  That is what lets ``tests/protocol/test_session.py`` run two sessions
against each other without a reactor.

The rules, in the order a migration goes (``doc/protocol.rst`` is normative)::

    source                                destination
    idle        --HELLO------------->     awaitHello -> admitting
    awaitWelcome <-----------WELCOME--    admitting  -> awaitStream (insecure)
    secure variant only, before any image byte:
      --CHALLENGE-->  <--EVIDENCE, CHALLENGE--  --EVIDENCE-->
      <--KEY_OFFER--  --WRAPPED_KEY-->     (host checks and TPM work are effects)
    streaming   --STREAM_BEGIN/DATA*/STREAM_END per image-->  receiving
    awaitPrepared <---------PREPARED--    preparing  -> awaitCommit
    committing (journal COMMITTED, give the VM up)
    awaitDone   --COMMIT------------->    committing (move into place, resume)
    done        <-------------DONE----    done

Any input a state does not list is a protocol violation
(:attr:`~securemig.protocol.ErrorCode.UNEXPECTED_MESSAGE`).  ABORT, a local
failure or a lost connection end the session from every state; what that
means for the VM depends on which side of the commit point it happens:

- before the source journals COMMITTED, the VM stays (or resumes) at the
  source and the destination discards its staging;
- after the destination sent PREPARED and before COMMIT arrived, the
  destination cannot know whether the source committed, so it *holds* its
  staging in doubt instead of discarding it (``securemig recover`` settles
  it from both journals);
- after the source committed, the destination owns the VM.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from automat import NoTransition, TypeMachineBuilder

from securemig.protocol import wire
from securemig.protocol.errors import ErrorCode, PeerViolation


class Outcome(enum.Enum):
    """How a session ended, as far as this side knows."""

    DONE = "done"  #: the VM runs at the destination
    ABORTED = "aborted"  #: nothing moved: the VM is (still) at the source
    IN_DOUBT = "in-doubt"  #: the commit's outcome is unknown here; see recover
    RESUME_FAILED = "resume-failed"  #: committed, but the destination could not resume


# --------------------------------------------------------------------------
# Effects: what a session asks its host to do, in order.


@dataclass(frozen=True)
class Send:
    """Send this control message to the peer."""

    message: Any


@dataclass(frozen=True)
class Admit:
    """Destination: check policy, free space and locks for this HELLO, then
    call ``admitted(migration_id)`` or ``refused(code, reason)``."""

    hello: wire.Hello


@dataclass(frozen=True)
class OpenStream:
    """Destination: start staging image ``index`` of the manifest."""

    index: int
    image: wire.ImageInfo


@dataclass(frozen=True)
class WriteChunk:
    """Destination: append this chunk to the open stream (and hash it)."""

    data: wire.Data


@dataclass(frozen=True)
class CloseStream:
    """Destination: finish the open stream; its SHA-256 must equal ``sha256``."""

    index: int
    sha256: bytes


@dataclass(frozen=True)
class Prepare:
    """Destination: once every stream is closed and verified, make staging
    durable and journal PREPARED, then call ``prepared()``."""


@dataclass(frozen=True)
class CommitInPlace:
    """Destination: journal the commit, move the VM into place and resume it,
    then call ``resumed()``."""


@dataclass(frozen=True)
class Discard:
    """Destination: remove staging and release locks; nothing was committed."""


@dataclass(frozen=True)
class HoldInDoubt:
    """Destination: keep the prepared staging; the source may have committed."""


@dataclass(frozen=True)
class StartStreams:
    """Source: stream every image in manifest order, then call ``streams_sent()``."""


@dataclass(frozen=True)
class CommitLocally:
    """Source: journal COMMITTED and give the VM up, then call ``committed_locally()``.

    If this fails before the journal records the commit, the host calls
    ``fail()`` instead and the VM stays at the source."""


@dataclass(frozen=True)
class RollBack:
    """Source: the VM stays (or resumes) here, unlocked and intact."""


@dataclass(frozen=True)
class Attest:
    """Secure: quote our PCRs for the peer's ``nonce`` (role: who we are),
    then call ``attested(evidence)``."""

    nonce: bytes
    role: str


@dataclass(frozen=True)
class VerifyPeer:
    """Secure: verify the peer's evidence against our ``nonce`` (role: who
    the peer is), then call ``peer_verified()``; a refusal raises."""

    evidence: wire.Evidence
    nonce: bytes
    role: str


@dataclass(frozen=True)
class OfferKey:
    """Secure, destination: certify the migration key for this session, then
    call ``key_offered(offer)``."""


@dataclass(frozen=True)
class WrapKey:
    """Secure, source: verify the offered key and wrap the vTPM key to it,
    then call ``key_wrapped(wrapped)``."""

    offer: wire.KeyOffer


@dataclass(frozen=True)
class AcceptKey:
    """Destination: keep the vTPM key (wrapped, or in the clear in the
    insecure variant) for the commit."""

    wrapped: wire.WrappedKey | wire.ClearKey


@dataclass(frozen=True)
class Finished:
    """The session is over: close the connection and report the outcome."""

    outcome: Outcome
    code: ErrorCode | None = None
    reason: str = ""


Effect = (
    Send
    | Admit
    | OpenStream
    | WriteChunk
    | CloseStream
    | Prepare
    | CommitInPlace
    | Discard
    | HoldInDoubt
    | StartStreams
    | CommitLocally
    | RollBack
    | Attest
    | VerifyPeer
    | OfferKey
    | WrapKey
    | AcceptKey
    | Finished
)
Effects = list[Effect]


def _abort(code: ErrorCode, reason: str) -> Send:
    return Send(wire.Abort(code, reason[: wire.MAX_REASON]))


def _named(target: Any, method: str) -> Callable[..., Effects]:
    """A transition behaviour: record ``target`` as the phase, then run
    ``core.<method>`` with the input's arguments."""

    def behaviour(inputs: Any, core: Any, *args: Any) -> Effects:
        # The behaviour still sees the phase it leaves (for its messages).
        try:
            result: Effects = getattr(core, method)(*args)
        finally:
            core.phase = target.name
        return result

    return behaviour


def _build(table: list[tuple[Any, Callable[..., Any], Any]]) -> None:
    """Register ``(state, input, next_state)`` transitions whose behaviour is
    the core's ``on_<input>`` method."""
    for state, input_method, target in table:
        upon = state.upon(input_method)
        registrar = upon.loop() if target is state else upon.to(target)
        registrar(_named(target, "on_" + input_method.__name__))


def _ignore_everything(inputs: type, states: list[Any]) -> None:
    """Terminal states swallow late events (a write finishing after an abort)."""
    names = [n for n in vars(inputs) if not n.startswith("_") and callable(getattr(inputs, n))]
    for state in states:
        for name in names:
            state.upon(getattr(inputs, name)).loop()(_named(state, "on_ignore"))


# --------------------------------------------------------------------------
# Destination


class DestinationInputs(Protocol):
    """Everything that can happen to a destination session."""

    def hello(self, message: wire.Hello) -> Effects: ...
    def admitted(self, migration_id: bytes) -> Effects: ...
    def refused(self, code: ErrorCode, reason: str) -> Effects: ...
    def challenge(self, message: wire.Challenge) -> Effects: ...
    def attested(self, evidence: wire.Evidence) -> Effects: ...
    def evidence(self, message: wire.Evidence) -> Effects: ...
    def peer_verified(self) -> Effects: ...
    def key_offered(self, offer: wire.KeyOffer) -> Effects: ...
    def wrapped_key(self, message: wire.WrappedKey) -> Effects: ...
    def clear_key(self, message: wire.ClearKey) -> Effects: ...
    def stream_begin(self, message: wire.StreamBegin) -> Effects: ...
    def data(self, message: wire.Data) -> Effects: ...
    def stream_end(self, message: wire.StreamEnd) -> Effects: ...
    def last_stream_end(self, message: wire.StreamEnd) -> Effects: ...
    def prepared(self) -> Effects: ...
    def commit(self, message: wire.Commit) -> Effects: ...
    def resumed(self) -> Effects: ...
    def peer_abort(self, message: wire.Abort) -> Effects: ...
    def fail(self, code: ErrorCode, reason: str) -> Effects: ...
    def connection_lost(self, detail: str) -> Effects: ...


@dataclass
class DestinationCore:
    """What a destination session remembers; the ``on_*`` methods are the
    behaviour of the transitions that :data:`_DESTINATION_TABLE` declares."""

    phase: str = "awaitHello"
    nonce: Callable[[], bytes] = field(default=lambda: os.urandom(wire.NONCE_SIZE))
    our_nonce: bytes = b""
    key_received: bool = False
    hello: wire.Hello | None = None
    migration_id: bytes | None = None
    next_index: int = 0
    received: int = 0
    total_received: int = 0
    #: Secure variant: the data channel's port, offered in WELCOME (0: none).
    data_port: int = 0

    def on_hello(self, message: wire.Hello) -> Effects:
        check_hello(message)
        self.hello = message
        return [Admit(message)]

    def on_admitted(self, migration_id: bytes) -> Effects:
        self.migration_id = migration_id
        return [Send(wire.Welcome(migration_id, self.data_port))]

    def on_refused(self, code: ErrorCode, reason: str) -> Effects:
        return [_abort(code, reason), Finished(Outcome.ABORTED, code, reason)]

    # Secure variant: attestation both ways, then the key offer.
    def on_challenge(self, message: wire.Challenge) -> Effects:
        return [Attest(message.nonce, "destination")]

    def on_attested(self, evidence: wire.Evidence) -> Effects:
        self.our_nonce = self.nonce()
        return [Send(evidence), Send(wire.Challenge(self.our_nonce))]

    def on_evidence(self, message: wire.Evidence) -> Effects:
        return [VerifyPeer(message, self.our_nonce, "source")]

    def on_peer_verified(self) -> Effects:
        return [OfferKey()]

    def on_key_offered(self, offer: wire.KeyOffer) -> Effects:
        return [Send(offer)]

    def on_wrapped_key(self, message: wire.WrappedKey) -> Effects:
        return [AcceptKey(message)]

    def on_clear_key(self, message: wire.ClearKey) -> Effects:
        # Insecure variant: once, and before the first stream.
        if self.next_index != 0 or self.key_received:
            raise PeerViolation(ErrorCode.UNEXPECTED_MESSAGE, "the vTPM key comes once, first")
        self.key_received = True
        return [AcceptKey(message)]

    def on_stream_begin(self, message: wire.StreamBegin) -> Effects:
        assert self.hello is not None
        if message.index != self.next_index:
            raise PeerViolation(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"stream {message.index} began; stream {self.next_index} was due",
            )
        self.received = 0
        return [OpenStream(message.index, self.hello.images[message.index])]

    def on_data(self, message: wire.Data) -> Effects:
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

    def on_stream_end(self, message: wire.StreamEnd) -> Effects:
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

    def on_last_stream_end(self, message: wire.StreamEnd) -> Effects:
        return [*self.on_stream_end(message), Prepare()]

    def on_prepared(self) -> Effects:
        return [Send(wire.Prepared())]

    def on_commit(self, message: wire.Commit) -> Effects:
        return [CommitInPlace()]

    def on_resumed(self) -> Effects:
        return [Send(wire.Done()), Finished(Outcome.DONE)]

    def on_peer_abort(self, message: wire.Abort) -> Effects:
        # The source only aborts before it commits, so discarding is safe in
        # every phase up to and including awaitCommit.
        return [Discard(), Finished(Outcome.ABORTED, message.code, f"source: {message.reason}")]

    def on_fail(self, code: ErrorCode, reason: str) -> Effects:
        return [_abort(code, reason), Discard(), Finished(Outcome.ABORTED, code, reason)]

    def on_connection_lost(self, detail: str) -> Effects:
        code, reason = ErrorCode.CONNECTION_LOST, f"connection lost in phase {self.phase}{detail}"
        return [Discard(), Finished(Outcome.ABORTED, code, reason)]

    # After PREPARED was sent, a COMMIT may be in flight: never discard.
    def on_fail_in_doubt(self, code: ErrorCode, reason: str) -> Effects:
        return [_abort(code, reason), HoldInDoubt(), Finished(Outcome.IN_DOUBT, code, reason)]

    def on_connection_lost_in_doubt(self, detail: str) -> Effects:
        reason = "connection lost after PREPARED, before COMMIT"
        return [HoldInDoubt(), Finished(Outcome.IN_DOUBT, ErrorCode.CONNECTION_LOST, reason)]

    # After COMMIT, the destination owns the VM whatever happens to the link.
    def on_fail_committed(self, code: ErrorCode, reason: str) -> Effects:
        return [_abort(code, reason), Finished(Outcome.RESUME_FAILED, code, reason)]

    def on_ignore(self, *args: Any) -> Effects:
        return []


def check_hello(message: wire.Hello) -> None:
    """Refuse a HELLO whose parameters no destination could accept."""
    if message.version != wire.PROTOCOL_VERSION:
        raise PeerViolation(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {message.version}; this destination speaks {wire.PROTOCOL_VERSION}",
        )
    if not wire.MIN_CHUNK_SIZE <= message.chunk_size <= wire.MAX_CHUNK_SIZE:
        raise PeerViolation(
            ErrorCode.BAD_PARAMETER,
            f"chunk size {message.chunk_size} outside {wire.MIN_CHUNK_SIZE}..{wire.MAX_CHUNK_SIZE}",
        )
    names = [image.name for image in message.images]
    if not names:
        raise PeerViolation(ErrorCode.BAD_PARAMETER, "HELLO announces no images")
    if len(set(names)) != len(names):
        raise PeerViolation(ErrorCode.BAD_PARAMETER, "HELLO names an image twice")


def _destination_machine(secure: bool) -> Any:
    b = TypeMachineBuilder(DestinationInputs, DestinationCore)
    I = DestinationInputs  # noqa: E741
    await_hello = b.state("awaitHello")
    admitting = b.state("admitting")
    await_stream = b.state("awaitStream")
    # Secure variant only: between WELCOME and the first stream.
    await_challenge = b.state("awaitChallenge")
    attesting = b.state("attesting")
    await_evidence = b.state("awaitEvidence")
    verifying = b.state("verifyingPeer")
    offering = b.state("offeringKey")
    await_key = b.state("awaitWrappedKey")
    receiving = b.state("receiving")
    preparing = b.state("preparing")
    await_commit = b.state("awaitCommit")
    committing = b.state("committing")
    done = b.state("done")
    failed = b.state("failed")
    before_commit_point = [await_hello, admitting, await_stream, receiving, preparing]
    table: list[tuple[Any, Any, Any]] = [
        (await_hello, I.hello, admitting),
        (admitting, I.admitted, await_challenge if secure else await_stream),
        (admitting, I.refused, failed),
        (await_stream, I.stream_begin, receiving),
        (receiving, I.data, receiving),
        (receiving, I.stream_end, await_stream),
        (receiving, I.last_stream_end, preparing),
        (preparing, I.prepared, await_commit),
        (await_commit, I.commit, committing),
        (committing, I.resumed, done),
        (await_commit, I.peer_abort, failed),
    ]
    if secure:
        table += [
            (await_challenge, I.challenge, attesting),
            (attesting, I.attested, await_evidence),
            (await_evidence, I.evidence, verifying),
            (verifying, I.peer_verified, offering),
            (offering, I.key_offered, await_key),
            (await_key, I.wrapped_key, await_stream),
        ]
        # Every secure state is before the commit point.
        before_commit_point += [state for state, _, _ in table[-6:]]
    else:
        # Insecure: the vTPM key may come in the clear, before the first stream.
        table.append((await_stream, I.clear_key, await_stream))
        # Unreachable states still need a way out, for Automat's completeness.
        before_commit_point += [await_challenge]
    for state in before_commit_point:
        table += [(state, I.peer_abort, failed), (state, I.fail, failed)]
        table += [(state, I.connection_lost, failed)]
    _build(table)
    await_commit.upon(I.fail).to(failed)(_named(failed, "on_fail_in_doubt"))
    await_commit.upon(I.connection_lost).to(failed)(_named(failed, "on_connection_lost_in_doubt"))
    committing.upon(I.fail).to(failed)(_named(failed, "on_fail_committed"))
    committing.upon(I.connection_lost).loop()(_named(committing, "on_ignore"))
    committing.upon(I.peer_abort).loop()(_named(committing, "on_ignore"))
    _ignore_everything(I, [done, failed])
    return b.build()


_DestinationMachines = {secure: _destination_machine(secure) for secure in (False, True)}


class _Session:
    """Shared plumbing: run an input, turning impossible ones into errors."""

    _core: Any
    _machine: Any

    @property
    def phase(self) -> str:
        """The name of the current state (``awaitHello``, ``streaming``, ...)."""
        phase: str = self._core.phase
        return phase

    @property
    def finished(self) -> bool:
        """True once the session reached ``done`` or ``failed``."""
        return self.phase in ("done", "failed")

    #: Which input each message type feeds; other types are never sent to us.
    _input_for: ClassVar[dict[type, str]]
    _role: ClassVar[str]

    def receive(self, message: wire.Message) -> Effects:
        """Feed one message from the peer.  Raises :class:`ProtocolError` for
        a message this phase does not allow; the caller then calls
        :meth:`fail` with it."""
        name = self._input_name(message)
        if name is None:
            raise PeerViolation(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"{type(message).__name__} is never sent to a {self._role}",
            )
        return self._input(name, message)

    def _input_name(self, message: wire.Message) -> str | None:
        return self._input_for.get(type(message))

    def fail(self, code: ErrorCode, reason: str) -> Effects:
        """A local failure or a protocol violation ends the session."""
        return self._input("fail", code, reason)

    def connection_lost(self, detail: str = "") -> Effects:
        """The connection is gone; ``detail`` says why, if it was not a clean close."""
        return self._input("connection_lost", f": {detail}" if detail else "")

    def _input(self, name: str, *args: Any) -> Effects:
        try:
            effects: Effects = getattr(self._machine, name)(*args)
        except NoTransition:
            raise PeerViolation(
                ErrorCode.UNEXPECTED_MESSAGE, f"{name} is not allowed in phase {self.phase}"
            ) from None
        return effects


class DestinationSession(_Session):
    """The destination's side of one migration."""

    def __init__(self, secure: bool = False) -> None:
        self._core = DestinationCore()
        self._machine = _DestinationMachines[secure](self._core)
        self.secure = secure

    @property
    def hello(self) -> wire.Hello | None:
        """The accepted HELLO, once there is one."""
        return self._core.hello  # type: ignore[no-any-return]

    @property
    def bytes_received(self) -> int:
        """Image bytes received so far, over all streams."""
        return self._core.total_received  # type: ignore[no-any-return]

    def offer_data_port(self, port: int) -> None:
        """Secure variant: offer a data channel on ``port`` in WELCOME
        (call before :meth:`admitted`)."""
        if not self.secure:
            raise ValueError("only the secure variant has a data channel")
        self._core.data_port = port

    _role = "destination"
    _input_for: ClassVar[dict[type, str]] = {
        wire.Hello: "hello",
        wire.Challenge: "challenge",
        wire.Evidence: "evidence",
        wire.WrappedKey: "wrapped_key",
        wire.ClearKey: "clear_key",
        wire.StreamBegin: "stream_begin",
        wire.Data: "data",
        wire.Commit: "commit",
        wire.Abort: "peer_abort",
    }

    def _input_name(self, message: wire.Message) -> str | None:
        # The machine needs to know which STREAM_END is the last: after it
        # the destination prepares instead of awaiting another stream.
        if isinstance(message, wire.StreamEnd):
            hello = self._core.hello
            last = hello is not None and self._core.next_index == len(hello.images) - 1
            return "last_stream_end" if last else "stream_end"
        return super()._input_name(message)

    def admitted(self, migration_id: bytes) -> Effects:
        """The host accepted the HELLO and reserved what it needs."""
        return self._input("admitted", migration_id)

    def refused(self, code: ErrorCode, reason: str) -> Effects:
        """The host refused the HELLO."""
        return self._input("refused", code, reason)

    def attested(self, evidence: wire.Evidence) -> Effects:
        """Secure: our evidence for the peer's challenge is ready."""
        return self._input("attested", evidence)

    def peer_verified(self) -> Effects:
        """Secure: the peer's evidence passed every check."""
        return self._input("peer_verified")

    def key_offered(self, offer: wire.KeyOffer) -> Effects:
        """Secure: the migration key is certified for this session."""
        return self._input("key_offered", offer)

    def prepared(self) -> Effects:
        """Every stream is verified and durable; PREPARED is journaled."""
        return self._input("prepared")

    def resumed(self) -> Effects:
        """The VM is in place and resumed here."""
        return self._input("resumed")


# --------------------------------------------------------------------------
# Source


class SourceInputs(Protocol):
    """Everything that can happen to a source session."""

    def start(self) -> Effects: ...
    def welcome(self, message: wire.Welcome) -> Effects: ...
    def evidence(self, message: wire.Evidence) -> Effects: ...
    def challenge(self, message: wire.Challenge) -> Effects: ...
    def peer_verified(self) -> Effects: ...
    def attested(self, evidence: wire.Evidence) -> Effects: ...
    def key_offer(self, message: wire.KeyOffer) -> Effects: ...
    def key_wrapped(self, wrapped: wire.WrappedKey) -> Effects: ...
    def streams_sent(self) -> Effects: ...
    def prepared(self, message: wire.Prepared) -> Effects: ...
    def committed_locally(self) -> Effects: ...
    def done(self, message: wire.Done) -> Effects: ...
    def peer_abort(self, message: wire.Abort) -> Effects: ...
    def fail(self, code: ErrorCode, reason: str) -> Effects: ...
    def connection_lost(self, detail: str) -> Effects: ...


@dataclass
class SourceCore:
    """What a source session remembers; see :class:`DestinationCore`."""

    hello: wire.Hello
    phase: str = "idle"
    migration_id: bytes | None = None
    nonce: Callable[[], bytes] = field(default=lambda: os.urandom(wire.NONCE_SIZE))
    our_nonce: bytes = b""
    #: Secure variant: the data channel port the destination offered (0: none).
    data_port: int = 0
    #: Insecure variant with a vTPM: the key material sent in the clear.
    clear_key: bytes | None = None

    def on_start(self) -> Effects:
        return [Send(self.hello)]

    def on_welcome(self, message: wire.Welcome) -> Effects:
        # The insecure variant streams at once; the secure one first attests
        # both ways and transfers the key (the on_welcome_secure path).
        self.migration_id = message.migration_id
        if self.clear_key is not None:
            return [Send(wire.ClearKey(self.clear_key)), StartStreams()]
        return [StartStreams()]

    def on_welcome_secure(self, message: wire.Welcome) -> Effects:
        self.migration_id = message.migration_id
        self.data_port = message.data_port
        self.our_nonce = self.nonce()
        return [Send(wire.Challenge(self.our_nonce))]

    def on_evidence(self, message: wire.Evidence) -> Effects:
        return [VerifyPeer(message, self.our_nonce, "destination")]

    def on_peer_verified(self) -> Effects:
        return []

    def on_challenge(self, message: wire.Challenge) -> Effects:
        return [Attest(message.nonce, "source")]

    def on_attested(self, evidence: wire.Evidence) -> Effects:
        return [Send(evidence)]

    def on_key_offer(self, message: wire.KeyOffer) -> Effects:
        return [WrapKey(message)]

    def on_key_wrapped(self, wrapped: wire.WrappedKey) -> Effects:
        return [Send(wrapped), StartStreams()]

    def on_streams_sent(self) -> Effects:
        return []

    def on_prepared(self, message: wire.Prepared) -> Effects:
        return [CommitLocally()]

    def on_committed_locally(self) -> Effects:
        return [Send(wire.Commit())]

    def on_done(self, message: wire.Done) -> Effects:
        return [Finished(Outcome.DONE)]

    def on_peer_abort(self, message: wire.Abort) -> Effects:
        reason = f"destination: {message.reason}"
        return [RollBack(), Finished(Outcome.ABORTED, message.code, reason)]

    def on_fail(self, code: ErrorCode, reason: str) -> Effects:
        return [_abort(code, reason), RollBack(), Finished(Outcome.ABORTED, code, reason)]

    def on_connection_lost(self, detail: str) -> Effects:
        code, reason = ErrorCode.CONNECTION_LOST, f"connection lost in phase {self.phase}{detail}"
        return [RollBack(), Finished(Outcome.ABORTED, code, reason)]

    # After the local commit the VM belongs to the destination: never roll back.
    def on_peer_abort_committed(self, message: wire.Abort) -> Effects:
        reason = f"committed; destination reported: {message.reason}"
        return [Finished(Outcome.IN_DOUBT, message.code, reason)]

    def on_fail_committed(self, code: ErrorCode, reason: str) -> Effects:
        return [Finished(Outcome.IN_DOUBT, code, f"committed; then {reason}")]

    def on_connection_lost_committed(self, detail: str) -> Effects:
        reason = "committed; connection lost before the destination confirmed"
        return [Finished(Outcome.IN_DOUBT, ErrorCode.CONNECTION_LOST, reason)]

    def on_ignore(self, *args: Any) -> Effects:
        return []


def _source_machine(secure: bool) -> Any:
    b = TypeMachineBuilder(SourceInputs, SourceCore)
    I = SourceInputs  # noqa: E741
    idle = b.state("idle")
    await_welcome = b.state("awaitWelcome")
    # Secure variant only: between WELCOME and the streams.
    await_evidence = b.state("awaitEvidence")
    verifying = b.state("verifyingPeer")
    await_challenge = b.state("awaitChallenge")
    attesting = b.state("attesting")
    await_offer = b.state("awaitKeyOffer")
    wrapping = b.state("wrappingKey")
    streaming = b.state("streaming")
    await_prepared = b.state("awaitPrepared")
    committing = b.state("committing")
    await_done = b.state("awaitDone")
    done = b.state("done")
    failed = b.state("failed")
    table: list[tuple[Any, Any, Any]] = [
        (idle, I.start, await_welcome),
        (streaming, I.streams_sent, await_prepared),
        (await_prepared, I.prepared, committing),
        (committing, I.committed_locally, await_done),
        (await_done, I.done, done),
    ]
    before_commit_point = [idle, await_welcome, streaming, await_prepared, committing]
    if secure:
        await_welcome.upon(I.welcome).to(await_evidence)(
            _named(await_evidence, "on_welcome_secure")
        )
        table += [
            (await_evidence, I.evidence, verifying),
            (verifying, I.peer_verified, await_challenge),
            (await_challenge, I.challenge, attesting),
            (attesting, I.attested, await_offer),
            (await_offer, I.key_offer, wrapping),
            (wrapping, I.key_wrapped, streaming),
        ]
        before_commit_point += [state for state, _, _ in table[-6:]]
    else:
        table.append((await_welcome, I.welcome, streaming))
        before_commit_point += [await_evidence]
    for state in before_commit_point:
        table += [(state, I.peer_abort, failed), (state, I.fail, failed)]
        table += [(state, I.connection_lost, failed)]
    _build(table)
    await_done.upon(I.peer_abort).to(failed)(_named(failed, "on_peer_abort_committed"))
    await_done.upon(I.fail).to(failed)(_named(failed, "on_fail_committed"))
    await_done.upon(I.connection_lost).to(failed)(_named(failed, "on_connection_lost_committed"))
    _ignore_everything(I, [done, failed])
    return b.build()


_SourceMachines = {secure: _source_machine(secure) for secure in (False, True)}


class SourceSession(_Session):
    """The source's side of one migration, for the VM that ``hello`` announces."""

    _role = "source"
    _input_for: ClassVar[dict[type, str]] = {
        wire.Welcome: "welcome",
        wire.Evidence: "evidence",
        wire.Challenge: "challenge",
        wire.KeyOffer: "key_offer",
        wire.Prepared: "prepared",
        wire.Done: "done",
        wire.Abort: "peer_abort",
    }

    def __init__(
        self, hello: wire.Hello, secure: bool = False, clear_key: bytes | None = None
    ) -> None:
        if secure and clear_key is not None:
            raise ValueError("the secure variant never sends a key in the clear")
        self._core = SourceCore(hello, clear_key=clear_key)
        self._machine = _SourceMachines[secure](self._core)
        self.secure = secure

    @property
    def hello(self) -> wire.Hello:
        """The HELLO this session sends."""
        return self._core.hello  # type: ignore[no-any-return]

    @property
    def migration_id(self) -> bytes | None:
        """The id the destination gave this migration, once known."""
        return self._core.migration_id  # type: ignore[no-any-return]

    @property
    def data_port(self) -> int:
        """The data channel port the destination offered (0: none)."""
        return self._core.data_port  # type: ignore[no-any-return]

    def start(self) -> Effects:
        """The connection is up: say HELLO."""
        return self._input("start")

    def peer_verified(self) -> Effects:
        """Secure: the destination's evidence passed every check."""
        return self._input("peer_verified")

    def attested(self, evidence: wire.Evidence) -> Effects:
        """Secure: our evidence for the destination's challenge is ready."""
        return self._input("attested", evidence)

    def key_wrapped(self, wrapped: wire.WrappedKey) -> Effects:
        """Secure: the vTPM key is wrapped to the certified migration key."""
        return self._input("key_wrapped", wrapped)

    def streams_sent(self) -> Effects:
        """Every image was written to the connection."""
        return self._input("streams_sent")

    def committed_locally(self) -> Effects:
        """COMMITTED is journaled and the VM given up here."""
        return self._input("committed_locally")

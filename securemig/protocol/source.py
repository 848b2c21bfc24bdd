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
    Session,
    Transition,
    build,
    ends_before_commit,
    ignore_everything,
    step,
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
class SourceCore(Core):
    """What a source session remembers; see :class:`DestinationCore`."""

    hello: wire.Hello
    phase: str = "idle"
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
    b = TypeMachineBuilder(SourceInputs, SourceCore)
    I = SourceInputs  # noqa: E741
    C = SourceCore
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
    # Live mode only: between WRAPPED_KEY and PREPARED.
    await_live_ready = b.state("awaitLiveReady")
    await_prepared = b.state("awaitPrepared")
    committing = b.state("committing")
    await_done = b.state("awaitDone")
    done = b.state("done")
    failed = b.state("failed")
    table: list[Transition] = [
        (idle, I.start, await_welcome, C.on_start),
        (streaming, I.streams_sent, await_prepared, C.on_streams_sent),
        (await_prepared, I.prepared, committing, C.on_prepared),
        (committing, I.committed_locally, await_done, C.on_committed_locally),
        (await_done, I.done, done, C.on_done),
    ]
    before_commit_point = [idle, await_welcome, streaming, await_prepared]
    if secure:
        await_welcome.upon(I.welcome).to(await_evidence)(step(await_evidence, C.on_welcome_secure))
        table += [
            (await_evidence, I.evidence, verifying, C.on_evidence),
            (verifying, I.peer_verified, await_challenge, C.on_peer_verified),
            (await_challenge, I.challenge, attesting, C.on_challenge),
            (attesting, I.attested, await_offer, C.on_attested),
            (await_offer, I.key_offer, wrapping, C.on_key_offer),
        ]
        if live:
            table += [
                (wrapping, I.key_wrapped, await_live_ready, C.on_key_wrapped_live),
                (await_live_ready, I.live_ready, await_prepared, C.on_live_ready),
            ]
        else:
            table.append((wrapping, I.key_wrapped, streaming, C.on_key_wrapped))
        before_commit_point += [await_evidence, verifying, await_challenge, attesting]
        before_commit_point += [await_offer, wrapping]
    else:
        table.append((await_welcome, I.welcome, streaming, C.on_welcome))
        before_commit_point += [await_evidence]
    # Unreachable in a machine without live mode, but it needs a way out.
    before_commit_point.append(await_live_ready)
    table += ends_before_commit(before_commit_point, I, C, failed)
    build(table)
    # From ``committing`` on, COMMITTED may be durable: a failure leaves the
    # migration in doubt (recovery settles it from the journal), never rolls
    # back; only a commit whose journal write itself failed aborts.
    committing.upon(I.commit_failed).to(failed)(step(failed, C.on_fail))
    for state in (committing, await_done):
        state.upon(I.peer_abort).to(failed)(step(failed, C.on_peer_abort_committed))
        state.upon(I.fail).to(failed)(step(failed, C.on_fail_committed))
        state.upon(I.connection_lost).to(failed)(step(failed, C.on_connection_lost_committed))
    ignore_everything(I, [done, failed], C.on_ignore)
    return b.build()


_SourceMachines = {
    (secure, live): _source_machine(secure, live)
    for secure, live in ((False, False), (True, False), (True, True))
}


class SourceSession(Session[SourceEffect]):
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
        self._machine: SourceInputs = _SourceMachines[secure, live](self._core)
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
                return self._run("welcome", lambda: m.welcome(message))
            case wire.Evidence():
                return self._run("evidence", lambda: m.evidence(message))
            case wire.Challenge():
                return self._run("challenge", lambda: m.challenge(message))
            case wire.KeyOffer():
                return self._run("key_offer", lambda: m.key_offer(message))
            case wire.LiveReady():
                return self._run("live_ready", lambda: m.live_ready(message))
            case wire.Prepared():
                return self._run("prepared", lambda: m.prepared(message))
            case wire.Done():
                return self._run("done", lambda: m.done(message))
            case wire.Abort():
                return self._run("peer_abort", lambda: m.peer_abort(message))
            case _:
                raise self._never_sent(message)

    def fail(self, code: ErrorCode, reason: str) -> SourceEffects:
        """A local failure or a protocol violation ends the session."""
        return self._run("fail", lambda: self._machine.fail(code, reason))

    def connection_lost(self, detail: str = "") -> SourceEffects:
        """The connection is gone; ``detail`` says why, if it was not a clean close."""
        why = f": {detail}" if detail else ""
        return self._run("connection_lost", lambda: self._machine.connection_lost(why))

    def start(self) -> SourceEffects:
        """The connection is up: say HELLO."""
        return self._run("start", self._machine.start)

    def peer_verified(self) -> SourceEffects:
        """Secure: the destination's evidence passed every check."""
        return self._run("peer_verified", self._machine.peer_verified)

    def attested(self, evidence: wire.Evidence) -> SourceEffects:
        """Secure: our evidence for the destination's challenge is ready."""
        return self._run("attested", lambda: self._machine.attested(evidence))

    def key_wrapped(self, wrapped: wire.WrappedKey) -> SourceEffects:
        """Secure: the vTPM key is wrapped to the certified migration key."""
        return self._run("key_wrapped", lambda: self._machine.key_wrapped(wrapped))

    def streams_sent(self) -> SourceEffects:
        """Every image was written to the connection."""
        return self._run("streams_sent", self._machine.streams_sent)

    def committed_locally(self) -> SourceEffects:
        """COMMITTED is journaled and the VM given up here."""
        return self._run("committed_locally", self._machine.committed_locally)

    def commit_failed(self, code: ErrorCode, reason: str) -> SourceEffects:
        """Journaling COMMITTED failed: nothing was committed, the VM stays here."""
        return self._run("commit_failed", lambda: self._machine.commit_failed(code, reason))

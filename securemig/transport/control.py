"""
The control connection's Twisted shell, common to both roles.

:class:`FramedProtocol` feeds received bytes to the frame decoder and the
session, and carries out the effects the session returns through a typed
dispatch (each role's :meth:`carry_out` matches every effect it can get;
mypy proves none is missing).  The session's end (:class:`Finished`) is
carried out even when an earlier effect of its batch raised.  It owns the
two clocks of a connection: an *idle* timer, reset by any progress (bytes
received, the transport taking more of our data, a disk write finishing),
and an overall *deadline*.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Generic, TypeVar, assert_never, cast

from twisted.internet import error as net_error
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from securemig import crashpoint
from securemig.protocol import records, wire
from securemig.protocol.effects import Attest, CommonEffect, Finished, Send, VerifyPeer
from securemig.protocol.errors import ErrorCode, MigrationError, ProtocolError, io_error
from securemig.protocol.session import Session
from securemig.transport import tls
from securemig.transport.tcp import tune_transport
from securemig.transport.tls import channel_binding
from securemig.trust.keyrelease import qualifying_data

E = TypeVar("E")

#: Defaults for the two timers of a connection, in seconds.
IDLE_TIMEOUT = 60.0
DEADLINE = 3600.0
#: After ending a session, how long to keep reading (and discarding) so the
#: peer gets our ABORT: closing a socket with unread data sends a TCP reset,
#: which makes the peer's kernel drop what it had not yet read.
CLOSE_GRACE = 10.0


def failure_to_error(failure: Failure | BaseException, doing: str) -> MigrationError:
    """The coded error for a local failure: our own errors carry their code;
    OS and SQLite errors are classified (a full disk has its own); anything
    else is a bug (INTERNAL)."""
    error = failure.value if isinstance(failure, Failure) else failure
    if isinstance(error, MigrationError):
        return error
    if isinstance(error, OSError):
        return io_error(error, doing)
    if isinstance(error, sqlite3.Error):
        # SQLite reports a full disk as its own error, not as ENOSPC.
        full = "full" in str(error)
        code = ErrorCode.DISK_FULL if full else ErrorCode.IO_ERROR
        return ProtocolError(code, f"{doing}: journal: {error}")
    return ProtocolError(ErrorCode.INTERNAL, f"{doing}: {error}")


def expected(error: BaseException) -> bool:
    """A failure securemig anticipates (a refusal, a full disk): logged as a
    sentence, without a traceback."""
    return isinstance(error, MigrationError | OSError | sqlite3.Error)


class Connection(Protocol):
    """A protocol whose transport is used as what it is."""

    @property
    def out(self) -> Any:
        """The transport.  Twisted declares its type through zope interfaces,
        which mypy cannot read; this is the one place we say so."""
        return self.transport


class FramedProtocol(Connection, Generic[E]):
    """Common to both sides: framing, timers, and running session effects.

    Each role's :meth:`carry_out` matches every effect of its union
    (``DestinationEffect``, ``SourceEffect``) and ends in ``assert_never``,
    so mypy proves that no effect lacks a handler.
    """

    log = Logger()
    session: Session[E]

    def __init__(
        self, clock: IReactorTime, idle_timeout: float = IDLE_TIMEOUT, deadline: float = DEADLINE
    ) -> None:
        self.clock: Any = clock
        self.idle_timeout = idle_timeout
        self.deadline = deadline
        self.decoder = wire.FrameDecoder()
        self.connection_open = True
        self._idle: Any = None  # IDelayedCall
        self._overall: Any = None

    # -- Twisted's Protocol interface

    def connectionMade(self) -> None:
        """Start both timers; let the transport move bulk data in large pieces."""
        tune_transport(self.transport)
        self._idle = self.clock.callLater(self.idle_timeout, self._timed_out, "idle")
        self._overall = self.clock.callLater(self.deadline, self._timed_out, "deadline")

    def dataReceived(self, data: bytes) -> None:
        """Feed bytes to the decoder and every whole message to the session."""
        if self.session.finished:
            return
        self.touch()
        self.decoder.feed(data)
        while not self.session.finished:
            try:
                message = self.decoder.next_message()
                if message is None:
                    return
                self.check_control(message)
                effects = self.session.receive(message)
            except ProtocolError as e:
                self.fail(e)
                return
            self.run(effects)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        """Stop the timers; a session still running learns it lost its peer."""
        self._cancel_timers()
        self.connection_open = False
        if not self.session.finished:
            clean = reason.check(net_error.ConnectionDone, net_error.ConnectionLost)
            # A TLS refusal (bad certificate, wrong name) arrives as the reason.
            self.run(self.session.connection_lost("" if clean else reason.getErrorMessage()))

    # -- helpers for subclasses

    def check_control(self, message: wire.Message) -> None:
        """Refuse a message that may not arrive on the control connection."""

    def touch(self) -> None:
        """Progress was made: restart the idle timer."""
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.idle_timeout)

    def fail(self, error: MigrationError) -> None:
        """End the session because of a local failure or a peer's violation."""
        if not self.session.finished:
            self.log.warn("failing: {code}: {reason}", code=error.code.name, reason=error.reason)
            self.run(self.session.fail(error.code, error.reason))

    def run(self, batch: Sequence[E]) -> None:
        """Carry out a batch of effects in order.

        An effect that raises ends the session with the error's code (a full
        disk under the journal is DISK_FULL, not a dropped connection); the
        rest of that batch is skipped, because it assumed success, except
        the session's end: when the batch itself ended the session (an
        effect before its :class:`Finished` raised), that end is still
        carried out, so the outcome is journaled and reported.
        """
        for index, effect in enumerate(batch):
            try:
                self.carry_out(effect)
            except Exception as e:
                error = self._fault(e, type(effect).__name__)
                if not self.session.finished:
                    self.fail(error)
                    return
                for later in batch[index + 1 :]:
                    if isinstance(later, Finished):
                        self._end_anyway(later, error)
                return

    def _fault(self, e: Exception, doing: str) -> MigrationError:
        if expected(e):
            self.log.warn("{doing} refused: {e}", doing=doing, e=e)
        else:
            self.log.failure("{doing} failed", doing=doing)
        return failure_to_error(e, doing)

    def _end_anyway(self, end: Finished, error: MigrationError) -> None:
        """Carry out the session's end after an effect before it failed; the
        outcome stays what the session decided, the reason says what failed."""
        reason = f"{end.reason}; then {error}" if end.reason else str(error)
        try:
            self.carry_out(cast(E, replace(end, code=end.code or error.code, reason=reason)))
        except Exception as e:
            self._fault(e, "Finished")

    def carry_out(self, effect: E) -> None:
        """Carry out one effect of this role (see the subclasses)."""
        raise NotImplementedError

    def carry_out_common(self, effect: CommonEffect) -> None:
        """The effects both roles share."""
        match effect:
            case Send():
                self.send(effect.message)
            case Attest():
                self._attest(effect)
            case VerifyPeer():
                self._verify_peer(effect)
            case Finished():
                self._close(effect)
            case _:
                assert_never(effect)

    def send(self, message: Any) -> None:
        """Write one control message."""
        self.out.write(wire.encode(message))

    # -- the secure variant (TPM operations are quick and run in place)

    security: Any = None

    def migration_id(self) -> bytes:
        """This migration's id (known once the destination admitted it)."""
        raise NotImplementedError

    def journal_phase(self, phase: str) -> None:
        """Record a phase of this migration in this side's journal."""
        raise NotImplementedError

    def peer_name(self) -> str:
        """The name the peer must prove (TLS and AK certificate alike)."""
        raise NotImplementedError

    def qualifying(self, role: str, nonce: bytes) -> bytes:
        """Qualifying data bound to this TLS session and migration."""

        return qualifying_data(channel_binding(self.transport), role, nonce, self.migration_id())

    def data_channel_key(self) -> tuple[str, bytes]:
        """The TLS cipher suite of this session and the data channel's key,
        exported from it for this migration: only the TLS peer has it."""

        cipher = tls.cipher_suite(self.transport)
        key = tls.exported(
            self.transport, records.EXPORTER_LABEL, records.key_length(cipher), self.migration_id()
        )
        return cipher, key

    def _attest(self, effect: Attest) -> None:
        evidence = self.security.attestor.evidence(self.qualifying(effect.role, effect.nonce))
        self.run(self.session.attested(evidence))

    def _verify_peer(self, effect: VerifyPeer) -> None:
        if effect.role == "destination":
            crashpoint.reached("source-attesting")
        qualifying = self.qualifying(effect.role, effect.nonce)
        self.peer_values = self.security.attestor.verify(
            effect.evidence, qualifying, self.peer_name()
        )
        self.peer_ak = effect.evidence.ak_public
        self.log.info("{peer} attested", peer=self.peer_name())
        self.journal_phase("peer-attested")
        self.run(self.session.peer_verified())

    def _close(self, effect: Finished) -> None:
        """The session is over: stop the timers, close the connection."""
        self._cancel_timers()
        if self.connection_open:
            self.close_gracefully()

    def close_gracefully(self) -> None:
        """Flush and half-close; drop the connection once the peer closed
        its side too or after :data:`CLOSE_GRACE` seconds."""
        if hasattr(self.out, "loseWriteConnection") and hasattr(self.out, "abortConnection"):
            self.out.loseWriteConnection()
            self._overall = self.clock.callLater(CLOSE_GRACE, self.out.abortConnection)
        else:
            self.out.loseConnection()

    def _timed_out(self, which: str) -> None:
        if which == "idle":
            reason = f"no progress for {self.idle_timeout:g} s in phase {self.session.phase}"
        else:
            reason = f"migration ran past its deadline of {self.deadline:g} s"
        self.fail(ProtocolError(ErrorCode.TIMEOUT, reason))

    def _cancel_timers(self) -> None:
        for call in (self._idle, self._overall):
            if call is not None and call.active():
                call.cancel()

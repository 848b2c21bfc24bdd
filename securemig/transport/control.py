"""
The control connection's Twisted shell, common to both roles.

:class:`FramedProtocol` is a thin adapter around a sans-IO connection object
(:mod:`securemig.protocol.connection`): it feeds it received bytes and the
clock's time, and carries out the effects it returns through a typed
dispatch (each role's :meth:`carry_out` matches every effect it can get;
mypy proves none is missing).  The session's end (:class:`Finished`) is
carried out even when an earlier effect of its batch raised.

Time: the connection object owns every clock (idle, deadline, close grace,
the source's data channel grace); this shell keeps one ``callLater`` at
``get_timer()`` and, when it fires, feeds ``handle_timer(clock.seconds())``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Generic, Protocol, TypeVar, assert_never, cast

from twisted.internet import error as net_error
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from securemig import crashpoint, logcontext
from securemig.crashpoint import CrashPoint
from securemig.protocol import records, wire

# The clocks' defaults live with the clocks; re-exported for the services' options.
from securemig.protocol.connection import DEADLINE as DEADLINE
from securemig.protocol.connection import IDLE_TIMEOUT as IDLE_TIMEOUT
from securemig.protocol.connection import CloseNow, MigrationConnection
from securemig.protocol.effects import Attest, CommonEffect, Finished, Send, VerifyPeer
from securemig.protocol.errors import ErrorCode, MigrationError, ProtocolError, io_error
from securemig.protocol.phases import Phase
from securemig.protocol.session import Session, SessionState
from securemig.transport import tls
from securemig.transport.tcp import tune_transport
from securemig.transport.tls import channel_binding
from securemig.trust.attestor import Attestor
from securemig.trust.keyrelease import qualifying_data

E = TypeVar("E")


class Attesting(Protocol):
    """A side's security in the secure variant (a
    :class:`~securemig.trust.keyrelease.SourceSecurity` or
    :class:`~securemig.trust.keyrelease.DestinationSecurity`): its attestor."""

    attestor: Attestor


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


class Connection(TwistedProtocol):
    """A protocol whose transport is used as what it is."""

    @property
    def out(self) -> Any:
        """The transport.  Twisted declares its type through zope interfaces,
        which mypy cannot read; this is the one place we say so."""
        return self.transport


class FramedProtocol(Connection, Generic[E]):
    """Common to both sides: bytes and time into the connection object,
    its effects carried out.

    Each role's :meth:`carry_out` matches every effect of its union
    (``DestinationEffect``, ``SourceEffect``) and ends in ``assert_never``,
    so mypy proves that no effect lacks a handler.
    """

    log = Logger()
    connection: MigrationConnection[E]

    def __init__(self, clock: IReactorTime, connection: MigrationConnection[E]) -> None:
        self.clock: Any = clock
        self.connection = connection
        self.connection_open = True
        self._timer: Any = None  # IDelayedCall

    @property
    def session(self) -> Session[E, SessionState]:
        """The session the connection object drives."""
        return self.connection.session

    def log_context(self) -> dict[str, str | None]:
        """What every log line of this connection names (the migration id,
        VM, peer, role; see :mod:`securemig.app.logformat`)."""
        return {}

    # -- Twisted's Protocol interface

    def connectionMade(self) -> None:
        """Start the clocks; let the transport move bulk data in large pieces."""
        tune_transport(self.transport)
        self.connection.start(self.clock.seconds())
        self._schedule()

    def dataReceived(self, data: bytes) -> None:
        """Feed bytes to the connection object and carry out the effects of
        each whole message before the next is decoded."""
        with logcontext.of(self.log_context):
            self.connection.receive_data(data, self.clock.seconds())
            self.drain()

    def drain(self) -> None:
        """Carry out the effects of every whole message received so far."""
        while (batch := self.connection.next_batch()) is not None:
            self._run_reporting(batch)
        self._schedule()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """No clock runs any more; a session still running learns it lost its peer."""
        self.connection_open = False
        clean = isinstance(reason.value, net_error.ConnectionDone | net_error.ConnectionLost)
        # A TLS refusal (bad certificate, wrong name) arrives as the reason.
        batch = self.connection.connection_lost("" if clean else tls.describe_failure(reason))
        self._schedule()
        with logcontext.of(self.log_context):
            self.run(batch)

    # -- helpers for subclasses

    def touch(self) -> None:
        """Progress was made: restart the idle timer."""
        self.connection.progress(self.clock.seconds())
        # The pending call may now fire early; handle_timer then finds
        # nothing due and the next one is scheduled (no reset per chunk).
        self._schedule()

    def fail(self, error: MigrationError) -> None:
        """End the session because of a local failure or a peer's violation."""
        self._run_reporting(self.connection.fail(error))

    def _run_reporting(self, batch: Sequence[E | CloseNow]) -> None:
        """Run a batch; if the connection object ended the session with an
        error just now (a violation, a timeout, a local failure), say so."""
        error = self.connection.error
        if error is not None and error is not self._reported:
            self._reported = error
            self.log.warn("failing: {code}: {reason}", code=error.code.name, reason=error.reason)
        self.run(batch)

    _reported: MigrationError | None = None

    def _schedule(self) -> None:
        """Keep one call at the connection object's next timer."""
        when = self.connection.get_timer()
        call = self._timer
        if call is not None and call.active():
            if when is not None and call.getTime() <= when:
                return
            call.cancel()
        self._timer = None
        if when is not None:
            delay = max(0.0, when - self.clock.seconds())
            self._timer = self.clock.callLater(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        with logcontext.of(self.log_context):
            self._run_reporting(self.connection.handle_timer(self.clock.seconds()))
        self._schedule()

    def run(self, batch: Sequence[E | CloseNow]) -> None:
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
                if isinstance(effect, CloseNow):
                    # Not once the connection is lost: Twisted's TLS layer
                    # has dropped its OpenSSL connection by then and an
                    # abort would reach it ('NoneType' ... 'bio_read').
                    if self.connection_open:
                        self.out.abortConnection()
                else:
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

    #: This side's security (None: the insecure variant); each role narrows it.
    security: Attesting | None = None

    def attestor(self) -> Attestor:
        """This host's attestor (only the secure variant attests)."""
        if self.security is None:
            raise ProtocolError(ErrorCode.INTERNAL, "the insecure variant does not attest")
        return self.security.attestor

    def migration_id(self) -> bytes:
        """This migration's id (known once the destination admitted it)."""
        raise NotImplementedError

    def journal_phase(self, phase: Phase) -> None:
        """Record a phase of this migration in this side's journal."""
        raise NotImplementedError

    def peer_name(self) -> str:
        """The name the peer must prove (TLS and AK certificate alike)."""
        raise NotImplementedError

    def qualifying(self, role: str, nonce: bytes) -> bytes:
        """Qualifying data bound to this TLS session and migration."""

        return qualifying_data(channel_binding(self.transport), role, nonce, self.migration_id())

    def data_channel_key(self, label: bytes = records.EXPORTER_LABEL) -> tuple[str, bytes]:
        """The TLS cipher suite of this session and the data channel's key,
        exported from it for this migration: only the TLS peer has it.
        ``label``: :data:`records.LIVE_EXPORTER_LABEL` for a live stream's key."""

        cipher = tls.cipher_suite(self.transport)
        key = tls.exported(self.transport, label, records.key_length(cipher), self.migration_id())
        return cipher, key

    def _attest(self, effect: Attest) -> None:
        evidence = self.attestor().evidence(
            self.qualifying(effect.role, effect.nonce), effect.request
        )
        self.run(self.session.attested(evidence))

    def _verify_peer(self, effect: VerifyPeer) -> None:
        if effect.role == "destination":
            crashpoint.reached(CrashPoint.SOURCE_ATTESTING)
        qualifying = self.qualifying(effect.role, effect.nonce)
        self.peer_values = self.attestor().verify(
            effect.evidence, qualifying, self.peer_name(), effect.request
        )
        self.peer_ak = effect.evidence.ak_public
        self.log.info("{peer} attested", peer=self.peer_name())
        self.journal_phase(Phase.PEER_ATTESTED)
        self.run(self.session.peer_verified())

    def _close(self, effect: Finished) -> None:
        """The session is over: close the connection."""
        if self.connection_open:
            self.close_gracefully()
        self._schedule()

    def close_gracefully(self) -> None:
        """Flush and close our side; drop the connection once the peer
        closed its side too or when the connection object's close grace ends.

        Under TLS that is TLS's own close (a close_notify after what is
        buffered; reading goes on), never a TCP half-close: with the TCP
        write side shut, a peer's close_notify makes Twisted's TLS close the
        TCP connection synchronously inside its own read loop, which then
        reads the OpenSSL connection it just dropped ('NoneType' object has
        no attribute 'bio_read': an "Unhandled Error" for a refused client
        that sends data and closes).  Plain TCP half-closes."""
        if not self.connection_open or getattr(self.out, "disconnecting", False):
            # Lost, or already closing (an abort, TLS's own shutdown).
            return
        if tls.is_tls(self.out):
            self.out.loseConnection()
            self.connection.closing(self.clock.seconds())
        elif hasattr(self.out, "loseWriteConnection") and hasattr(self.out, "abortConnection"):
            self.out.loseWriteConnection()
            self.connection.closing(self.clock.seconds())
        else:
            self.out.loseConnection()

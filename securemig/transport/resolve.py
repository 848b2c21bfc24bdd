"""
Telling a destination the coordinator's decision: RESOLVE on a fresh
connection, over the variant (and, secure, the mutual TLS identities) of the
migration it settles; the answer is RESOLVED.  ASK, on such a connection,
asks what it holds of a carried live departure the source cannot decide
alone; the answer is RESOLVED too.

:func:`resolve` sends one RESOLVE, :func:`ask` one ASK; :class:`Resolver` is
the daemon's loop that sends every decision this host's journal still owes,
and every question, with back-off, until each destination confirms.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from securemig.host.journal import Journal, MigrationRecord
from securemig.host.recovery import (
    Ask,
    Backoff,
    Owed,
    acknowledge,
    decide_asked,
    settle_departures,
)
from securemig.protocol import wire
from securemig.protocol.errors import ErrorCode, PeerViolation, ProtocolError
from securemig.protocol.phases import Phase
from securemig.transport import tls
from securemig.transport.control import Connection
from securemig.transport.tcp import client_endpoint, connect

log = Logger()

#: Seconds to wait for a destination's answer.
RESOLVE_TIMEOUT = 30.0
#: Back-off between attempts for one migration: doubles from the first to the last.
FIRST_RETRY, LAST_RETRY = 1.0, 60.0


class ResolveProtocol(Connection):
    """Sends one RESOLVE (or ASK) and fires ``answer`` with the RESOLVED it
    gets."""

    def __init__(self, message: wire.Resolve | wire.Ask) -> None:
        self.message = message
        self.decoder = wire.FrameDecoder()
        self.answer: Deferred[wire.Resolved] = Deferred()

    def connectionMade(self) -> None:
        """Say it."""
        self.out.write(wire.encode(self.message))

    def dataReceived(self, data: bytes) -> None:
        """The first whole message must be RESOLVED for our migration (or ABORT)."""
        if self.answer.called:
            return
        try:
            self.decoder.feed(data)
            message = self.decoder.next_message()
            if message is None:
                return
            if isinstance(message, wire.Abort):
                raise ProtocolError(message.code, f"destination: {message.reason}")
            if not (
                isinstance(message, wire.Resolved)
                and message.migration_id == self.message.migration_id
            ):
                raise PeerViolation(ErrorCode.UNEXPECTED_MESSAGE, "not a RESOLVED for us")
        except ProtocolError as e:
            self.answer.errback(e)
        else:
            self.answer.callback(message)
        self.out.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Gone before it answered."""
        if not self.answer.called:
            self.answer.errback(ProtocolError(ErrorCode.CONNECTION_LOST, reason.getErrorMessage()))


async def resolve(
    reactor: Any, owed: Owed, identity: Path | None, timeout: float = RESOLVE_TIMEOUT
) -> wire.Resolved:
    """Send one decision to the destination the journal names; returns its answer.

    A secure migration is resolved over mutual TLS with ``identity`` (this
    host's), checking the destination's name as the migration did.
    """
    return await _send(
        reactor, owed.record, wire.Resolve(owed.migration_id, owed.decision), identity, timeout
    )


async def ask(
    reactor: Any, question: Ask, identity: Path | None, timeout: float = RESOLVE_TIMEOUT
) -> wire.Resolved:
    """Ask the destination the journal names what it holds of a carried
    live departure (ASK), as :func:`resolve` sends a decision; returns its
    answer."""
    return await _send(reactor, question.record, wire.Ask(question.migration_id), identity, timeout)


async def _send(
    reactor: Any,
    record: MigrationRecord,
    message: wire.Resolve | wire.Ask,
    identity: Path | None,
    timeout: float,
) -> wire.Resolved:
    host, _, port = record.peer.rpartition(":")
    host = host.strip("[]")
    endpoint: Any = client_endpoint(reactor, host, int(port), timeout=timeout)
    if record.protocol == "secure":
        if identity is None:
            raise ProtocolError(
                ErrorCode.BAD_PARAMETER, "a secure migration is resolved with --identity"
            )
        endpoint = wrapClientTLS(tls.client_options(identity, record.peer_name or host), endpoint)
    proto = ResolveProtocol(message)
    await connect(endpoint, proto)
    timer = reactor.callLater(timeout, proto.out.abortConnection)
    try:
        return await proto.answer
    finally:
        if timer.active():
            timer.cancel()


async def confirmed(journal: Journal, owed: Owed, answer: wire.Resolved) -> bool:
    """Carry out and journal the destination's answer (see
    :func:`securemig.host.recovery.acknowledge`); True if nothing more is owed."""
    return await acknowledge(journal, owed, answer)


class Resolver:
    """The daemon's side of recovery as a source: settle this host's
    departures at start and every ``interval`` seconds (a ``securemig
    migrate`` may die at any time), and send each owed decision (and
    question) until its destination confirms, backing off from 1 s to 60 s
    per migration; a failed release of a committed copy here is retried
    backing off the same way."""

    def __init__(
        self,
        reactor: Any,
        journal: Journal,
        identity: Path | None,
        unseal: Callable[[bytes], bytes] | None,
        interval: float = 5.0,
    ) -> None:
        self.reactor = reactor
        self.journal = journal
        self.identity = identity
        self.unseal = unseal
        self.interval = interval
        self._next: dict[str, tuple[float, float]] = {}  # record id -> (when, delay)
        #: A committed departure whose copy here could not be removed (its
        #: hypervisor down) is tried again backing off, not every round.
        self.backoff = Backoff(clock=reactor.seconds)
        self._busy = False
        self._call: Any = None

    def start(self) -> None:
        """Begin: a first round now."""
        self._call = self.reactor.callLater(0, self._round)

    def stop(self) -> None:
        """No more rounds."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _round(self) -> None:
        if self._busy:
            return
        self._busy = True

        def again(_: object) -> None:
            self._busy = False
            if self._call is not None:
                self._call = self.reactor.callLater(self.interval, self._round)

        Deferred.fromCoroutine(self.run_once()).addErrback(
            lambda f: log.failure("recovery round failed", f)
        ).addBoth(again)

    async def run_once(self) -> None:
        """One round: settle locally, then send what is due."""
        did, owed = await settle_departures(self.journal, self.unseal, backoff=self.backoff)
        for sentence in did:
            log.info("recovery: {what}", what=sentence)
        now = self.reactor.seconds()
        for item in owed:
            when, delay = self._next.get(item.record.id, (0.0, FIRST_RETRY))
            if when > now:
                continue
            if isinstance(item, Ask):
                await self._ask(item, now, delay)
                continue
            try:
                answer = await resolve(self.reactor, item, self.identity)
            except Exception as e:
                self._later(item.record.id, now, delay)
                log.warn(
                    "RESOLVE {decision} of migration {mid} to {peer} failed ({e}); "
                    "retrying in {delay:g} s",
                    decision=item.decision.name,
                    mid=item.record.migration_id,
                    peer=item.record.peer,
                    e=e,
                    delay=delay,
                )
                continue
            if await confirmed(self.journal, item, answer):
                self._next.pop(item.record.id, None)
                log.info(
                    "migration {mid} of VM {vm}: destination {peer} settled it: {how}",
                    mid=item.record.migration_id,
                    vm=item.record.vm,
                    peer=item.record.peer,
                    how=f"{answer.settled.name.lower()} ({answer.reason})",
                )
            else:
                self._later(item.record.id, now, delay)
                log.warn(
                    "migration {mid}: destination answered {how}; retrying",
                    mid=item.record.migration_id,
                    how=f"{answer.settled.name} ({answer.reason})",
                )

    def _later(self, local_id: str, now: float, delay: float) -> None:
        """Ask or resolve record ``local_id`` again in ``delay`` seconds,
        and back off: the next wait doubles, up to ``LAST_RETRY``."""
        self._next[local_id] = (now + delay, min(delay * 2, LAST_RETRY))

    async def _ask(self, item: Ask, now: float, delay: float) -> None:
        """Ask a destination what it holds (ASK) and decide on its answer
        (:func:`securemig.host.recovery.decide_asked`); unreachable, or an
        answer that says neither: asked again, backing off."""
        try:
            answer = await ask(self.reactor, item, self.identity)
        except Exception as e:
            self._later(item.record.id, now, delay)
            log.warn(
                "ASK of migration {mid} to {peer} failed ({e}); in doubt, asking again in "
                "{delay:g} s",
                mid=item.record.migration_id,
                peer=item.record.peer,
                e=e,
                delay=delay,
            )
            return
        log.info(
            "migration {mid} of VM {vm}: destination {peer} holds: {how}",
            mid=item.record.migration_id,
            vm=item.record.vm,
            peer=item.record.peer,
            how=f"{answer.settled.name.lower()} ({answer.reason})",
        )
        for sentence in await decide_asked(self.journal, item, answer):
            log.info("recovery: {what}", what=sentence)
        fresh = self.journal.get(item.record.id)
        if fresh is not None and fresh.outcome == "in-doubt" and not fresh.reached(Phase.COMMITTED):
            self._later(item.record.id, now, delay)
        else:
            self._next.pop(item.record.id, None)

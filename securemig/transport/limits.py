"""
Limits on what a peer gets before it has authenticated (OpenSSH's
``LoginGraceTime``, ``MaxStartups`` and ``PerSourceMaxStartups``).

A connection is *pending* from the moment it is accepted until its TLS
handshake completes, which is when the source's site-CA certificate has
been verified.  While pending it may cost a descriptor and a TLS state,
so:

- it has ``handshake_timeout`` seconds to finish the handshake, then it is
  aborted (no TLS alert, no close grace);
- at most ``per_address`` connections from one peer address may be pending;
  one more is refused at accept;
- above ``start`` pending connections in all, each new one is accepted but,
  with a probability rising linearly from ``rate`` % at ``start`` to 100 %
  at ``full`` (random early drop), makes room by closing the *oldest*
  pending connection, so there are never more than ``full``.  OpenSSH
  refuses the newcomer instead; that locks a valid source out for as long
  as a flood holds the cap.  Closing the oldest lets it through: a valid
  handshake takes milliseconds, so the oldest pending connection is the one
  that has had longest to prove itself and has not, and a valid source is
  only closed if ``full`` newer connections arrive during its handshake.

The default caps derive from the descriptor limit, which
:func:`raise_descriptor_limit` raises to the hard limit at start.
"""

from __future__ import annotations

import random
import resource
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

#: LoginGraceTime for the TLS handshake, seconds.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds between two log lines about dropped or refused connections: a
#: flood must not become a flood of log lines.
LOG_INTERVAL = 10.0


def raise_descriptor_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit (a
    service's default of 1,024 is what a flood of idle sockets exhausts);
    returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep the soft limit we have; the caps derive from it
    return soft


@dataclass(frozen=True)
class Caps:
    """The pre-authentication caps (see the module's docstring)."""

    start: int
    rate: int
    full: int
    per_address: int
    handshake_timeout: float = HANDSHAKE_TIMEOUT

    @classmethod
    def from_descriptors(cls, nofile: int, handshake_timeout: float = HANDSHAKE_TIMEOUT) -> Caps:
        """Caps that leave at least three quarters of ``nofile`` descriptors
        to authenticated migrations (each holds a control and a data
        connection, a data port, staging files, the journal and a TPM
        socket); at most 1,000 pending, as each holds a TLS state too."""
        full = max(8, min(nofile // 4, 1000))
        return cls(
            start=full // 2,
            rate=30,
            full=full,
            per_address=max(4, full // 10),
            handshake_timeout=handshake_timeout,
        )

    @classmethod
    def parse_startups(cls, text: str) -> tuple[int, int, int]:
        """``START:RATE:FULL`` (or one number, FULL with no early drop), as
        OpenSSH's MaxStartups; raises ValueError with what is wrong."""
        parts = text.split(":")
        if len(parts) == 1:
            full = int(parts[0])
            start, rate = full, 100
        elif len(parts) == 3:
            start, rate, full = (int(p) for p in parts)
        else:
            raise ValueError("write START:RATE:FULL, e.g. 10:30:100, or FULL")
        if not (1 <= start <= full and 0 <= rate <= 100):
            raise ValueError("need 1 <= START <= FULL and 0 <= RATE <= 100")
        return start, rate, full


class PendingConnections:
    """Who is pending, per address and in all; decides at each accept."""

    def __init__(self, caps: Caps, clock: Any, rng: random.Random | None = None) -> None:
        self.caps = caps
        self.clock = clock
        self.rng = rng or random.Random()
        #: Oldest first (insertion order): the victims of early drop.
        self.pending: OrderedDict[PreAuthGuard, None] = OrderedDict()
        self.per_address: dict[str, int] = {}
        #: Since the start: refused at accept (per-address cap), dropped to
        #: make room (early drop), aborted at the handshake deadline.
        self.refused = 0
        self.dropped = 0
        self.timed_out = 0
        self._last_log = -LOG_INTERVAL

    def admit(self, address: str) -> bool:
        """May a new connection from ``address`` be accepted?  Makes room
        for it (random early drop) if so."""
        if self.per_address.get(address, 0) >= self.caps.per_address:
            self.refused += 1
            self._log_pressure()
            return False
        n = len(self.pending)
        if n >= self.caps.start:
            span = max(1, self.caps.full - self.caps.start)
            chance = self.caps.rate + (100 - self.caps.rate) * (n - self.caps.start) / span
            if n >= self.caps.full or self.rng.random() * 100 < chance:
                victim = next(iter(self.pending))
                self.dropped += 1
                victim.drop()
                self._log_pressure()
        return True

    def add(self, guard: PreAuthGuard) -> None:
        self.pending[guard] = None
        self.per_address[guard.address] = self.per_address.get(guard.address, 0) + 1

    def remove(self, guard: PreAuthGuard) -> None:
        self.pending.pop(guard, None)
        left = self.per_address.get(guard.address, 0) - 1
        if left > 0:
            self.per_address[guard.address] = left
        else:
            self.per_address.pop(guard.address, None)

    def _log_pressure(self) -> None:
        now = self.clock.seconds()
        if now - self._last_log >= LOG_INTERVAL:
            self._last_log = now
            log.warn(
                "unauthenticated connections at their caps: {pending} pending; since start "
                "{refused} refused (per address, max {per_address}), {dropped} dropped "
                "early, oldest first (above {start}, max {full}), {timed_out} past the "
                "{timeout:g} s handshake deadline",
                pending=len(self.pending),
                refused=self.refused,
                per_address=self.caps.per_address,
                dropped=self.dropped,
                start=self.caps.start,
                full=self.caps.full,
                timed_out=self.timed_out,
                timeout=self.caps.handshake_timeout,
            )


@implementer(IHandshakeListener)
class PreAuthGuard(ProtocolWrapper):
    """Between the TLS layer and the protocol it carries: counts the
    connection as pending until the TLS layer reports the handshake done,
    and aborts it at the handshake deadline.  Everything else passes through
    (and so does the handshake notice, to a protocol that listens for it)."""

    def __init__(self, factory: Any, wrapped: Any, limits: PendingConnections, address: str):
        super().__init__(factory, wrapped)
        self.limits = limits
        self.address = address
        self.is_pending = False
        self._deadline: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.limits.add(self)
        self.is_pending = True
        self._deadline = self.limits.clock.callLater(
            self.limits.caps.handshake_timeout, self._expired
        )
        super().makeConnection(transport)  # type: ignore[no-untyped-call]  # Twisted does not annotate it

    def _release(self) -> None:
        if self.is_pending:
            self.is_pending = False
            self.limits.remove(self)
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        self.limits.timed_out += 1
        self.limits._log_pressure()
        self.drop()

    def drop(self) -> None:
        """Close now, without TLS close grace: the slot is free at once."""
        self._release()
        tls: Any = self.transport  # the TLS protocol (IHandshakeListener is its hook)
        if tls is not None:
            tls.abortConnection()

    def handshakeCompleted(self) -> None:
        self._release()
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._release()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]  # Twisted does not annotate it


class LimitedTLSFactory(TLSMemoryBIOFactory):
    """A TLS server factory that applies :class:`Caps` to connections until
    their handshake completes."""

    def __init__(
        self,
        context_factory: Any,
        wrapped_factory: Any,
        caps: Caps,
        clock: Any,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(context_factory, False, wrapped_factory)
        self.limits = PendingConnections(caps, clock, rng)

    def buildProtocol(self, addr: Any) -> Any:
        """The TLS protocol over a guarded one, or None (Twisted then closes
        the accepted socket) when the per-address cap refuses it."""
        address = str(getattr(addr, "host", addr))
        if not self.limits.admit(address):
            return None
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        guard = PreAuthGuard(self, inner, self.limits, address)
        return self.protocol(self, guard)

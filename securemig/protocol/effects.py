"""
What a session asks its host to do: effects, in order, and how it ended.

A session (:mod:`securemig.protocol.destination`, :mod:`.source`) returns a
list of effects for every input.  The Twisted shell carries each one out
with a ``match`` over the role's union (:data:`DestinationEffect`,
:data:`SourceEffect`), so mypy proves every effect has a handler.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from securemig.protocol import wire
from securemig.protocol.errors import ErrorCode


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

    message: wire.Message


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
    """Destination: append this chunk to the open stream (hashed too where
    the stream's SHA-256 is checked: see :class:`CloseStream`)."""

    data: wire.Data


@dataclass(frozen=True)
class CloseStream:
    """Destination: finish the open stream.  Its SHA-256 must equal
    ``sha256`` on the secure variant's control connection; a data channel's
    records are authenticated one by one and the insecure twin checks sizes
    only, so there the shell does not hash it."""

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
class StartLive:
    """Source, live mode: start QEMU's live migration into records sent to
    the destination's ``port``; the guest keeps running.  Nothing to call
    back: the destination's PREPARED (its QEMU loaded everything) is next."""

    port: int


@dataclass(frozen=True)
class StartIncoming:
    """Destination, live mode: with the key just accepted, start the VM's
    vTPM and QEMU paused, waiting for the stream, then call
    ``incoming_ready(port)``; when QEMU has loaded it, ``incoming_loaded()``."""


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
    """Secure: quote what the peer's challenge requests for its
    ``nonce`` (role: who we are), then call ``attested(evidence)``."""

    nonce: bytes
    role: str
    request: wire.QuoteRequest = wire.DEFAULT_QUOTE_REQUEST


@dataclass(frozen=True)
class VerifyPeer:
    """Secure: verify the peer's evidence against our ``nonce`` (role: who
    the peer is), then call ``peer_verified()``; a refusal raises."""

    evidence: wire.Evidence
    nonce: bytes
    role: str
    #: What our challenge asked the peer to quote.
    request: wire.QuoteRequest = wire.DEFAULT_QUOTE_REQUEST


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
class Settle:
    """Destination, recovery: carry out the source's decision for a migration
    (roll a commit forward, or discard), or say what it holds of it (ASK:
    nothing changed), then call ``settled(answer)``."""

    resolve: wire.Resolve | wire.Ask


@dataclass(frozen=True)
class Finished:
    """The session is over: close the connection and report the outcome."""

    outcome: Outcome
    code: ErrorCode | None = None
    reason: str = ""
    #: Source: the destination told us how it ended (DONE, or its own ABORT
    #: before the commit), so recovery owes it no RESOLVE.
    peer_settled: bool = False


#: Effects either role may be asked to carry out.
CommonEffect = Send | Attest | VerifyPeer | Finished
#: Everything a destination session may ask for.
DestinationEffect = (
    CommonEffect
    | Admit
    | OpenStream
    | WriteChunk
    | CloseStream
    | Prepare
    | CommitInPlace
    | Discard
    | HoldInDoubt
    | OfferKey
    | AcceptKey
    | Settle
    | StartIncoming
)
#: Everything a source session may ask for.
SourceEffect = CommonEffect | StartStreams | CommitLocally | RollBack | WrapKey | StartLive
DestinationEffects = list[DestinationEffect]
SourceEffects = list[SourceEffect]


def abort(code: ErrorCode, reason: str) -> Send:
    """The ABORT to send for a failure, its reason cut to the wire's bound."""
    return Send(wire.Abort(code, reason[: wire.MAX_REASON]))

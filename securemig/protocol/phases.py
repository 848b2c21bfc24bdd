"""
The phases a migration's journal records, and what the time between them
is called: names that are types.

Each side journals one event per phase it reaches
(:mod:`securemig.host.journal`); recovery reads them back
(:mod:`securemig.protocol.recovery`), and ``securemig status`` and the
benchmark report show the time between them as activities.  A phase is a
:class:`Phase` member everywhere in the code, so a typo is an error of mypy
(or an ``AttributeError``), not a phase that is silently never reached.

Both are ``StrEnum`` on purpose: a member *is* its string, so the journal
stores, and JSON shows, exactly the bytes it did when phases were literals,
and a journal written before (or by a newer release) still loads.  The
values are journaled data: append members, never rename a value.
"""

from __future__ import annotations

import enum


class Phase(enum.StrEnum):
    """A step of a migration that a side journals, in protocol order (see
    ``doc/protocol.rst``, "Journal states and recovery")."""

    STARTED = "started"
    SUSPENDED = "suspended"  #: source: a running VM was suspended for this migration
    CONNECTED = "connected"
    ADMITTED = "admitted"
    PEER_ATTESTED = "peer-attested"  #: secure: the peer's evidence passed every check
    #: secure, source: the destination's certified migration key arrived
    KEY_OFFERED = "key-offered"
    KEY_RECEIVED = "key-received"  #: secure, destination: the wrapped vTPM key arrived
    STREAMING = "streaming"
    PREPARED = "prepared"
    COMMITTED = "committed"
    RELEASED = "released"  #: source: after COMMITTED, the vTPM key and the bundle are gone
    RESUMED = "resumed"
    DONE = "done"
    ABORTED = "aborted"
    IN_DOUBT = "in-doubt"
    # Live mode (issue 16), appended: phase names are journaled data.
    LIVE = "live"  #: source: a live migration of the running VM began (it keeps running)
    INCOMING = "incoming"  #: destination: the VM's vTPM and QEMU wait paused for the stream
    # Issue 22, appended:
    #: destination, live: its QEMU ended before CONTINUING was journaled (never ran)
    LOST = "lost"
    RECLAIMED = (
        "reclaimed"  #: source, live: committed, the destination lost; the guest goes on here
    )
    #: destination, live: in place, its QEMU there; the last durable step before cont
    CONTINUING = "continuing"


class Activity(enum.StrEnum):
    """What happens between two journaled phases, as phase tables name it
    (``securemig status``, the benchmark report's ``phases``)."""

    CONNECT = "connect"  #: source: TCP (and TLS) set-up
    HELLO = "hello"  #: HELLO to WELCOME (destination: WELCOME to the first stream)
    HELLO_ATTEST_DESTINATION = "hello + attest destination"
    ATTEST_SOURCE = "attest source"
    ATTEST_BOTH = "attest both ways"
    KEY_TRANSFER = "key transfer"
    FIRST_STREAM = "first stream"
    STREAMS = "streams"  #: every image sent, received, verified and fsynced
    COMMIT = "commit"  #: source: journal COMMITTED, give the VM up
    RELEASE_COPY = "release copy"  #: source: vTPM key and bundle removed
    RESUME = "resume"  #: the VM moved into place and resumed
    CONFIRM = "confirm"

    @property
    def varies_with_size(self) -> bool:
        """Whether this activity's time grows with the VM's size (the
        benchmark report separates the fixed cost of a migration from it)."""
        return self in _VARIES_WITH_SIZE


_VARIES_WITH_SIZE = frozenset(
    {Activity.STREAMS, Activity.COMMIT, Activity.RELEASE_COPY, Activity.RESUME}
)

#: What happens between a phase and the next one journaled, for phase tables:
#: by the pair (phase, next phase), else by the phase it starts from
#: (:data:`ACTIVITY_AFTER`); a phase in neither names its own time.
ACTIVITY_BETWEEN: dict[tuple[Phase, Phase], Activity] = {
    (Phase.CONNECTED, Phase.PEER_ATTESTED): Activity.HELLO_ATTEST_DESTINATION,
    (Phase.PEER_ATTESTED, Phase.KEY_OFFERED): Activity.ATTEST_SOURCE,
    (Phase.KEY_OFFERED, Phase.STREAMING): Activity.KEY_TRANSFER,
    (Phase.ADMITTED, Phase.PEER_ATTESTED): Activity.ATTEST_BOTH,
    (Phase.PEER_ATTESTED, Phase.KEY_RECEIVED): Activity.KEY_TRANSFER,
    (Phase.KEY_RECEIVED, Phase.STREAMING): Activity.FIRST_STREAM,
    (Phase.COMMITTED, Phase.RELEASED): Activity.RELEASE_COPY,
}
ACTIVITY_AFTER: dict[Phase, Activity] = {
    Phase.STARTED: Activity.CONNECT,
    Phase.CONNECTED: Activity.HELLO,
    Phase.ADMITTED: Activity.HELLO,
    Phase.STREAMING: Activity.STREAMS,
    Phase.PREPARED: Activity.COMMIT,
    Phase.COMMITTED: Activity.RESUME,  # destination: into place and resumed
    Phase.CONTINUING: Activity.RESUME,  # destination, live: cont
    Phase.RESUMED: Activity.CONFIRM,
    Phase.RELEASED: Activity.RESUME,  # source: from giving the VM up to DONE
}


def known(name: str) -> Phase | None:
    """The phase a journaled name stands for, or None for a name this
    release does not know (a journal written by a newer one)."""
    try:
        return Phase(name)
    except ValueError:
        return None


def activity(phase: str, following: str) -> str:
    """The name of the time from journaled ``phase`` to ``following``
    (plain strings in, as a journal holds them): a phase in neither table,
    or one this release does not know, names its own time."""
    start, end = known(phase), known(following)
    if start is None:
        return phase
    if end is not None and (start, end) in ACTIVITY_BETWEEN:
        return ACTIVITY_BETWEEN[start, end]
    return ACTIVITY_AFTER.get(start, start)

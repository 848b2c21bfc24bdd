"""
What the Twisted shell may ask of this host: the typed operations of an
arrival and a departure, as :class:`typing.Protocol` classes.

:mod:`securemig.transport` carries out a session's effects; where an effect
is a rule of this host (admit a VM, accept and release its vTPM key, check
and re-seal it, prepare, commit, start a live incoming or outgoing stream)
the shell calls one operation declared here and implemented in
:mod:`securemig.host.arrival` (:class:`~securemig.host.arrival.Arrival`,
:class:`~securemig.host.arrival.DestinationHost`) or
:mod:`securemig.host.departure` (:class:`~securemig.host.departure.Departure`).
The shell keeps what is its own: connections, producers, executors and
timers; it says *which thread* an operation runs on, never what it does.

Threads: operations documented "on the disk thread" run on the connection's
disk executor, in the order the session asked; the others on the reactor
thread (where the host TPM's owner is).  Operations that wait on a
hypervisor are coroutines and never block the reactor.

A backend's live path: the key is released (:meth:`ArrivingVM.release_key`,
unwrapped in this host's TPM) before :meth:`ArrivingVM.start_incoming` gives
it to the backend, so a backend that must first hand the key to its own
manager (libvirt: define the vTPM's secret) does that inside
``start_incoming``; where the stream arrives is the arrival's
:attr:`ArrivingVM.live_socket` today, and a backend whose stream takes
several carried sockets adds an operation here, not a field the shell writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from twisted.internet.defer import Deferred

from securemig.host.journal import Journal
from securemig.hypervisor.bundle import Bundle
from securemig.protocol import wire
from securemig.protocol.effects import Finished
from securemig.protocol.phases import Phase
from securemig.protocol.recovery import SourceGuest


@dataclass(frozen=True)
class VtpmKey:
    """A vTPM's state key as released to this host, and the identity (the
    SHA-256 of its EK public area) the source announced with it; an empty
    identity: the VM has no vTPM state.  Never journaled nor logged."""

    secret: bytes
    identity: bytes

    def __repr__(self) -> str:
        # A traceback or a log line that shows this object shows no secret.
        return f"VtpmKey(identity={self.identity.hex() or None})"


class KeySealer(Protocol):
    """Seals vTPM keys to this host's TPM (an
    :class:`~securemig.trust.attestor.Attestor`)."""

    def seal(self, secret: bytes) -> bytes:
        """``secret`` sealed to this host's TPM."""
        ...


class KeyUnwrapper(Protocol):
    """Unwraps a vTPM key inside this host's TPM, in the attested state (a
    :class:`~securemig.trust.keyrelease.DestinationSecurity`)."""

    def unwrap(self, wrapped: wire.WrappedKey, migration_id: bytes) -> tuple[bytes, bytes]:
        """The vTPM key and the identity the source announced."""
        ...


class ArrivingVM(Protocol):
    """One VM arriving, as the destination's shell drives it."""

    migration_id: bytes
    #: The migration id, hex (the journal's key).
    id: str
    hello: wire.Hello
    #: Live mode: the unix socket the backend's guest takes the stream on.
    live_socket: Path | None
    #: Live mode: what :meth:`prepare` writes was made durable before the
    #: stream (then the prepare has nothing left to do).
    staged_ahead: bool

    def journal_phase(self, phase: Phase, nbytes: int) -> None:
        """Record a phase of this arrival."""
        ...

    def journal_progress(self, nbytes: int) -> None:
        """Record the bytes received so far."""
        ...

    # -- on the disk thread

    def open_stream(self, index: int, hashed: bool = True) -> None:
        """Create the staging file of image ``index``."""
        ...

    def write(self, parts: tuple[bytes | memoryview, ...]) -> int:
        """Append one chunk; returns its length."""
        ...

    def close_stream(self, sha256: bytes) -> None:
        """Make the image durable and check its digest."""
        ...

    def check_vtpm(self, key: VtpmKey) -> str | None:
        """Check the vTPM that arrived opens with ``key`` and is the one
        announced; its identity (hex), or None for a VM without one."""
        ...

    def prepare(self) -> None:
        """Write the bundle in staging and make it all durable."""
        ...

    def discard(self) -> None:
        """Remove staging and release the VM's name (released even if the
        removal fails: what is left is recovery's)."""
        ...

    # -- on the reactor thread

    def accept_key(self, key: wire.WrappedKey | wire.ClearKey, nbytes: int) -> None:
        """Keep the vTPM key that arrived (still wrapped) for its release."""
        ...

    def key_expected(self, secure: bool) -> bool:
        """Whether a vTPM key is to be released before :meth:`prepare`."""
        ...

    def release_key(self, unwrapper: KeyUnwrapper | None, *, live: bool = False) -> VtpmKey:
        """The accepted key, unwrapped inside this host's TPM (host TPM)."""
        ...

    def keep_key(self, sealer: KeySealer, key: VtpmKey, identity: str | None) -> None:
        """Re-seal the checked key to this host's TPM, for :meth:`prepare`."""
        ...

    def start_vtpm_check(self, key: VtpmKey) -> None:
        """Live mode, before the stream: start what :meth:`check_vtpm` uses
        (blocks; on the thread that will run the check)."""
        ...

    def drop_vtpm_check(self) -> None:
        """End what :meth:`start_vtpm_check` started, if no check used it."""
        ...

    def check_vtpm_beside(self, checking: Deferred[str | None]) -> None:
        """Live mode: the :meth:`check_vtpm` ``checking`` on a thread of its
        own beside PREPARED and the commit; the commit waits for it before
        the guest may run here."""
        ...

    def prepared(self, nbytes: int) -> None:
        """Journal PREPARED (staging is durable)."""
        ...

    def check_shared_disk(self, me: str) -> None:
        """Refuse to resume on a shared disk another host owns."""
        ...

    async def start_incoming(self, released: VtpmKey) -> None:
        """Live mode: start the guest paused with its released vTPM key,
        waiting for the stream at :attr:`live_socket`."""
        ...

    @property
    def carried(self) -> bool:
        """Live through the hypervisor's own migration, its sockets carried."""
        ...

    def carried_sockets(self) -> dict[str, str]:
        """Live, carried: the local sockets the carrier dials, by name."""
        ...

    @property
    def carried_connections(self) -> int:
        """Live, carried: how many connections the source's hypervisor may
        open at once on them (its carrier lets each wait beside strangers)."""
        ...

    @property
    def multifd(self) -> int:
        """Live, the backend's own stream: its multifd channels besides the
        main one (0: one stream); each is carried as its own sealed stream."""
        ...

    def loaded(self) -> None:
        """Live, carried: the hypervisor completed here (its guest paused)."""
        ...

    def incoming_started(self) -> None:
        """Live mode: the stream's receiver listens (a crash point)."""
        ...

    async def wait_loaded(self) -> None:
        """Live mode: until the guest here has loaded the whole stream."""
        ...

    async def commit(self) -> None:
        """The source committed: move the VM into place and resume it."""
        ...

    def cancel(self) -> None:
        """Make queued disk jobs do nothing; a discard follows."""
        ...

    def hold(self) -> None:
        """Keep the prepared staging in doubt for recovery."""
        ...

    def finish(self, effect: Finished, nbytes: int) -> None:
        """Journal the outcome."""
        ...


class ArrivalHost(Protocol):
    """A destination host, as its shell admits arrivals and settles RESOLVE."""

    journal: Journal

    def admit(
        self,
        hello: wire.Hello,
        peer: str,
        protocol: str,
        peer_name: str | None = None,
        *,
        keeps_keys: bool = True,
    ) -> ArrivingVM:
        """Accept a HELLO or raise a coded refusal saying why not."""
        ...

    async def resolve(
        self, message: wire.Resolve | wire.Ask, peer_name: str, protocol: str
    ) -> wire.Resolved:
        """Carry out the source's decision for one of our arrivals (RESOLVE),
        or say what this host holds of it (ASK)."""
        ...


class LeavingVM(Protocol):
    """One VM leaving this host, as the source's shell drives it."""

    id: str
    bundle: Bundle
    peer: str
    journal: Journal
    #: Whether COMMITTED is journaled here (the VM is the destination's).
    committed: bool
    #: Live, after COMMITTED: whether a copy is kept here until DONE
    #: (decided at the commit, :meth:`keeps_copy`).
    kept: bool
    #: Live mode: the guest's downtime bounded here, once DONE arrived (ms).
    guest_downtime_ms: int | None

    def live_started(self) -> bool:
        """Live mode: whether the backend's migration was started (its QEMU,
        paused after the stream, is kept after COMMITTED until DONE)."""
        ...

    def connected(self) -> None:
        """The connection is up."""
        ...

    def streaming(self, migration_id: bytes | None) -> None:
        """The destination admitted us; images (or the live stream) flow."""
        ...

    def stream_files(self) -> list[tuple[Path, int]]:
        """Paths and sizes of the images, in HELLO order."""
        ...

    def live_socket(self, tag: str) -> Path:
        """Live mode: where this host listens for its guest's stream."""
        ...

    @property
    def carried(self) -> bool:
        """Live through the hypervisor's own migration, its sockets carried."""
        ...

    def carried_sockets(self, tag: str) -> dict[str, str]:
        """Live, carried: the sockets to listen on for migration ``tag``."""
        ...

    #: Live, the backend's own stream: its multifd channels (0: one stream).
    parallel: int

    async def start_live(self, uri: str) -> None:
        """Live mode: start the guest's stream to ``uri`` while it runs."""
        ...

    async def live_sent(self) -> None:
        """Live mode: until the backend says the stream completed."""
        ...

    async def commit(self) -> None:
        """The commit point: journal COMMITTED, then give the VM up."""
        ...

    def released(self) -> Deferred[None] | None:
        """After the commit: the giving up of the VM here still under way
        (it overlaps the destination's resume), else None."""
        ...

    async def keeps_copy(self) -> bool:
        """Live, after COMMITTED: whether a copy is kept here until DONE."""
        ...

    async def live_qemu_alive(self) -> bool:
        """Live mode: whether this VM's guest process still runs here
        (asked off the reactor thread)."""
        ...

    async def guest_here(self) -> SourceGuest:
        """Live, carried: where the hypervisor says the guest is."""
        ...

    async def hand_over(self) -> None:
        """Live, after COMMITTED and DONE: end the guest here, release the VM."""
        ...

    def keep_paused(self) -> None:
        """Live, after COMMITTED, no DONE: keep the paused guest for recovery."""
        ...

    def rollback(self) -> Deferred[None]:
        """Before the commit: keep the VM here, resumed if it was running."""
        ...

    def finish(self, effect: Finished, nbytes: int, peer_settled: bool = False) -> None:
        """Journal the outcome."""
        ...

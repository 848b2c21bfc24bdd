"""
The backend contract: what securemig asks of a hypervisor, and what each
backend says it can do.

:class:`Backend` is everything the layers above ``hypervisor/`` call on a
backend; :class:`Capabilities` is what a backend can do, as data, so that
``host/``, ``transport/`` and ``app/`` ask "can it run a live arrival?"
instead of "is it QEMU?".  The registry that pairs a backend's kind with its
factory and capabilities is :mod:`securemig.hypervisor.backends`; a backend
module implements this contract and needs no import of the registry (which
imports it), so this module sits apart from it.

Operations a backend lacks (``start``, the live ones, ``live_socket``) have
default bodies here that raise :class:`Unsupported`: a backend subclasses
:class:`Backend` and overrides what its :class:`Capabilities` promise.
Callers query the capabilities first; the error is the backstop that names
the backend and the operation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred, succeed

from securemig.hypervisor.bundle import Bundle, BundleError
from securemig.protocol.recovery import SourceGuest

T = TypeVar("T")

#: The file of a live arrival's staging holding HELLO's ``backend_info``
#: (written before :meth:`Backend.live_destination`; the backend's to read
#: and rewrite).
BACKEND_INFO_FILE = "backend-info.json"

#: Defaults of a live migration's parameters (``migrate --downtime-ms``,
#: ``--bandwidth``): QEMU's downtime limit, and its bandwidth in bytes per
#: second (this one: no practical limit on loopback; a libvirt domain is
#: then left at libvirt's own).
LIVE_DOWNTIME_LIMIT_MS = 300
LIVE_MAX_BANDWIDTH = 1 << 30

#: Returns the 32-byte state key of a bundle's vTPM (unsealed by this host's TPM).
VTPMKey = Callable[[Bundle], bytes]


class Unsupported(BundleError):
    """A backend was asked for an operation its capabilities do not offer."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, as data; every CLI choice, daemon option and
    admission check is derived from these (:mod:`securemig.hypervisor.backends`)."""

    #: Suspends a running VM into its images and resumes it from them (the
    #: suspended migration); every backend so far.
    suspend: bool = True
    #: Sends a running guest's memory while it runs (``migrate --live``).
    live_source: bool = False
    #: Takes a live arrival: a guest waits paused for the stream.
    live_destination: bool = False
    #: A VM it calls ``running`` really runs a guest here (a process, a
    #: domain), rather than files whose manifest says so.
    runs_guest: bool = False
    #: ``securemig vm start`` boots a VM of this kind here.
    startable: bool = False
    #: ``securemig vm create --backend KIND`` makes one (the demo too).
    creatable: bool = False
    #: Runs the VM's vTPM (swtpm) attached to its guest; a backend without it
    #: only carries the vTPM's state as files.
    vtpm: bool = False
    #: Its ``status`` says ``running`` also of a guest waiting paused (after a
    #: live stream), and its ``resume`` continues such a guest and leaves a
    #: running one alone: recovery always asks it to resume.
    resume_continues: bool = False
    #: Its live stream is several connections to per-migration UNIX sockets
    #: (a hypervisor's RPC, memory and disk copy: libvirt's), each carried as
    #: sealed records (:mod:`securemig.transport.carried`), rather than one
    #: QEMU stream; its HELLO says what the destination needs
    #: (:meth:`Backend.live_info`), and the destination's guest is made by
    #: the hypervisor's own migration, not started by securemig.
    carried: bool = False
    #: Its own live stream (not ``carried``) may run on this many multifd
    #: channels at most (``migrate --live --parallel N``), each carried as
    #: its own sealed stream; 0: one stream only.
    multifd: int = 0
    #: Guest kinds it runs (a manifest's ``guest``).
    guests: frozenset[str] = frozenset({"firmware"})
    #: Disk image formats it accepts.
    disks: frozenset[str] = frozenset({"raw"})

    @property
    def live(self) -> bool:
        """Migrates live in both roles."""
        return self.live_source and self.live_destination


class LiveSide(Protocol):
    """One side of a live migration, as a backend started it
    (:meth:`Backend.live_source`, :meth:`Backend.live_destination`)."""

    bundle: Bundle
    #: Source: ``time.monotonic()`` just before the backend was told to
    #: migrate (its total time counts from then); None if it does not say.
    started: float | None

    async def wait(self, timeout: float = ...) -> Any:
        """Until the backend says the stream completed; its numbers."""

    async def cont(self) -> None:
        """Let the guest run here."""

    async def waits_loaded(self) -> bool:
        """Destination, after the stream: whether the guest still waits here,
        loaded and paused (False: its process has ended)."""

    async def alive_moved(self, bundle: Bundle) -> bool:
        """Destination, after the commit, its bundle moved into place at
        ``bundle`` and before CONTINUING: whether the process holding the
        loaded guest still runs, asked without a call that could block on
        the switchover path (False: it ended; the guest never ran here)."""

    async def continue_moved(self, bundle: Bundle) -> bool:
        """Destination, after the commit, its bundle moved into place at
        ``bundle``: let the guest run on the control connection held since
        the stream (no reconnect on the guest's switchover path), then let
        the connection go; True once it runs.  False: this side holds none,
        the caller resumes the VM as :meth:`Backend.resume` does."""

    async def cancel(self) -> None:
        """Source, before the commit: stop sending, the guest goes on here."""

    def abandon(self) -> Deferred[None]:
        """Destination, before the commit: end the waiting guest."""

    async def finish(self) -> None:
        """Source, after the commit: end the guest here."""

    def release(self) -> None:
        """Let go of the backend's control connection."""


def _unsupported(backend: Backend, operation: str) -> Unsupported:
    return Unsupported(f"the {backend.name} backend does not {operation}")


class Backend(Protocol):
    """What securemig needs from a hypervisor.  Every operation that waits on
    the hypervisor returns a Deferred, and none blocks the reactor thread;
    ``status`` is immediate."""

    #: The kind manifests name and the registry knows it by.
    name: str

    def suspend(self, bundle: Bundle) -> Deferred[None]:
        """Stop the VM and leave its state in the bundle's images."""
        ...

    def resume(self, bundle: Bundle) -> Deferred[None]:
        """Run the VM from the bundle's images (here, at the destination, or
        back at the source after a failed migration)."""
        ...

    def discard(self, bundle: Bundle) -> Deferred[None]:
        """Remove the VM from this host; it has moved elsewhere."""
        ...

    def discard_moved(self, bundle: Bundle, moved: str) -> Deferred[None]:
        """Remove the VM from this host once committed migration ``moved``
        (its id in hex) took it elsewhere: :meth:`discard`, and for a backend
        that copied the VM's storage in that migration, the copies left
        here too."""
        return self.discard(bundle)

    def status(self, bundle: Bundle) -> str:
        """A short word for operators: ``suspended``, ``running``, ..."""
        ...

    def start(self, bundle: Bundle) -> Deferred[None]:
        """Boot the VM (``Capabilities.startable``)."""
        raise _unsupported(self, "start VMs")

    def end(self, bundle: Bundle) -> Deferred[None]:
        """End whatever of this VM runs here (processes it started, by their
        records in the bundle's directory), without blocking the reactor
        thread; fires once they are gone.  Nothing by default."""
        return succeed(None)

    def end_blocking(self, bundle: Bundle) -> None:
        """:meth:`end`, blocking the calling thread until done: only for
        callers off the reactor thread (the disk executor's worker, the lab's
        synchronous stop).  Nothing by default."""
        return None

    def ready_blocking(self, bundle: Bundle) -> None:
        """Destination, a suspended arrival complete in staging, before
        PREPARED, blocking the calling thread (the disk executor's, never
        the reactor's): make the VM ready to resume (libvirt: restore it
        paused), so a VM this host cannot run fails before the source
        commits.  Nothing by default."""
        return None

    def live_socket(self, bundle: Bundle, tag: str = "") -> Path:
        """The unix socket of a live stream of this VM: where the
        destination's guest listens, or where securemig listens for the
        source's (``Capabilities.live_source`` / ``live_destination``);
        ``tag`` (migration id and side) makes it one migration's own."""
        raise _unsupported(self, "migrate live")

    def live_source(
        self, bundle: Bundle, uri: str, downtime_limit_ms: int, max_bandwidth: int
    ) -> Deferred[Any]:
        """Start sending the running VM to ``uri``; fires with its
        :class:`LiveSide` (``Capabilities.live_source``)."""
        raise _unsupported(self, "send live migrations")

    def live_destination(self, bundle: Bundle, tag: str = "") -> Deferred[Any]:
        """Start the VM paused, waiting for a live stream on
        :meth:`live_socket` (with ``tag``); fires with its :class:`LiveSide`
        (``Capabilities.live_destination``)."""
        raise _unsupported(self, "take live migrations")

    def live_info(self, bundle: Bundle, copy_storage: bool, parallel: int) -> Deferred[bytes]:
        """Source, before HELLO (``Capabilities.carried``, or
        ``Capabilities.multifd`` with ``parallel``): what the destination's
        backend needs to take this VM live (HELLO's ``backend_info``);
        ``copy_storage``: its disks are copied too; ``parallel``: extra
        connections (multifd channels) for the memory stream."""
        raise _unsupported(self, "migrate live over carried sockets")

    def live_channels(self, backend_info: bytes) -> int:
        """Destination, admitting a live arrival: HELLO's ``backend_info``
        checked (BundleError for a description it cannot use or, with
        ``POLICY_REFUSED``, will not), and for a backend that is not
        ``carried`` how many multifd channels its stream has besides the
        main one (``Capabilities.multifd``).  By default none may be
        described."""
        if backend_info:
            raise BundleError(f"the {self.name} backend takes no live parameters")
        return 0

    def carried_connections(self, backend_info: bytes) -> int:
        """Destination, a carried arrival (``Capabilities.carried``): how
        many connections the source's hypervisor may open at once on the
        carried sockets (HELLO's ``backend_info``, checked at admission).
        The carrier's port lets that many more connections wait for their
        first record at once, so that a burst of the hypervisor's own (a
        main channel and its multifd channels) fits beside the strangers
        it allows.  One per socket by default (``rpc``, ``memory``, ``disk``)."""
        return 3

    def carried_sockets(self, tag: str, destination: bool) -> dict[str, str]:
        """The UNIX sockets of one carried migration (``tag``: its id, the
        same on both hosts), by name (:data:`securemig.transport.carried.SOCKETS`):
        at the source where securemig listens, at the destination what it
        dials (``Capabilities.carried``)."""
        raise _unsupported(self, "migrate live over carried sockets")

    def arrived(self, bundle: Bundle) -> bool:
        """Destination, a live arrival in staging (``Capabilities.carried``):
        whether the hypervisor's own migration completed here -- its guest
        waits loaded and paused, and the source's has ended, so this copy
        is the only one and must not be discarded before the source decides.
        Blocks; False by default."""
        return False

    def moved_away(self, bundle: Bundle) -> bool:
        """Source, a live departure (``Capabilities.carried``): whether the
        hypervisor's own migration completed -- the guest left this host
        (its process here ended because it moved), so the source's recovery
        commits rather than aborts.  Blocks; False by default."""
        return False

    def guest_here(self, bundle: Bundle) -> Deferred[SourceGuest]:
        """Source, a live departure: where the hypervisor says its guest is
        (``protocol.recovery.carried_decision`` decides on it): RUNS while a
        process of it runs here, GONE otherwise; a carried backend tells
        MOVED, and UNKNOWN when its hypervisor cannot be asked.  Never
        blocks the reactor thread; never raises."""
        return succeed(SourceGuest.RUNS if self.has_process(bundle) else SourceGuest.GONE)

    def process_alive(self, bundle: Bundle) -> Deferred[bool]:
        """:meth:`has_process`, for the reactor thread: a backend whose
        answer blocks (libvirt asks its daemon) asks off it."""
        return succeed(self.has_process(bundle))

    def ask(self, question: Callable[..., T], *args: Any) -> Deferred[T]:
        """``question(*args)``, one of this backend's blocking questions
        (:meth:`arrived`, :meth:`has_process`, :meth:`status`), for the
        reactor thread: answered at once by a backend whose answers do not
        block; one whose answers block (libvirt asks its daemon) asks on
        its own thread and fails after a timeout rather than hang."""
        return maybeDeferred(question, *args)

    def console(self, bundle: Bundle) -> Path | None:
        """The file this host keeps the VM's console in (its first serial
        port, appended while it runs), for ``securemig vm console``; None
        for a backend, or a guest, that keeps none."""
        return None

    def has_process(self, bundle: Bundle) -> bool:
        """Whether a process of this VM runs here (its guest running or
        paused: continuing it needs no key); False for backends without."""
        return False

    def vtpm_attached(self, bundle: Bundle) -> bool:
        """Whether the running VM has its vTPM as a TPM device (only a
        backend with ``Capabilities.vtpm`` attaches one)."""
        return False

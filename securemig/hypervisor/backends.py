"""
Hypervisor backends: one contract, one registry.

The contract is :class:`~securemig.hypervisor.contract.Backend` (what the
layers above call) and :class:`~securemig.hypervisor.contract.Capabilities`
(what a backend can do, as data); both are re-exported here.  The registry
pairs each backend *kind* (the name a manifest records and ``--backend``
takes) with its factory and capabilities.  Everything above ``hypervisor/``
derives its choices from it: ``vm create --backend``, ``demo --backend``,
``twistd securemig --backend`` and the configuration file's ``backend`` key,
the destination's admission of an arriving VM (:func:`refusal`), recovery
(:func:`backend_for`).  Nothing above this layer names a backend.

Adding a backend is its module (a :class:`Backend`) and one :func:`register`
call, below for the shipped ones.  A backend kept outside the package (a
site's own, or the tests' toy) registers itself when its module is imported;
``SECUREMIG_BACKEND_MODULES`` (comma-separated module names) makes every
securemig process import such modules before it first asks the registry, so
a daemon started with ``--backend KIND`` knows it too.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from securemig.hypervisor.bundle import (
    MANIFEST,
    Bundle,
    BundleError,
    Manifest,
    create_image_vm,
)
from securemig.hypervisor.contract import Backend, Capabilities, LiveSide, Unsupported, VTPMKey
from securemig.hypervisor.image import ImageBackend
from securemig.hypervisor.libvirt_info import CAPABILITIES as LIBVIRT_CAPABILITIES
from securemig.hypervisor.qemu import MAX_MULTIFD_CHANNELS, QemuBackend
from securemig.hypervisor.xen import XenBackend
from securemig.protocol import wire

__all__ = [
    "DEFAULT",
    "Backend",
    "Capabilities",
    "LiveSide",
    "Unsupported",
    "backend_for",
    "capabilities",
    "create_vm",
    "end_started",
    "end_started_blocking",
    "kinds",
    "refusal",
    "register",
    "unregister",
]

#: The backend of a host that names none: a VM is its image files.
DEFAULT = "image"

#: Names modules to import (comma-separated) that register more backends.
MODULES_ENV = "SECUREMIG_BACKEND_MODULES"

#: Makes a backend; given the host's vTPM key reader (None without a TPM
#: identity), which only backends that run a vTPM use.
Factory = Callable[[VTPMKey | None], Backend]


@dataclass(frozen=True)
class Registration:
    """One backend kind: how to make it, what it can do."""

    kind: str
    factory: Factory
    capabilities: Capabilities


_REGISTRY: dict[str, Registration] = {}
_loaded_modules = False


def register(kind: str, factory: Factory, capabilities: Capabilities) -> None:
    """Make backend ``kind`` known to every command and daemon of this
    process.  Registering a kind again replaces it (a module imported twice)."""
    if not kind or not wire.BACKEND_RE.fullmatch(kind):
        # As HELLO carries it (and manifests and --backend spell it).
        raise ValueError(f"backend kind {kind!r}: a-z, then a-z, 0-9 or '_', at most 16")
    _REGISTRY[kind] = Registration(kind, factory, capabilities)


def unregister(kind: str) -> None:
    """Forget backend ``kind`` (a test's own backend, once the test ends)."""
    _REGISTRY.pop(kind, None)


def _registry() -> dict[str, Registration]:
    global _loaded_modules
    if not _loaded_modules:
        # Set first: a module that queries the registry while it is imported
        # does not import itself again.
        _loaded_modules = True
        for name in filter(None, (m.strip() for m in os.environ.get(MODULES_ENV, "").split(","))):
            importlib.import_module(name)
    return _REGISTRY


def kinds(where: Callable[[Capabilities], bool] | None = None) -> tuple[str, ...]:
    """The registered kinds, in registration order; only those whose
    capabilities satisfy ``where`` if given."""
    return tuple(r.kind for r in _registry().values() if where is None or where(r.capabilities))


def _registration(kind: str) -> Registration:
    try:
        return _registry()[kind]
    except KeyError:
        raise BundleError(f"unknown backend {kind!r}; known: {', '.join(kinds())}") from None


def capabilities(kind: str) -> Capabilities:
    """What backend ``kind`` can do; :class:`BundleError` for an unknown kind."""
    return _registration(kind).capabilities


def backend_for(kind: str, vtpm_key: VTPMKey | None = None) -> Backend:
    """The backend a manifest names.  ``vtpm_key`` returns a VM's vTPM state
    key (unsealed by this host's TPM), for backends that run the vTPM."""
    return _registration(kind).factory(vtpm_key)


def refusal(
    destination: str, kind: str, *, live: bool = False, guest: str = "", vtpm: bool = False
) -> str | None:
    """Why a destination whose backend is ``destination`` cannot run an
    arriving VM of backend ``kind`` (a sentence naming both), or None if it
    can.  ``live``: it arrives live; ``guest``: its guest kind (``""`` for
    firmware); ``vtpm``: it has a vTPM.  A kind of ``""`` (an older source
    that does not say) is not judged: it is admitted as before."""
    if not kind:
        return None
    if kind not in kinds():
        return (
            f"the VM's backend is {kind}, which this destination does not know "
            f"(its backend is {destination})"
        )
    if kind != destination:
        return (
            f"the VM's backend is {kind} and this destination's is {destination}: "
            f"it cannot run the VM (migrate it to a host whose daemon runs --backend {kind})"
        )
    caps = capabilities(destination)
    if live and not caps.live_destination:
        return f"this destination's {destination} backend takes no live migration"
    if (guest or "firmware") not in caps.guests:
        return f"this destination's {destination} backend does not run a {guest} guest"
    if vtpm and caps.runs_guest and not caps.vtpm:
        return f"this destination's {destination} backend cannot attach the VM's vTPM"
    return None


def create_vm(
    vm_dir: Path,
    name: str,
    ram_mib: int,
    *,
    kind: str = DEFAULT,
    guest: str = "firmware",
    **options: object,
) -> Bundle:
    """A new VM of backend ``kind`` (``vm create``, the lab): a suspended VM
    of random images, or, for a backend that runs guests, a stopped guest of
    ``ram_mib`` MiB; ``options`` as :func:`create_image_vm` takes them."""
    caps = capabilities(kind)
    if not caps.creatable:
        raise BundleError(
            f"VMs of the {kind} backend are not created here; "
            f"creatable: {', '.join(kinds(lambda c: c.creatable))}"
        )
    if guest not in caps.guests:
        raise BundleError(f"the {kind} backend runs {' or '.join(sorted(caps.guests))} guests")
    return create_image_vm(
        vm_dir,
        name,
        ram_mib,
        backend=kind,
        guest=guest,
        guest_vm=caps.runs_guest,
        **options,  # type: ignore[arg-type]
    )


def _started(path: Path) -> list[tuple[Backend, Bundle]]:
    """Who to ask to end what was started at ``path``: the backend its
    manifest names, or, with no readable manifest, every backend (each ends
    only what its own records there name)."""
    try:
        found: Bundle | None = Bundle.load(path) if (path / MANIFEST).exists() else None
    except BundleError:
        found = None
    if found is not None and found.manifest.backend in kinds():
        return [(backend_for(found.manifest.backend), found)]
    return [
        (backend_for(kind), Bundle(path, Manifest(name="staging", backend=kind)))
        for kind in kinds()
    ]


async def end_started(path: Path) -> None:
    """End whatever a backend started for the bundle (or staging) at
    ``path``, e.g. a live arrival's guest in staging, without blocking the
    reactor thread (:meth:`Backend.end`)."""
    for backend, bundle in _started(path):
        await backend.end(bundle)


def end_started_blocking(path: Path) -> None:
    """:func:`end_started`, blocking: only off the reactor thread
    (:meth:`Backend.end_blocking`)."""
    for backend, bundle in _started(path):
        backend.end_blocking(bundle)


def _libvirt_backend(key: VTPMKey | None) -> Backend:
    # Imported when the first libvirt backend is made, not with the
    # registry: a command or daemon that never handles a libvirt domain
    # does not pay for the module at start-up (hypervisor/libvirt_info.py).
    from securemig.hypervisor.libvirt import LibvirtBackend

    return LibvirtBackend(vtpm_key=key)


# The shipped backends.  A new one: its module, and one line here.
register("image", lambda key: ImageBackend(), Capabilities(creatable=True))
register(
    "qemu",
    lambda key: QemuBackend(vtpm_key=key),
    Capabilities(
        live_source=True,
        live_destination=True,
        runs_guest=True,
        startable=True,
        creatable=True,
        vtpm=True,
        resume_continues=True,
        multifd=MAX_MULTIFD_CHANNELS,
        guests=frozenset({"firmware", "linux"}),
    ),
)
register("xen", lambda key: XenBackend(), Capabilities(runs_guest=True))
register("libvirt", _libvirt_backend, LIBVIRT_CAPABILITIES)

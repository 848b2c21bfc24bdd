"""
Hypervisor backends behind one small interface.

The protocol and the journal use only :class:`Backend`: suspend a VM into
its images, resume it from them, discard it, and say what state it is in.
Every operation returns a Deferred, because real hypervisors (QEMU over QMP,
Xen's ``xl``) answer asynchronously.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import Deferred

from securemig.hypervisor.bundle import Bundle, BundleError
from securemig.hypervisor.image import ImageBackend
from securemig.hypervisor.libvirt import LibvirtBackend
from securemig.hypervisor.qemu import QemuBackend
from securemig.hypervisor.xen import XenBackend


class Backend(Protocol):
    """What securemig needs from a hypervisor."""

    name: str

    def suspend(self, bundle: Bundle) -> Deferred[None]:
        """Stop the VM and leave its state in the bundle's images."""

    def resume(self, bundle: Bundle) -> Deferred[None]:
        """Run the VM from the bundle's images (here, at the destination, or
        back at the source after a failed migration)."""

    def discard(self, bundle: Bundle) -> Deferred[None]:
        """Remove the VM from this host; it has moved elsewhere."""

    def status(self, bundle: Bundle) -> str:
        """A short word for operators: ``suspended``, ``running``, ..."""


def backend_for(name: str, vtpm_key: Callable[[Bundle], bytes] | None = None) -> Backend:
    """The backend a manifest names.  ``vtpm_key`` returns a VM's vTPM state
    key (unsealed by this host's TPM), for backends that run the vTPM."""

    backends: dict[str, Backend] = {
        "image": ImageBackend(),
        "qemu": QemuBackend(vtpm_key=vtpm_key),
        "xen": XenBackend(),
        "libvirt": LibvirtBackend(vtpm_key=vtpm_key),
    }
    try:
        return backends[name]
    except KeyError:
        raise BundleError(f"unknown backend {name!r}; known: {', '.join(backends)}") from None

"""
A toy third backend, for the tests only (not shipped): what a new backend
needs to be usable by ``vm create``, ``vm start``, ``migrate``, ``twistd
securemig --backend``, the configuration file and recovery -- its class and
the one :func:`~securemig.hypervisor.backends.register` call at the bottom.

A toy VM is its image files plus ``toy.log``, in which the backend writes
one line per operation and the pid of the process that did it: a test reads
there that the toy (and not the ``image`` backend) ran, and in which process
(a daemon, ``securemig migrate``, ``securemig recover``).  Other processes
import this module through ``SECUREMIG_BACKEND_MODULES=tests.hypervisor.toy``
and the toy registers at once; in the test process, which imports every test
module, the tests that use it register it for their own time only
(:func:`registered`), so the others see the shipped backends alone.
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.trial.unittest import SynchronousTestCase as TestCase

from securemig import files
from securemig.hypervisor import backends
from securemig.hypervisor.bundle import Bundle
from securemig.hypervisor.contract import Backend, Capabilities

KIND = "toy"
MODULE = __name__
LOG = "toy.log"


def operations(bundle: Bundle) -> list[tuple[str, int]]:
    """(operation, pid) of each toy operation on this VM, in order."""
    path = bundle.path / LOG
    if not path.exists():
        return []
    return [(op, int(pid)) for op, pid in (line.split() for line in path.read_text().splitlines())]


class ToyBackend(Backend):
    """Files, a state in the manifest, and a log of what was done."""

    name = KIND

    def _did(self, bundle: Bundle, operation: str, state: str | None) -> None:
        bundle.check_images()
        with open(bundle.path / LOG, "a") as log:
            log.write(f"{operation} {os.getpid()}\n")
        if state is not None:
            bundle.manifest.state = state
            bundle.save()

    def suspend(self, bundle: Bundle) -> Deferred[None]:
        """Record the suspend; the images are the VM's state already."""
        return maybeDeferred(self._did, bundle, "suspend", "suspended")

    def resume(self, bundle: Bundle) -> Deferred[None]:
        """Record the resume: the VM "runs" (its manifest says so)."""
        return maybeDeferred(self._did, bundle, "resume", "running")

    def start(self, bundle: Bundle) -> Deferred[None]:
        """Record a boot."""
        return maybeDeferred(self._did, bundle, "start", "running")

    def discard(self, bundle: Bundle) -> Deferred[None]:
        """Remove the bundle."""
        return maybeDeferred(files.remove_tree, bundle.path)

    def status(self, bundle: Bundle) -> str:
        """What the manifest says."""
        return bundle.manifest.state


def register() -> None:
    """The one registry call a new backend needs."""
    backends.register(KIND, lambda key: ToyBackend(), Capabilities(creatable=True, startable=True))


def registered(case: TestCase) -> None:
    """Register the toy for the time of test ``case``."""
    register()
    case.addCleanup(backends.unregister, KIND)


if MODULE in os.environ.get(backends.MODULES_ENV, "").split(","):
    register()

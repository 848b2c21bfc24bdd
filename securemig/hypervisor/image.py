"""The ``image`` backend: a suspended VM that is nothing but its image files.

It runs nowhere, which makes it the reference for what the protocol moves:
suspend checks the images, resume marks the bundle resumed, discard removes
it.  QEMU and Xen backends do the same with a real VM around the images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThread

from securemig import files
from securemig.hypervisor.bundle import Bundle
from securemig.hypervisor.contract import Backend

#: Runs blocking file work off the reactor thread (tests without a reactor
#: patch in ``maybeDeferred``, which runs it inline).
run_blocking: Callable[..., Deferred[Any]] = deferToThread


class ImageBackend(Backend):
    """A VM that exists only as files."""

    name = "image"

    def suspend(self, bundle: Bundle) -> Deferred[None]:
        """Already suspended; check the images are whole."""
        return maybeDeferred(bundle.check_images)

    def resume(self, bundle: Bundle) -> Deferred[None]:
        """Check the images and record the VM as resumed."""

        def run() -> None:
            bundle.check_images()
            bundle.manifest.state = "resumed"
            bundle.save()

        return maybeDeferred(run)

    def discard(self, bundle: Bundle) -> Deferred[None]:
        """Remove the bundle (not a shared disk, which the destination now owns).

        Renamed out of the way at once, its files unlinked by a detached
        remover (:func:`~securemig.files.discard_tree`): unlinking a GiB
        image takes a tenth of a second to more than half a second of the
        filesystem's time, which neither the reactor nor the command's exit
        need wait for.  On a thread all the same: the rename's fsyncs."""
        return run_blocking(files.discard_tree, bundle.path)

    def status(self, bundle: Bundle) -> str:
        """The state the manifest records."""
        return bundle.manifest.state

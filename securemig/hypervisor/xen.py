"""
The Xen backend: a VM is a Xen domain, driven through ``xl``.

- suspend: ``xl save -p DOMAIN RAM_IMAGE`` saves the domain's memory into
  the bundle's RAM image and leaves the domain *paused*, so a failed
  migration can be undone with ``xl unpause``;
- resume: at the source after a failure, ``xl unpause DOMAIN``; at a
  destination (no such domain yet), ``xl restore -p RAM_IMAGE`` then
  ``xl unpause DOMAIN``;
- discard (after the commit): ``xl destroy DOMAIN``, then the bundle goes.

``xl`` runs through Twisted's ``spawnProcess``; when it fails, its own
error output is surfaced verbatim.  The domain is named after the VM.  Xen
cannot run here, so this backend's tests run it against a stand-in ``xl``
that records its arguments (the *contract* tests).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue

from securemig import files
from securemig.hypervisor.bundle import Bundle, BundleError
from securemig.hypervisor.contract import Backend
from securemig.protocol.errors import ErrorCode, LocalFault


class XenError(LocalFault, RuntimeError):
    """``xl`` failed; the message carries its error output verbatim."""

    # The hypervisor fails where a VM is resumed or loaded (the reason says which).
    default_code = ErrorCode.RESUME_FAILED


class XenBackend(Backend):
    """Xen through ``xl`` (the path may be given, e.g. for the contract tests)."""

    name = "xen"

    def __init__(self, xl: str | None = None, reactor: Any = None) -> None:
        self.xl = xl or shutil.which("xl") or "xl"
        self.reactor = reactor

    async def _xl(self, *args: str) -> str:
        kwargs: dict[str, Any] = {"env": dict(os.environ)}
        if self.reactor is not None:
            kwargs["reactor"] = self.reactor
        out, err, code = await getProcessOutputAndValue(self.xl, args, **kwargs)
        if code != 0:
            detail = (err or out).decode(errors="replace").strip()
            raise XenError(f"xl {' '.join(args)} failed ({code}): {detail}")
        return str(out.decode(errors="replace"))

    def _exists(self, bundle: Bundle) -> bool:
        result = subprocess.run([self.xl, "domid", bundle.name], capture_output=True, check=False)
        return result.returncode == 0

    def suspend(self, bundle: Bundle) -> Deferred[None]:
        """Save the domain's memory into the RAM image, leaving it paused."""
        return Deferred.fromCoroutine(self._suspend(bundle))

    async def _suspend(self, bundle: Bundle) -> None:
        ram = bundle.image_path("ram")
        await self._xl("save", "-p", bundle.name, str(ram))
        # The image is as large as Xen made it: record its size for HELLO.
        for image in bundle.manifest.images:
            if image.name == "ram":
                image.size = ram.stat().st_size
        bundle.save()

    def resume(self, bundle: Bundle) -> Deferred[None]:
        """Unpause a paused domain (source), or restore it from the RAM image
        first (destination)."""
        return Deferred.fromCoroutine(self._resume(bundle))

    async def _resume(self, bundle: Bundle) -> None:
        if not self._exists(bundle):
            await self._xl("restore", "-p", str(bundle.image_path("ram")))
        await self._xl("unpause", bundle.name)
        bundle.manifest.state = "running"
        bundle.save()

    def discard(self, bundle: Bundle) -> Deferred[None]:
        """Destroy the (paused) domain here and remove its bundle."""
        return Deferred.fromCoroutine(self._discard(bundle))

    async def _discard(self, bundle: Bundle) -> None:
        if self._exists(bundle):
            await self._xl("destroy", bundle.name)
        files.remove_tree(bundle.path)

    def status(self, bundle: Bundle) -> str:
        """``running`` or ``paused`` from ``xl list``, ``absent`` if no domain."""
        result = subprocess.run(
            [self.xl, "list", bundle.name], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            return "absent"
        lines = result.stdout.strip().splitlines()
        if len(lines) < 2:
            raise BundleError(f"unexpected `xl list` output: {result.stdout!r}")
        state = lines[-1].split()[4] if len(lines[-1].split()) > 4 else ""
        return "paused" if "p" in state else "running"

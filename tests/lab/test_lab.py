"""The lab's own clean-up: what its hosts' daemons leave running ends with it."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from securemig.hypervisor.bundle import Bundle, Image, Manifest
from securemig.hypervisor.qemu import QemuBackend, alive, qemu_binary
from securemig.lab.lab import Lab
from tests.support.qemu import under_tcg


class LabStopTests(TestCase):
    async def test_stop_ends_a_qemu_left_in_staging(self) -> None:
        """A live arrival's QEMU in a host's staging outlives the daemon that
        started it when a run fails (seen after a failed `bench --live`):
        Lab.stop ends it, and leaves a VM's QEMU outside staging alone."""
        qemu_binary()  # fails, naming the Debian package, when QEMU is missing
        under_tcg(self)
        work = Path(self.mktemp()).absolute()
        qemu = QemuBackend(reactor)
        bundles = {}
        for where in ("dest-b/staging/0123abcd", "dest-b/vms/vm2"):
            path = work / where
            path.mkdir(parents=True)
            (path / "marker.bin").write_bytes(os.urandom(64))
            bundle = Bundle(path, Manifest(path.name, backend="qemu", images=[Image("ram", 0)]))
            bundle.save()
            self.addCleanup(qemu.end, bundle)
            await qemu.start(bundle)
            bundles[where] = int((path / "qemu.pid").read_text())
        Lab(work, lambda *_: None).stop()
        self.assertFalse(alive(bundles["dest-b/staging/0123abcd"]))
        self.assertTrue(alive(bundles["dest-b/vms/vm2"]))

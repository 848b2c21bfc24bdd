"""The QEMU backend with a real QEMU (TCG here): a running guest with a
random marker in RAM is suspended into its RAM image and resumed elsewhere
from it; the marker reads back identical."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from securemig.bundle import Bundle, Image, Manifest
from securemig.hypervisor.qemu import MARKER_ADDRESS, QemuBackend, qemu_binary


class QemuBackendTests(TestCase):
    def setUp(self) -> None:
        qemu_binary()  # fails, naming the Debian package, when QEMU is missing
        self.base = Path(self.mktemp()).absolute()
        self.qemu = QemuBackend(reactor)
        self.marker = os.urandom(4096)
        source = self.base / "source" / "vm1"
        source.mkdir(parents=True)
        (source / "marker.bin").write_bytes(self.marker)
        self.bundle = Bundle(source, Manifest("vm1", backend="qemu", images=[Image("ram", 0)]))
        self.bundle.save()
        self.addCleanup(self.qemu.end, self.bundle)

    async def read_marker(self, bundle: Bundle) -> bytes:
        monitor = await self.qemu.monitor(bundle)
        out = bundle.path / "marker.out"
        await monitor.execute(
            "pmemsave", val=MARKER_ADDRESS, size=len(self.marker), filename=str(out)
        )
        monitor.transport.loseConnection()  # type: ignore[union-attr]
        return out.read_bytes()

    async def test_suspend_and_resume_elsewhere(self) -> None:
        await self.qemu.start(self.bundle)
        self.assertEqual(self.qemu.status(self.bundle), "running")
        self.assertEqual(await self.read_marker(self.bundle), self.marker)
        await self.qemu.suspend(self.bundle)
        self.assertEqual(self.qemu.status(self.bundle), "suspended")
        ram = self.bundle.image_path("ram")
        self.assertGreater(ram.stat().st_size, 0)
        self.assertEqual(Bundle.load(self.bundle.path).manifest.images[0].size, ram.stat().st_size)
        # "Elsewhere": the images only (no marker file), as a migration delivers them.
        target = self.base / "destination" / "vm1"
        target.mkdir(parents=True)
        (target / "ram.img").write_bytes(ram.read_bytes())
        arrived = Bundle(target, Bundle.load(self.bundle.path).manifest)
        arrived.save()
        self.addCleanup(self.qemu.end, arrived)
        await self.qemu.resume(arrived)
        self.assertEqual(self.qemu.status(arrived), "running")
        self.assertEqual(await self.read_marker(arrived), self.marker)
        await self.qemu.discard(arrived)
        self.assertFalse(target.exists())

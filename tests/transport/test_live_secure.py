"""Attested live migration end to end (issue 16): a real Linux guest under
QEMU with its vTPM, a real ``twistd securemig --backend qemu`` destination
with its own swtpm host TPM, a real ``securemig migrate --live``."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import threads

from securemig.hypervisor import guest as linux_guest
from securemig.hypervisor.bundle import Bundle
from securemig.hypervisor.heartbeat import Watch
from securemig.hypervisor.qemu import QemuBackend, alive, heartbeat_path, qemu_binary
from securemig.lab import processes

from ..hypervisor.test_guest import extended
from ..hypervisor.test_qemu import under_tcg
from .test_secure import SecureBase


class LiveSecureBase(SecureBase):
    """A running Linux guest with a vTPM at source-a, dest-b running QEMU."""

    def setUp(self) -> None:
        super().setUp()
        qemu_binary()
        linux_guest.find()
        under_tcg(self)
        self.pcr16 = os.urandom(32).hex()

    def start_guest(self, dirty: int = 8) -> tuple[Bundle, Watch]:
        bundle = self.create_vm(
            "--backend", "qemu", "--guest", "linux", "--ram-mib", "128",
            "--pcr16", self.pcr16, "--dirty-mib-s", str(dirty), "--wss-mib", "16",
        )  # fmt: skip
        self.addCleanup(QemuBackend().end, bundle)
        result = processes.securemig(
            "vm", "start", "vm1", "--dir", str(self.vm_dir), "--identity", str(self.src_id)
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        watch = Watch(heartbeat_path(bundle))
        self.addCleanup(watch.stop)
        return bundle, watch

    def arrived(self, destination: processes.Destination) -> Bundle:
        path = destination.state_dir / "vms" / "vm1"
        bundle = Bundle(path, Bundle.load(self.vm_dir / "vm1").manifest)
        self.addCleanup(QemuBackend().end, bundle)
        return bundle

    def migrate_live(self, destination: processes.Destination, *extra: str) -> Any:
        return self.migrate(destination, "--live", "--tofu", *extra)


class LiveSecureMigrationTests(LiveSecureBase):
    async def test_live_migration_keeps_guest_running_and_its_vtpm(self) -> None:
        """Attested both ways, the key released, QEMU's stream in records:
        the guest's heartbeat goes on at the destination in sequence (no
        reboot), its PCR 16 is the value it extended (the vTPM moved), no
        QEMU of it is left at the source, and --json says live with QEMU's
        downtime."""
        destination = self.start_destination("--tofu", "--backend", "qemu")
        bundle, watch = self.start_guest()
        first = await threads.deferToThread(watch.wait, 5, 120.0)
        self.assertEqual(first.pcr16, extended(self.pcr16))
        arrived = self.arrived(destination)
        watch.follow(heartbeat_path(arrived))
        source_pid = int((bundle.path / "qemu.pid").read_text())
        result = await threads.deferToThread(self.migrate_live, destination)
        self.assertEqual(result.returncode, 0, result.stderr + destination.log()[-3000:])
        summary = json.loads(result.stdout)
        self.assertEqual((summary["outcome"], summary["mode"]), ("done", "live"))
        self.assertGreater(summary["transferred"], 16 << 20)
        self.assertIsInstance(summary["downtime_ms"], int)
        last = await threads.deferToThread(watch.wait, 5, 60.0, 1)
        self.assertEqual(last.pcr16, extended(self.pcr16))
        self.assertTrue(watch.continuous(), [b.seq for b in watch.beats])
        self.assertFalse(alive(source_pid))
        self.assertFalse(bundle.path.exists())
        self.assertEqual(QemuBackend().status(arrived), "running")
        self.assertNoUnhandledError(destination)

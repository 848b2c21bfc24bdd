"""The live QEMU tests' base (tests/transport/test_live_secure.py,
test_live_multifd.py): a running Linux guest with a vTPM at source-a,
dest-b running QEMU."""

from __future__ import annotations

import os
from typing import Any

from securemig.hypervisor import guest as linux_guest
from securemig.hypervisor.bundle import Bundle
from securemig.hypervisor.heartbeat import Watch
from securemig.hypervisor.qemu import QemuBackend, heartbeat_path, qemu_binary
from securemig.lab import processes
from tests.support.qemu import under_tcg
from tests.support.secure import SecureBase


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
        # Kept (in the test's temporary directory) whatever happens to the bundles.
        self.addCleanup(watch.save, self.base / "consoles")
        return bundle, watch

    def arrived(self, destination: processes.Destination) -> Bundle:
        path = destination.state_dir / "vms" / "vm1"
        bundle = Bundle(path, Bundle.load(self.vm_dir / "vm1").manifest)
        self.addCleanup(QemuBackend().end, bundle)
        return bundle

    def migrate_live(self, destination: processes.Destination, *extra: str) -> Any:
        return self.migrate(destination, "--live", "--tofu", *extra)

"""The lab's own clean-up: what its hosts' daemons leave running ends with it,
and what it puts on the machine goes with it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from securemig import runtime
from securemig.hypervisor.bundle import Bundle, Image, Manifest
from securemig.hypervisor.qemu import QemuBackend, alive, qemu_binary
from securemig.lab import processes
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


class LabLeftoverTests(TestCase):
    timeout = 240

    def test_demo_leaves_the_temporary_directory_as_it_was(self) -> None:
        """``securemig demo`` with no TPM lock directory chosen: its lab's
        TPM lock files are in the lab's run directory and its daemons'
        runtime directories in their state directories, all removed with
        the lab; nothing is left in the temporary directory (one lock file
        per host TPM stayed there per run)."""
        tmp = Path(tempfile.mkdtemp(prefix="smdl-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        env = {k: v for k, v in os.environ.items() if k != runtime.TPM_LOCK_ENV}
        env["TMPDIR"] = str(tmp)
        result = processes.securemig("demo", "--json", "--size-mib", "4", env=env)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertEqual(sorted(p.name for p in tmp.iterdir()), [])

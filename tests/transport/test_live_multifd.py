"""Attested live migration on QEMU multifd channels (issue 22, item 3):
``securemig migrate --live --parallel N`` with a real Linux guest, a real
``twistd securemig --backend qemu`` destination and both QEMUs told to
use multifd; each channel is its own sealed stream (the carried sockets'
machinery; its hostile cases are in ``tests/transport/test_carried.py``)."""

from __future__ import annotations

import json

from twisted.internet import threads

from securemig.hypervisor.qemu import QemuBackend, alive, heartbeat_path
from tests.support.qemu import extended
from tests.transport.test_live_secure import LiveSecureBase


class LiveMultifdTests(LiveSecureBase):
    async def test_parallel_two_keeps_guest_running_on_multifd(self) -> None:
        """--parallel 2: QEMU says it sent the guest's pages on its multifd
        channels (a QEMU told nothing, or a carrier that lets only one
        connection through, sends none or fails); the heartbeat goes on at
        the destination in sequence, PCR 16 is the value it extended, and
        the source's QEMU is gone."""
        destination = self.start_destination("--tofu", "--backend", "qemu")
        bundle, watch = self.start_guest()
        first = await threads.deferToThread(watch.wait, 5, 120.0)
        self.assertEqual(first.pcr16, extended(self.pcr16))
        arrived = self.arrived(destination)
        watch.follow(heartbeat_path(arrived))
        source_pid = int((bundle.path / "qemu.pid").read_text())
        result = await threads.deferToThread(self.migrate_live, destination, "--parallel", "2")
        self.assertEqual(result.returncode, 0, result.stderr + destination.log()[-3000:])
        summary = json.loads(result.stdout)
        self.assertEqual((summary["outcome"], summary["mode"]), ("done", "live"))
        # The guest's RAM went mostly over the multifd channels.
        self.assertGreater(summary["multifd_bytes"], 16 << 20)
        last = await threads.deferToThread(watch.wait, 5, 60.0, 1)
        self.assertEqual(last.pcr16, extended(self.pcr16))
        self.assertTrue(watch.continuous(), [b.seq for b in watch.beats])
        self.assertFalse(alive(source_pid))
        self.assertEqual(QemuBackend().status(arrived), "running")
        self.assertNoUnhandledError(destination)

    async def test_parallel_beyond_bound_refused_before_anything_moves(self) -> None:
        """--parallel 9 (QEMU takes 1 to 8): refused at the source before
        HELLO; the guest runs on there, unlocked."""
        destination = self.start_destination("--tofu", "--backend", "qemu")
        bundle, watch = self.start_guest()
        await threads.deferToThread(watch.wait, 2, 120.0)
        result = await threads.deferToThread(self.migrate_live, destination, "--parallel", "9")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("1 to 8 multifd channels", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(QemuBackend().status(bundle), "running")

"""Live migration of the running Linux guest between two real QEMUs (TCG
here) through securemig's relay: the guest keeps running through the
pre-copy, its heartbeat continues without a restart and its vTPM (PCR 16)
moves; a stream broken mid-pre-copy leaves it running at the source."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from securemig.hypervisor import guest as linux_guest
from securemig.hypervisor import qemu
from securemig.hypervisor.bundle import Bundle
from securemig.hypervisor.heartbeat import Watch
from securemig.hypervisor.qemu import (
    QemuBackend,
    QemuError,
    heartbeat_path,
    live_socket,
    qemu_binary,
)
from securemig.protocol import records
from securemig.transport.live import LIVE_RECORD_PLAINTEXT, LiveReceiver, LiveSender
from tests.support.qemu import extended, linux_bundle, under_tcg
from tests.support.relay import Relay


class LiveMigrationTests(TestCase):
    """A running Linux guest dirtying memory, live-migrated to a second
    QEMU whose swtpm has the same state key (as the released key gives it)."""

    def setUp(self) -> None:
        qemu_binary()
        linux_guest.find()
        under_tcg(self)
        self.base = Path(self.mktemp()).absolute()
        self.key = os.urandom(32)
        self.pcr16 = os.urandom(32).hex()
        self.source = linux_bundle(self.base / "src" / "vm1", self.key, self.pcr16, dirty=16)
        self.destination = Bundle(self.base / "dst" / "vm1", self.source.manifest)
        self.destination.path.mkdir(parents=True)
        self.destination.save()
        self.qemu = QemuBackend(reactor, vtpm_key=lambda bundle: self.key)
        self.addCleanup(self.qemu.end, self.source)
        self.addCleanup(self.qemu.end, self.destination)

    async def boot(self) -> Watch:
        await self.qemu.start(self.source)
        watch = Watch(heartbeat_path(self.source))
        self.addCleanup(watch.stop)
        await threads.deferToThread(watch.wait, 5, 90.0)
        return watch

    def relay(self) -> tuple[Relay, str]:
        listen = str(live_socket(self.source))
        live_socket(self.source).unlink(missing_ok=True)
        relay = Relay(reactor, listen, str(live_socket(self.destination)))
        self.addCleanup(relay.cut)
        return relay, f"unix:{listen}"

    async def test_live_migration_keeps_guest_running_and_vtpm(self) -> None:
        """Through the pre-copy the source guest keeps beating; at the end
        QEMU says completed with the source in postmigrate and the
        destination paused; after cont there the heartbeat continues the
        source's sequence, PCR 16 is the value the guest extended, and the
        largest gap the host saw is QEMU's downtime plus the switch."""
        watch = await self.boot()
        incoming = await self.qemu.live_destination(self.destination)
        watch.follow(heartbeat_path(self.destination))
        relay, uri = self.relay()
        outgoing = await self.qemu.live_source(self.source, uri, downtime_limit_ms=100)
        stats = await outgoing.wait()
        self.assertEqual(await outgoing.run_state(), "postmigrate")
        await incoming.wait()
        self.assertEqual(await incoming.run_state(), "paused")
        await incoming.cont()
        await outgoing.finish()
        incoming.release()
        last = await threads.deferToThread(watch.wait, 5, 60.0, 1)
        self.assertTrue(watch.continuous(), [b.seq for b in watch.beats])
        self.assertEqual(last.pcr16, extended(self.pcr16))
        self.assertIsNone(self.qemu._pid(self.source))
        self.assertEqual(self.qemu.status(self.destination), "running")
        self.assertGreater(relay.relayed, 16 << 20)
        self.assertGreaterEqual(stats.transferred, 16 << 20)
        self.assertGreater(stats.iterations, 0)
        # The guest saw at least QEMU's downtime, and far less than a suspend's.
        self.assertGreaterEqual(watch.largest_gap_ms() + 25, stats.downtime_ms)
        self.assertLess(watch.largest_gap_ms(), 5000)

    async def test_completion_wakes_the_wait(self) -> None:
        """Both sides learn of the completion from QEMU's MIGRATION event,
        not at the next poll: with polls a minute apart the destination's
        wait still returns within a second of the source's (its stream
        completed: the switchover path waits for no poll)."""
        self.patch(qemu, "LIVE_POLL", 60.0)
        await self.boot()
        incoming = await self.qemu.live_destination(self.destination)
        _, uri = self.relay()
        outgoing = await self.qemu.live_source(self.source, uri, downtime_limit_ms=100)
        waited = Deferred.fromCoroutine(incoming.wait())
        await outgoing.wait()
        sent = time.monotonic()
        await waited
        self.assertLess(time.monotonic() - sent, 1.0)
        self.assertEqual(await incoming.run_state(), "paused")
        await incoming.cont()
        await outgoing.finish()
        incoming.release()

    def sealed(
        self, receiver_key: bytes | None = None, accept_timeout: float = 30.0, stranger: bytes = b""
    ) -> tuple[LiveSender, LiveReceiver, str]:
        """The sealed stream: the source's QEMU -> records on loopback TCP ->
        the destination's QEMU, both ends keyed as one session's would be."""
        cipher, key, migration_id = "TLS_AES_128_GCM_SHA256", os.urandom(16), os.urandom(16)
        receiver = LiveReceiver(
            reactor,
            str(live_socket(self.destination)),
            lambda: records.Opener(
                cipher, receiver_key or key, migration_id, LIVE_RECORD_PLAINTEXT
            ),
            accept_timeout=accept_timeout,
        )
        self.addCleanup(receiver.cut)
        if stranger:
            # Connected and sent before the sender exists: accepted first.
            s = socket.create_connection(receiver.address)
            self.addCleanup(s.close)
            s.sendall(stranger)
        live_socket(self.source).unlink(missing_ok=True)
        sender = LiveSender(
            reactor,
            str(live_socket(self.source)),
            *receiver.address,
            records.Sealer(cipher, key, migration_id),
        )
        self.addCleanup(sender.cut)
        return sender, receiver, f"unix:{live_socket(self.source)}"

    async def test_sealed_live_migration(self) -> None:
        """The same through AEAD records: every byte QEMU sent reached the
        destination's QEMU, which runs the guest on in sequence, PCR 16 kept."""
        watch = await self.boot()
        incoming = await self.qemu.live_destination(self.destination)
        watch.follow(heartbeat_path(self.destination))
        sender, receiver, uri = self.sealed()
        outgoing = await self.qemu.live_source(self.source, uri, downtime_limit_ms=100)
        stats = await outgoing.wait()
        await incoming.wait()
        await incoming.cont()
        await outgoing.finish()
        incoming.release()
        await receiver.done
        self.assertIsNone(receiver.error)
        self.assertEqual(receiver.delivered, sender.sent)
        self.assertGreaterEqual(sender.sent, stats.transferred)
        last = await threads.deferToThread(watch.wait, 5, 60.0, 1)
        self.assertTrue(watch.continuous(), [b.seq for b in watch.beats])
        self.assertEqual(last.pcr16, extended(self.pcr16))

    async def test_stranger_first_on_the_live_port(self) -> None:
        """A stranger connects to the destination's live port before the
        source and sends a well-formed record under another key: it is
        closed, the port listens on, and the source's stream that follows
        migrates the guest, every byte delivered, none of the stranger's."""
        watch = await self.boot()
        incoming = await self.qemu.live_destination(self.destination)
        watch.follow(heartbeat_path(self.destination))
        forged = b"".join(
            records.Sealer("TLS_AES_128_GCM_SHA256", os.urandom(16), os.urandom(16)).seal([b""])
        )
        sender, receiver, uri = self.sealed(stranger=forged)
        outgoing = await self.qemu.live_source(self.source, uri, downtime_limit_ms=100)
        await outgoing.wait()
        await incoming.wait()
        await incoming.cont()
        await outgoing.finish()
        incoming.release()
        await receiver.done
        self.assertIsNone(receiver.error)
        self.assertEqual(receiver.strangers_closed, 1)
        self.assertIn("does not authenticate", str(receiver.last_refusal))
        self.assertEqual(receiver.delivered, sender.sent)
        last = await threads.deferToThread(watch.wait, 5, 60.0, 1)
        self.assertTrue(watch.continuous(), [b.seq for b in watch.beats])
        self.assertEqual(last.pcr16, extended(self.pcr16))

    async def test_records_of_another_key_never_reach_qemu(self) -> None:
        """A destination whose key is not this session's (a stream altered,
        replayed or from another session) refuses the first record: not a
        byte reaches its QEMU, QEMU's migration fails and the source's
        guest, never paused, goes on in sequence after ``cancel``."""
        watch = await self.boot()
        incoming = await self.qemu.live_destination(self.destination)
        _, receiver, uri = self.sealed(receiver_key=os.urandom(16), accept_timeout=5.0)
        outgoing = await self.qemu.live_source(self.source, uri)
        with self.assertRaises(QemuError):
            await outgoing.wait()
        await receiver.done
        self.assertIn("does not authenticate", str(receiver.error))
        self.assertEqual(receiver.strangers_closed, 1)
        self.assertEqual(receiver.delivered, 0)
        await incoming.abandon()
        await outgoing.cancel()
        outgoing.release()
        await threads.deferToThread(watch.wait, 5, 30.0)
        self.assertTrue(watch.continuous(), [b.seq for b in watch.beats])

    async def test_cut_mid_precopy_guest_stays_at_source(self) -> None:
        """The stream breaks while pre-copy runs (the destination gone):
        QEMU says failed, the source guest never stopped and goes on
        beating in sequence, and the destination's QEMU is ended."""
        watch = await self.boot()
        incoming = await self.qemu.live_destination(self.destination)
        relay, uri = self.relay()
        # A slow stream: the pre-copy is still running when it is cut.
        outgoing = await self.qemu.live_source(self.source, uri, max_bandwidth=4 << 20)
        while relay.relayed < 2 << 20:
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(await outgoing.run_state(), "running")
        os.kill(self.qemu._pid(self.destination) or 0, 9)
        with self.assertRaises(QemuError):
            await outgoing.wait()
        await incoming.abandon()
        await outgoing.cancel()
        self.assertEqual(await outgoing.run_state(), "running")
        outgoing.release()
        before = len(watch.beats)
        await threads.deferToThread(watch.wait, 5, 30.0)
        self.assertGreater(len(watch.beats), before)
        self.assertTrue(watch.continuous(), [b.seq for b in watch.beats])
        self.assertIsNone(self.qemu._pid(self.destination))

"""The Linux guest: its initramfs writer, and the guest itself booted under
real QEMU with its vTPM (PCR 16 extended from the command line, the
heartbeat read at the host, both kept across a suspend and resume
elsewhere)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from twisted.internet import reactor, threads
from twisted.trial.unittest import SynchronousTestCase, TestCase

from securemig.hypervisor import guest as linux_guest
from securemig.hypervisor.bundle import Bundle, Image, Manifest, image_file
from securemig.hypervisor.heartbeat import GuestPanic, Watch
from securemig.hypervisor.qemu import QemuBackend, alive, heartbeat_path, qemu_binary
from securemig.trust import vtpm
from tests.support.qemu import extended, linux_bundle, under_tcg


def read_cpio(archive: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, rdev) of a newc archive, as the kernel reads it."""
    members = {}
    offset = 0
    while True:
        assert archive[offset : offset + 6] == b"070701", offset
        fields = [int(archive[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        start = offset + 110
        name = archive[start : start + namesize - 1].decode()
        data_at = start + namesize + (-(110 + namesize) % 4)
        data = archive[data_at : data_at + filesize]
        offset = data_at + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            assert offset == len(archive)
            return members
        members[name] = (fields[1], data, (fields[9], fields[10]))


class CpioTests(SynchronousTestCase):
    def test_newc_round_trip(self) -> None:
        """Every member reads back (name, mode, data, device numbers) over
        names and sizes that need each padding; the same members in
        another order give the same bytes (deterministic)."""
        entries = [
            linux_guest.Entry("init", 0o100755, b"#!/bin/sh\n"),
            linux_guest.Entry("bin", 0o040755),
            linux_guest.Entry("bin/sh", 0o120777, b"busybox"),
            linux_guest.Entry("dev/console", 0o020600, rdev=(5, 1)),
            linux_guest.Entry("a" * 7, 0o100644, os.urandom(1001)),
        ]
        archive = linux_guest.write_cpio(entries)
        self.assertEqual(archive, linux_guest.write_cpio(list(reversed(entries))))
        members = read_cpio(archive)
        self.assertEqual(
            members, {e.name: (e.mode, e.data, e.rdev) for e in entries}, "members differ"
        )

    def test_built_guest_is_cached(self) -> None:
        """A built guest is not rebuilt: build() on it touches nothing."""
        built = linux_guest.find()
        before = built.initrd.stat().st_mtime_ns, built.kernel.stat().st_mtime_ns
        self.assertEqual(linux_guest.build(built.kernel.parent), built)
        self.assertEqual((built.initrd.stat().st_mtime_ns, built.kernel.stat().st_mtime_ns), before)
        members = read_cpio(built.initrd.read_bytes())
        self.assertEqual(members["init"][1], linux_guest.INIT.encode())
        self.assertEqual(members["dev/console"][2], (5, 1))

    def test_cmdline_refuses_bad_pcr_value(self) -> None:
        """Only 32 bytes in hex reach the guest's command line."""
        with self.assertRaises(linux_guest.GuestError):
            linux_guest.cmdline("ab" * 31)
        with self.assertRaises(linux_guest.GuestError):
            linux_guest.cmdline("x" * 64)


class LinuxGuestTests(TestCase):
    """The Linux guest under real QEMU (TCG) with its swtpm vTPM."""

    def setUp(self) -> None:
        qemu_binary()
        linux_guest.find()  # fails, saying how to build it, when it is not built
        under_tcg(self)
        self.base = Path(self.mktemp()).absolute()
        self.key = os.urandom(32)
        self.pcr16 = os.urandom(32).hex()
        self.bundle = linux_bundle(self.base / "src" / "vm1", self.key, self.pcr16, dirty=4)
        self.qemu = QemuBackend(reactor, vtpm_key=lambda bundle: self.key)
        self.addCleanup(self.qemu.end, self.bundle)

    async def test_boots_uses_vtpm_and_survives_suspend_resume(self) -> None:
        """The guest extends PCR 16 with the command line's value (read back
        through sysfs in every heartbeat); after a suspend and a resume in
        another directory its heartbeat goes on from the next number, with
        the same PCR 16: the same guest and the same vTPM, no reboot."""
        await self.qemu.start(self.bundle)
        watch = Watch(heartbeat_path(self.bundle))
        self.addCleanup(watch.stop)
        first = await threads.deferToThread(watch.wait, 5, 90.0)
        self.assertEqual(first.pcr16, extended(self.pcr16))
        await self.qemu.suspend(self.bundle)
        target = self.base / "dst" / "vm1"
        (target / vtpm.STATE_DIR).mkdir(parents=True)
        for image in ("ram", "vtpm"):
            shutil.copyfile(self.bundle.image_path(image), target / image_file(image))
        arrived = Bundle(target, Bundle.load(self.bundle.path).manifest)
        arrived.save()
        self.addCleanup(self.qemu.end, arrived)
        watch.follow(heartbeat_path(arrived))
        await self.qemu.resume(arrived)
        last = await threads.deferToThread(watch.wait, 5, 60.0, 1)
        self.assertEqual(last.pcr16, extended(self.pcr16))
        self.assertTrue(watch.continuous(), [b.seq for b in watch.beats])
        self.assertGreater(last.seq, first.seq)

    async def test_panic_is_reported_as_a_panic(self) -> None:
        """A guest kernel panic (here an NMI with ``unknown_nmi_panic=1``)
        ends its QEMU (``-no-reboot``) instead of booting the guest again, so
        it never passes for a restart (heartbeat from 1); waiting for a
        heartbeat says it panicked, from its console, kept by the watch."""
        self.bundle.manifest.guest_cmdline = (
            f"{self.bundle.manifest.guest_cmdline or linux_guest.cmdline()} unknown_nmi_panic=1"
        )
        self.bundle.save()
        await self.qemu.start(self.bundle)
        watch = Watch(heartbeat_path(self.bundle))
        self.addCleanup(watch.stop)
        await threads.deferToThread(watch.wait, 3, 90.0)
        pid = self.qemu._pid(self.bundle)
        assert pid is not None
        self.qemu.query(self.bundle, "inject-nmi")
        with self.assertRaises(GuestPanic) as raised:
            await threads.deferToThread(watch.wait, 1, 20.0)
        self.assertIn("Kernel panic", str(raised.exception))
        self.assertFalse(alive(pid))
        self.assertTrue(watch.continuous(), [b.seq for b in watch.beats])
        self.assertIsNotNone(watch.panic())


class LinuxGuestMigrationTests(TestCase):
    """The Linux guest moved by `securemig migrate` (suspended, insecure)
    to a real `twistd securemig --backend qemu`: HELLO carries its guest
    kind and command line, so the destination's QEMU starts it as the
    source's did."""

    def setUp(self) -> None:
        from securemig.lab import processes

        qemu_binary()
        linux_guest.find()
        under_tcg(self)
        self.base = Path(self.mktemp()).absolute()
        self.vm_dir = self.base / "src"
        path = self.vm_dir / "vm1"
        path.mkdir(parents=True)
        manifest = Manifest(
            "vm1",
            "qemu",
            [Image("ram", 0)],
            memory_mib=96,
            state="stopped",
            guest="linux",
            guest_cmdline=linux_guest.cmdline(dirty_mib_s=2, wss_mib=8),
        )
        self.bundle = Bundle(path, manifest)
        self.bundle.save()
        self.qemu = QemuBackend(reactor)
        self.addCleanup(self.qemu.end, self.bundle)
        self.destination = processes.start_destination(self.base / "dst", "--backend", "qemu")
        self.addCleanup(self.destination.stop)
        self.arrived = Bundle(self.base / "dst" / "vms" / "vm1", manifest)
        self.addCleanup(self.qemu.end, self.arrived)

    async def test_heartbeat_goes_on_at_destination(self) -> None:
        """After the migration the heartbeat comes from the destination's
        QEMU and continues the source's sequence (no reboot)."""
        from tests.support.commands import migrate_vm

        await self.qemu.start(self.bundle)
        watch = Watch(heartbeat_path(self.bundle))
        self.addCleanup(watch.stop)
        await threads.deferToThread(watch.wait, 3, 90.0)
        watch.follow(heartbeat_path(self.arrived))
        result = await threads.deferToThread(
            migrate_vm, self.vm_dir, self.destination.address, "--insecure"
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        await threads.deferToThread(watch.wait, 3, 60.0, 1)
        self.assertTrue(watch.continuous(), [b.seq for b in watch.beats])
        self.assertEqual(
            Bundle.load(self.arrived.path).manifest.guest_cmdline,
            self.bundle.manifest.guest_cmdline,
        )

    def test_cli_refuses_a_linux_guest_that_cannot_fit(self) -> None:
        """`vm create --guest linux`: too little RAM for its working set, or
        not the qemu backend: a usage error (2), one line, nothing made."""
        from securemig.lab import processes

        for extra in (("--backend", "qemu", "--ram-mib", "40"), ("--ram-mib", "256")):
            result = processes.securemig(
                "vm", "create", "vmx", "--dir", str(self.base / "cli"), "--guest", "linux", *extra
            )
            self.assertEqual(result.returncode, 2, result.stderr)
            self.assertNotIn("Traceback", result.stderr)
            self.assertFalse((self.base / "cli" / "vmx").exists())


class WatchFileTests(SynchronousTestCase):
    def watched(self, first: bytes) -> tuple[Path, Watch]:
        """A ``heartbeat.log`` holding ``first`` in a fresh directory, and
        a watch of it (read from its end on)."""
        base = Path(self.mktemp())
        base.mkdir()
        path = base / "heartbeat.log"
        path.write_bytes(first)
        watch = Watch(path)
        self.addCleanup(watch.stop)
        return path, watch

    def until(self, watch: Watch, seq: int) -> None:
        deadline = time.monotonic() + 10
        while seq not in [b.seq for b in watch.beats]:
            if time.monotonic() > deadline:
                self.fail(f"beat {seq} not seen: {[b.seq for b in watch.beats]}")
            time.sleep(0.01)

    def test_beats_written_before_a_rename_aside_are_seen(self) -> None:
        """A migrated-away bundle is renamed aside and removed right after
        the commit; beats its QEMU wrote just before, which the watch had
        not read yet (a loaded machine), are still seen: no false gap in
        the sequence.  A file made again at the same path (a QEMU started
        again) is then followed from its start."""
        path, watch = self.watched(b"hb 1 none\n")
        base = path.parent
        with open(path, "ab") as qemu:
            qemu.write(b"hb 2 none\n")
            qemu.flush()
            self.until(watch, 2)
            with watch._lock:  # the watch does not look meanwhile
                qemu.write(b"hb 3 none\nhb 4 none\n")
                qemu.flush()
                path.rename(base / "aside.log")
                (base / "aside.log").unlink()
        self.until(watch, 4)
        path.write_bytes(b"hb 5 none\n")
        self.until(watch, 5)
        self.assertEqual([b.seq for b in watch.beats], [2, 3, 4, 5])
        self.assertTrue(watch.continuous())

    def test_consoles_kept_beside_either_heartbeat_file(self) -> None:
        """The console the watch keeps (and a failed test saves) is found
        beside a QEMU bundle's ``heartbeat.log`` and beside a lab libvirt
        domain's ``NAME-heartbeat.log``; a panic in either is told."""
        base = Path(self.mktemp())
        base.mkdir()
        qemu, libvirt = base / "heartbeat.log", base / "lvc2-heartbeat.log"
        (base / "console.log").write_bytes(b"booted\n")
        (base / "lvc2-console.log").write_bytes(b"Kernel panic - not syncing: test\n")
        for path in (qemu, libvirt):
            path.write_bytes(b"hb 1 none\n")
        watch = Watch(qemu, libvirt)
        self.addCleanup(watch.stop)
        self.assertEqual(set(watch.consoles()), {base / "console.log", base / "lvc2-console.log"})
        self.assertEqual(watch.panic(), "Kernel panic - not syncing: test")
        watch.save(base / "kept")
        self.assertEqual(len(list((base / "kept").iterdir())), 2)

    def test_breaks_say_where_the_sequence_broke(self) -> None:
        """A lost beat, a repeated one and a restart are each a break, in
        order; a sequence that goes up by one has none."""
        path, watch = self.watched(b"")
        with open(path, "ab") as qemu:
            qemu.write(b"".join(b"hb %d none\n" % n for n in (1, 2, 4, 4, 1, 2, 3)))
        self.until(watch, 3)
        self.assertEqual(watch.breaks(), [(2, 4), (4, 4), (4, 1)])
        self.assertFalse(watch.continuous())
        with open(path, "ab") as qemu:
            qemu.write(b"hb 4 none\n")
        self.until(watch, 4)
        self.assertEqual(len(watch.breaks()), 3)  # going on by one adds none

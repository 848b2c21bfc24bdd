"""The QEMU backend with a real QEMU (TCG here): a running guest with a
random marker in RAM is suspended into its RAM image and resumed elsewhere
from it; the marker reads back identical."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.task import LoopingCall, deferLater
from twisted.trial.unittest import TestCase

from securemig.hypervisor import qmp
from securemig.hypervisor.bundle import Bundle, Image, Manifest, image_file
from securemig.hypervisor.qemu import (
    MARKER_ADDRESS,
    QemuBackend,
    QemuError,
    alive,
    qemu_binary,
)
from securemig.trust import vtpm
from securemig.trust.tpm import swtpm
from securemig.trust.tpm.tpm import TPM
from tests.support.commands import migrate_vm
from tests.support.qemu import under_tcg


async def read_marker(qemu: QemuBackend, bundle: Bundle, size: int, scratch: Path) -> bytes:
    """The guest-physical bytes where the marker was loaded (QMP pmemsave)."""
    monitor = await qemu.monitor(bundle)
    out = scratch / f"marker-{os.urandom(4).hex()}"
    await monitor.execute("pmemsave", val=MARKER_ADDRESS, size=size, filename=str(out))
    monitor.transport.loseConnection()  # type: ignore[union-attr]
    return out.read_bytes()


class QemuBackendTests(TestCase):
    def setUp(self) -> None:
        qemu_binary()  # fails, naming the Debian package, when QEMU is missing
        under_tcg(self)
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
        return await read_marker(self.qemu, bundle, len(self.marker), self.base)

    async def test_suspend_and_resume_elsewhere(self) -> None:
        await self.qemu.start(self.bundle)
        self.assertEqual(self.qemu.status(self.bundle), "running")
        pid = (self.bundle.path / "qemu.pid").read_text().strip()
        self.assertIn(b"\0tcg\0", Path(f"/proc/{pid}/cmdline").read_bytes())
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

    async def test_qmp_errors_from_a_real_qemu(self) -> None:
        """QEMU's error class reaches both clients: the Twisted one raises
        ExecuteError, the blocking one (through the backend) QemuError
        caused by it; after QEMU quits, a command is Interrupted."""
        await self.qemu.start(self.bundle)
        monitor = await self.qemu.monitor(self.bundle)
        with self.assertRaises(qmp.ExecuteError) as raised:
            await monitor.execute("no-such-command")
        self.assertEqual(raised.exception.error_class, "CommandNotFound")
        monitor.transport.loseConnection()  # type: ignore[union-attr]
        await monitor.closed
        with self.assertRaises(QemuError) as blocking:
            self.qemu.query(self.bundle, "no-such-command")
        cause = blocking.exception.__cause__
        assert isinstance(cause, qmp.ExecuteError)
        self.assertEqual(cause.error_class, "CommandNotFound")
        self.assertEqual(self.qemu.query(self.bundle, "query-status")["status"], "running")
        monitor = await self.qemu.monitor(self.bundle)
        quitting = monitor.execute("quit")
        await monitor.closed
        with contextlib.suppress(qmp.Interrupted):  # QEMU may close before its reply
            await quitting
        with self.assertRaises(qmp.Interrupted):
            await monitor.execute("query-status")

    async def _ending(self, bundle: Bundle) -> tuple[float, float]:
        """End ``bundle``'s QEMU while a 10 ms LoopingCall watches the
        reactor; how long it took, and the longest the reactor was away."""
        last = time.monotonic()
        gaps: list[float] = []

        def tick() -> None:
            nonlocal last
            now = time.monotonic()
            gaps.append(now - last)
            last = now

        loop = LoopingCall(tick)
        loop.clock = reactor
        started = time.monotonic()
        loop.start(0.01)
        try:
            await self.qemu.end(bundle)
            took = time.monotonic() - started
            await deferLater(reactor, 0.03, lambda: None)  # its next tick sees the last gap
        finally:
            loop.stop()
        return took, max(gaps)

    async def _stopped_qemu(self) -> int:
        """A running QEMU, stopped (SIGSTOP): SIGTERM waits until it continues."""
        await self.qemu.start(self.bundle)
        pid = self.qemu._pid(self.bundle)
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(lambda: alive(pid) and os.kill(pid, signal.SIGCONT))
        return pid

    async def test_end_does_not_block_the_reactor(self) -> None:
        """A QEMU that does not act on SIGTERM for 0.6 s (stopped, then
        continued) is waited for on the reactor's clock: it ran every 10 ms,
        never away for more than 100 ms (the old ``end`` slept 0.6 s)."""
        pid = await self._stopped_qemu()
        reactor.callLater(0.6, os.kill, pid, signal.SIGCONT)
        took, gap = await self._ending(self.bundle)
        self.assertFalse(alive(pid))
        self.assertGreater(took, 0.5)
        self.assertLess(gap, 0.1)
        self.assertEqual(self.qemu.status(self.bundle), "stopped")

    async def test_end_kills_after_the_grace(self) -> None:
        """A QEMU that never acts on SIGTERM is killed after the grace,
        the reactor still free meanwhile."""
        self.qemu.end_grace = 0.5
        pid = await self._stopped_qemu()
        took, gap = await self._ending(self.bundle)
        self.assertFalse(alive(pid))
        self.assertGreater(took, 0.5)
        self.assertLess(gap, 0.1)

    async def test_end_blocking_off_the_reactor_thread(self) -> None:
        """The blocking form (the disk executor's worker, the lab) ends it too."""
        await self.qemu.start(self.bundle)
        pid = self.qemu._pid(self.bundle)
        assert pid is not None
        await threads.deferToThread(self.qemu.end_blocking, self.bundle)
        self.assertFalse(alive(pid))


class QemuMigrationBase(TestCase):
    """A running QEMU guest, a real `twistd securemig --backend qemu`
    destination, and a real `securemig migrate` (insecure variant)."""

    def setUp(self) -> None:
        from securemig.lab import processes

        qemu_binary()
        under_tcg(self)
        self.base = Path(self.mktemp()).absolute()
        self.qemu = QemuBackend(reactor)
        self.marker = os.urandom(4096)
        self.vm_dir = self.base / "src"
        path = self.vm_dir / "vm1"
        path.mkdir(parents=True)
        (path / "marker.bin").write_bytes(self.marker)
        self.bundle = Bundle(path, Manifest("vm1", backend="qemu", images=[Image("ram", 0)]))
        self.bundle.save()
        self.addCleanup(self.qemu.end, self.bundle)
        self.destination = processes.start_destination(self.base / "dst", "--backend", "qemu")
        self.addCleanup(self.destination.stop)
        self.arrived_path = self.base / "dst" / "vms" / "vm1"
        self.addCleanup(lambda: self.qemu.end(Bundle(self.arrived_path, self.bundle.manifest)))

    def migrate(self) -> Any:
        return migrate_vm(self.vm_dir, self.destination.address, "--insecure")

    async def marker_of(self, bundle: Bundle) -> bytes:
        return await read_marker(self.qemu, bundle, len(self.marker), self.base)


class QemuMigrationTests(QemuMigrationBase):
    """A running QEMU guest moves, or stays, as the protocol decides."""

    async def test_running_guest_moves(self) -> None:
        """The guest runs at the destination with the same RAM; no QEMU of
        it remains at the source."""
        await self.qemu.start(self.bundle)
        result = self.migrate()
        self.assertEqual(result.returncode, 0, result.stderr)  # type: ignore[attr-defined]
        arrived = Bundle.load(self.arrived_path)
        self.assertEqual(self.qemu.status(arrived), "running")
        self.assertEqual(await self.marker_of(arrived), self.marker)
        self.assertFalse(self.bundle.path.exists())

    async def test_refused_migration_resumes_at_source(self) -> None:
        """The destination refuses (the VM is already there): the guest is
        resumed at the source from its RAM image, marker intact."""
        self.arrived_path.mkdir(parents=True)
        await self.qemu.start(self.bundle)
        result = self.migrate()
        self.assertEqual(result.returncode, 1)  # type: ignore[attr-defined]
        self.assertIn("VM_BUSY", result.stderr)  # type: ignore[attr-defined]
        source = Bundle.load(self.bundle.path)
        self.assertEqual(self.qemu.status(source), "running")
        self.assertEqual(await self.marker_of(source), self.marker)

    async def test_shared_storage_guest_moves(self) -> None:
        """Shared-storage variant: only RAM travels; the destination's QEMU
        runs the guest on the same shared disk, which nobody copied."""
        disk = self.base / "shared" / "vm1.raw"
        disk.parent.mkdir()
        contents = os.urandom(4 << 20)
        disk.write_bytes(contents)
        self.bundle.manifest.shared_disk = str(disk)
        self.bundle.save()
        await self.qemu.start(self.bundle)
        result = migrate_vm(self.vm_dir, self.destination.address, "--insecure", "--shared-storage")
        self.assertEqual(result.returncode, 0, result.stderr)
        arrived = Bundle.load(self.arrived_path)
        self.assertEqual(self.qemu.status(arrived), "running")
        self.assertEqual(await self.marker_of(arrived), self.marker)
        self.assertEqual(sorted(p.name for p in arrived.path.glob("*.img")), ["ram.img"])
        pid = (arrived.path / "qemu.pid").read_text().strip()
        self.assertIn(f"file={disk},".encode(), Path(f"/proc/{pid}/cmdline").read_bytes())
        self.assertEqual(disk.read_bytes(), contents)


def ek_certificate(state: Path, key: bytes) -> bytes:
    """The EK certificate a vTPM keeps in its NV memory: a known piece of
    its persistent state (read from a copy, so the state stays as it was)."""
    copy = state.parent / f".copy-{os.urandom(4).hex()}"
    shutil.copytree(state, copy)
    process = swtpm.start(copy, key)
    try:
        with TPM(process.tcti) as tpm:
            return tpm.ek_certificate()
    finally:
        process.stop()
        shutil.rmtree(copy)


class ForgetsMigrationKey(QemuBackend):
    """Test double: the QEMU backend as it would be without swtpm's
    ``--migration-key``, to show what the RAM image would then hold."""

    def stream_key(self, key: bytes) -> bytes | None:
        return None


class QemuVTPMTests(TestCase):
    """A guest with its vTPM: swtpm attached to QEMU, its state encrypted
    in the RAM image, the same vTPM after a resume elsewhere."""

    def setUp(self) -> None:
        qemu_binary()
        under_tcg(self)
        self.base = Path(self.mktemp()).absolute()
        self.key = os.urandom(32)
        path = self.base / "source" / "vm1"
        path.mkdir(parents=True)
        self.identity = vtpm.create(path, self.key, self.base / "vtpm-ca")
        state = path / vtpm.STATE_DIR
        self.ek_cert = ek_certificate(state, self.key)
        images = [Image("ram", 0), Image("vtpm", (state / vtpm.STATE_FILE).stat().st_size)]
        self.bundle = Bundle(path, Manifest("vm1", "qemu", images, vtpm=self.identity))
        self.bundle.save()
        self.qemu = QemuBackend(reactor, vtpm_key=lambda bundle: self.key)
        self.addCleanup(self.qemu.end, self.bundle)

    def pids(self, bundle: Bundle) -> dict[str, int | None]:
        return {p: self.qemu._pid(bundle, p) for p in ("qemu", "swtpm")}

    def arrive(self, qemu: QemuBackend) -> Bundle:
        """Deliver the suspended VM's images elsewhere, as a migration does."""
        target = self.base / "destination" / "vm1"
        (target / vtpm.STATE_DIR).mkdir(parents=True)
        for image in ("ram", "vtpm"):
            shutil.copyfile(self.bundle.image_path(image), target / image_file(image))
        arrived = Bundle(target, Bundle.load(self.bundle.path).manifest)
        arrived.save()
        self.addCleanup(qemu.end, arrived)
        return arrived

    async def test_vtpm_moves_encrypted(self) -> None:
        """Attached while running; after suspend nothing of the VM runs and
        the RAM image holds none of the vTPM's state in clear; resumed
        elsewhere with the same key, the same vTPM is attached again."""
        await self.qemu.start(self.bundle)
        running = self.pids(self.bundle)
        self.assertTrue(self.qemu.vtpm_attached(self.bundle))
        await self.qemu.suspend(self.bundle)
        self.assertEqual(self.pids(self.bundle), {"qemu": None, "swtpm": None})
        for pid in running.values():
            assert pid is not None
            self.assertFalse(alive(pid))
        ram = self.bundle.image_path("ram").read_bytes()
        self.assertNotIn(self.ek_cert[:64], ram)
        self.assertNotIn(self.ek_cert[-64:], ram)
        arrived = self.arrive(self.qemu)
        await self.qemu.resume(arrived)
        self.assertEqual(self.qemu.status(arrived), "running")
        self.assertTrue(self.qemu.vtpm_attached(arrived))
        await self.qemu.end(arrived)
        self.assertEqual(vtpm.identity(arrived.path / vtpm.STATE_DIR, self.key), self.identity)

    async def test_without_migration_key_ram_image_holds_vtpm(self) -> None:
        """The control for the check above: without ``--migration-key`` the
        vTPM's persistent state (its EK certificate) is in the RAM image."""
        forgetful = ForgetsMigrationKey(reactor, vtpm_key=lambda bundle: self.key)
        await forgetful.start(self.bundle)
        await forgetful.suspend(self.bundle)
        self.assertIn(self.ek_cert, self.bundle.image_path("ram").read_bytes())

    async def test_resume_with_another_key_fails(self) -> None:
        """A vTPM key that does not open the state: the resume fails with a
        clear error and neither QEMU nor swtpm is left running."""
        await self.qemu.start(self.bundle)
        await self.qemu.suspend(self.bundle)
        wrong = QemuBackend(reactor, vtpm_key=lambda bundle: os.urandom(32))
        arrived = self.arrive(wrong)
        with self.assertRaises(QemuError) as caught:
            await wrong.resume(arrived)
        self.assertIn("vTPM", str(caught.exception))
        self.assertEqual(self.pids(arrived), {"qemu": None, "swtpm": None})

    async def test_vtpm_needs_its_key(self) -> None:
        """A host that cannot unseal vTPM keys does not start such a VM."""
        with self.assertRaises(QemuError) as caught:
            await QemuBackend(reactor).start(self.bundle)
        self.assertIn("--identity", str(caught.exception))
        self.assertEqual(self.pids(self.bundle), {"qemu": None, "swtpm": None})


class QemuCommandTests(TestCase):
    """`securemig vm create --backend qemu`, `vm start`, `vm status`."""

    async def test_create_start_status(self) -> None:
        from securemig.lab import processes

        qemu_binary()
        under_tcg(self)
        vm_dir = Path(self.mktemp()).absolute()
        created = processes.securemig(
            "vm", "create", "q1", "--dir", str(vm_dir), "--ram-mib", "64", "--backend", "qemu"
        )
        self.assertEqual(created.returncode, 0, created.stderr)
        bundle = Bundle.load(vm_dir / "q1")
        self.assertEqual((bundle.manifest.backend, bundle.manifest.memory_mib), ("qemu", 64))
        self.assertTrue((vm_dir / "q1" / "marker.bin").exists())
        self.assertIn(
            "stopped", processes.securemig("vm", "status", "q1", "--dir", str(vm_dir)).stdout
        )
        started = processes.securemig("vm", "start", "q1", "--dir", str(vm_dir))
        self.addCleanup(QemuBackend(reactor).end, Bundle.load(vm_dir / "q1"))
        self.assertEqual(started.returncode, 0, started.stderr)
        self.assertIn(
            "running", processes.securemig("vm", "status", "q1", "--dir", str(vm_dir)).stdout
        )
        await QemuBackend(reactor).end(Bundle.load(vm_dir / "q1"))
        self.assertIn(
            "stopped", processes.securemig("vm", "status", "q1", "--dir", str(vm_dir)).stdout
        )

    def test_paused_is_not_running_and_start_continues_it(self) -> None:
        """A QEMU whose guest is paused (as after a live stream) is ``paused``
        by QMP, not ``running`` because its pid lives; ``vm start`` continues
        that QEMU (the same process, no second one, no key needed)."""
        from securemig.lab import processes

        qemu_binary()
        under_tcg(self)
        vm_dir = Path(self.mktemp()).absolute()
        created = processes.securemig(
            "vm", "create", "q1", "--dir", str(vm_dir), "--ram-mib", "64", "--backend", "qemu"
        )
        self.assertEqual(created.returncode, 0, created.stderr)
        started = processes.securemig("vm", "start", "q1", "--dir", str(vm_dir))
        self.assertEqual(started.returncode, 0, started.stderr)
        bundle = Bundle.load(vm_dir / "q1")
        qemu = QemuBackend(reactor)
        self.addCleanup(qemu.end, bundle)
        pid = qemu._pid(bundle)
        qemu.query(bundle, "stop")
        status = processes.securemig("vm", "status", "q1", "--dir", str(vm_dir))
        self.assertIn("q1: paused", status.stdout, status.stderr)
        again = processes.securemig("vm", "start", "q1", "--dir", str(vm_dir))
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertIn("q1: running", again.stdout)
        self.assertEqual(qemu.query(bundle, "query-status")["status"], "running")
        self.assertEqual(qemu._pid(bundle), pid)


class QemuResumeFailureTests(QemuMigrationBase):
    """QEMU fails at the destination's resume, after the commit: reported to
    the source (exit status 3), and the VM is kept at the destination."""

    def setUp(self) -> None:
        # The destination finds a QEMU that cannot start; the source the real one.
        broken = Path(self.mktemp()).absolute()
        broken.mkdir()
        fake = broken / "qemu-system-x86_64"
        fake.write_text("#!/bin/sh\necho 'qemu: could not load the BIOS' >&2\nexit 1\n")
        fake.chmod(0o755)
        path = os.environ["PATH"]
        os.environ["PATH"] = f"{broken}:{path}"
        try:
            super().setUp()  # starts the destination with this PATH
        finally:
            os.environ["PATH"] = path

    async def test_resume_fails_after_commit(self) -> None:
        """Reported to the source, which has given the VM up; the VM's files
        stay in place at the destination, journaled as resume-failed."""
        await self.qemu.start(self.bundle)
        result = self.migrate()
        self.assertEqual(result.returncode, 3, result.stderr)
        self.assertIn("RESUME_FAILED", result.stderr)
        self.assertIn("could not load the BIOS", result.stderr)
        self.assertFalse(self.bundle.path.exists())
        arrived = Bundle.load(self.arrived_path)
        self.assertGreater(arrived.image_path("ram").stat().st_size, 0)
        from securemig.lab import processes

        status = processes.securemig("status", "--state-dir", str(self.base / "dst"), "--json")
        self.assertEqual(json.loads(status.stdout)[0]["outcome"], "resume-failed")


class QemuDemoTests(TestCase):
    """`securemig demo --backend qemu`: a running guest goes securely to one
    host and back insecurely; its memory (96 MiB, not QEMU's default, so the
    size must travel) and vTPM arrive intact both times."""

    def test_demo(self) -> None:
        from securemig.lab import processes

        qemu_binary()
        under_tcg(self)
        result = processes.securemig("demo", "--backend", "qemu", "--json", "--size-mib", "96")
        self.assertEqual(result.returncode, 0, result.stderr)
        checks = json.loads(result.stdout)["checks"]
        self.assertEqual(
            checks,
            {
                "guest_running_with_same_memory_and_vtpm": True,
                "vtpm_key_released_to_destination_tpm": True,
                "same_vtpm_at_destination": True,
                "vtpm_back_at_source": True,
                "source_copies_removed": True,
                "refused_after_a_pcr_change_vm_intact_at_source": True,
            },
        )


class QemuSourceCrashTests(QemuMigrationBase):
    """The source's `securemig migrate` is killed mid-stream, after QEMU
    saved the guest into its RAM image and quit: the source host's recovery
    resumes the guest from that image (not a cold boot), memory intact, and
    the destination keeps nothing."""

    async def test_killed_mid_stream_resumes_at_source(self) -> None:
        from securemig.lab import processes

        await self.qemu.start(self.bundle)
        state = self.base / "src-state"
        result = processes.securemig(
            "migrate",
            "vm1",
            "--vm-dir",
            str(self.vm_dir),
            "--state-dir",
            str(state),
            "--to",
            self.destination.address,
            "--insecure",
            env={
                **os.environ,
                "SECUREMIG_CRASH_POINTS": "1",
                "SECUREMIG_CRASH_AT": "source-streaming",
            },
        )
        self.assertEqual(result.returncode, -9, result.stderr)
        self.assertNotEqual(self.qemu.status(Bundle.load(self.bundle.path)), "running")
        # The operator starts the source host's daemon (or runs any command
        # that settles): it finds the dead migration and resumes the guest.
        daemon = processes.start_destination(state, "--resolve-interval", "0.3")
        self.addCleanup(daemon.stop)
        deadline = time.monotonic() + 60
        # Running, and resumed: QEMU writes its pid file before it opens its
        # monitor, and the daemon saves the manifest only after `cont`.
        while (
            self.qemu.status(Bundle.load(self.bundle.path)) != "running"
            or Bundle.load(self.bundle.path).manifest.state != "running"
        ):
            self.assertLess(time.monotonic(), deadline, daemon.log())
            await deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(await self.marker_of(Bundle.load(self.bundle.path)), self.marker)
        while list((self.base / "dst" / "staging").iterdir()):
            self.assertLess(time.monotonic(), deadline, daemon.log())
            await deferLater(reactor, 0.2, lambda: None)
        self.assertFalse(self.arrived_path.exists())


class QemuLiveDemoTests(TestCase):
    """`securemig demo --backend qemu --live`: a Linux guest under load goes
    live and securely to the destination and back; per migration --json
    says mode live with QEMU's and the guest-observed downtime, and the
    checks hold (heartbeat continuous, PCR 16 preserved)."""

    def test_live_demo(self) -> None:
        from securemig.hypervisor import guest
        from securemig.lab import processes

        qemu_binary()
        guest.find()
        under_tcg(self)
        result = processes.securemig("demo", "--backend", "qemu", "--live", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        report = json.loads(result.stdout)
        self.assertEqual(
            report["checks"],
            {
                "mode_live": True,
                "guest_kept_running": True,
                "guest_vtpm_preserved": True,
                "source_copies_removed": True,
            },
        )
        for move in report["migrations"]:
            self.assertEqual((move["mode"], move["outcome"]), ("live", "done"))
            self.assertGreaterEqual(move["guest_downtime_ms"], 0)
            self.assertIsInstance(move["downtime_ms"], int)

    def test_live_needs_qemu(self) -> None:
        """--live without --backend qemu: a usage error, one line."""
        from securemig.lab import processes

        result = processes.securemig("demo", "--live")
        self.assertEqual(result.returncode, 2)
        self.assertIn("--backend qemu", result.stderr)

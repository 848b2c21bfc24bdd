"""Locks, durable files, bundles, the journal and crash recovery of staging."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from securemig import files
from securemig.host import storage
from securemig.host.arrival import DestinationHost
from securemig.host.journal import ADDED_COLUMNS, SCHEMA, Journal
from securemig.hypervisor.bundle import Bundle, BundleError, Manifest, create_image_vm
from securemig.protocol import wire
from securemig.protocol.errors import ErrorCode, ProtocolError, io_error


class LockTests(SynchronousTestCase):
    def test_second_lock_refused(self) -> None:
        """Two locks on one file conflict, even within one process."""
        path = Path(self.mktemp())
        with storage.Lock(path):
            self.assertRaises(storage.LockBusy, storage.Lock, path)
        storage.Lock(path).release()

    def test_survives_closing_another_descriptor(self) -> None:
        """Closing an unrelated descriptor of the lock file keeps the lock
        (a POSIX fcntl lock would be dropped here)."""
        path = Path(self.mktemp())
        lock = storage.Lock(path)
        with open(path, "rb"):
            pass
        self.assertTrue(storage.is_locked(path))
        lock.release()
        self.assertFalse(storage.is_locked(path))


class VMLockTests(SynchronousTestCase):
    """The CLI and the daemon take the same lock for a VM (issue 22)."""

    def test_vm_in_a_state_dir_is_locked_by_its_name_too(self) -> None:
        """A VM in ``STATE/vms/NAME`` is refused while the daemon holds
        ``STATE/locks/NAME.lock`` (resuming it), and takes both locks."""
        state = Path(self.mktemp())
        (state / "locks").mkdir(parents=True)
        bundle = state / "vms" / "vm1"
        bundle.mkdir(parents=True)
        daemons = storage.Lock(state / "locks" / "vm1.lock")
        with self.assertRaises(storage.LockBusy):
            storage.VMLock(bundle / ".lock")
        self.assertFalse(storage.is_locked(bundle / ".lock"))  # nothing half-taken
        daemons.release()
        lock = storage.VMLock(bundle / ".lock")
        self.assertTrue(storage.is_locked(state / "locks" / "vm1.lock"))
        self.assertTrue(storage.is_locked(bundle / ".lock"))
        lock.release()
        self.assertFalse(storage.is_locked(state / "locks" / "vm1.lock"))

    def test_vm_elsewhere_is_locked_by_its_bundle(self) -> None:
        """A VM in any other directory has only its bundle's lock."""
        vms = Path(self.mktemp()) / "vms"
        (vms / "vm1").mkdir(parents=True)
        lock = storage.VMLock(vms / "vm1" / ".lock")
        self.assertIsNone(storage.name_lock(vms / "vm1"))
        lock.release()


class DurableFileTests(SynchronousTestCase):
    def test_write_durably_replaces(self) -> None:
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_durably(path, b"one")
        files.write_durably(path, b"two")
        self.assertEqual(path.read_bytes(), b"two")
        self.assertEqual([p.name for p in path.parent.iterdir()], [path.name])

    def test_stale_temporaries_of_dead_writers_removed(self) -> None:
        """A writer killed mid-write leaves ``.NAME.PID.TID.tmp``; the next
        write removes it, but not a live writer's (this process's pid)."""
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        dead = subprocess.Popen(["true"])
        dead.wait()
        stale = path.with_name(f".{path.name}.{dead.pid}.1.tmp")
        live = path.with_name(f".{path.name}.{os.getpid()}.0.tmp")
        other = path.with_name(f".other.{dead.pid}.1.tmp")
        for p in (stale, live, other):
            p.write_bytes(b"half")
        files.write_durably(path, b"whole")
        self.assertEqual(path.read_bytes(), b"whole")
        self.assertFalse(stale.exists())
        self.assertTrue(live.exists())
        self.assertTrue(other.exists())  # another file's temporaries are its own

    def test_failed_write_leaves_no_temporary(self) -> None:
        """A write that fails (here: data that is not bytes, as a full disk
        fails mid-write) keeps the old file and leaves no temporary."""
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_durably(path, b"old")
        self.assertRaises(TypeError, files.write_durably, path, "not bytes")  # type: ignore[arg-type]
        self.assertEqual(path.read_bytes(), b"old")
        self.assertEqual([p.name for p in path.parent.iterdir()], [path.name])

    def test_free_space_refusal(self) -> None:
        """More than the file system holds is refused with INSUFFICIENT_SPACE."""
        with self.assertRaises(ProtocolError) as cm:
            storage.check_free_space(Path("."), 1 << 60)
        self.assertEqual(cm.exception.code, ErrorCode.INSUFFICIENT_SPACE)

    def test_io_error_codes(self) -> None:
        """ENOSPC is DISK_FULL; other errors are IO_ERROR."""
        full = io_error(OSError(errno.ENOSPC, "No space left on device"), "writing")
        other = io_error(OSError(errno.EIO, "Input/output error"), "writing")
        self.assertEqual((full.code, other.code), (ErrorCode.DISK_FULL, ErrorCode.IO_ERROR))


class BundleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())

    def test_create_and_find(self) -> None:
        bundle = create_image_vm(self.dir, "vm1", 1, disk_mib=2)
        found = Bundle.find(self.dir, "vm1")
        self.assertEqual(found.manifest, bundle.manifest)
        self.assertEqual(bundle.image_path("disk").stat().st_size, 2 << 20)
        self.assertNotEqual(bundle.image_path("ram").read_bytes()[:64], b"\0" * 64)

    def test_variant_rules(self) -> None:
        """Full needs the disk in the bundle; shared storage needs it outside."""
        local = create_image_vm(self.dir, "local", 1, disk_mib=1)
        self.assertRaises(BundleError, local.streamed_images, wire.Variant.SHARED_STORAGE)
        shared = create_image_vm(self.dir, "shared", 1, shared_disk=self.dir / "s.img")
        self.assertRaises(BundleError, shared.streamed_images, wire.Variant.FULL)
        self.assertEqual(
            [i.name for i in shared.streamed_images(wire.Variant.SHARED_STORAGE)], ["ram"]
        )

    def test_size_mismatch_detected(self) -> None:
        bundle = create_image_vm(self.dir, "vm1", 1)
        with open(bundle.image_path("ram"), "ab") as f:
            f.write(b"x")
        self.assertRaises(BundleError, bundle.check_images)

    def test_bad_manifests(self) -> None:
        """Unknown formats and unsafe names in a manifest are refused."""
        self.assertRaises(BundleError, Manifest.from_json, b'{"format": 99}')
        bad = Manifest("vm1").to_json().replace(b'"vm1"', b'"../x"')
        self.assertRaises(BundleError, Manifest.from_json, bad)
        self.assertRaises(BundleError, Manifest.from_json, b"not json")

    def test_wrong_name_in_directory(self) -> None:
        create_image_vm(self.dir, "vm1", 1)
        os.rename(self.dir / "vm1", self.dir / "vm2")
        self.assertRaises(BundleError, Bundle.find, self.dir, "vm2")


class JournalTests(SynchronousTestCase):
    def test_opened_while_another_process_adds_the_columns(self) -> None:
        """Two processes opening one new journal at once: the second sees
        the columns the first is adding under the write lock and adds none
        itself (before, both added them: "duplicate column name")."""
        path = Path(self.mktemp())
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("PRAGMA journal_mode=WAL")
        other.executescript(SCHEMA)
        other.execute("BEGIN IMMEDIATE")  # the other opener, mid-upgrade
        opened: list[BaseException | Journal] = []

        def open_journal() -> None:
            try:
                journal = Journal(path)
                journal.close()
                opened.append(journal)
            except BaseException as e:
                opened.append(e)

        thread = threading.Thread(target=open_journal)
        thread.start()
        time.sleep(0.5)  # it now waits for the lock (or, before, for its ALTER)
        have = {row[1] for row in other.execute("PRAGMA table_info(migrations)")}
        missing = {c: d for c, d in ADDED_COLUMNS.items() if c not in have}
        self.assertTrue(missing)  # a new journal is upgraded when opened
        for column, definition in missing.items():
            other.execute(f"ALTER TABLE migrations ADD COLUMN {column} {definition}")
        other.execute("COMMIT")
        other.close()
        thread.join(20)
        self.assertIsInstance(opened[0], Journal, repr(opened))
        # Reopened here (a connection belongs to its thread): the columns are
        # there and a migration can be journaled.
        journal = Journal(path)
        mid = journal.begin(
            role="source", vm="vm1", peer="h:1", variant="full", protocol="insecure"
        )
        self.assertIsNotNone(journal.get(mid))
        journal.close()

    def test_phases_and_reopen(self) -> None:
        """What was journaled is there after reopening, in order."""
        path = Path(self.mktemp())
        journal = Journal(path)
        mid = journal.begin(
            role="source", vm="vm1", peer="h:1", variant="full", protocol="insecure"
        )
        for phase in ("connected", "streaming", "prepared", "committed"):
            journal.phase(mid, phase, nbytes=10)
        journal.finish(mid, "done")
        journal.close()
        record = Journal(path).get(mid)
        assert record is not None
        self.assertEqual(
            [p for p, _ in record.events],
            ["started", "connected", "streaming", "prepared", "committed", "done"],
        )
        self.assertEqual((record.outcome, record.bytes), ("done", 10))
        self.assertEqual(
            set(record.phase_times()), {"connect", "hello", "streams", "commit", "resume"}
        )

    def test_unfinished(self) -> None:
        journal = Journal(Path(self.mktemp()))
        a = journal.begin(role="source", vm="a", peer="p", variant="full", protocol="insecure")
        b = journal.begin(role="source", vm="b", peer="p", variant="full", protocol="insecure")
        journal.finish(a, "aborted", error="X")
        self.assertEqual([r.id for r in journal.unfinished()], [b])


class RecoveryTests(SynchronousTestCase):
    """What a destination does at start with staging a crash left behind."""

    def setUp(self) -> None:
        self.state = Path(self.mktemp())
        self.host = DestinationHost(self.state)

    def stage(self, mid: str, phase: str) -> Path:
        self.host.journal.begin(
            role="destination", vm="vm1", peer="p", variant="full", protocol="insecure", id=mid
        )
        self.host.journal.phase(mid, phase)
        path = self.host.staging / mid
        path.mkdir()
        (path / "ram.img").write_bytes(b"x")
        return path

    def recover(self, host: DestinationHost | None = None) -> list[tuple[str, str]]:
        """Restart: what ``twistd securemig`` does first."""
        host = host or DestinationHost(self.state)
        result: list[tuple[str, str]] = self.successResultOf(Deferred.fromCoroutine(host.recover()))
        return result

    def test_unprepared_staging_removed(self) -> None:
        """Never PREPARED: the source cannot have committed; remove it."""
        path = self.stage("a" * 32, "streaming")
        self.assertIn("staging removed", self.recover()[0][1])
        self.assertFalse(path.exists())
        self.assertEqual(self.host.journal.get("a" * 32).outcome, "aborted")  # type: ignore

    def test_prepared_staging_held(self) -> None:
        """PREPARED: the source may have committed; keep it, in doubt, and
        refuse a new arrival of that VM until it is settled."""
        path = self.stage("b" * 32, "prepared")
        host = DestinationHost(self.state)
        self.assertIn("held in doubt", self.recover(host)[0][1])
        self.assertTrue(path.exists())
        self.assertEqual(host.journal.get("b" * 32).outcome, "in-doubt")  # type: ignore
        hello = wire.Hello(1, wire.Variant.FULL, "vm1", 4096, (wire.ImageInfo("ram", 1),), "")
        with self.assertRaises(ProtocolError) as cm:
            host.admit(hello, "p", "insecure")
        self.assertEqual(cm.exception.code, ErrorCode.VM_BUSY)
        self.assertIn("in doubt", cm.exception.reason)

    def stage_vm(self, mid: str, *phases: str) -> Path:
        """A real (image backend) VM staged by migration ``mid``."""
        self.host.journal.begin(
            role="destination", vm="vm1", peer="p", variant="full", protocol="insecure", id=mid
        )
        for phase in phases:
            self.host.journal.phase(mid, phase)
        bundle = create_image_vm(self.state / "tmp", "vm1", 1)
        os.rename(bundle.path, self.host.staging / mid)
        return self.host.staging / mid

    def test_journaled_commit_rolled_forward(self) -> None:
        """COMMIT journaled, crash before the move: the restart moves the VM
        into place, resumes it and journals DONE (the old rule discarded it,
        and the source had already given its copy up: the VM was lost)."""
        ram = (self.stage_vm("d" * 32, "prepared", "committed") / "ram.img").read_bytes()
        self.assertIn("resumed here", self.recover()[0][1])
        self.assertEqual((self.host.vms / "vm1" / "ram.img").read_bytes(), ram)
        self.assertEqual(list(self.host.staging.iterdir()), [])
        record = self.host.journal.get("d" * 32)
        assert record is not None
        self.assertEqual(record.outcome, "done")

    def test_resumed_before_done_is_done(self) -> None:
        """Crash after the move and resume, before DONE: the VM is in place,
        and the journal says done, not aborted."""
        staged = self.stage_vm("e" * 32, "prepared", "committed")
        os.rename(staged, self.host.vms / "vm1")
        self.host.journal.phase("e" * 32, "resumed")
        self.recover()
        record = self.host.journal.get("e" * 32)
        assert record is not None
        self.assertEqual(record.outcome, "done")
        self.assertTrue((self.host.vms / "vm1").exists())


class ResolveTests(SynchronousTestCase):
    """RESOLVE: the source's decision for an arrival held in doubt, accepted
    only from the peer that started it."""

    def setUp(self) -> None:
        base = Path(self.mktemp())
        self.host = DestinationHost(base / "dst")
        self.mid = bytes.fromhex("f" * 32)
        self.host.journal.begin(
            role="destination",
            vm="vm1",
            peer="10.0.0.1:5555",
            variant="full",
            protocol="secure",
            id=self.mid.hex(),
            peer_name="src-a",
        )
        self.host.journal.phase(self.mid.hex(), "prepared")
        bundle = create_image_vm(base / "tmp", "vm1", 1)
        self.ram = bundle.image_path("ram").read_bytes()
        os.rename(bundle.path, self.host.staging / self.mid.hex())
        self.successResultOf(Deferred.fromCoroutine(self.host.recover()))

    def resolve(
        self, decision: wire.Decision, peer: str = "src-a", protocol: str = "secure"
    ) -> wire.Resolved:
        message = wire.Resolve(self.mid, decision)
        answer: wire.Resolved = self.successResultOf(
            Deferred.fromCoroutine(self.host.resolve(message, peer, protocol))
        )
        return answer

    def test_committed_rolls_forward(self) -> None:
        """COMMITTED: the VM is put in place and resumed; a repeat is idempotent."""
        self.assertEqual(self.resolve(wire.Decision.COMMITTED).settled, wire.Settled.DONE)
        self.assertEqual((self.host.vms / "vm1" / "ram.img").read_bytes(), self.ram)
        self.assertEqual(list(self.host.staging.iterdir()), [])
        self.assertEqual(self.resolve(wire.Decision.COMMITTED).settled, wire.Settled.DONE)
        record = self.host.journal.get(self.mid.hex())
        assert record is not None
        self.assertEqual(record.outcome, "done")

    def test_aborted_discards(self) -> None:
        """ABORTED: staging is removed and the arrival journaled aborted."""
        self.assertEqual(self.resolve(wire.Decision.ABORTED).settled, wire.Settled.ABORTED)
        self.assertEqual(list(self.host.staging.iterdir()), [])
        self.assertFalse((self.host.vms / "vm1").exists())
        self.assertEqual(self.resolve(wire.Decision.ABORTED).settled, wire.Settled.ABORTED)

    def test_not_under_a_running_session(self) -> None:
        """While the name is locked (this migration's session still runs),
        neither decision touches the staging: FAILED, try again."""
        with storage.Lock(self.host.locks / "vm1.lock"):
            for decision in (wire.Decision.ABORTED, wire.Decision.COMMITTED):
                self.assertEqual(self.resolve(decision).settled, wire.Settled.FAILED)
        self.assertTrue((self.host.staging / self.mid.hex()).exists())
        self.assertEqual(self.resolve(wire.Decision.ABORTED).settled, wire.Settled.ABORTED)

    def test_from_another_source_refused(self) -> None:
        """Another (attested) host cannot decide this migration."""
        self.assertEqual(
            self.resolve(wire.Decision.ABORTED, peer="src-b").settled, wire.Settled.REFUSED
        )
        self.assertEqual(
            self.resolve(wire.Decision.COMMITTED, protocol="insecure").settled,
            wire.Settled.REFUSED,
        )
        self.assertTrue((self.host.staging / self.mid.hex()).exists())

    def test_unknown_migration(self) -> None:
        message = wire.Resolve(b"\0" * 16, wire.Decision.COMMITTED)
        answer = self.successResultOf(
            Deferred.fromCoroutine(self.host.resolve(message, "src-a", "secure"))
        )
        self.assertEqual(answer.settled, wire.Settled.UNKNOWN)


class SettleTests(SynchronousTestCase):
    """`securemig recover`: an in-doubt arrival settled from the source's
    journal, never by guessing."""

    def setUp(self) -> None:
        from securemig.hypervisor.bundle import create_image_vm

        base = Path(self.mktemp())
        self.host = DestinationHost(base / "dst")
        self.mid = "c" * 32
        self.host.journal.begin(
            role="destination", vm="vm1", peer="p", variant="full", protocol="secure", id=self.mid
        )
        self.host.journal.phase(self.mid, "prepared")
        bundle = create_image_vm(base / "tmp", "vm1", 1)
        os.rename(bundle.path, self.host.staging / self.mid)
        # A restart: prepared staging is held in doubt.
        self.successResultOf(Deferred.fromCoroutine(self.host.recover()))
        self.source = Journal(base / "src.sqlite")
        self.local = self.source.begin(
            role="source", vm="vm1", peer="d", variant="full", protocol="secure"
        )
        self.source.set_migration_id(self.local, self.mid)

    def settle(self) -> list[tuple[str, str]]:
        from twisted.internet.defer import Deferred

        result: list[tuple[str, str]] = self.successResultOf(
            Deferred.fromCoroutine(self.host.settle(self.source))
        )
        return result

    def test_source_committed(self) -> None:
        """The source journaled COMMITTED: the VM is put in place here."""
        self.source.phase(self.local, "committed")
        self.source.finish(self.local, "in-doubt", error="CONNECTION_LOST")
        self.assertIn("resumed here", self.settle()[0][1])
        self.assertTrue((self.host.vms / "vm1" / "ram.img").exists())
        self.assertFalse((self.host.staging / self.mid).exists())
        self.assertEqual(self.host.journal.get(self.mid).outcome, "done")  # type: ignore

    def test_source_did_not_commit(self) -> None:
        """The source ended without committing: its VM is still there; discard."""
        self.source.finish(self.local, "aborted", error="CONNECTION_LOST")
        self.assertIn("discarded", self.settle()[0][1])
        self.assertFalse((self.host.staging / self.mid).exists())
        self.assertFalse((self.host.vms / "vm1").exists())

    def test_source_undecided(self) -> None:
        """No outcome and no commit at the source yet: nothing is done."""
        self.assertIn("not decided", self.settle()[0][1])
        self.assertTrue((self.host.staging / self.mid).exists())

    def test_unknown_to_source(self) -> None:
        other = Journal(Path(self.mktemp()))
        self.source = other
        self.assertIn("unknown", self.settle()[0][1])
        self.assertTrue((self.host.staging / self.mid).exists())

    def test_busy_name_left_alone(self) -> None:
        """While something holds the VM's name here, nothing is moved."""
        self.source.phase(self.local, "committed")
        with storage.Lock(self.host.locks / "vm1.lock"):
            self.assertIn("busy", self.settle()[0][1])
        self.assertTrue((self.host.staging / self.mid).exists())


def resident_bytes(path: Path) -> int:
    """How much of a file is in the page cache (util-linux's fincore)."""
    import shutil
    import subprocess

    tool = shutil.which("fincore")
    if tool is None:
        raise RuntimeError("fincore not found: install the Debian package util-linux")
    out = subprocess.run(
        [tool, "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


class WriteBehindTests(SynchronousTestCase):
    """An arriving image's pages leave the page cache once on disk."""

    class Small(storage.WriteBehind):
        WINDOW = 1 << 20

    def write(self, behind: bool) -> tuple[Path, bytes]:
        path = Path(self.mktemp())
        data = os.urandom(8 << 20)
        with open(path, "wb", buffering=0) as f:
            writer = self.Small(f.fileno())
            for offset in range(0, len(data), 256 << 10):
                f.write(data[offset : offset + (256 << 10)])
                if behind:
                    writer.wrote(256 << 10)
            os.fsync(f.fileno())
        return path, data

    def test_written_windows_leave_the_page_cache(self) -> None:
        path, data = self.write(behind=True)
        # All but the newest two windows were dropped (measured before reading).
        self.assertLessEqual(resident_bytes(path), 2 * self.Small.WINDOW)
        self.assertEqual(path.read_bytes(), data)

    def test_control_without_write_behind(self) -> None:
        """Without it the whole file stays cached: the check above can fail."""
        path, data = self.write(behind=False)
        self.assertEqual(resident_bytes(path), len(data))

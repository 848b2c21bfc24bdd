"""Host storage (:mod:`securemig.host.storage`): locks, the free-space check
and write-behind."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from securemig.host import storage
from securemig.protocol.errors import ErrorCode, ProtocolError


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


class FreeSpaceTests(SynchronousTestCase):
    def test_free_space_refusal(self) -> None:
        """More than the file system holds is refused with INSUFFICIENT_SPACE."""
        with self.assertRaises(ProtocolError) as cm:
            storage.check_free_space(Path("."), 1 << 60)
        self.assertEqual(cm.exception.code, ErrorCode.INSUFFICIENT_SPACE)


def resident_bytes(path: Path) -> int:
    """How much of a file is in the page cache (util-linux's fincore)."""
    import shutil

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

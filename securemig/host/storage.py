"""
This host's storage: advisory locks, free space, write-behind for arriving
images.  Durable writes themselves are :mod:`securemig.files`.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType
from typing import Any

from securemig.host.glibc import glibc
from securemig.protocol.errors import ErrorCode, LocalFault, ProtocolError

#: Head room kept free beyond the announced image sizes when admitting a VM.
SPACE_MARGIN = 64 * 1024 * 1024


class LockBusy(LocalFault):
    """Another process (or another descriptor of ours) holds the lock."""

    default_code = ErrorCode.VM_BUSY


class Lock:
    """An exclusive advisory lock on a file, held until :meth:`release`.

    We use ``flock(2)``, not POSIX ``fcntl`` record locks: a POSIX lock is
    owned by the process and silently dropped when the process closes *any*
    descriptor of that file (sqlite, a backup tool, a library reading the
    manifest), whereas a flock belongs to this open file description and
    lives until we close it.  OFD locks would do as well; flock is simpler and
    also conflicts between two descriptors of one process, which the tests
    use.  Neither works across NFS reliably; shared storage for disks must
    provide its own locking (see the operator's guide).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockBusy(str(path)) from None
        self._fd: int | None = fd
        # Say who holds it; only for operators looking at the file.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Release the lock; safe to call twice."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Lock:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def name_lock(bundle: Path) -> Path | None:
    """The name lock of a VM in a host's state directory (``STATE/vms/NAME``):
    ``STATE/locks/NAME.lock``, which that host's daemon holds while the VM
    arrives, is moved into place, resumed or settled; None elsewhere."""
    vms = bundle.absolute().parent
    locks = vms.parent / "locks"
    if vms.name == "vms" and locks.is_dir():
        return locks / f"{bundle.name}.lock"
    return None


class VMLock:
    """A VM's lock, as every command and the daemon take it: its bundle's
    ``.lock`` and, for a VM in a host's state directory, its name lock too
    (:func:`name_lock`), so that a ``securemig migrate`` or ``vm start`` of a
    VM the daemon is still resuming is refused.  Taken in that order (the
    daemon takes only the name lock: no cycle); :class:`LockBusy` if either
    is held."""

    def __init__(self, lock_path: Path) -> None:
        self.path = lock_path
        self._locks = [Lock(lock_path)]
        name = name_lock(lock_path.parent)
        if name is not None:
            try:
                self._locks.append(Lock(name))
            except LockBusy:
                self.release()
                raise

    def release(self) -> None:
        """Release both; safe to call twice."""
        for lock in reversed(self._locks):
            lock.release()


def is_locked(path: Path) -> bool:
    """Whether some descriptor holds the lock at ``path`` (for status and tests)."""
    try:
        Lock(path).release()
    except LockBusy:
        return True
    return False


def free_bytes(path: Path) -> int:
    """Bytes available to us on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def check_free_space(path: Path, needed: int) -> None:
    """Refuse with INSUFFICIENT_SPACE unless ``needed`` bytes and a margin fit."""
    available = free_bytes(path)
    if available < needed + SPACE_MARGIN:
        raise ProtocolError(
            ErrorCode.INSUFFICIENT_SPACE,
            f"needs {needed >> 20} MiB plus {SPACE_MARGIN >> 20} MiB head room; "
            f"{available >> 20} MiB free",
        )


class WriteBehind:
    """Write-behind for a file written front to back, such as an arriving
    image: every :data:`WINDOW` bytes, start writing the newest window to
    disk (``sync_file_range``), wait for the one before and drop its pages
    from the page cache (``posix_fadvise(DONTNEED)``).

    Why: measured here, writing 1 GiB into fresh page-cache pages cost
    0.5-4.8 CPU-s from run to run, and 0.4 CPU-s steadily with this, because
    the same few dozen MiB of page cache are reused instead of new memory
    being filled (it also leaves the final fsync little to do).  Advisory
    only: the fsync when the file is complete is what makes it durable, and
    reports any error; where the calls do not exist this does nothing.
    """

    #: Bytes per window.
    WINDOW = 16 * 1024 * 1024

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.written = 0
        self.started = 0

    def wrote(self, n: int) -> None:
        """``n`` more bytes were written at the end of the file."""
        self.written += n
        while self.written - self.started >= self.WINDOW:
            _sync_file_range(self.fd, self.started, self.WINDOW, _SYNC_WRITE)
            if self.started >= self.WINDOW:
                before = self.started - self.WINDOW
                _sync_file_range(self.fd, before, self.WINDOW, _SYNC_WAIT_ALL)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(self.fd, before, self.WINDOW, os.POSIX_FADV_DONTNEED)
            self.started += self.WINDOW


#: sync_file_range(2) flags: start writeback; wait before, write, wait after.
_SYNC_WRITE = 2
_SYNC_WAIT_ALL = 1 | 2 | 4


def _libc_sync_file_range() -> Any:
    import ctypes

    function = getattr(glibc(), "sync_file_range", None)
    if function is not None:
        function.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
    return function


_SYNC_FILE_RANGE = _libc_sync_file_range()


def _sync_file_range(fd: int, offset: int, length: int, flags: int) -> None:
    # Advisory (see WriteBehind): its return value is deliberately not checked.
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, flags)

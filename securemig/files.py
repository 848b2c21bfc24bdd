"""
Durable file operations, for every layer above the sans-IO protocol.

Everything that must survive a crash is written the same way, so the rules
are in one place: write to a temporary file beside the target, fsync it,
rename it into place, fsync the directory that holds the new name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make the names in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably.  The file is
    created with ``mode`` (0o600 for keys), never wider even for an instant.
    A failed write (disk full) leaves ``path`` as it was and no temporary
    file; those of writers that died mid-write are removed here too."""
    # A temporary name of its own per writer: concurrent writers of one
    # file (migrations recording a peer's values on first use) must not
    # unlink or rename each other's half-written file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    remove_stale_temporaries(path)
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_stale_temporaries(path: Path) -> int:
    """Remove the temporary files of :func:`write_durably` for ``path``
    whose writer process no longer exists (killed mid-write); returns how
    many.  A live writer's file, or one whose pid cannot be read, is kept."""
    removed = 0
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return 0
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid_text = name[len(prefix) :].split(".", 1)[0]
        if not pid_text.isdigit() or process_alive(int(pid_text)):
            continue
        try:
            os.unlink(path.parent / name)
            removed += 1
        except FileNotFoundError:
            pass  # another writer removed it first
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (a zombie counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def pid_file_alive(path: Path) -> bool | None:
    """Whether the process whose pid the file ``path`` holds runs (a
    zombie, dead but not yet reaped, does not); None if there is no such
    file or it holds no pid."""
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name, which may hold spaces: after ')'.
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def rename_durably(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` (files or directories) and fsync both parents."""
    os.rename(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def remove_durably(path: Path) -> bool:
    """Remove a file if it exists, then make the removal durable; False if
    there was none.

    For keys, lists and markers whose absence a recovery reads as a
    decision: the unlink must survive a crash before the next step acts.
    """
    if not path.exists():
        return False
    path.unlink()
    fsync_dir(path.parent)
    return True


def remove_tree(path: Path) -> None:
    """Remove a directory tree if it exists, then make the removal durable."""
    if path.exists():
        shutil.rmtree(path)
        fsync_dir(path.parent)


#: Where :func:`discard_tree` puts a tree until its remover has unlinked
#: it: a directory beside it, so the rename stays on one filesystem.
DISCARDED = ".securemig-discarded"


def discard_tree(path: Path) -> None:
    """Remove a directory tree (if it exists) without waiting for the
    filesystem to free its blocks: rename it, durably, into
    :data:`DISCARDED` beside it (its name is free at once), then hand the
    unlinking to a detached ``rm -rf`` that outlives this process.

    Why: unlinking a 1 GiB image takes 0.2-0.7 s of wall time on an ext4
    mounted with ``discard`` (the blocks are trimmed as they are freed) and
    almost no CPU; after a commit nobody waits for it, so the command need
    not either.  Trees that an earlier remover left (it was killed) go
    with the same ``rm``: see :func:`sweep_discarded`."""
    if path.exists():
        trash = path.parent / DISCARDED
        trash.mkdir(mode=0o700, exist_ok=True)
        rename_durably(path, trash / f"{path.name}.{os.urandom(8).hex()}")
    if not removals_deferred_in(path.parent):
        sweep_discarded(path.parent)


#: Directories whose removers wait (:func:`removals_deferred`), and how many
#: blocks defer them.
_deferred: Counter[str] = Counter()
_deferred_lock = threading.Lock()


def removals_deferred_in(directory: Path) -> bool:
    """Whether :func:`discard_tree` in ``directory`` only sets trees aside."""
    with _deferred_lock:
        return _deferred[os.path.abspath(directory)] > 0


@contextmanager
def removals_deferred(directory: Path) -> Iterator[None]:
    """While the block runs (a migration from ``directory``),
    :func:`discard_tree` there only sets trees aside in :data:`DISCARDED`
    (the name is free, the rename durable); their remover starts when the
    block ends.

    Why: a remover unlinking a GiB on a filesystem mounted with
    ``discard`` trims the freed blocks in the journal's next commit, and
    every ``fsync`` meanwhile waits for it (10 to 60 ms each, for a quarter
    of a second, measured here).  A committed source gives its copy up
    while the migration's last steps are still journaled -- its own
    ``released`` and outcome, and, on one filesystem, the destination's
    move into place and resume -- each an ``fsync``.  A process killed in
    the block leaves the trees set aside: the next discard in the
    directory, or the recovery of that migration, starts their remover.
    Each block's end starts the remover, whatever other blocks of the
    directory still run (a live migration's may run for minutes)."""
    key = os.path.abspath(directory)
    with _deferred_lock:
        _deferred[key] += 1
    try:
        yield
    finally:
        with _deferred_lock:
            _deferred[key] -= 1
            if _deferred[key] <= 0:
                del _deferred[key]
        sweep_discarded(directory)


def sweep_discarded(directory: Path) -> None:
    """Start a detached ``rm -rf`` of whatever :func:`discard_tree` left in
    ``directory`` (nothing to do: nothing is started).  Removing a tree
    twice at once is harmless (``rm -f``), so a remover still running is
    no reason to wait."""
    trash = directory / DISCARDED
    try:
        left = [str(p) for p in trash.iterdir()]
    except FileNotFoundError:
        return
    if left:
        # sh starts rm in the background and exits at once: rm is
        # reparented to init (no zombie in a long-lived daemon) and
        # nothing waits for it; it holds no descriptor of ours.
        subprocess.run(
            ["sh", "-c", 'rm -rf -- "$@" </dev/null >/dev/null 2>&1 &', "rm", *left],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
            start_new_session=True,
        )


def discarding(directory: Path) -> bool:
    """Whether trees :func:`discard_tree` renamed in ``directory`` are still
    being removed."""
    trash = directory / DISCARDED
    return trash.is_dir() and any(trash.iterdir())


def write_all(f: Any, data: bytes | memoryview) -> None:
    """Write all of ``data`` to an unbuffered file, finishing short writes
    (an unbuffered ``write`` may write less, e.g. after a signal)."""
    view = memoryview(data)
    while view:
        view = view[f.write(view) :]

"""
Where a host's runtime files live, and how a restart removes what a killed
process left there.

Runtime files are the UNIX sockets of running programs (a QEMU's QMP
socket, its vTPM's control socket, a live migration's stream socket) and the
links swtpm follows to a VM's vTPM state.  They belong to a host state
directory, and live in one directory of their own, its *runtime directory*:

- ``STATE/run`` when its longest socket path fits in a UNIX socket address
  (107 bytes: the limit that sent these files to ``/tmp`` before);
- otherwise ``TMP/securemig-run-DIGEST``, DIGEST a hash of the state
  directory's absolute path, TMP the temporary directory (``$TMPDIR``),
  used only if it is this user's own directory (:func:`private`).

A process that works for a state directory (the daemon, ``securemig
migrate``, ``vm start``) makes its runtime directory its own with :func:`use`
(the choice is inherited by the programs it starts); one that has none uses
a directory per user in the temporary directory (:func:`current`).  A VM
records, when its QEMU starts, where its sockets are, so every process finds
them.  The daemon, once its recovery has run at start, removes with
:func:`clean` what no running program holds any more: the files of programs
that were SIGKILLed (or whose host was) mid-migration.

Entries are named ``KIND-ID`` (``qmp-ID.sock``, ``vtpm-ID.sock``,
``vtpm-state-ID``, ``live-ID.sock``): the entries with one ID belong to one
VM's programs or one live stream.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: This process's runtime directory (set by :func:`use`, inherited by the
#: programs it starts).
ENV = "SECUREMIG_RUNTIME_DIR"
#: Where every process of this host serialises its use of a TPM
#: (``trust/tpm/tpm.py``, ``lock_path``); the temporary directory when unset.
TPM_LOCK_ENV = "SECUREMIG_TPM_LOCK_DIR"
#: The bytes of a UNIX socket path, its terminating NUL excluded.
SOCKET_PATH_MAX = 107
#: The longest name put in a runtime directory: a live stream's socket,
#: named by the migration id and the side.
LONGEST_NAME = len("live-" + "0" * 32 + "-d.sock")

#: ``KIND-ID[.sock|.new]``: ID a digest or a migration id in hex, and a side.
_ENTRY = re.compile(r"^[a-z-]+?-(?P<id>[0-9a-f]{16,}(?:-[a-z])?)(?:\.sock|\.new)?$")


def for_state_dir(state: Path) -> Path:
    """The runtime directory of the host state directory ``state``."""
    state = state.absolute()
    run = state / "run"
    if len(os.fsencode(run)) + 1 + LONGEST_NAME <= SOCKET_PATH_MAX:
        return run
    digest = hashlib.sha256(os.fsencode(state)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"securemig-run-{digest}"


def use(state: Path) -> Path:
    """Make ``state``'s runtime directory this process's (and the programs'
    it starts); creates it, private to this user, and removes it at exit if
    nothing is left in it."""
    run = private(for_state_dir(state))
    os.environ[ENV] = str(run)
    if run not in _used:
        _used.add(run)
        atexit.register(remove_if_empty, run)
    return run


_used: set[Path] = set()


def current() -> Path:
    """This process's runtime directory (created if missing): the one
    :func:`use` chose, else one per user in the temporary directory."""
    chosen = os.environ.get(ENV)
    run = (
        Path(chosen) if chosen else Path(tempfile.gettempdir()) / f"securemig-run-uid{os.getuid()}"
    )
    return private(run)


class NotPrivate(OSError):
    """A runtime directory another user could reach into: its sockets
    (QEMU's monitor, its vTPM's, a live stream's plaintext) would be theirs
    to replace.  The message says whose it is and what to do."""


def private(run: Path) -> Path:
    """``run``, created mode 0700 if missing, checked to be a directory of
    this user's own, not a link, mode 0700 (one of ours with a looser mode
    is tightened).  In the temporary directory anyone may have made the
    name first: :class:`NotPrivate` then, never a socket in it."""
    run.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(run)
    problem = None
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory"
    elif st.st_uid != os.geteuid():
        problem = f"belongs to uid {st.st_uid}, not to uid {os.geteuid()}"
    if problem is not None:
        raise NotPrivate(
            f"runtime directory {run} {problem}: another user may have made it to reach "
            "this host's sockets; remove it, or choose another with "
            f"{ENV} or a shorter --state-dir"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(run, 0o700)
    return run


def remove_if_empty(run: Path) -> None:
    """Remove the runtime directory ``run`` if nothing is in it (a process
    that ends cleanly leaves no empty directory in the temporary directory)."""
    with contextlib.suppress(OSError):
        run.rmdir()


@contextlib.contextmanager
def own_run_dir(work: Path) -> Iterator[None]:
    """While in the block, the TPM lock files of this process and of the
    programs it starts go to ``work/run`` (a lab's, the demo's or a
    benchmark's own TPMs: nobody else uses them), and so do the runtime
    files of what this process starts itself (:func:`for_state_dir` of
    ``work``), each unless a directory was chosen already (the test
    suite's, an operator's)."""
    chosen = {
        TPM_LOCK_ENV: work / "run",
        ENV: for_state_dir(work),
    }
    mine = [name for name in chosen if not os.environ.get(name)]
    for name in mine:
        chosen[name].mkdir(mode=0o700, parents=True, exist_ok=True)
        os.environ[name] = str(chosen[name])
    try:
        yield
    finally:
        for name in mine:
            os.environ.pop(name, None)
        if ENV in mine:
            remove_if_empty(chosen[ENV])


def bound_paths() -> set[str] | None:
    """The paths of every UNIX socket a process of this host holds, bound or
    accepted (``/proc/net/unix``); None when that cannot be read.  Read, not
    connected to: a connection would be taken for a live stream's by the
    QEMU listening there, and would end a swtpm (``--terminate``)."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return None
    return {fields[7] for line in lines if len(fields := line.split(None, 7)) == 8}


def clean(run: Path) -> list[str]:
    """Remove from the runtime directory ``run`` what no running program
    holds; returns the names removed.

    The entries of one ID stay while a process holds one of its sockets (a
    running QEMU or swtpm, a live stream's listener); an ID that has no
    socket stays while the vTPM state its link names exists (a VM between
    the start of its swtpm and its QEMU's).  Everything else goes: the
    sockets, links and unknown entries a killed process left.  Nothing goes
    when which sockets are held cannot be read."""
    bound = bound_paths()
    if bound is None or not run.is_dir():
        return []
    groups: dict[str, list[Path]] = {}
    for entry in run.iterdir():
        match = _ENTRY.match(entry.name)
        groups.setdefault(match["id"] if match else "", []).append(entry)
    removed = []
    for ident, entries in sorted(groups.items()):
        if ident and _group_held(entries, bound):
            continue
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry.name)
    return removed


def _group_held(entries: list[Path], bound: set[str]) -> bool:
    """Whether one ID's entries belong to programs that still run."""
    sockets = [e for e in entries if e.name.endswith(".sock")]
    if sockets:
        return any(str(e) in bound for e in sockets)
    links = [e for e in entries if e.is_symlink()]
    return bool(links) and all(link.exists() for link in links)

"""``securemig status`` and ``securemig recover``: a host's migration
journal, and settling what it holds in doubt."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from securemig import runtime
from securemig.app.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    CommandError,
    Subparsers,
    UsageError,
    check_identity,
    describe,
    error,
    run_interruptible,
)
from securemig.host.arrival import DestinationHost
from securemig.host.journal import Journal, MigrationRecord, dumps, owner_alive
from securemig.host.recovery import settle_departures
from securemig.protocol.phases import Phase
from securemig.trust import vtpm


def add_parser(subparsers: Subparsers) -> None:
    """Register ``securemig status``, ``jobs``, ``abort``, ``recover`` and ``journal``."""
    st = subparsers.add_parser(
        "status",
        help="show the migration journal of a host",
        description="Show recent migrations from a journal: a destination's "
        "--state-dir, or a source's --vm-dir.",
    )
    where = st.add_mutually_exclusive_group(required=True)
    where.add_argument("--state-dir", type=Path, help="a destination's state directory")
    where.add_argument("--vm-dir", type=Path, help="a source's VM directory")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument("--limit", type=int, default=20, help="how many (default %(default)s)")
    st.set_defaults(func=cmd_status)

    jobs = subparsers.add_parser(
        "jobs",
        help="show the migrations running on a host, live",
        description="Show the migrations running now (their process alive) in one or more "
        "journals: a destination's --state-dir, a source's --vm-dir or host state directory "
        "(default $SECUREMIG_STATE_DIR), with phase, bytes done and total, and the rate since "
        "streaming began.  The bytes are journaled every half second.",
    )
    jobs.add_argument(
        "--state-dir", type=Path, action="append", help="a host state directory (repeatable)"
    )
    jobs.add_argument("--vm-dir", type=Path, action="append", help="a source's VM directory")
    jobs.add_argument("--json", action="store_true", help="print JSON")
    jobs.add_argument(
        "--watch",
        type=float,
        metavar="SECONDS",
        help="print again every SECONDS until none runs or Ctrl-C",
    )
    jobs.set_defaults(func=cmd_jobs)

    ab = subparsers.add_parser(
        "abort",
        help="abort a running migration from another shell",
        description="Ask the source process driving migration ID (its id in `securemig jobs`, "
        "or a unique prefix of it or of the destination's migration id) to abort it: it "
        "tells the destination (ABORT) and keeps the VM here, intact and unlocked.  Too late "
        "once the source has committed.  Waits for the migration to end.",
    )
    ab.add_argument("id", help="the migration (a prefix of at least 4 characters will do)")
    abw = ab.add_mutually_exclusive_group()
    abw.add_argument("--state-dir", type=Path, help="the source's host state directory")
    abw.add_argument("--vm-dir", type=Path, help="the source's VM directory")
    ab.add_argument(
        "--timeout",
        type=_seconds,
        default=30.0,
        help="seconds to wait for the migration to end (default %(default)s; 0: do not wait)",
    )
    ab.set_defaults(func=cmd_abort)

    rec = subparsers.add_parser(
        "recover",
        help="settle migrations held in doubt at a destination",
        description="A destination that lost its source after PREPARED keeps the VM in "
        "staging, in doubt.  Given the source's journal (copied from the source host), this "
        "completes the migration if the source committed, or discards it if it did not.",
    )
    rec.add_argument("--state-dir", type=Path, required=True, help="the destination's")
    rec.add_argument(
        "--identity",
        type=Path,
        help="the destination's identity directory, to resume VMs with a vTPM",
    )
    rec.add_argument(
        "--source-journal",
        type=Path,
        required=True,
        help="a copy of the source's journal, made there with `securemig journal export` "
        "(copying journal.sqlite alone may miss what its write-ahead log holds)",
    )
    rec.set_defaults(func=cmd_recover)

    jr = subparsers.add_parser(
        "journal",
        help="copy a host's journal (for recover --source-journal)",
        description="A host's journal is SQLite in WAL mode: copying journal.sqlite alone "
        "may miss what the write-ahead log still holds.  `journal export` writes a "
        "consistent, self-contained copy (SQLite's backup API), safe while migrations run.",
    )
    jr_sub = jr.add_subparsers(dest="journal_action", metavar="ACTION", required=True)
    export = jr_sub.add_parser("export", help="write a consistent copy of the journal to FILE")
    export.add_argument("file", type=Path, help="where to write the copy (must not exist)")
    where = export.add_mutually_exclusive_group(required=True)
    where.add_argument("--state-dir", type=Path, help="this host's state directory")
    where.add_argument("--vm-dir", type=Path, help="a source's VM directory (VM_DIR/.securemig)")
    export.set_defaults(func=cmd_journal_export)


#: Names this host's state directory when no --state-dir is given (the
#: systemd units set it to the daemon's, /var/lib/securemig).
STATE_DIR_ENV = "SECUREMIG_STATE_DIR"


def host_journal(vm_dir: Path, state_dir: Path | None) -> Journal:
    """This host's journal in :func:`source_state_dir`, created if need be;
    :class:`~securemig.app.cli.common.CommandError` if ``vm_dir`` is no
    directory and would hold it, or that directory cannot hold it (not writable, not a
    directory, a file that is no journal)."""
    directory = source_state_dir(vm_dir, state_dir)
    if directory == vm_dir / ".securemig" and not vm_dir.is_dir():
        # A mistyped directory: said, and nothing made there (the journal
        # would go to VM_DIR/.securemig, making it).  With a state directory
        # of its own the journal may still say the VM was given away.
        raise CommandError(f"no directory {vm_dir} (the directory holding VM bundles)")
    try:
        journal = Journal(directory / "journal.sqlite")
        # The sockets and links of the programs this command starts (a
        # QEMU, a live stream's listener) go to this state directory's
        # runtime directory, where its daemon cleans up after a crash.
        runtime.use(directory)
        return journal
    except runtime.NotPrivate as e:
        raise CommandError(str(e)) from None
    except (OSError, sqlite3.Error) as e:
        if isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.OperationalError):
            raise CommandError(
                f"{directory / 'journal.sqlite'} is not a securemig journal ({e}); move it "
                "away, or give --state-dir this host's state directory"
            ) from None
        reason = describe(e) if isinstance(e, OSError) else str(e)
        raise CommandError(
            f"cannot keep this host's journal in {directory} ({reason}); give --state-dir "
            f"(or ${STATE_DIR_ENV}) a writable directory"
        ) from None


def source_state_dir(vm_dir: Path, state_dir: Path | None) -> Path:
    """Where a source keeps its journal: ``--state-dir``, else
    ``$SECUREMIG_STATE_DIR``, else ``VM_DIR/.securemig``.  Give it the
    directory of this host's ``twistd securemig`` so that the daemon settles
    what a ``securemig migrate`` that died left unfinished."""
    if state_dir is not None:
        return state_dir
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV])
    return vm_dir / ".securemig"


async def settle_here(journal: Journal, identity: Path | None, err: TextIO | None = None) -> None:
    """Settle this host's unfinished departures before a command acts (see
    :mod:`securemig.host.recovery`), saying what was done on ``err``
    (default: stderr)."""
    err = err or sys.stderr
    unseal = vtpm.unsealer(identity) if identity is not None else None
    # Without the host's TPM a VM that needs its key is left for the daemon,
    # never aborted and left stopped (a paused QEMU is continued: no key).
    did, owed = await settle_departures(journal, unseal, defer=unseal is None)
    for sentence in did:
        print(f"recovery: {sentence}", file=err)
    if owed:
        print(
            f"recovery: {len(owed)} decision(s) or question(s) still owed to destinations; "
            "this host's twistd securemig (same --state-dir) sends them",
            file=err,
        )


def given_away(journal: Journal, name: str, vm_dir: Path) -> str | None:
    """Why VM ``name`` in ``vm_dir`` must not run or leave here: this host
    gave it away (and it has not come back) and its bundle is gone, or is
    still the one it gave away (its removal did not finish); None otherwise
    (a bundle of that name made since is another VM)."""
    record = journal.given_away(name)
    if record is None:
        return None
    if (vm_dir / name).exists() and record.reached(Phase.RELEASED):
        return None
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.updated))
    return (
        f"VM {name} was migrated to {record.peer_name or record.peer} ({record.peer}) in "
        f"migration {record.migration_id} at {when}; it belongs to that host now"
    )


def cmd_status(args: argparse.Namespace) -> int:
    """``securemig status``: the journal, newest first."""
    state_dir = args.state_dir if args.state_dir else source_state_dir(args.vm_dir, None)
    try:
        journal = open_journal(state_dir / "journal.sqlite")
    except JournalError as e:
        return error(str(e))

    async def settle(reactor: Any) -> None:
        await settle_here(journal, None)

    run_interruptible(settle)
    records = journal.records(args.limit)
    if args.json:
        print(dumps(records))
        return EXIT_OK
    if not records:
        print("no migrations recorded")
    for r in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started))
        print(
            f"{when}  {r.role:<11} {r.vm:<16} {r.protocol:<8} {r.variant:<14} "
            f"{(r.outcome or r.phase):<13} {r.bytes >> 20:>6} MiB  peer {peer_of(r)}"
            + (f"\n    {r.error}" if r.error else "")
        )
    refusals = journal.refusals(args.limit)
    if refusals:
        print("refused arrivals:")
    for f in refusals:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f.at))
        who = f"{f.peer_name} ({f.peer})" if f.peer_name else f.peer
        print(f"{when}  VM {f.vm or '?'} from {who}: {f.code}: {f.reason}")
    return EXIT_OK


def peer_of(record: MigrationRecord) -> str:
    """The peer as the operator knows it: its attested name and address
    (secure variant), else its address."""
    if record.peer_name and record.peer_name not in record.peer:
        return f"{record.peer_name} ({record.peer})"
    return record.peer


def job_journals(args: argparse.Namespace) -> list[tuple[Path, Journal]]:
    """The journals ``jobs`` reads: each ``--state-dir`` and ``--vm-dir``
    given, else ``$SECUREMIG_STATE_DIR``; :class:`UsageError` if none."""
    dirs = list(args.state_dir or []) + [source_state_dir(v, None) for v in args.vm_dir or []]
    if not dirs and os.environ.get(STATE_DIR_ENV):
        dirs = [Path(os.environ[STATE_DIR_ENV])]
    if not dirs:
        raise UsageError(f"give --state-dir DIR or --vm-dir DIR (or set ${STATE_DIR_ENV})")
    journals = []
    for directory in dirs:
        try:
            journals.append((directory, open_journal(directory / "journal.sqlite")))
        except JournalError as e:
            raise CommandError(str(e)) from None
    return journals


def job(record: MigrationRecord, now: float) -> dict[str, Any]:
    """What ``jobs`` shows of a running migration."""
    streaming = next((at for phase, at in record.events if phase == Phase.STREAMING), None)
    rate = None
    if streaming is not None and record.updated > streaming and record.bytes:
        rate = record.bytes / (record.updated - streaming)
    return {
        "id": record.id,
        "migration_id": record.migration_id,
        "role": record.role,
        "vm": record.vm,
        "peer": peer_of(record),
        "protocol": record.protocol,
        "phase": record.phase,
        "bytes": record.bytes,
        "total": record.total,
        "rate_mibps": None if rate is None else round(rate / (1 << 20), 2),
        "seconds": round(now - record.started, 1),
    }


def cmd_jobs(args: argparse.Namespace) -> int:
    """``securemig jobs``: the running migrations of one or more journals."""
    journals = job_journals(args)
    if args.watch is not None and args.watch <= 0:
        raise UsageError("--watch takes a positive number of seconds")
    try:
        while True:
            now = time.time()
            jobs = [job(r, now) for _, j in journals for r in j.running()]
            _print_jobs(jobs, args.json)
            if args.watch is None or not jobs:
                return EXIT_OK
            sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return EXIT_OK


def _print_jobs(jobs: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(jobs, indent=2))
        return
    if not jobs:
        print("no migration is running")
        return
    print(f"{'ID':<12}  {'ROLE':<11} {'VM':<16} {'PHASE':<13} {'DONE / TOTAL':>22}  RATE")
    for j in jobs:
        total = j["total"]
        done = f"{j['bytes'] / (1 << 20):.1f}"
        if total:
            done += f" / {total / (1 << 20):.1f} MiB {100 * j['bytes'] // total:>3}%"
        else:
            done += " MiB"
        rate = f"{j['rate_mibps']:.1f} MiB/s" if j["rate_mibps"] is not None else "-"
        print(
            f"{j['id'][:12]:<12}  {j['role']:<11} {j['vm']:<16} {j['phase']:<13} {done:>22}  "
            f"{rate}  {j['seconds']:.0f} s  peer {j['peer']}"
        )


def cmd_abort(args: argparse.Namespace) -> int:
    """``securemig abort``: ask the process driving a migration to abort it."""
    state_dir = args.state_dir
    if state_dir is None:
        if args.vm_dir is None and not os.environ.get(STATE_DIR_ENV):
            raise UsageError(f"give --state-dir DIR or --vm-dir DIR (or set ${STATE_DIR_ENV})")
        state_dir = source_state_dir(args.vm_dir or Path("."), None)
    if len(args.id) < 4:
        raise UsageError("give at least 4 characters of the migration id")
    try:
        journal = open_journal(state_dir / "journal.sqlite")
    except JournalError as e:
        raise CommandError(str(e)) from None
    record = _find(journal, args.id)
    name = f"migration {record.id[:12]} of VM {record.vm}"
    if record.role != "source":
        raise CommandError(
            f"{name} arrives here from {peer_of(record)}; abort it at its source "
            "(securemig abort there): the source decides"
        )
    if record.outcome is not None:
        raise CommandError(f"{name} has already ended: {record.outcome}")
    if record.reached(Phase.COMMITTED):
        raise CommandError(f"{name} has committed: the VM belongs to {peer_of(record)} now")
    if not owner_alive(record.owner):
        raise CommandError(
            f"{name} is not running (its process is gone); this host's twistd securemig "
            "settles it, or any securemig command on this journal (securemig status)"
        )
    journal.request_abort(record.id)
    deadline = time.monotonic() + args.timeout
    while True:
        current = journal.get(record.id)
        assert current is not None
        if current.outcome is not None or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if current.outcome is None:
        print(f"asked {name} to abort; it has not ended yet (see securemig jobs)")
        return EXIT_OK if args.timeout == 0 else EXIT_FAILED
    if current.outcome == "aborted":
        print(f"{name} aborted: the VM stays here ({current.error})")
        return EXIT_OK
    raise CommandError(f"{name} ended {current.outcome} before the abort took effect")


def _find(journal: Journal, prefix: str) -> MigrationRecord:
    """The one migration whose local or migration id starts with ``prefix``."""
    found = {
        r.id: r
        for r in journal.records(1000)
        if r.id.startswith(prefix) or (r.migration_id or "").startswith(prefix)
    }
    if not found:
        raise CommandError(f"no migration {prefix} in {journal.path} (see securemig jobs)")
    if len(found) > 1:
        raise UsageError(f"{prefix} names {len(found)} migrations; give more of its id")
    return next(iter(found.values()))


def open_journal(path: Path) -> Journal:
    """An existing journal, or :class:`JournalError` saying why it is not one."""
    if not path.is_file():
        raise JournalError(f"no journal at {path}")
    try:
        journal = Journal(path)
        journal.records(1)
    except sqlite3.DatabaseError as e:
        raise JournalError(f"{path} is not a securemig journal ({e})") from None
    return journal


class JournalError(Exception):
    """A journal file the command cannot use; the message says why."""


def cmd_journal_export(args: argparse.Namespace) -> int:
    """``securemig journal export``: a consistent copy of a host's journal."""
    state_dir = args.state_dir if args.state_dir else source_state_dir(args.vm_dir, None)
    try:
        journal = open_journal(state_dir / "journal.sqlite")
        journal.export(args.file)
    except JournalError as e:
        return error(str(e))
    except (FileExistsError, OSError, sqlite3.Error) as e:
        return error(f"cannot write {args.file}: {e}")
    print(f"journal of {state_dir} exported to {args.file}")
    return EXIT_OK


def cmd_recover(args: argparse.Namespace) -> int:
    """``securemig recover``: settle in-doubt migrations from both journals."""
    try:
        source = open_journal(args.source_journal)
    except JournalError as e:
        return error(str(e))
    host = DestinationHost(args.state_dir)
    if args.identity:
        check_identity(args.identity)
        host.unseal = vtpm.unsealer(args.identity)

    async def settle(reactor: Any) -> list[tuple[str, str]]:
        return await host.settle(source)

    actions = run_interruptible(settle)
    if not actions:
        print("nothing is in doubt here")
    for migration_id, action in actions:
        print(f"{migration_id}: {action}")
    return EXIT_OK


def _seconds(text: str) -> float:
    """An argument type: a finite number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, not {text}")
    return value

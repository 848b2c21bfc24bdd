"""``securemig status`` and ``securemig recover``: a host's migration
journal, and settling what it holds in doubt."""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from securemig.app.cli.common import (
    EXIT_OK,
    CommandError,
    Subparsers,
    check_identity,
    describe,
    error,
    run_interruptible,
)
from securemig.host.arrival import DestinationHost
from securemig.host.journal import Journal, dumps
from securemig.host.recovery import settle_departures
from securemig.trust import vtpm


def add_parser(subparsers: Subparsers) -> None:
    """Register ``securemig status``, ``securemig recover`` and ``securemig journal``."""
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
        help="the source's journal.sqlite (VM_DIR/.securemig/journal.sqlite there)",
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
    :class:`~securemig.app.cli.common.CommandError` if that directory cannot
    hold it (not writable, not a directory, a file that is no journal)."""
    directory = source_state_dir(vm_dir, state_dir)
    try:
        return Journal(directory / "journal.sqlite")
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


async def settle_here(journal: Journal, identity: Path | None) -> None:
    """Settle this host's unfinished departures before a command acts (see
    :mod:`securemig.host.recovery`), saying what was done on stderr."""
    unseal = vtpm.unsealer(identity) if identity is not None else None
    did, owed = await settle_departures(journal, unseal)
    for sentence in did:
        print(f"recovery: {sentence}", file=sys.stderr)
    if owed:
        print(
            f"recovery: {len(owed)} decision(s) still owed to destinations; this host's "
            "twistd securemig (same --state-dir) sends them",
            file=sys.stderr,
        )


def given_away(journal: Journal, name: str, vm_dir: Path) -> str | None:
    """Why VM ``name`` in ``vm_dir`` must not run or leave here: this host
    gave it away (and it has not come back) and its bundle is gone, or is
    still the one it gave away (its removal did not finish); None otherwise
    (a bundle of that name made since is another VM)."""
    record = journal.given_away(name)
    if record is None:
        return None
    if (vm_dir / name).exists() and record.reached("released"):
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
            f"{(r.outcome or r.phase):<13} {r.bytes >> 20:>6} MiB  peer {r.peer}"
            + (f"\n    {r.error}" if r.error else "")
        )
    return EXIT_OK


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

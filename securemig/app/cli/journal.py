"""``securemig status`` and ``securemig recover``: a host's migration
journal, and settling what it holds in doubt."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from securemig.app.cli.common import EXIT_OK, Subparsers, error
from securemig.host.arrival import DestinationHost
from securemig.host.journal import Journal, dumps
from securemig.transport.reactor import run_reactor
from securemig.trust import vtpm


def add_parser(subparsers: Subparsers) -> None:
    """Register ``securemig status`` and ``securemig recover``."""
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


def source_state_dir(vm_dir: Path, state_dir: Path | None) -> Path:
    """Where a source keeps its journal."""
    return state_dir if state_dir is not None else vm_dir / ".securemig"


def cmd_status(args: argparse.Namespace) -> int:
    """``securemig status``: the journal, newest first."""
    state_dir = args.state_dir if args.state_dir else source_state_dir(args.vm_dir, None)
    path = state_dir / "journal.sqlite"
    if not path.exists():
        return error(f"no journal at {path}")
    records = Journal(path).records(args.limit)
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


def cmd_recover(args: argparse.Namespace) -> int:
    """``securemig recover``: settle in-doubt migrations from both journals."""
    if not args.source_journal.is_file():
        return error(f"no source journal at {args.source_journal}")
    host = DestinationHost(args.state_dir)
    if args.identity:
        host.unseal = vtpm.unsealer(args.identity)
    source = Journal(args.source_journal)

    async def settle(reactor: Any) -> list[tuple[str, str]]:
        return await host.settle(source)

    actions = run_reactor(settle)
    if not actions:
        print("nothing is in doubt here")
    for migration_id, action in actions:
        print(f"{migration_id}: {action}")
    return EXIT_OK

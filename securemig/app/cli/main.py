"""
The ``securemig`` command.

Exit status: 0 when the work asked for is done; 1 when it failed and
nothing was lost (for ``migrate``: the VM is still at the source, unlocked);
2 for usage errors; 3 when ``migrate`` committed but the destination did
not confirm the resume (see ``securemig status`` on the destination).

Each command group lives in a module of this package that registers its
commands with ``add_parser`` and sets ``func``, the ``cmd_*`` that runs one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from securemig import __version__
from securemig.app.cli import identity, journal, lab, migrate, policy, vm
from securemig.app.cli.common import EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(
        prog="securemig",
        description="Move a suspended VM and its virtual TPM to another host. "
        "The destination runs `twistd securemig`; this command drives the source, "
        "creates test VMs, shows the journal and runs the demo and the benchmark.",
    )
    p.add_argument("--version", action="version", version=f"securemig {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # In the order `securemig --help` lists them.
    vm.add_parser(sub)  # vm
    migrate.add_parser(sub)  # migrate
    journal.add_parser(sub)  # status, recover
    lab.add_demo_parser(sub)  # demo
    identity.add_parser(sub)  # ca, pca, host
    policy.add_parser(sub)  # policy
    lab.add_bench_parser(sub)  # bench
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``securemig`` console script."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("securemig: interrupted", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

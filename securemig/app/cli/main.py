"""
The ``securemig`` command.

Exit status: 0 when the work asked for is done; 1 when it failed and
nothing was lost (for ``migrate``: the VM is still at the source, unlocked);
2 for usage errors, argparse's own and those it cannot see (a missing
variant, a bad chunk size, a malformed list: :class:`.common.UsageError`);
3 when ``migrate`` committed but the destination did not confirm the resume
(see ``securemig status`` on the destination).

No operator mistake ends in a traceback: :func:`main` reports every error
securemig expects (:class:`~securemig.protocol.errors.MigrationError`,
``OSError``, ``sqlite3.Error``, a TPM's own refusal,
:class:`.common.CommandError`) as one line, ``securemig: error: ...``;
anything else is a bug, reported as an internal error.  ``securemig --debug
COMMAND`` shows the traceback of either.  ``tests/app/test_misuse.py`` runs
a table of operator mistakes against the real command.

Each command group lives in a module of this package that registers its
commands with ``add_parser`` and sets ``func``, the ``cmd_*`` that runs one.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sqlite3
import sys
import threading
import traceback
from collections.abc import Callable
from typing import TextIO

from tpm2_pytss import TSS2_Exception

from securemig import __version__
from securemig.app import config
from securemig.app.cli import config as config_cmd
from securemig.app.cli import identity, journal, lab, migrate, policy, settings, tpm, vm
from securemig.app.cli.common import (
    EXIT_FAILED,
    EXIT_STATUS_HELP,
    EXIT_USAGE,
    CommandError,
    HelpFormatter,
    describe,
    error,
    walk_parsers,
)
from securemig.protocol.errors import MigrationError


def build_parser(
    loaded: config.Config | None = None, probe: bool = False
) -> argparse.ArgumentParser:
    """The argument parser of every subcommand, its options' defaults taken
    from the configuration file ``loaded`` (see :mod:`settings`; ``probe``:
    its probe parser)."""
    p = settings.Parser(
        config=loaded,
        probe=probe,
        prog="securemig",
        description="Move a VM and its virtual TPM to another host, only to an attested "
        "one: suspended (stopped, streamed, resumed there), or live with `migrate --live` "
        "(a running QEMU guest or adopted libvirt domain keeps running while its memory is "
        "copied and stops only for the last dirty pages; needs the secure variant and the "
        "VM's backend on both hosts; a QEMU guest's disk on shared storage, as it does not "
        "yet copy a disk of a QEMU guest, a libvirt domain's disks shared or copied with "
        "--copy-storage).  The destination runs `twistd securemig`; this command drives "
        "the source, creates test VMs, adopts libvirt domains, shows the journal and runs "
        "the demo and the benchmark.",
    )
    p.add_argument("--version", action="version", version=f"securemig {__version__}")
    p.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error (before the command: securemig --debug migrate ...)",
    )
    p.add_argument(
        "--config",
        metavar="PATH",
        help=f"the configuration file (default: ${config.CONFIG_ENV}, else "
        f"{config.DEFAULT_PATH} if it exists); options given here override it",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # In the order `securemig --help` lists them.
    vm.add_parser(sub)  # vm
    migrate.add_parser(sub)  # migrate
    journal.add_parser(sub)  # status, jobs, abort, recover, journal
    config_cmd.add_parser(sub)  # config
    lab.add_demo_parser(sub)  # demo
    identity.add_parser(sub)  # ca, pca, host
    policy.add_parser(sub)  # policy
    tpm.add_parser(sub)  # tpm
    lab.add_bench_parser(sub)  # bench
    # Every command's --help ends with the exit statuses, laid out the same way.
    for parser in walk_parsers(p):
        parser.formatter_class = HelpFormatter
        if parser.epilog is None:
            parser.epilog = EXIT_STATUS_HELP
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``securemig`` console script: run one command and
    turn whatever it raises into one error line and its exit status."""
    # Called without arguments: as the console script, the whole process.
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else argv
    given = _config_option(argv)
    try:
        loaded = config.load(given)
    except config.ConfigError as e:
        print(f"securemig: error: {e}", file=sys.stderr)
        return EXIT_USAGE

    def parse(line: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
        parsed = build_parser(loaded).parse_args(line)
        # The same line again, to tell what it gave from what the file did.
        probe = build_parser(loaded, probe=True).parse_args(line)
        return parsed, settings.origins(parsed, probe)

    args, origins = parse(argv)
    args._config, args._config_given, args._origins, args._parse = loaded, given, origins, parse
    # `migrate --daemon` hands the line as given to this host's daemon.
    args._argv = argv
    status = _run(args)
    if as_program and args.command in EXIT_AT_ONCE:
        _exit_at_once(status)
    return status


#: Commands that, run as the program, end without the interpreter's
#: teardown once their work is done and reported (see :func:`_exit_at_once`).
EXIT_AT_ONCE = frozenset({"migrate"})


def _exit_at_once(status: int) -> None:
    """End the process now that the command's work is done and reported.

    What an operator waits for after ``migrate`` said DONE is only the
    interpreter tearing down its hundreds of modules (0.1-0.2 CPU-s,
    measured in ``doc/performance.rst``).  The exit handlers still run and
    the output is flushed; with a non-daemon thread still running this
    returns, and the process ends the ordinary way (which waits for it).
    """
    if any(
        t.is_alive() and not t.daemon
        for t in threading.enumerate()
        if t is not threading.main_thread()
    ):
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _run(args: argparse.Namespace) -> int:
    """Run the parsed command, turning what it raises into one error line
    and its exit status."""
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except KeyboardInterrupt:
        _debug(args)
        print("securemig: interrupted", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:
        _debug(args)
        return exit_status(e, sys.stderr)


def exit_status(e: Exception, err: TextIO) -> int:
    """What a command raised, said as one error line on ``err``; returns
    the exit status it ends the command with.  (The daemon reports a
    ``migrate --daemon`` it ran the same way: ``app/control.py``.)"""
    if isinstance(e, CommandError):
        print(f"securemig: error: {e}", file=err)
        return e.status
    if isinstance(e, MigrationError | OSError | sqlite3.Error):
        return error(describe(e), err)
    if isinstance(e, TSS2_Exception):
        return error(
            f"the TPM refused: {e}; a key made by another TPM does not load here: is "
            "--identity this host's own identity directory?",
            err,
        )
    # Not an operator's mistake but a bug: still no traceback unless asked.
    return error(
        f"internal error: {type(e).__name__}: {e} (run again with --debug for the "
        "traceback, and report it)",
        err,
    )


def parse_for_daemon(
    argv: list[str], config_path: str | None, out: TextIO, err: TextIO
) -> argparse.Namespace | int:
    """The command line ``argv`` a client of the daemon gave, parsed as
    :func:`main` parses it (the configuration file ``--config`` names, else
    ``config_path``, else the default one), with what argparse would print
    written to ``out`` and ``err``; an exit status instead of the namespace
    when it ends there (a usage error: 2, ``--help``: 0)."""
    given = _config_option(argv) or config_path
    try:
        loaded = config.load(given)
    except config.ConfigError as e:
        print(f"securemig: error: {e}", file=err)
        return EXIT_USAGE
    parser = build_parser(loaded)
    for each in walk_parsers(parser):
        # argparse prints its usage errors and help to sys.stderr and
        # sys.stdout, the daemon's: these go to the client instead.
        each._print_message = _printer(out, err)  # type: ignore[method-assign,assignment]
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    args._config, args._config_given, args._argv = loaded, given, argv
    return args


def _printer(out: TextIO, err: TextIO) -> Callable[[str, object], None]:
    """argparse's ``_print_message``, to ``out`` for what it would print on
    stdout (help, version) and to ``err`` for the rest."""

    def print_message(message: str, file: object = None) -> None:
        if message:
            (out if file is sys.stdout else err).write(message)

    return print_message


def _config_option(argv: list[str]) -> str | None:
    """The ``--config PATH`` before the command, if given (the file must be
    read before the command line is parsed: it changes the defaults)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--debug", action="store_true")
    known, _ = pre.parse_known_args(argv[: _command_index(argv)])
    return known.config


def _command_index(argv: list[str]) -> int:
    """Where the command starts: the first word that is no option of
    ``securemig`` itself or its value."""
    i = 0
    while i < len(argv):
        if argv[i] == "--config":
            i += 2
        elif argv[i].startswith("-"):
            i += 1
        else:
            return i
    return i


def _debug(args: argparse.Namespace) -> None:
    """With ``--debug``, print the traceback of the exception being handled."""
    if args.debug:
        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())

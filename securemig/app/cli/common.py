"""
What the modules of the ``securemig`` command share: exit statuses, the
error line, the errors a command raises for :func:`securemig.app.cli.main.main`
to report, argument types, and running the reactor so that Ctrl-C ends a
command cleanly.  (Here rather than in :mod:`.main`, which imports every
command module: they cannot import it back.)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TextIO, TypeAlias, TypeVar

from securemig.transport.reactor import run_reactor

#: See the docstring of :mod:`securemig.app.cli.main`.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_IN_DOUBT = 0, 1, 2, 3

#: The exit statuses, as ``securemig --help`` and ``migrate --help`` list them.
EXIT_STATUS_HELP = """\
exit status:
  0  done
  1  failed, and nothing was lost (migrate: the VM is still here, intact,
     unlocked)
  2  usage error: the command line is wrong (nothing was done)
  3  migrate committed, but the destination did not confirm the resume
     (see `securemig status` there)

Add --debug (before the command) to see the traceback of an error."""


class HelpFormatter(argparse.HelpFormatter):
    """The layout of every ``securemig`` help: argparse's, except that a
    text with line breaks (the exit statuses) was laid out by hand and is
    printed as written; a text without is wrapped to the terminal."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def walk_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every subcommand's parser below it, depth first in the
    order ``--help`` lists them (each once, aliases not repeated); their
    ``prog`` is the command as typed, e.g. ``securemig vm create``.  The
    exit statuses of every help and the command reference (``doc/commands.rst``)
    are made from it."""
    yield parser
    seen: set[int] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    yield from walk_parsers(sub)


#: What ``ArgumentParser.add_subparsers`` returns; each command module adds
#: its commands to it.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

T = TypeVar("T")


class CommandError(Exception):
    """A command cannot do what was asked; the message says what is wrong
    and what to do.  :func:`~securemig.app.cli.main.main` prints it as one
    error line and exits with :attr:`status`."""

    #: The exit status this error ends the command with.
    status = EXIT_FAILED


class UsageError(CommandError):
    """The command line is wrong in a way the parser cannot see (a missing
    variant, a bad chunk size, a malformed list): exit status 2."""

    status = EXIT_USAGE


def error(message: str, err: TextIO | None = None) -> int:
    """Tell the operator what went wrong, on ``err`` (default: stderr);
    returns ``EXIT_FAILED`` for a command to return."""
    print(f"securemig: error: {message}", file=err or sys.stderr)
    return EXIT_FAILED


def usage_error(message: str, err: TextIO | None = None) -> int:
    """Tell the operator their command line is wrong, on ``err`` (default:
    stderr); returns ``EXIT_USAGE`` for a command to return."""
    print(f"securemig: error: {message}", file=err or sys.stderr)
    return EXIT_USAGE


def describe(e: BaseException) -> str:
    """An exception as a sentence for the operator: an ``OSError`` as what
    failed and on which file (not ``[Errno 2] ...``), others as their text."""
    if isinstance(e, OSError) and e.strerror:
        files = [str(f) for f in (e.filename, e.filename2) if f is not None]
        return f"{e.strerror}: {' -> '.join(files)}" if files else e.strerror
    return str(e) or type(e).__name__


def _mib(text: str) -> int:
    """An argument type: a positive whole number of MiB.  (argparse names
    the type in its message for a non-number, "invalid _mib value".)"""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of MiB")
    return value


def int_list(text: str, option: str, minimum: int = 0) -> list[int]:
    """The whole numbers of a comma-separated option (``--sizes 128,256``),
    or :class:`UsageError` naming the option and the item that is not one."""
    values = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        if not item.isdigit() or int(item) < minimum:
            raise UsageError(
                f"{option} takes comma-separated whole numbers of at least {minimum}, not {item!r}"
            )
        values.append(int(item))
    if not values:
        raise UsageError(f"{option} needs at least one number")
    return values


def run_interruptible(
    main: Callable[[Any], Coroutine[Any, Any, T]],
    on_interrupt: Callable[[Any], None] | None = None,
) -> T:
    """Run the reactor until ``main(reactor)`` finishes (see
    :func:`~securemig.transport.reactor.run_reactor`), with Ctrl-C made safe.

    The first SIGINT does not stop the reactor under the running work (that
    left a migration half torn down and a ``ReactorNotRunning`` traceback):
    it calls ``on_interrupt(reactor)`` (``migrate`` cancels its migration
    there), or else lets ``main`` finish what it started.  A second SIGINT
    exits at once with status 1; the journal lets the next command or this
    host's daemon settle whatever was left unfinished.
    """
    interrupts = 0

    async def guarded(reactor: Any) -> T:
        def interrupted() -> None:
            nonlocal interrupts
            interrupts += 1
            if interrupts > 1:
                print(
                    "securemig: interrupted again: exiting now; this host's journal settles "
                    "what was left unfinished (see `securemig status`)",
                    file=sys.stderr,
                )
                sys.stderr.flush()
                os._exit(EXIT_FAILED)
            if on_interrupt is None:
                print(
                    "securemig: interrupted: finishing the step under way (Ctrl-C again to "
                    "exit at once)",
                    file=sys.stderr,
                )
            else:
                on_interrupt(reactor)

        def handler(signum: int, frame: object) -> None:
            reactor.callFromThread(interrupted)

        previous = signal.signal(signal.SIGINT, handler)
        try:
            return await main(reactor)
        finally:
            signal.signal(signal.SIGINT, previous)

    return run_reactor(guarded)


def check_identity(directory: Path) -> Path:
    """``directory`` if it is a host identity directory (``securemig host
    init``) whose ``host.json`` names the host and its TPM; else
    :class:`CommandError` saying what is wrong with it and what to do."""
    what = f"{directory} is not a host identity directory"
    todo = "give the directory `securemig host init --dir` made"
    if not directory.is_dir():
        raise CommandError(f"{what}: it does not exist or is no directory; {todo}")
    try:
        data = json.loads((directory / "host.json").read_bytes())
    except FileNotFoundError:
        raise CommandError(f"{what}: it has no host.json; {todo}") from None
    except OSError as e:
        raise CommandError(f"cannot read {directory / 'host.json'}: {describe(e)}") from None
    except ValueError as e:
        raise CommandError(f"{directory / 'host.json'} is not JSON ({e}); {todo}") from None
    if not isinstance(data, dict):
        raise CommandError(f"{directory / 'host.json'} is not a JSON object; {todo}")
    for key, what in (("name", "the host"), ("tpm", "its TPM")):
        if not isinstance(data.get(key), str) or not data[key]:
            raise CommandError(f"{directory / 'host.json'} does not name {what} ({key!r}); {todo}")
    if not (directory / "pca.pem").is_file():
        raise CommandError(f"{what}: pca.pem is missing; {todo}")
    return directory

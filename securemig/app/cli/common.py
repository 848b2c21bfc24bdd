"""
What the modules of the ``securemig`` command share: exit statuses, the
error line, argument types.  (Here rather than in :mod:`.main`, which
imports every command module: they cannot import it back.)
"""

from __future__ import annotations

import argparse
import sys
from typing import TypeAlias

#: See the docstring of :mod:`securemig.app.cli.main`.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_IN_DOUBT = 0, 1, 2, 3

#: What ``ArgumentParser.add_subparsers`` returns; each command module adds
#: its commands to it.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def error(message: str) -> int:
    """Tell the operator what went wrong, on stderr; returns ``EXIT_FAILED``
    for a command to return."""
    print(f"securemig: error: {message}", file=sys.stderr)
    return EXIT_FAILED


def _mib(text: str) -> int:
    """An argument type: a positive whole number of MiB.  (argparse names
    the type in its message for a non-number, "invalid _mib value".)"""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of MiB")
    return value

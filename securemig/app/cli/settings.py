"""The configuration file under the ``securemig`` command (see
:mod:`securemig.app.config`): options it gives defaults to, filled in
after parsing where the command line did not give them, and where each
value came from, for ``securemig config show``."""

from __future__ import annotations

import argparse
from typing import Any

from securemig.app.cli.common import walk_parsers
from securemig.app.config import Config

#: Stands for "not on the command line" while parsing.
_UNSET = object()


def command_of(parser: argparse.ArgumentParser) -> str:
    """A parser's command as :data:`~securemig.app.config.KEYS` names it
    (``securemig vm create`` -> ``vm create``)."""
    return parser.prog.partition(" ")[2]


def prepare(root: argparse.ArgumentParser, config: Config) -> None:
    """Before parsing: options the file gives are no longer required, and
    each has a stand-in default that tells whether the command line gave it."""
    for parser in walk_parsers(root):
        parser.set_defaults(_parser=parser)
        given = config.defaults_for(command_of(parser))
        for action in parser._actions:
            if action.dest not in given:
                continue
            action.required = False
            for group in parser._mutually_exclusive_groups:
                if action in group._group_actions:
                    group.required = False
            # An appending option keeps None (argparse appends to a default list).
            if not isinstance(action, argparse._AppendAction):
                action.__dict__["_config_default"] = action.default
                action.default = _UNSET


def fill(args: argparse.Namespace, config: Config) -> dict[str, str]:
    """After parsing: the file's value for each option the command line did
    not give (unless it gave another of the option's mutually exclusive
    group); returns where each option's value came from: ``flag``, ``file
    PATH`` or ``default``."""
    parser: argparse.ArgumentParser = args._parser
    given = config.defaults_for(command_of(parser))
    origins: dict[str, str] = {}
    on_command_line = {
        a.dest
        for a in parser._actions
        if getattr(args, a.dest, None) is not _UNSET
        and not (isinstance(a, argparse._AppendAction) and getattr(args, a.dest, None) is None)
        and a.dest in given
    }
    for action in parser._actions:
        dest = action.dest
        if dest not in given:
            continue
        value = getattr(args, dest, None)
        if dest in on_command_line:
            origins[dest] = "flag"
            continue
        excluded = any(
            action in g._group_actions
            and any(o is not action and _given(args, o, on_command_line) for o in g._group_actions)
            for g in parser._mutually_exclusive_groups
        )
        if excluded:
            setattr(args, dest, action.__dict__.get("_config_default"))
            origins[dest] = "default"
            continue
        value = given[dest]
        if isinstance(action, argparse._AppendAction):
            value = [value]
        setattr(args, dest, value)
        origins[dest] = f"file {config.path}"
    for action in parser._actions:
        if action.option_strings and action.dest not in origins and action.dest != "help":
            default = action.default
            value = getattr(args, action.dest, None)
            origins[action.dest] = "default" if value == default else "flag"
    return origins


def _given(args: argparse.Namespace, action: argparse.Action, known: set[str]) -> bool:
    """Whether the command line gave ``action``: known to, or a value other
    than its default."""
    value = getattr(args, action.dest, None)
    return action.dest in known or (value is not _UNSET and value not in (None, action.default))


def unset(value: Any) -> bool:
    """Whether ``value`` is the stand-in of an option nobody gave."""
    return value is _UNSET

"""The configuration file under the ``securemig`` command (see
:mod:`securemig.app.config`): its values are the defaults of the options
they stand for, and where each value came from is told for ``securemig
config show``.

Only argparse's public interface is used.  :class:`Parser` is an
``ArgumentParser`` that reads the file's values *before* it declares its
options: each option the file gives is declared with the file's value as
its ``default`` and not ``required`` (nor is a mutually exclusive group it
belongs to).  To tell a flag from the file, the same command line is parsed
a second time by a *probe* parser, whose every option defaults to a
stand-in: what is not the stand-in there was on the command line.
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

from securemig.app.config import Config

#: Stands for "not on the command line" in the probe parse.
_UNSET = object()


class Parser(argparse.ArgumentParser):
    """An argument parser whose options take their defaults from a
    configuration file (``config``), and its subcommands' parsers too.

    ``options`` lists the options it declared (``config show`` lists them);
    ``exclusive`` the destinations of each mutually exclusive group."""

    def __init__(
        self, *args: Any, config: Config | None = None, probe: bool = False, **kwargs: Any
    ) -> None:
        # argparse's own -h is declared before this parser is ready: as is.
        self.ready = False
        super().__init__(*args, **kwargs)
        self.config = config if config is not None else Config(None, {})
        #: A probe parser: every option defaults to the stand-in, none is required.
        self.probe = probe
        #: What the file gives this command, by argparse destination.
        self.given = self.config.defaults_for(command_of(self))
        self.options: list[argparse.Action] = []
        self.exclusive: list[list[str]] = []
        #: Each option's own default (the one without the file), by destination.
        self.own_defaults: dict[str, Any] = {}
        #: Appending options the file gives (the command line replaces, not extends, the file).
        self.appending: set[str] = set()
        self.set_defaults(_parser=self)
        self.ready = True

    def add_subparsers(self, **kwargs: Any) -> Any:
        """Subcommands' parsers read the same file."""
        kwargs.setdefault("parser_class", partial(Parser, config=self.config, probe=self.probe))
        return super().add_subparsers(**kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        """Declare an option, its default taken from the file if it gives it."""
        if not self.ready:
            return super().add_argument(*args, **kwargs)
        action = super().add_argument(*args, **self.configured(kwargs, args))
        if action.option_strings:
            self.options.append(action)
        return action

    def add_mutually_exclusive_group(self, *, required: bool = False) -> Any:
        """A group whose options take their defaults from the file; a group
        an option of which the file gives is not required."""
        return _ExclusiveGroup(self, super().add_mutually_exclusive_group(required=required))

    def configured(self, kwargs: dict[str, Any], flags: tuple[Any, ...]) -> dict[str, Any]:
        """``add_argument``'s keywords with the file's default applied."""
        dest = kwargs.get("dest") or _dest_of(flags)
        if dest is None:
            return kwargs
        self.own_defaults[dest] = kwargs.get(
            "default", False if kwargs.get("action") == "store_true" else None
        )
        if kwargs.get("action") in ("help", "version", "count"):
            return kwargs
        if self.probe and flags and str(flags[0]).startswith("-"):
            # An appending option appends to its default: keep None, which no flag gives.
            default = None if kwargs.get("action") == "append" else _UNSET
            return _not_required({**kwargs, "default": default})
        if dest in self.given and not self.probe:
            value = self.given[dest]
            if kwargs.get("action") == "append":
                self.appending.add(dest)
                value = [value]
            return _not_required({**kwargs, "default": value})
        return kwargs


class _ExclusiveGroup:
    """A mutually exclusive group of a :class:`Parser`: its options are
    declared through :meth:`Parser.configured`."""

    def __init__(self, parser: Parser, group: Any) -> None:
        self.parser = parser
        self.group = group
        self.dests: list[str] = []
        parser.exclusive.append(self.dests)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        """Declare one of the group's options."""
        action: argparse.Action = self.group.add_argument(
            *args, **self.parser.configured(kwargs, args)
        )
        self.parser.options.append(action)
        self.dests.append(action.dest)
        if self.parser.probe or action.dest in self.parser.given:
            # The file (or the probe) stands in for the one the group requires.
            self.group.required = False
        return action


def _not_required(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``add_argument``'s keywords, the option no longer required."""
    if kwargs.get("required"):
        kwargs["required"] = False
    return kwargs


def _dest_of(flags: tuple[Any, ...]) -> str | None:
    """argparse's destination for these option strings (the first long one)."""
    if not flags:
        return None
    longs = [f for f in flags if str(f).startswith("--")]
    name = str(longs[0] if longs else flags[0]).lstrip("-")
    return name.replace("-", "_")


def command_of(parser: argparse.ArgumentParser) -> str:
    """A parser's command as :data:`~securemig.app.config.KEYS` names it
    (``securemig vm create`` -> ``vm create``)."""
    return parser.prog.partition(" ")[2]


def origins(args: argparse.Namespace, probe: argparse.Namespace) -> dict[str, str]:
    """Where the value of each option of the parsed command came from:
    ``flag``, ``file PATH`` or ``default``.  ``probe`` is the same command
    line parsed by the probe parser.  An option the file gives yields to
    another of its mutually exclusive group given on the command line: it
    gets its own default back."""
    parser: Parser = args._parser
    on_command_line = {
        a.dest for a in parser.options if getattr(probe, a.dest, None) not in (_UNSET, None)
    }
    found: dict[str, str] = {}
    for action in parser.options:
        dest = action.dest
        if dest == "help":
            continue
        if dest in on_command_line:
            if dest in parser.appending:
                setattr(args, dest, getattr(probe, dest))
            found[dest] = "flag"
        elif dest in parser.given:
            excluded = any(
                dest in group and any(o != dest and o in on_command_line for o in group)
                for group in parser.exclusive
            )
            if excluded:
                setattr(args, dest, parser.own_defaults.get(dest))
                found[dest] = "default"
            else:
                found[dest] = f"file {parser.config.path}"
        else:
            found[dest] = "default"
    return found

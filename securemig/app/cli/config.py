"""``securemig config show``: the effective configuration and where each
value came from."""

from __future__ import annotations

import argparse
import json
from typing import Any

from securemig.app import config
from securemig.app.cli.common import EXIT_OK, Subparsers, UsageError


def add_parser(subparsers: Subparsers) -> None:
    """Register ``securemig config show``."""
    cf = subparsers.add_parser(
        "config",
        help="show the configuration file's effect",
        description="The configuration file (--config PATH before the command, else "
        f"${config.CONFIG_ENV}, else {config.DEFAULT_PATH}) gives defaults to the options "
        "of securemig and twistd securemig; options on the command line override it.",
    )
    sub = cf.add_subparsers(dest="config_action", metavar="ACTION", required=True)
    show = sub.add_parser(
        "show",
        help="print the effective values and where each came from",
        description="Without COMMAND: every key of the file, its value and whether it "
        "comes from the file or is left to the default.  With a command line (config show "
        "migrate vm1 --to HOST:PORT): each option of that command, its value and whether "
        "it came from the command line (flag), the file or the default.",
    )
    show.add_argument("--json", action="store_true", help="print JSON")
    show.add_argument(
        "command_line",
        nargs=argparse.REMAINDER,
        metavar="COMMAND ...",
        help="a securemig command line to show the options of (not run)",
    )
    show.set_defaults(func=cmd_config_show)


def cmd_config_show(args: argparse.Namespace) -> int:
    """``securemig config show``: see :func:`add_parser`."""
    loaded: config.Config = args._config
    rows: list[dict[str, Any]]
    if not args.command_line:
        rows = [
            {
                "key": f"{section}.{name}",
                "value": _plain(loaded.values.get((section, name))),
                "from": loaded.origin(section, name),
            }
            for section, keys in config.KEYS.items()
            for name in keys
        ]
    else:
        rows = _options_of(args)
    if args.json:
        print(json.dumps({"file": str(loaded.path) if loaded.path else None, "values": rows}))
        return EXIT_OK
    path, _ = config.path_from(args._config_given)
    print(f"configuration file: {loaded.path or f'{path} (absent)'}")
    for row in rows:
        value = "(not set)" if row["value"] is None else row["value"]
        print(f"  {row['key']:<32} = {value!s:<32} ({row['from']})")
    return EXIT_OK


def _options_of(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each option of the command line ``args.command_line``, parsed as
    ``securemig`` would parse it (the file applied), with its origin."""
    parse = args._parse
    try:
        inner, origins = parse(args.command_line)
    except SystemExit as e:
        raise UsageError(
            f"config show: the command line does not parse (status {e.code})"
        ) from None
    if inner.func is cmd_config_show:
        raise UsageError("config show: give another command to show")
    parser = inner._parser
    return [
        {
            "key": f"--{a.dest.replace('_', '-')}",
            "value": _plain(getattr(inner, a.dest)),
            "from": origins.get(a.dest, "default"),
        }
        for a in parser.options
        if a.dest != "help"
    ]


def _plain(value: Any) -> Any:
    """A value as JSON and a reader take it (paths as strings)."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)

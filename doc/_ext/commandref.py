"""
Sphinx extension: the command reference, made from the parsers themselves.

``.. command-reference:: securemig`` renders ``securemig --help`` and the
``--help`` of every subcommand below it, one section each, from
:func:`securemig.app.cli.main.build_parser`; ``.. command-reference:: twistd
securemig`` renders what ``twistd securemig --help`` prints, through
twistd's own option parser (so the plugin must be found, as for an
operator).  The text is exactly what the command prints at 80 columns: the
documentation cannot disagree with ``--help``, and a command added to the
parser appears here without anyone writing it down
(``tests/test_docs.py`` checks both).

Each command is an entry of its own: a section with a one-line summary (its
description's first sentence), a label ``command-<command>`` that
``:ref:`` reaches from any page (``:ref:`securemig migrate
<command-securemig-migrate>```), an index entry, and a line in the list of
commands at the top of the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections.abc import Iterator
from typing import Any

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from twisted.scripts.twistd import ServerOptions

from securemig.app.cli.common import walk_parsers
from securemig.app.cli.main import build_parser

#: The width the help texts are rendered at (argparse and twistd read COLUMNS).
WIDTH = "80"


@contextlib.contextmanager
def _columns() -> Iterator[None]:
    """Help formatted at :data:`WIDTH` columns, whatever the terminal."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        yield
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def summary(text: str | None) -> str:
    """The first sentence of a description, on one line."""
    flat = " ".join((text or "").split())
    for end in (".  ", ". ", ": "):
        if end in flat:
            return flat.split(end, 1)[0] + "."
    return flat


def label(command: str) -> str:
    """The ``:ref:`` label of a command's entry: ``command-securemig-vm-create``."""
    return nodes.make_id("command-" + command)


def securemig_helps() -> list[tuple[str, str, str]]:
    """(command, its ``--help`` text, its summary) for ``securemig`` and
    each subcommand."""
    parsers = list(walk_parsers(build_parser()))
    # The one line each command's parent lists it with (its ``help=``).
    listed: dict[int, str] = {}
    for parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if choice.help:
                        listed[id(action.choices[choice.dest])] = choice.help
    with _columns():
        return [
            (
                p.prog,
                p.format_help(),
                summary(listed[id(p)]) if id(p) in listed else summary(p.description),
            )
            for p in parsers
        ]


def twistd_help(plugin: str) -> str:
    """What ``twistd PLUGIN --help`` prints, from twistd's own parser."""
    out = io.StringIO()
    argv0 = sys.argv[0]
    sys.argv[0] = "twistd"  # the synopsis names the program from it
    try:
        with _columns(), contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            ServerOptions().parseOptions([plugin, "--help"])
    finally:
        sys.argv[0] = argv0
    text = out.getvalue()
    if not text.startswith("Usage: twistd"):
        raise RuntimeError(f"twistd does not know the plugin {plugin!r}: {text[:200]!r}")
    return text


class CommandReferenceDirective(SphinxDirective):
    """``.. command-reference:: securemig`` or ``twistd PLUGIN``: one section
    per command, titled with the command, holding its ``--help``."""

    required_arguments = 1
    optional_arguments = 1

    def run(self) -> list[nodes.Node]:
        """The sections of the commands named by the arguments."""
        if self.arguments == ["securemig"]:
            helps = securemig_helps()
        elif len(self.arguments) == 2 and self.arguments[0] == "twistd":
            text = twistd_help(self.arguments[1])
            # twistd's synopsis line, then the plugin's description.
            paragraphs = [" ".join(p.split()) for p in text.split("\n\n")[1:] if p.strip()]
            first = summary(paragraphs[0]) if paragraphs else ""
            helps = [(" ".join(self.arguments), text, first)]
        else:
            raise self.error("command-reference takes 'securemig' or 'twistd PLUGIN'")
        result: list[nodes.Node] = []
        if len(helps) > 1:
            result.append(self._contents(helps))
        return result + [self._section(*entry) for entry in helps]

    def _contents(self, helps: list[tuple[str, str, str]]) -> nodes.bullet_list:
        """One line per command: a link to its entry and its summary."""
        items = nodes.bullet_list()
        for command, _, first in helps:
            para = nodes.paragraph()
            link = nodes.reference("", "", internal=True, refid=label(command))
            link += nodes.literal(command, command)
            para += link
            if first:
                para += nodes.Text(f" — {first}")
            items += nodes.list_item("", para)
        return items

    def _section(self, command: str, text: str, first: str) -> nodes.section:
        """A section titled with ``command``: its summary, its help as a
        literal block; a ``:ref:`` label and an index entry."""
        section_id = label(command)
        section = nodes.section(ids=[section_id], names=[nodes.fully_normalize_name(command)])
        section += nodes.title(command, "", nodes.literal(command, command))
        section += addnodes.index(
            entries=[("single", f"{command} (command)", section_id, "", None)]
        )
        if first:
            section += nodes.paragraph(first, first)
        section += nodes.literal_block(text, text, language="text")
        self.state.document.note_implicit_target(section, section)
        self.env.get_domain("std").note_hyperlink_target(  # type: ignore[attr-defined]
            section_id, self.env.docname, section_id, command
        )
        return section


def setup(app: Sphinx) -> dict[str, Any]:
    """Register the directive."""
    app.add_directive("command-reference", CommandReferenceDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}

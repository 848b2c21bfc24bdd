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
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from typing import Any

from docutils import nodes
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


def securemig_helps() -> list[tuple[str, str]]:
    """(command, its ``--help`` text) for ``securemig`` and each subcommand."""
    with _columns():
        return [(p.prog, p.format_help()) for p in walk_parsers(build_parser())]


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
            helps = [(" ".join(self.arguments), twistd_help(self.arguments[1]))]
        else:
            raise self.error("command-reference takes 'securemig' or 'twistd PLUGIN'")
        return [self._section(command, text) for command, text in helps]

    def _section(self, command: str, text: str) -> nodes.section:
        """A section titled with ``command``, its help as a literal block."""
        section_id = nodes.make_id("command-" + command)
        section = nodes.section(ids=[section_id], names=[nodes.fully_normalize_name(command)])
        section += nodes.title(command, "", nodes.literal(command, command))
        section += nodes.literal_block(text, text, language="text")
        self.state.document.note_implicit_target(section, section)
        return section


def setup(app: Sphinx) -> dict[str, Any]:
    """Register the directive."""
    app.add_directive("command-reference", CommandReferenceDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}

"""The rendered documentation (``make docs``) and the help it is made from:
the command reference holds every command's ``--help`` as the command
prints it, and every help ends with its exit statuses."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from securemig.app import service
from securemig.app.cli.common import EXIT_STATUS_HELP, walk_parsers
from securemig.app.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: What the command reference renders at (doc/_ext/commandref.py, WIDTH).
COLUMNS = {"COLUMNS": "80"}
SERVICES = ("securemig", "securemig-pca")


def flat(text: str) -> str:
    """``text`` with every run of whitespace one space: a help as it reads,
    whatever indentation a builder gives its literal blocks."""
    return " ".join(text.split())


def helps() -> dict[str, str]:
    """Each ``securemig`` command (``securemig vm create``) and its help at 80 columns."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"
    try:
        return {p.prog: p.format_help() for p in walk_parsers(build_parser())}
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def twistd_help(plugin: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``twistd PLUGIN --help`` (outside the checkout, so the
    plugin is found as an operator's twistd finds it)."""
    return subprocess.run(
        [str(BIN / "twistd"), plugin, "--help"],
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
        env={**os.environ, **COLUMNS},
        timeout=60,
    )


@functools.cache
def build_docs() -> tuple[Path, subprocess.CompletedProcess[str]]:
    """Build doc/ once per test process, as text, with warnings as errors,
    into trial's working directory; the output directory and how it went."""
    out = Path("docs-text").absolute()
    sphinx = [sys.executable, "-m", "sphinx", "-q", "-E", "-W", "--keep-going", "-b", "text"]
    done = subprocess.run(
        [*sphinx, str(ROOT / "doc"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out, done


class CommandReferenceTests(SynchronousTestCase):
    """doc/commands.rst, built by Sphinx, says what the commands say."""

    def setUp(self) -> None:
        self.out, self.build = build_docs()

    def reference(self) -> str:
        """The rendered command reference (the build must have succeeded)."""
        self.assertEqual(
            self.build.returncode,
            0,
            f"sphinx-build failed (pip install -e '.[test]' installs Sphinx):\n"
            f"{self.build.stdout}{self.build.stderr}",
        )
        return (self.out / "commands.txt").read_text()

    def test_builds_without_warnings(self) -> None:
        """The whole of doc/ builds with -W: no warning, nothing missing from the toctree."""
        self.reference()
        self.assertEqual(self.build.stderr, "")
        for page in ("operators-guide", "protocol", "performance", "commands"):
            self.assertTrue((self.out / f"{page}.txt").exists(), page)

    def test_every_command_is_in_the_reference(self) -> None:
        """Every command the parser knows (walked here, not by the extension)
        has a section titled with it holding its whole help text."""
        text = self.reference()
        commands = helps()
        # The groups, their subcommands, and the commands of the operator's guide.
        for expected in ("securemig", "securemig migrate", "securemig vm create"):
            self.assertIn(expected, commands)
        for command, help_text in commands.items():
            # The text builder quotes the literal of each section's title.
            self.assertIn(f'\n"{command}"\n', text, f"no section for {command}")
            self.assertIn(flat(help_text), flat(text), f"{command} --help differs from the docs")

    def test_services_are_in_the_reference(self) -> None:
        """What the real ``twistd securemig --help`` (and -pca) prints is in the reference."""
        text = self.reference()
        for plugin in SERVICES:
            shown = twistd_help(plugin)
            self.assertEqual(shown.returncode, 0, shown.stderr)
            self.assertIn(f'\n"twistd {plugin}"\n', text, f"no section for twistd {plugin}")
            self.assertIn(flat(shown.stdout), flat(text), f"twistd {plugin} --help differs")


class ExitStatusHelpTests(SynchronousTestCase):
    """Every help says how the command ends."""

    def test_every_securemig_help_ends_with_the_exit_statuses(self) -> None:
        """``securemig --help`` and each subcommand's help end with
        EXIT_STATUS_HELP, as laid out."""
        self.assertIn("exit status:\n  0  done\n", EXIT_STATUS_HELP)
        for command, help_text in helps().items():
            self.assertTrue(
                help_text.rstrip().endswith(EXIT_STATUS_HELP.rstrip()),
                f"{command} --help does not end with the exit statuses",
            )

    def test_descriptions_are_still_wrapped(self) -> None:
        """A one-line description is wrapped to the terminal, not printed as one long line."""
        for command, help_text in helps().items():
            for line in help_text.splitlines():
                self.assertLessEqual(len(line), 80, f"{command}: {line!r}")

    def test_services_help_ends_with_their_exit_statuses(self) -> None:
        """``twistd securemig --help`` and ``twistd securemig-pca --help`` list
        their exit statuses, as laid out (twistd rewraps longdesc)."""
        self.assertIn("exit status:\n  0  ", service.EXIT_STATUS_HELP)
        for plugin in SERVICES:
            shown = twistd_help(plugin)
            self.assertEqual(shown.returncode, 0, shown.stderr)
            self.assertTrue(shown.stdout.rstrip().endswith(service.EXIT_STATUS_HELP.rstrip()))


class LiveFrontDoorTests(SynchronousTestCase):
    """Live migration is in the front door: what it does, what it needs,
    what it does not do yet (issue 24)."""

    def test_help_readme_and_guide_say_it(self) -> None:
        main = flat(build_parser().format_help())
        migrate = flat(helps()["securemig migrate"])
        readme = flat((ROOT / "README.rst").read_text())
        guide = flat((ROOT / "doc/operators-guide.rst").read_text())
        for text in (main, readme, guide):
            self.assertIn("--live", text)
        for text in (main, migrate, readme, guide):
            # What it does, what it needs, what it does not do yet.
            self.assertRegex(text, r"keeps running")
            self.assertRegex(text, r"secure variant")
            self.assertRegex(text, r"shared storage|storage both hosts mount")
            self.assertRegex(text, r"(?i)(does not|not yet)[^.]*(copy a disk|copying a disk)")
        self.assertNotIn("Move a suspended VM", main)
        # Not only QEMU guests: an adopted libvirt domain moves live too,
        # its disks copied with --copy-storage (issue 23).
        self.assertIn("libvirt domain", main)
        self.assertIn("--copy-storage", main)
        self.assertNotIn("the QEMU backend on both hosts", main)


class TroubleshootingTests(SynchronousTestCase):
    def test_every_code_and_exit_status(self) -> None:
        """doc/troubleshooting.rst says what every error code and exit status
        means (a code added to the protocol must be explained there)."""
        from securemig.protocol.errors import ErrorCode

        text = (ROOT / "doc/troubleshooting.rst").read_text()
        for code in ErrorCode:
            self.assertIn(f"``{code.name}``", text)
        for status in "0123":
            self.assertRegex(text, rf"(?m)^{status}  \S")


def _labels() -> dict[str, tuple[str, str, str]]:
    """The ``:ref:`` labels of the built documentation: name -> (document,
    id, title), from the environment Sphinx pickled beside its output."""
    import pickle

    out, done = build_docs()
    assert done.returncode == 0, done.stdout + done.stderr
    with open(out / ".doctrees" / "environment.pickle", "rb") as f:
        env = pickle.load(f)
    return dict(env.domaindata["std"]["labels"])


class CommandEntryTests(SynchronousTestCase):
    """One entry per command (issue 24 item 8): a label that ``:ref:``
    reaches, a line in the list of commands, a summary."""

    def test_every_command_has_a_label(self) -> None:
        labels = _labels()
        commands = [*helps(), *(f"twistd {plugin}" for plugin in SERVICES)]
        for command in commands:
            name = "command-" + "-".join(command.split())
            self.assertIn(name, labels, f"no :ref: label for {command}")
            self.assertEqual(labels[name][0], "commands", command)
            self.assertEqual(labels[name][2], command)

    def test_every_command_is_listed_with_its_summary(self) -> None:
        out, _ = build_docs()
        text = (out / "commands.txt").read_text()
        contents = text.split('\n\n"securemig"\n', 1)[0]
        for command in helps():
            self.assertIn(f'* "{command}" — ', contents, f"{command} not listed with a summary")


class DocsShapeTests(SynchronousTestCase):
    """Links, not file names; warnings where a choice weakens security; a
    quick start; install from a wheel first."""

    def test_cross_references_are_links(self) -> None:
        """No document names another by its file name in prose: ``:doc:``
        or ``:ref:`` instead (``backend-NAME.rst``, a placeholder, aside)."""
        import re

        pages = {p.stem for p in (ROOT / "doc").glob("*.rst")}
        for page in (ROOT / "doc").glob("*.rst"):
            for match in re.finditer(r"``(?:doc/)?([a-z-]+)\.rst``", page.read_text()):
                self.assertNotIn(match.group(1), pages, f"{page.name}: {match.group(0)}")

    def test_warnings_for_insecure_and_tofu(self) -> None:
        out, _ = build_docs()
        guide = (out / "operators-guide.txt").read_text()
        warnings = [block for block in guide.split("Warning:\n")[1:]]
        self.assertTrue(any("Trust on first use" in w.split("\n\n\n")[0] for w in warnings))
        self.assertTrue(any("The insecure variant" in w.split("\n\n\n")[0] for w in warnings))
        quickstart = (out / "quickstart.txt").read_text()
        self.assertIn("Warning:", quickstart)

    def test_quickstart_and_wheel_install(self) -> None:
        out, _ = build_docs()
        self.assertIn("quickstart", (ROOT / "doc/index.rst").read_text())
        guide = (out / "operators-guide.txt").read_text()
        installing = guide.split("Installing\n", 1)[1]
        self.assertLess(installing.index("pip install"), installing.index("PEP 660"))
        self.assertLess(installing.index("pip wheel"), installing.index("make setup"))
        quickstart = (out / "quickstart.txt").read_text()
        for step in ("pip install", "securemig demo", "guide-walk.sh"):
            self.assertIn(step, quickstart)

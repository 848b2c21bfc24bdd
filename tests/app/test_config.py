"""The configuration file: its values fill the options the command line
did not give (flags win), `config show` says where each came from, and a
mistake in it is one usage error (exit status 2)."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from securemig.app import config
from securemig.app.cli.main import main
from securemig.lab import processes

FILE = """\
[paths]
identity = "/srv/id"
vm-dir = "/srv/vms"
state-dir = "/srv/state"

[migrate]
destination = "10.0.0.2:9000"
destination-name = "dest-b"
bandwidth = 50
tofu = true

[service]
allow-source = ["source-a"]
"""


def run(*argv: str) -> tuple[int, str, str]:
    """``securemig ARGV`` in this process: status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(argv))
        except SystemExit as e:  # argparse's own errors
            status = int(e.code or 0)
    return status, out.getvalue(), err.getvalue()


class ConfigTests(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir()
        self.file = self.base / "securemig.toml"
        self.file.write_text(FILE)
        # The tests' own file, never the machine's.
        self.patch(config, "DEFAULT_PATH", self.base / "absent.toml")
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != config.CONFIG_ENV})

    def show(self, *command_line: str, config_file: Path | None = None) -> dict[str, Any]:
        given = ["--config", str(config_file or self.file)]
        status, out, err = run(*given, "config", "show", "--json", *command_line)
        self.assertEqual(status, 0, err)
        rows = json.loads(out)["values"]
        return {r["key"]: (r["value"], r["from"]) for r in rows}

    def test_file_fills_what_the_command_line_did_not_give(self) -> None:
        """migrate needs --vm-dir and --to; the file gives them; a flag wins
        over the file; an option neither gives keeps its default."""
        shown = self.show("migrate", "vm1", "--destination-name", "other", "--chunk-kib", "512")
        where = f"file {self.file}"
        self.assertEqual(shown["--vm-dir"], ("/srv/vms", where))
        self.assertEqual(shown["--to"], ("10.0.0.2:9000", where))
        self.assertEqual(shown["--identity"], ("/srv/id", where))
        self.assertEqual(shown["--bandwidth"], (50.0, where))
        self.assertEqual(shown["--tofu"], (True, where))
        self.assertEqual(shown["--destination-name"], ("other", "flag"))
        self.assertEqual(shown["--chunk-kib"], (512, "flag"))
        self.assertEqual(shown["--insecure"], (False, "default"))
        self.assertEqual(shown["--deadline"], (None, "default"))

    def test_the_other_of_exclusive_options_wins(self) -> None:
        """status --vm-dir with a state-dir in the file: --vm-dir's journal,
        not the file's state directory."""
        shown = self.show("status", "--vm-dir", "/elsewhere")
        self.assertEqual(shown["--state-dir"], (None, "default"))
        self.assertEqual(shown["--vm-dir"], ("/elsewhere", "flag"))
        self.assertEqual(self.show("status")["--state-dir"], ("/srv/state", f"file {self.file}"))

    def test_every_key_and_its_origin(self) -> None:
        shown = self.show()
        self.assertEqual(shown["migrate.bandwidth"], (50.0, f"file {self.file}"))
        self.assertEqual(shown["service.allow-source"], (["source-a"], f"file {self.file}"))
        self.assertEqual(shown["service.listen"], (None, "default"))
        keys = {f"{s}.{k}" for s, ks in config.KEYS.items() for k in ks}
        self.assertEqual(set(shown), keys)

    def test_text_form(self) -> None:
        status, out, _ = run("--config", str(self.file), "config", "show", "migrate", "vm1")
        self.assertEqual(status, 0)
        self.assertIn(f"configuration file: {self.file}", out)
        self.assertRegex(out, rf"--to +\= 10\.0\.0\.2:9000 +\(file {self.file}\)")

    def test_environment_names_the_file(self) -> None:
        os.environ[config.CONFIG_ENV] = str(self.file)
        status, out, _ = run("config", "show", "--json")
        self.assertEqual(status, 0)
        self.assertEqual(json.loads(out)["file"], str(self.file))
        other = self.base / "other.toml"
        other.write_text('[migrate]\ndestination = "10.0.0.3:1"\n')
        # --config wins over the environment.
        self.assertEqual(self.show(config_file=other)["migrate.destination"][0], "10.0.0.3:1")

    def test_absent_default_file_is_no_configuration(self) -> None:
        status, out, err = run("config", "show", "--json")
        self.assertEqual(status, 0, err)
        self.assertIsNone(json.loads(out)["file"])

    def test_mistakes_are_usage_errors(self) -> None:
        """Each mistake: exit status 2, one line naming the file and the key."""
        cases = {
            "[migrate]\nto = '1.2.3.4:5'\n": "unknown key 'to' in [migrate]",
            "[paths]\nidentity = 3\n": "[paths] identity must be a path (a string), not 3",
            "[migrate]\ntofu = 'yes'\n": "[migrate] tofu must be true or false, not 'yes'",
            "[migrate]\nchunk-kib = 1.5\n": "[migrate] chunk-kib must be a whole number, not 1.5",
            "[service]\nallow-source = [1]\n": "allow-source must be a list of strings",
            "migrate = 1\n": "migrate must be a section, [migrate], not a value",
            "[x]\n": "unknown section [x]",
            # The backends are the registry's (securemig.hypervisor.backends).
            "[service]\nbackend = 'bogus'\n": "[service] backend must be one of image, qemu",
            "[paths\n": "is not TOML",
        }
        for text, message in cases.items():
            self.file.write_text(text)
            status, out, err = run("--config", str(self.file), "jobs")
            self.assertEqual((status, out), (2, ""), text)
            self.assertEqual(err.count("\n"), 1, err)
            self.assertIn(f"securemig: error: {self.file}", err)
            self.assertIn(message, err)
        status, _, err = run("--config", str(self.base / "nope.toml"), "jobs")
        self.assertEqual(status, 2)
        self.assertIn("no configuration file", err)

    def test_twistd_reads_it_and_flags_win(self) -> None:
        """twistd securemig takes [paths] and [service] from the file; a flag
        overrides the file (the file's handshake timeout would be refused)."""
        state = self.base / "state"
        self.file.write_text(
            f'[paths]\nstate-dir = "{state}"\n'
            '[service]\ninsecure-listen = "tcp:0:interface=127.0.0.1"\nhandshake-timeout = 0\n'
        )
        process, _ = processes.start_twistd(
            "securemig",
            "--config",
            str(self.file),
            "--handshake-timeout",
            "10",
            port_file=self.base / "port",
            log_file=self.base / "d.log",
        )
        processes.end_process(process)
        self.assertTrue((state / "journal.sqlite").exists())
        self.assertIn("listening for insecure migrations", (self.base / "d.log").read_text())


def twistd_option_names() -> set[str]:
    """Every option ``twistd securemig`` takes (twistd gathers them along
    the class tree; ``opt_*`` methods are options too)."""
    from securemig.app.service import Options

    names: set[str] = set()
    for cls in Options.__mro__:
        for row in [*vars(cls).get("optParameters", []), *vars(cls).get("optFlags", [])]:
            names.add(row[0])
        names |= {n[4:].replace("_", "-") for n in vars(cls) if n.startswith("opt_")}
    return names


class KeysNameRealOptionsTests(TestCase):
    """Each key of the file stands for options that exist, and a bad value
    is refused with one sentence by both programs."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir()
        self.patch(config, "DEFAULT_PATH", self.base / "absent.toml")
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != config.CONFIG_ENV})

    def test_every_key_names_a_real_option(self) -> None:
        """Every (command, destination) of every key is an option of that
        securemig command's parser (``policy *``: of every policy action),
        and every ``service`` one an option of ``twistd securemig``."""
        from securemig.app.cli.common import walk_parsers
        from securemig.app.cli.main import build_parser
        from securemig.app.cli.settings import Parser, command_of

        parsers = [p for p in walk_parsers(build_parser()) if isinstance(p, Parser)]
        twistd = twistd_option_names()
        for section, keys in config.KEYS.items():
            for name, key in keys.items():
                for command, dest in key.commands.items():
                    where = f"[{section}] {name} -> {command}: {dest}"
                    if command == "service":
                        self.assertIn(dest, twistd, where)
                        continue
                    matching = [
                        p
                        for p in parsers
                        if command_of(p) == command
                        or (command.endswith(" *") and command_of(p).startswith(command[:-1]))
                    ]
                    self.assertTrue(matching, f"{where}: no such command")
                    for parser in matching:
                        self.assertIn(dest, {a.dest for a in parser.options}, where)

    def migrate_refuses(self, *words: str, file: str | None = None) -> str:
        """The error line of ``securemig migrate`` (insecure, nothing reachable)."""
        given: list[str] = []
        if file is not None:
            path = self.base / "m.toml"
            path.write_text(file)
            given = ["--config", str(path)]
        line = [*given, "migrate", "vm1", "--vm-dir", str(self.base), "--to", "127.0.0.1:1"]
        status, _, err = run(*line, "--insecure", *words)
        self.assertEqual(status, 2, err)
        prefix = "securemig: error: "
        self.assertTrue(err.startswith(prefix), err)
        return err[len(prefix) :].strip()

    def twistd_refuses(self, *words: str, file: str | None = None) -> str:
        """The usage error of ``twistd securemig``'s options."""
        from twisted.python import usage

        from securemig.app.service import Options

        state = Path(self.mktemp()).absolute()
        line = ["--state-dir", str(state), "--insecure-listen", "tcp:0", *words]
        if file is not None:
            path = self.base / "s.toml"
            path.write_text(file)
            line += ["--config", str(path)]
        options = Options()
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(line)
        lock = getattr(options, "lock", None)
        if lock is not None:
            lock.release()
        return str(caught.exception)

    def test_bad_values_refused_with_one_sentence(self) -> None:
        """The keys both programs take (and --crl, --crl-max-age): the same
        sentence from securemig migrate and twistd securemig, whether the
        value came from a flag or from the file."""
        for option, bad, sentence in [
            ("idle-timeout", "0", "--idle-timeout must be positive"),
            ("deadline", "-1", "--deadline must be positive"),
            ("crl-max-age", "0", "--crl-max-age must be positive"),
            ("crl", "http://pca", "--crl must be the privacy CA's https:// URL"),
        ]:
            flag = (f"--{option}", bad)
            self.assertEqual(self.migrate_refuses(*flag), sentence)
            self.assertEqual(self.twistd_refuses(*flag), sentence)
            if (option in config.KEYS["migrate"]) and (option in config.KEYS["service"]):
                from_file = self.migrate_refuses(file=f"[migrate]\n{option} = {bad}\n")
                self.assertEqual(from_file, sentence)
                from_file = self.twistd_refuses(file=f"[service]\n{option} = {bad}\n")
                self.assertEqual(from_file, sentence)

"""`twistd securemig` as a service: one per state directory, and a port it
cannot bind is a failed start (exit status 1), not a healthy-looking idle
process."""

from __future__ import annotations

import configparser
import json
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

from twisted.python import usage
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import TestCase

from securemig.app import pca_service, service
from securemig.lab import processes


def twistd(*args: str, log_file: Path) -> subprocess.CompletedProcess[str]:
    """Run ``twistd -n securemig ARGS`` to its end (it must not keep running)."""
    return subprocess.run(
        [
            processes.script("twistd"),
            "-n",
            "--pidfile=",
            "--logfile",
            str(log_file),
            "securemig",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class ServiceTests(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()

    def test_second_daemon_on_a_state_dir_refused(self) -> None:
        """While one daemon runs on a state directory, a second is refused
        before it touches anything (it used to delete the first one's staging)."""
        state = self.base / "state"
        first = processes.start_destination(state)
        self.addCleanup(first.stop)
        staged = state / "staging" / ("a" * 32)
        staged.mkdir(parents=True)
        result = twistd(
            "--state-dir",
            str(state),
            "--insecure-listen",
            "tcp:0:interface=127.0.0.1",
            log_file=self.base / "second.log",
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("another twistd securemig", result.stdout + result.stderr)
        self.assertTrue(staged.exists())
        self.assertIsNone(first.process.poll())

    def test_port_in_use_exits_1(self) -> None:
        """A port taken by someone else: a one-line CRITICAL and exit status 1."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log = self.base / "d.log"
        result = twistd(
            "--state-dir",
            str(self.base / "state"),
            "--insecure-listen",
            f"tcp:{port}:interface=127.0.0.1",
            log_file=log,
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        text = log.read_text()
        self.assertIn("cannot listen for insecure migrations", text)
        self.assertNotIn("Traceback", text)


class LogFormatTests(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()

    def test_json_logs_one_event_per_line(self) -> None:
        """--log-format json: every line of the log is one flat JSON object
        (no text lines, no record separators), and the events are the service's."""
        destination = processes.start_destination(self.base / "state", "--log-format", "json")
        destination.stop()
        lines = destination.log().splitlines()
        self.assertTrue(lines)
        events = [json.loads(line) for line in lines]
        texts = [e["message"] for e in events]
        self.assertTrue(any("listening for insecure migrations" in t for t in texts), texts)
        self.assertTrue(
            any(
                "INSECURE" in t and e["level"] == "warning"
                for t, e in zip(texts, events, strict=True)
            )
        )
        self.assertNotIn("\x1e", destination.log())
        self.assertNotIn("log_format", destination.log())

    def test_unknown_log_format_is_a_usage_error(self) -> None:
        result = twistd(
            "--log-format",
            "xml",
            "--state-dir",
            str(self.base / "state"),
            "--insecure-listen",
            "tcp:0:interface=127.0.0.1",
            log_file=self.base / "d.log",
        )
        self.assertEqual(result.returncode, 1)
        self.assertIn("--log-format 'xml': one of text, json", result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_pca_takes_log_format(self) -> None:
        self.assertIn("log-format=", pca_service.Options().longOpt)


class UnitFileTests(TestCase):
    """contrib/systemd, installed by `make install-units`: systemd accepts
    them, and every option of their ExecStart is one twistd and the plugin
    have."""

    def test_units_install_and_verify(self) -> None:
        root = Path(self.mktemp()).absolute()
        checkout = Path(__file__).resolve().parents[2]
        result = subprocess.run(
            [
                "make",
                "--no-print-directory",
                "-C",
                str(checkout),
                "install-units",
                f"DESTDIR={root}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        units = sorted((root / "etc/systemd/system").glob("*.service"))
        self.assertEqual([u.name for u in units], ["securemig-pca.service", "securemig.service"])
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            self.fail("systemd-analyze is missing: apt-get install systemd")
        verify = subprocess.run(
            [analyze, "verify", *map(str, units)], capture_output=True, text=True, check=False
        )
        self.assertEqual((verify.returncode, verify.stderr, verify.stdout), (0, "", ""))
        for unit in units:
            argv = exec_start(unit)
            self.assertEqual(Path(argv[0]), checkout / ".venv/bin/twistd")
            plugin = next(a for a in argv[1:] if a.startswith("securemig"))
            here = argv.index(plugin)
            self.assertIn("--nodaemon", argv[:here])
            self.assertEqual(argv[here + 1 : here + 3], ["--log-format", "json"])
            self.assertEqual(unknown_options(ServerOptions(), argv[1:here]), [])
            options = {"securemig": service.Options, "securemig-pca": pca_service.Options}[plugin]
            self.assertEqual(unknown_options(options(), argv[here + 1 :]), [])

    def test_unknown_option_is_noticed(self) -> None:
        """The check above would see a misspelt option."""
        self.assertEqual(
            unknown_options(service.Options(), ["--state-dir", "x", "--listne", "tcp:1"]),
            ["--listne"],
        )


def exec_start(unit: Path) -> list[str]:
    """The ExecStart command line of a unit file (continuation lines joined)."""
    text = unit.read_text().replace("\\\n", " ")
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return shlex.split(parser["Service"]["ExecStart"])


def unknown_options(options: usage.Options, argv: list[str]) -> list[str]:
    """The ``--long`` options in ``argv`` that ``options`` does not declare."""
    known = {o.rstrip("=") for o in options.longOpt}
    return [a for a in argv if a.startswith("--") and a[2:].split("=")[0] not in known]

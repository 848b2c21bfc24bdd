"""`twistd securemig` as a service: one per state directory, and a port it
cannot bind is a failed start (exit status 1), not a healthy-looking idle
process."""

from __future__ import annotations

import json
import re
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
from tests.support.commands import twistd


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
    them (verify), their exposure is at most :data:`MAX_EXPOSURE`
    (``systemd-analyze security --offline=yes``), they run unprivileged and
    hardened, the daemon's restart leaves guests alone (KillMode=process),
    the daemon takes everything from the configuration file, the privacy
    CA's directory is the one the guide's ``pca init`` makes, and every
    option of their ExecStart is one twistd and the plugin have."""

    def setUp(self) -> None:
        root = Path(self.mktemp()).absolute()
        self.checkout = Path(__file__).resolve().parents[2]
        result = subprocess.run(
            [
                "make",
                "--no-print-directory",
                "-C",
                str(self.checkout),
                "install-units",
                f"DESTDIR={root}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.units = sorted((root / "etc/systemd/system").glob("*.service"))
        self.assertEqual(
            [u.name for u in self.units], ["securemig-pca.service", "securemig.service"]
        )
        self.sysusers = root / "etc/sysusers.d/securemig.conf"
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            self.fail(
                "systemd-analyze is missing: install the Debian package systemd "
                "(scripts/setup-debs.sh does)"
            )
        self.analyze = analyze

    def test_units_verify(self) -> None:
        verify = subprocess.run(
            [self.analyze, "verify", *map(str, self.units)],
            capture_output=True,
            text=True,
            check=False,
        )
        self.assertEqual((verify.returncode, verify.stderr, verify.stdout), (0, "", ""))

    def test_exposure(self) -> None:
        for unit in self.units:
            result = subprocess.run(
                [self.analyze, "security", "--offline=yes", "--no-pager", str(unit)],
                capture_output=True,
                text=True,
                check=False,
            )
            found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
            self.assertIsNotNone(found, result.stdout + result.stderr)
            assert found is not None
            self.assertLessEqual(float(found.group(1)), MAX_EXPOSURE, f"{unit.name}: {found[0]}")

    def test_hardening(self) -> None:
        for unit in self.units:
            settings = unit_settings(unit)
            name = unit.name
            self.assertNotIn(settings.get("User", ["root"])[-1], ("", "root"), name)
            for key, value in {
                "ProtectSystem": "strict",
                "PrivateTmp": "yes",
                "NoNewPrivileges": "yes",
                "CapabilityBoundingSet": "",
                "DevicePolicy": "closed",
            }.items():
                self.assertEqual(settings.get(key), [value], f"{name}: {key}")
            for key in ("StateDirectory", "LimitNOFILE", "UMask"):
                self.assertTrue(settings.get(key), f"{name}: {key}")
        daemon = unit_settings(self.unit("securemig.service"))
        # A restart must not kill the guests (their QEMU and swtpm stay in
        # this cgroup): only the daemon's own process is stopped.
        self.assertEqual(daemon["KillMode"], ["process"])
        self.assertEqual(daemon["ConfigurationDirectory"], ["securemig"])
        self.assertIn("/dev/tpmrm0 rw", daemon["DeviceAllow"])
        self.assertIn("tss", daemon["SupplementaryGroups"][0].split())
        users = self.sysusers.read_text()
        self.assertRegex(users, r"(?m)^u\s+securemig\s")
        self.assertRegex(users, r"(?m)^m\s+securemig\s+tss$")
        self.assertRegex(users, r"(?m)^u\s+securemig-pca\s")

    def test_exec_start(self) -> None:
        for unit in self.units:
            argv = exec_start(unit)
            self.assertEqual(Path(argv[0]), self.checkout / ".venv/bin/twistd")
            plugin = next(a for a in argv[1:] if a.startswith("securemig"))
            here = argv.index(plugin)
            self.assertIn("--nodaemon", argv[:here])
            self.assertEqual(unknown_options(ServerOptions(), argv[1:here]), [])
            options = {"securemig": service.Options, "securemig-pca": pca_service.Options}[plugin]
            self.assertEqual(unknown_options(options(), argv[here + 1 :]), [])
        # The daemon: the configuration file and nothing that would shadow it.
        argv = exec_start(self.unit("securemig.service"))
        self.assertEqual(argv[argv.index("securemig") + 1 :], ["--config", CONFIG])
        # The privacy CA: its state directory, as the guide makes it.
        pca = self.unit("securemig-pca.service")
        argv = exec_start(pca)
        directory = argv[argv.index("--dir") + 1]
        self.assertEqual(directory, "/var/lib/" + unit_settings(pca)["StateDirectory"][0])
        guide = (self.checkout / "doc/operators-guide.rst").read_text()
        self.assertIn(f"securemig pca init {directory} ", guide)
        self.assertIn(f"twistd -n securemig-pca --dir {directory} ", guide)
        self.assertIn("--log-format", argv)

    def unit(self, name: str) -> Path:
        return next(u for u in self.units if u.name == name)

    def test_unknown_option_is_noticed(self) -> None:
        """The check above would see a misspelt option."""
        self.assertEqual(
            unknown_options(service.Options(), ["--state-dir", "x", "--listne", "tcp:1"]),
            ["--listne"],
        )


#: What ``systemd-analyze security --offline=yes`` may score a unit at most.
MAX_EXPOSURE = 3.0
CONFIG = "/etc/securemig/securemig.toml"


def unit_settings(unit: Path) -> dict[str, list[str]]:
    """A unit file's [Service] settings, each with every value it is given
    (continuation lines joined, comments dropped)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in unit.read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def exec_start(unit: Path) -> list[str]:
    """The ExecStart command line of a unit file (continuation lines joined)."""
    return shlex.split(unit_settings(unit)["ExecStart"][0])


def unknown_options(options: usage.Options, argv: list[str]) -> list[str]:
    """The ``--long`` options in ``argv`` that ``options`` does not declare."""
    known = {o.rstrip("=") for o in options.longOpt}
    return [a for a in argv if a.startswith("--") and a[2:].split("=")[0] not in known]

"""``securemig migrate --daemon``: the source host's daemon drives the
migration over its control socket (``securemig/app/control.py``), the thin
console entry (``securemig/app/cli/entry.py``) only asks it.

Real daemons (a source host's ``twistd securemig`` and a destination's),
real ``securemig`` processes, real sockets; the secure case with the real
swtpm host TPMs of ``tests/support/secure.py``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import threads
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from securemig.app import config, control_client
from securemig.app.cli import entry
from securemig.app.cli.journal import STATE_DIR_ENV
from securemig.app.control_client import MAX_CONNECTIONS, MAX_LINE, REQUEST_TIMEOUT
from securemig.host import storage
from securemig.host.journal import Journal
from securemig.hypervisor.bundle import Bundle
from securemig.hypervisor.qemu import QemuBackend, alive, heartbeat_path
from securemig.lab import processes
from tests.support.bundles import bundle_digests
from tests.support.live_qemu import LiveSecureBase
from tests.support.qemu import extended
from tests.support.secure import SecureBase

#: The state directory of a VM directory /v (source_state_dir's default).
DEFAULT_STATE = Path("/v/.securemig")

#: The modules the thin path must not import.
HEAVY = ("twisted", "cryptography", "tpm2_pytss", "OpenSSL")


class EntryTests(SynchronousTestCase):
    """The thin entry decides only what the line alone tells."""

    def test_state_dir_from_the_line(self) -> None:
        """``--state-dir`` wins; else ``$SECUREMIG_STATE_DIR``; else
        ``VM_DIR/.securemig``; anything unsure (a configuration file, help,
        an abbreviation, another command, no ``--daemon``) goes to the full
        command."""
        none: dict[str, str] = {}
        cases: list[tuple[list[str], dict[str, str], Path | None]] = [
            (["migrate", "v", "--daemon", "--state-dir", "/s"], none, Path("/s")),
            (["migrate", "v", "--daemon", "--state-dir=/s", "--vm-dir", "/v"], none, Path("/s")),
            (
                ["--debug", "migrate", "v", "--vm-dir", "/v", "--daemon"],
                none,
                Path("/v/.securemig"),
            ),
            (["migrate", "v", "--vm-dir", "/v", "--daemon"], {STATE_DIR_ENV: "/e"}, Path("/e")),
            (["migrate", "v", "--vm-dir", "/v", "--daemon"], {config.CONFIG_ENV: "/c"}, None),
            (["migrate", "v", "--state-dir", "/s"], none, None),
            (["migrate", "v", "--daemon", "--state", "/s"], none, None),
            (["migrate", "v", "--daemon", "--state-dir", "/s", "--help"], none, None),
            (["--config", "/c", "migrate", "v", "--daemon", "--state-dir", "/s"], none, None),
            (["status", "--daemon", "--state-dir", "/s"], none, None),
            (["migrate", "v", "--daemon", "--state-dir"], none, None),
        ]
        for argv, env, expected in cases:
            self.assertEqual(entry.daemon_state_dir(argv, env), expected, argv)

    def test_client_paths(self) -> None:
        """The global ``--config`` made absolute against the client's
        directory (both spellings; the command's own words untouched); a
        file only the client's process can open refused, named directly,
        by ``SECUREMIG_CONFIG`` or through a link."""
        line = ["--debug", "--config", "a.toml", "migrate", "vm1", "--vm-dir", "v"]
        self.assertEqual(
            control_client.client_paths(line, {}, "/w"),
            ["--debug", "--config", "/w/a.toml", "migrate", "vm1", "--vm-dir", "v"],
        )
        self.assertEqual(
            control_client.client_paths(["--config=../b.toml", "migrate"], {}, "/w/x"),
            ["--config=/w/b.toml", "migrate"],
        )
        link = Path(self.mktemp()).absolute()
        link.symlink_to("/dev/stdin")
        for argv, env in (
            (["--config", "/dev/fd/3", "migrate"], {}),
            (["--config=/proc/self/fd/0", "migrate"], {}),
            (["--config", str(link), "migrate"], {}),
            (["migrate"], {"SECUREMIG_CONFIG": "/dev/stdin"}),
        ):
            with self.assertRaises(control_client.NotForTheDaemon):
                control_client.client_paths(argv, env, "/w")

    def test_no_daemon_goes_the_full_way(self) -> None:
        """``--no-daemon`` (or an abbreviation of it) after ``--daemon``: the
        thin entry does not ask the daemon, the full command decides."""
        base = ["migrate", "vm1", "--vm-dir", "/v", "--state-dir", "/s", "--daemon"]
        self.assertEqual(entry.daemon_state_dir(base, {}), Path("/s"))
        for word in ("--no-daemon", "--no-d"):
            self.assertIsNone(entry.daemon_state_dir([*base, word], {}))

    def test_constants_agree(self) -> None:
        """The thin side's copies of the full side's names are the same."""
        self.assertEqual(entry.CONFIG_DEFAULT_PATH, config.DEFAULT_PATH)
        self.assertEqual(set(control_client.PASSED_ENV), {config.CONFIG_ENV, STATE_DIR_ENV})

    def test_long_state_dir_socket_fits(self) -> None:
        """The socket is always STATE_DIR/control.sock; a state directory
        too deep for a socket address is bound and connected through a
        descriptor of it (/proc/self/fd), so the socket file is still there
        and nothing lands in the shared temporary directory (where a killed
        daemon's socket once stayed behind)."""
        short = control_client.socket_path(Path("/srv/state"))
        self.assertEqual(short, Path("/srv/state/control.sock"))
        deep = Path(self.mktemp()).absolute() / ("d" * 120)
        deep.mkdir(parents=True)
        path = control_client.socket_path(deep)
        self.assertEqual(path, deep / "control.sock")
        self.assertGreater(len(os.fsencode(path)), 107)
        with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
            with control_client.socket_address(path) as address:
                self.assertLessEqual(len(address), 107)
                server.bind(address)
            server.listen()
            with control_client.socket_address(path) as address:
                client.connect(address)
            self.assertTrue(path.is_socket())

    def test_thin_path_imports_nothing_heavy(self) -> None:
        """``migrate --daemon`` with no daemon listening: one sentence naming
        how to start it, exit 1, nothing touched, and none of Twisted,
        cryptography or the TSS imported (the point of the thin entry)."""
        base = Path(self.mktemp()).absolute()
        state = base / "state"
        code = (
            "import sys\n"
            "from securemig.app.cli import entry\n"
            f"sys.argv = ['securemig', 'migrate', 'vm1', '--vm-dir', {str(base)!r}, "
            f"'--to', '127.0.0.1:1', '--insecure', '--state-dir', {str(state)!r}, '--daemon']\n"
            "status = entry.main()\n"
            f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
            "print(status, heavy)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=False
        )
        self.assertEqual(result.stdout.strip(), "1 []", result.stderr)
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertIn(f"twistd securemig --state-dir {state}", result.stderr)
        self.assertFalse(base.exists())


class DaemonBase(TestCase):
    """A destination daemon, the source host's daemon, VMs at the source."""

    timeout = 120

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.vm_dir = self.base / "src-vms"
        self.src_state = self.base / "src-state"
        self.destination = processes.start_destination(self.base / "dst-state")
        self.addCleanup(self.destination.stop)
        self.source = processes.start_destination(
            self.src_state, "--resolve-interval", "0.3", log_file=self.base / "src.log"
        )
        self.addCleanup(self.source.stop)

    def create_vm(self, name: str, ram_mib: int = 4, *extra: str) -> Bundle:
        result = processes.securemig(
            "vm", "create", name, "--dir", str(self.vm_dir), "--ram-mib", str(ram_mib), *extra
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return Bundle.find(self.vm_dir, name)

    def argv(self, name: str, *extra: str) -> list[str]:
        """``securemig migrate NAME`` (insecure) through the source's daemon."""
        return [
            processes.script("securemig"),
            "migrate",
            name,
            "--vm-dir",
            str(self.vm_dir),
            "--state-dir",
            str(self.src_state),
            "--to",
            self.destination.address,
            "--insecure",
            "--no-progress",
            *extra,
        ]

    def run_migrate(self, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(name, *extra), capture_output=True, text=True, check=False, timeout=90
        )

    def start_migrate(self, name: str, *extra: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            self.argv(name, "--daemon", *extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        return process

    def record(self, vm: str) -> Any:
        """The source journal's newest record of ``vm`` (None: none yet)."""
        path = self.src_state / "journal.sqlite"
        if not path.exists():
            return None
        journal = Journal(path)
        try:
            return next((r for r in journal.records() if r.vm == vm), None)
        finally:
            journal.close()

    def wait_for(self, what: str, ready: Any, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                self.fail(f"{what} did not happen:\n{self.source.log()[-3000:]}")
            time.sleep(0.05)

    def streaming(self, vm: str) -> bool:
        record = self.record(vm)
        return record is not None and record.phase == "streaming"

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with control_client.socket_address(control_client.socket_path(self.src_state)) as address:
            sock.connect(address)
        self.addCleanup(sock.close)
        return sock


class DaemonMigrateTests(DaemonBase):
    """What the operator sees is what the in-process command shows."""

    def test_same_summary_and_journal(self) -> None:
        """One VM through the daemon, one in process: the same ``--json``
        summary (keys, outcome, bytes), exit 0, the VM byte-identical at the
        destination and gone here, journaled done by the daemon's process."""
        one, two = self.create_vm("vm1", 4, "--disk-mib", "2"), self.create_vm("vm2", 4)
        before = bundle_digests(one)
        via = self.run_migrate("vm1", "--json", "--daemon")
        direct = self.run_migrate("vm2", "--json")
        self.assertEqual((via.returncode, direct.returncode), (0, 0), via.stderr + direct.stderr)
        a, b = json.loads(via.stdout), json.loads(direct.stdout)
        self.assertEqual(sorted(a), sorted(b))
        self.assertEqual((a["outcome"], a["bytes"], a["vm"]), ("done", 6 << 20, "vm1"))
        self.assertEqual((via.stderr, direct.stderr), ("", ""))
        arrived = Bundle.load(self.destination.state_dir / "vms" / "vm1")
        self.assertEqual(bundle_digests(arrived), before)
        self.assertFalse(one.path.exists() or two.path.exists())
        record = self.record("vm1")
        self.assertEqual((record.outcome, record.migration_id), ("done", a["migration_id"]))
        self.assertEqual(record.owner.split(":")[0], str(self.source.process.pid))

    def test_refusals_as_in_process(self) -> None:
        """A usage error (argparse's and one argparse cannot see) and a
        refused migration (no such VM): the same exit status and the same
        words through the daemon as in process."""
        self.create_vm("vm1", 1)
        for extra in (("--chunk-kib", "0"), ("--parallel", "abc"), ("--name-typo",)):
            via = self.run_migrate("vm1", *extra, "--daemon")
            direct = self.run_migrate("vm1", *extra)
            self.assertEqual(via.returncode, 2, via.stderr)
            self.assertEqual((via.returncode, via.stderr), (direct.returncode, direct.stderr))
        via = self.run_migrate("nosuchvm", "--daemon", "--json")
        direct = self.run_migrate("nosuchvm", "--json")
        self.assertEqual(via.returncode, 1, via.stderr)
        self.assertEqual((via.returncode, via.stderr), (direct.returncode, direct.stderr))
        self.assertEqual(json.loads(via.stdout), json.loads(direct.stdout))
        self.assertTrue((self.vm_dir / "vm1").exists())

    def test_other_state_dir_refused(self) -> None:
        """A journal other than the daemon's is refused (a usage error),
        before anything is touched."""
        self.create_vm("vm1", 1)
        sock = self.connect()
        argv = self.argv("vm1", "--daemon")[1:]
        argv[argv.index("--state-dir") + 1] = str(self.base / "elsewhere")
        request = {"command": "migrate", "argv": argv, "cwd": "/", "env": {}}
        sock.sendall(control_client.encode(request))
        result = json.loads(_read_all(sock))
        self.assertEqual(result["status"], 2)
        self.assertIn(f"this daemon keeps its journal in {self.src_state}", result["stderr"])
        self.assertIsNone(self.record("vm1"))
        self.assertFalse((self.base / "elsewhere").exists())

    def test_relative_paths_against_the_clients_directory(self) -> None:
        """Relative ``--vm-dir`` and ``--state-dir`` mean the client's
        working directory, not the daemon's."""
        bundle = self.create_vm("vm1", 1)
        argv = self.argv("vm1", "--daemon", "--json")
        argv[argv.index("--vm-dir") + 1] = "src-vms"
        argv[argv.index("--state-dir") + 1] = "src-state"
        result = subprocess.run(
            argv, capture_output=True, text=True, check=False, timeout=90, cwd=self.base
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["outcome"], "done")
        self.assertFalse(bundle.path.exists())

    def test_relative_configuration_file(self) -> None:
        """``securemig --config my.toml migrate ... --daemon`` from the file's
        directory reads the client's ``my.toml`` (which names the
        destination), as without ``--daemon``; ``--config /dev/stdin``
        is refused (the daemon would read its own stdin), nothing touched."""
        one, two = self.create_vm("vm1", 1), self.create_vm("vm2", 1)
        text = f'[migrate]\ndestination = "{self.destination.address}"\n'
        (self.base / "my.toml").write_text(text)

        def run(name: str, *extra: str, config: str = "my.toml") -> Any:
            argv = [processes.script("securemig"), "--config", config, "migrate", name]
            argv += ["--vm-dir", "src-vms", "--state-dir", "src-state", "--insecure"]
            argv += ["--no-progress", "--json", *extra]
            return subprocess.run(
                argv,
                input=text,  # for /dev/stdin
                capture_output=True,
                text=True,
                check=False,
                timeout=90,
                cwd=self.base,
            )

        via, direct = run("vm1", "--daemon"), run("vm2")
        self.assertEqual((via.returncode, direct.returncode), (0, 0), via.stderr + direct.stderr)
        self.assertEqual(json.loads(via.stdout)["outcome"], "done")
        self.assertEqual(json.loads(via.stdout)["to"], json.loads(direct.stdout)["to"])
        self.assertFalse(one.path.exists() or two.path.exists())
        self.assertEqual(self.record("vm1").owner.split(":")[0], str(self.source.process.pid))
        three = self.create_vm("vm3", 1)
        refused = run("vm3", "--daemon", config="/dev/stdin")
        self.assertEqual(refused.returncode, 2, refused.stderr)
        self.assertIn("/dev/stdin is this command's own open file", refused.stderr)
        self.assertNotIn("Traceback", refused.stderr)
        self.assertTrue(three.path.exists())
        self.assertIsNone(self.record("vm3"))

    def test_configuration_file_asks_the_daemon(self) -> None:
        """``[migrate] daemon = true`` and ``[paths] state-dir``: a line with
        neither ``--daemon`` nor ``--state-dir`` goes through the full
        command to the daemon (the journal says the daemon drove it)."""
        bundle = self.create_vm("vm1", 1)
        conf = self.base / "securemig.toml"
        conf.write_text(f'[paths]\nstate-dir = "{self.src_state}"\n[migrate]\ndaemon = true\n')
        argv = self.argv("vm1", "--json")
        del argv[argv.index("--state-dir") : argv.index("--state-dir") + 2]
        result = subprocess.run(
            [argv[0], "--config", str(conf), *argv[1:]],
            capture_output=True,
            text=True,
            check=False,
            timeout=90,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["outcome"], "done")
        self.assertFalse(bundle.path.exists())
        self.assertEqual(self.record("vm1").owner.split(":")[0], str(self.source.process.pid))

    def test_no_daemon_overrides_the_file(self) -> None:
        """``[migrate] daemon = true`` in the file and no daemon on the state
        directory: the error names the key and ``--no-daemon``;
        ``--no-daemon`` migrates in this process (journaled by it, not a
        daemon); a daemon named on the line is not blamed on the file."""
        bundle = self.create_vm("vm1", 1)
        other = self.base / "no-daemon-state"
        conf = self.base / "securemig.toml"
        conf.write_text("[migrate]\ndaemon = true\n")
        argv = self.argv("vm1", "--json")
        argv[argv.index("--state-dir") + 1] = str(other)

        def run(*extra: str) -> Any:
            line = [argv[0], "--config", str(conf), *argv[1:], *extra]
            return subprocess.run(line, capture_output=True, text=True, check=False, timeout=90)

        unreachable = run()
        self.assertEqual(unreachable.returncode, 1, unreachable.stderr)
        self.assertIn("no daemon listens on", unreachable.stderr)
        self.assertIn(f"[migrate] daemon = true ({conf})", unreachable.stderr)
        self.assertIn("give --no-daemon", unreachable.stderr)
        self.assertNotIn("Traceback", unreachable.stderr)
        self.assertTrue(bundle.path.exists())
        flagged = run("--daemon")
        self.assertEqual(flagged.returncode, 1, flagged.stderr)
        self.assertNotIn("[migrate] daemon", flagged.stderr)
        # The last of --daemon / --no-daemon wins, the thin entry too.
        done = run("--daemon", "--no-daemon")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(json.loads(done.stdout)["outcome"], "done")
        self.assertFalse(bundle.path.exists())
        journal = Journal(other / "journal.sqlite")
        try:
            record = journal.records()[0]
        finally:
            journal.close()
        self.assertEqual(record.outcome, "done")
        self.assertNotEqual(record.owner.split(":")[0], str(self.source.process.pid))

    def test_cancel_ends_only_that_migration(self) -> None:
        """Two migrations driven by one daemon; Ctrl-C at one client cancels
        that one (CANCELLED, the VM intact here and unlocked, journaled
        aborted); the other one completes."""
        big = self.create_vm("big", 24)
        other = self.create_vm("other", 24)
        digests = bundle_digests(big)
        first = self.start_migrate("big", "--bandwidth", "6")
        second = self.start_migrate("other", "--bandwidth", "6", "--json")
        self.wait_for("streaming", lambda: self.streaming("big") and self.streaming("other"))
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
        self.assertIn("interrupted: cancelling the migration", err)
        self.assertIn("CANCELLED: interrupted by the operator (Ctrl-C)", err)
        self.assertIn("the VM is still at the source, unlocked", err)
        self.assertEqual(first.returncode, 1, err)
        self.assertEqual(bundle_digests(Bundle.load(big.path)), digests)
        self.assertFalse(storage.is_locked(big.lock_path))
        self.assertEqual(self.record("big").outcome, "aborted")
        out, err = second.communicate(timeout=90)
        self.assertEqual(second.returncode, 0, err)
        self.assertEqual(json.loads(out)["outcome"], "done")
        self.assertFalse(other.path.exists())

    def test_cancel_with_the_request(self) -> None:
        """Ctrl-C at once: the cancel sent together with the request (before
        the daemon has checked it and prepared the migration) stops it
        before anything is sent: exit 1 saying so, the VM intact here and
        unlocked, nothing journaled done; the daemon serves the next one."""
        bundle = self.create_vm("vm1", 8)
        digests = bundle_digests(bundle)
        sock = self.connect()
        argv = self.argv("vm1", "--daemon", "--bandwidth", "4")[1:]
        request = {"command": "migrate", "argv": argv, "cwd": "/", "env": {}}
        sock.sendall(control_client.encode(request) + control_client.encode({"command": "cancel"}))
        sock.settimeout(60)
        result = json.loads(_read_all(sock).splitlines()[-1])
        self.assertEqual(result["status"], 1, result)
        self.assertIn("cancelled: interrupted by the operator (Ctrl-C)", result["stderr"])
        self.assertIn("the VM is still here, unlocked", result["stderr"])
        self.assertEqual(bundle_digests(Bundle.load(bundle.path)), digests)
        self.assertFalse(storage.is_locked(bundle.lock_path))
        record = self.record("vm1")
        self.assertTrue(record is None or record.outcome != "done", record)
        self.assertFalse((self.destination.state_dir / "vms" / "vm1").exists())
        # Nothing left running: the same VM migrates through the daemon next.
        done = self.run_migrate("vm1", "--daemon", "--json")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(json.loads(done.stdout)["outcome"], "done")

    def test_client_killed_migration_completes(self) -> None:
        """The client SIGKILLed mid-stream: the daemon finishes the migration
        (journaled done, the VM byte-identical at the destination) and logs
        that its client left."""
        bundle = self.create_vm("vm1", 24)
        before = bundle_digests(bundle)
        client = self.start_migrate("vm1", "--bandwidth", "8")
        self.wait_for("streaming", lambda: self.streaming("vm1"))
        client.kill()
        client.wait()
        self.wait_for("done", lambda: (r := self.record("vm1")) is not None and r.outcome)
        self.assertEqual(self.record("vm1").outcome, "done")
        arrived = Bundle.load(self.destination.state_dir / "vms" / "vm1")
        self.assertEqual(bundle_digests(arrived), before)
        self.assertFalse(bundle.path.exists())
        self.wait_for("the log line", lambda: "after its client left" in self.source.log())
        self.assertIn("left; the migration goes on", self.source.log())


class ControlSocketTests(DaemonBase):
    """The control socket is a trust boundary: local, bounded."""

    def test_socket_private(self) -> None:
        """The socket is this user's only (0600), created fresh: a stale file
        left there is replaced at start."""
        path = control_client.socket_path(self.src_state)
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)
        self.source.stop(signal.SIGKILL)
        self.assertTrue(path.exists())  # a killed daemon leaves it
        again = processes.start_destination(self.src_state, log_file=self.base / "src2.log")
        self.addCleanup(again.stop)
        sock = self.connect()
        sock.sendall(control_client.encode({"command": "status"}))
        self.assertEqual(json.loads(_read_all(sock))["status"], 2)

    def test_other_uid_refused(self) -> None:
        """A process of another uid (nobody) cannot open the socket (0600);
        with the file opened up, the daemon itself refuses it by its
        SO_PEERCRED uid and says so in its log."""
        path = str(control_client.socket_path(self.src_state))
        if os.geteuid() != 0:
            self.fail("this test needs root, to run a child as another uid (nobody)")

        def as_nobody() -> str:
            # A forked child that drops to nobody and tries the socket.
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: only socket calls, then _exit
                said = b"?"
                try:
                    # Entered as root: the test's own directories above it
                    # need not be open to nobody, only the socket is tried.
                    os.chdir(os.path.dirname(path))
                    os.setgid(65534)
                    os.setuid(65534)
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    try:
                        s.connect(os.path.basename(path))
                    except PermissionError:
                        said = b"EACCES"
                    else:
                        s.settimeout(10)
                        try:
                            s.sendall(b'{"command": "migrate", "argv": [], "cwd": "/"}\n')
                            said = b"closed" if s.recv(100) == b"" else b"answered"
                        except (BrokenPipeError, ConnectionResetError):
                            said = b"closed"  # dropped before (or while) it asked
                except BaseException as e:
                    said = repr(e).encode()
                finally:
                    os.write(write, said)
                    os._exit(0)
            os.close(write)
            with os.fdopen(read, "rb") as f:
                answer = f.read().decode()
            os.waitpid(pid, 0)
            return answer

        # The directory holding the socket (the test's private temporary
        # directory when its path is long) is made searchable meanwhile:
        # only the socket's own mode is under test.
        parent = os.path.dirname(path)
        mode = os.stat(parent).st_mode & 0o777
        os.chmod(parent, mode | 0o011)
        self.addCleanup(os.chmod, parent, mode)
        self.assertEqual(as_nobody(), "EACCES")
        os.chmod(path, 0o666)
        self.assertEqual(as_nobody(), "closed")
        self.wait_for("the log line", lambda: "refused a client of uid 65534" in self.source.log())

    def test_oversized_request_dropped(self) -> None:
        """A request over the line limit is dropped before it is buffered
        whole: without its newline, and with it."""
        for tail in (b"", b"\n"):
            sock = self.connect()
            sock.settimeout(10)
            with _suppress_reset():
                sock.sendall(b"x" * (MAX_LINE + 1) + tail)
            self.assertEqual(_recv_or_reset(sock), b"")
        self.assertIn(f"a line over {MAX_LINE} bytes; dropped", self.source.log())

    def test_slow_request_dropped(self) -> None:
        """A client that does not finish its request within the request
        timeout is dropped then (not before, not never)."""
        sock = self.connect()
        sock.settimeout(REQUEST_TIMEOUT * 4)
        started = time.monotonic()
        sock.sendall(b'{"command": "mig')
        self.assertEqual(_recv_or_reset(sock), b"")
        self.assertGreaterEqual(time.monotonic() - started, REQUEST_TIMEOUT - 0.5)
        self.assertIn("no whole request within", self.source.log())

    def test_connections_capped(self) -> None:
        """Above the cap of open control connections a new one is closed at
        once, while those before it stay open."""
        held = [self.connect() for _ in range(MAX_CONNECTIONS)]
        extra = self.connect()
        extra.settimeout(REQUEST_TIMEOUT / 2)
        self.assertEqual(_recv_or_reset(extra), b"")
        held[0].setblocking(False)
        with self.assertRaises(BlockingIOError):
            held[0].recv(1)
        self.assertIn("connections already; refused one more", self.source.log())

    def test_only_cancel_follows_the_request(self) -> None:
        """After its request a client may send only ``cancel``: anything
        else disconnects it (one log line, not one per line sent), and its
        migration goes on to the end."""
        bundle = self.create_vm("vm1", 8)
        sock = self.connect()
        argv = self.argv("vm1", "--daemon", "--bandwidth", "4")[1:]
        sock.sendall(control_client.encode({"command": "migrate", "argv": argv, "cwd": "/"}))
        self.wait_for("streaming", lambda: self.streaming("vm1"))
        with _suppress_reset():
            sock.sendall(b"junk\n" * 1000)
        sock.settimeout(30)
        events = _read_all(sock).splitlines()
        self.assertNotIn("result", b" ".join(events).decode())
        self.wait_for("done", lambda: (r := self.record("vm1")) is not None and r.outcome)
        self.assertEqual(self.record("vm1").outcome, "done")
        self.assertFalse(bundle.path.exists())
        self.assertEqual(self.source.log().count("other than cancel; disconnected"), 1)

    def test_repeated_cancel_honoured_once(self) -> None:
        """A client that sends ``cancel`` a thousand times (before its
        migration has a session): the first cancels it, the rest are
        ignored -- one log line, not a thousand, the client not dropped."""
        bundle = self.create_vm("vm1", 4)
        sock = self.connect()
        argv = self.argv("vm1", "--daemon")[1:]
        request = {"command": "migrate", "argv": argv, "cwd": "/", "env": {}}
        cancel = control_client.encode({"command": "cancel"})
        sock.sendall(control_client.encode(request) + cancel * 1000)
        sock.settimeout(60)
        result = json.loads(_read_all(sock).splitlines()[-1])
        self.assertEqual(result["status"], 1, result)
        self.assertIn("interrupted by the operator (Ctrl-C)", result["stderr"])
        self.assertTrue(bundle.path.exists())
        log = self.source.log()
        self.assertEqual(log.count("cancels it"), 1, log[-2000:])
        self.assertNotIn("other than cancel", log)

    def test_deeply_nested_request_malformed(self) -> None:
        """A line of 64 KiB of ``[`` (deeper than the JSON parser recurses)
        is a malformed request like any other: refused with a usage status,
        no traceback in the daemon's log."""
        sock = self.connect()
        sock.settimeout(30)
        sock.sendall(b"[" * MAX_LINE + b"\n")
        result = json.loads(_read_all(sock))
        self.assertEqual(result["status"], 2)
        self.assertIn("the daemon accepts only migrate", result["stderr"])
        # The daemon still answers.
        again = self.connect()
        again.sendall(control_client.encode({"command": "shutdown"}))
        self.assertEqual(json.loads(_read_all(again))["status"], 2)
        log = self.source.log()
        self.assertNotIn("Traceback", log)
        self.assertNotIn("Unhandled", log)
        self.assertNotIn("RecursionError", log)

    def test_only_migrate(self) -> None:
        """Any command but migrate is refused with a usage status; so is a
        migrate line naming another command."""
        sock = self.connect()
        sock.sendall(control_client.encode({"command": "shutdown"}))
        self.assertEqual(json.loads(_read_all(sock))["status"], 2)
        sock = self.connect()
        argv = ["status", "--state-dir", str(self.src_state)]
        request = {"command": "migrate", "argv": argv, "cwd": "/", "env": {}}
        sock.sendall(control_client.encode(request))
        result = json.loads(_read_all(sock))
        self.assertEqual(result["status"], 2)
        self.assertIn("the daemon runs only migrate, not status", result["stderr"])


class DeepStateDirTests(TestCase):
    """A state directory too deep for a socket address: the daemon's
    control socket is still ``STATE/control.sock`` (bound and reached
    through /proc/self/fd), nothing lands in the temporary directory; a
    socket that cannot be made costs ``migrate --daemon`` only, never the
    daemon."""

    timeout = 120

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        # A temporary directory of the source's and the clients' own (short:
        # sockets go there); the destination's daemon uses the suite's.
        self.tmp = Path(tempfile.mkdtemp(prefix="smc-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.env = {**os.environ, "TMPDIR": str(self.tmp)}
        self.state = self.base / ("d" * 110) / "state"
        self.vm_dir = self.base / "vms"
        self.destination = processes.start_destination(
            self.base / "dst-state", log_file=self.base / "dst.log"
        )
        self.addCleanup(self.destination.stop)

    def start_source(self, name: str = "src") -> processes.Destination:
        source = processes.start_destination(
            self.state,
            log_file=self.base / f"{name}.log",
            port_file=self.base / f"{name}.port",
            env=self.env,
        )
        self.addCleanup(source.stop)
        return source

    def migrate(self, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
        created = processes.securemig(
            "vm", "create", name, "--dir", str(self.vm_dir), "--ram-mib", "1"
        )
        self.assertEqual(created.returncode, 0, created.stderr)
        return processes.securemig(
            "migrate",
            name,
            "--vm-dir",
            str(self.vm_dir),
            "--state-dir",
            str(self.state),
            "--insecure",
            "--no-progress",
            "--to",
            self.destination.address,
            *extra,
            env=self.env,
            timeout=90,
        )

    def test_socket_in_the_state_directory(self) -> None:
        """The socket is made in the deep state directory (mode 0600) and
        ``migrate --daemon`` works through it; the temporary directory the
        daemon and client share holds nothing of it."""
        source = self.start_source()
        path = self.state / "control.sock"
        self.assertGreater(len(os.fsencode(path)), 107)
        self.assertTrue(path.is_socket())
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)
        result = self.migrate("vm1", "--daemon")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("control socket", source.log())
        self.assertEqual(list(self.tmp.glob("*control*")), [])

    def test_socket_cannot_be_made(self) -> None:
        """Something not a socket sits where the socket goes (here a
        directory with a file in it): the daemon starts all the same, says
        in one log line why it has no control socket, and serves arrivals;
        a client says no daemon listens there, without a traceback, and
        nothing there is touched."""
        blocker = self.state / "control.sock"
        blocker.mkdir(parents=True)
        (blocker / "keep").write_text("operator's")
        source = self.start_source()
        log = source.log()
        self.assertEqual(log.count("cannot listen"), 1, log[-2000:])
        self.assertIn("migrate --daemon cannot ask this daemon", log)
        self.assertNotIn("Traceback", log)
        created = processes.securemig(
            "vm", "create", "arriving", "--dir", str(self.base / "other"), "--ram-mib", "1"
        )
        self.assertEqual(created.returncode, 0, created.stderr)
        moved = processes.securemig(
            "migrate",
            "arriving",
            "--vm-dir",
            str(self.base / "other"),
            "--insecure",
            "--no-progress",
            "--to",
            source.address,
            env=self.env,
            timeout=90,
        )
        self.assertEqual(moved.returncode, 0, moved.stderr)
        self.assertTrue((self.state / "vms" / "arriving").exists())
        asked = self.migrate("vm2", "--daemon")
        self.assertEqual(asked.returncode, 1, asked.stderr)
        self.assertIn("no daemon listens", asked.stderr)
        self.assertNotIn("Traceback", asked.stderr)
        self.assertTrue((self.vm_dir / "vm2").exists())
        self.assertEqual((blocker / "keep").read_text(), "operator's")


class ControlServiceTests(SynchronousTestCase):
    """A control socket that cannot be made does not stop the daemon: the
    service starts (one error line), stops, and removes nothing of what
    it did not make."""

    def test_cannot_listen(self) -> None:
        from twisted.internet import reactor

        from securemig.app.control import ControlService

        # Short: the socket would be STATE/control.sock, a directory here.
        state = Path(tempfile.mkdtemp(prefix="st-"))
        self.addCleanup(shutil.rmtree, state, True)
        (state / control_client.SOCKET_NAME / "in-the-way").mkdir(parents=True)
        errors: list[LogEvent] = []
        globalLogPublisher.addObserver(errors.append)
        self.addCleanup(globalLogPublisher.removeObserver, errors.append)

        class Host:
            state_dir = state

        control = ControlService(Host(), reactor)  # type: ignore[arg-type]
        control.startService()
        self.assertIsNone(control.port)
        said = [formatEvent(e) for e in errors if "cannot listen" in e.get("log_format", "")]
        self.assertEqual(len(said), 1, said)
        self.assertIn("migrate --daemon cannot ask this daemon", said[0])
        control.stopService()
        self.assertTrue((state / control_client.SOCKET_NAME / "in-the-way").is_dir())


class SecureDaemonTests(SecureBase):
    """The secure variant through the daemon: attestation, key release,
    the vTPM key unsealed by the daemon (off its reactor), real swtpm."""

    timeout = 180

    def test_secure_same_as_in_process(self) -> None:
        """Done through the daemon, summary shaped as in process; a refused
        destination name ends alike (exit 1, the VM here, unlocked)."""
        destination = self.start_destination("--tofu")
        src_state = self.base / "src-state"
        source = processes.start_destination(src_state, log_file=self.base / "src.log")
        self.addCleanup(source.stop)
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        via = ["--state-dir", str(src_state), "--tofu"]
        refused = self.migrate(destination, *via, "--daemon", name="not-dest-b")
        direct = self.migrate(destination, *via, name="not-dest-b")
        self.assertEqual((refused.returncode, direct.returncode), (1, 1), refused.stderr)
        self.assertEqual(sorted(json.loads(refused.stdout)), sorted(json.loads(direct.stdout)))
        self.assertEqual(bundle_digests(Bundle.load(bundle.path)), before)
        self.assertFalse(storage.is_locked(bundle.lock_path))
        result = self.migrate(destination, *via, "--daemon")
        self.assertEqual(result.returncode, 0, result.stderr + source.log()[-3000:])
        summary = json.loads(result.stdout)
        self.assertEqual((summary["protocol"], summary["outcome"]), ("secure", "done"))
        self.assertIn("key transfer", summary["phases"])
        arrived = Bundle.load(destination.state_dir / "vms" / "vm1")
        self.assertEqual(bundle_digests(arrived), before)
        self.assertFalse(bundle.path.exists())


class LiveDaemonTests(LiveSecureBase):
    """A running QEMU guest migrated live through the daemon: the daemon's
    reactor drives QEMU's pre-copy, relays the stream and decides the commit."""

    timeout = 300

    async def test_live_through_the_daemon(self) -> None:
        """The guest's heartbeat goes on at the destination in sequence, its
        vTPM's PCR 16 with it, no QEMU of it left here; ``--json`` says live
        with QEMU's downtime, and the daemon journaled it."""
        destination = self.start_destination("--tofu", "--backend", "qemu")
        bundle, watch = self.start_guest()
        state = self.vm_dir / ".securemig"
        source = processes.start_destination(state, log_file=self.base / "src.log")
        self.addCleanup(source.stop)
        first = await threads.deferToThread(watch.wait, 5, 120.0)
        self.assertEqual(first.pcr16, extended(self.pcr16))
        arrived = self.arrived(destination)
        watch.follow(heartbeat_path(arrived))
        source_pid = int((bundle.path / "qemu.pid").read_text())
        result = await threads.deferToThread(self.migrate_live, destination, "--daemon")
        self.assertEqual(result.returncode, 0, result.stderr + source.log()[-3000:])
        summary = json.loads(result.stdout)
        self.assertEqual((summary["outcome"], summary["mode"]), ("done", "live"))
        self.assertIsInstance(summary["downtime_ms"], int)
        last = await threads.deferToThread(watch.wait, 5, 60.0, 1)
        self.assertEqual(last.pcr16, extended(self.pcr16))
        self.assertTrue(watch.continuous(), [b.seq for b in watch.beats])
        self.assertFalse(alive(source_pid))
        self.assertFalse(bundle.path.exists())
        self.assertEqual(QemuBackend().status(arrived), "running")
        journal = Journal(state / "journal.sqlite")
        self.addCleanup(journal.close)
        [record] = journal.records()
        self.assertEqual(
            (record.outcome, record.owner.split(":")[0]), ("done", str(source.process.pid))
        )


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the daemon closes (or resets) the connection."""
    sock.settimeout(30)
    data = b""
    while chunk := _recv_or_reset(sock, 65536):
        data += chunk
    return data


def _recv_or_reset(sock: socket.socket, size: int = 100) -> bytes:
    """What a recv gives once the peer dropped us: b"" (or a reset, the
    same thing here)."""
    try:
        return sock.recv(size)
    except ConnectionResetError:
        return b""


class _suppress_reset:
    """A send the peer cuts short (it dropped us) is not an error here."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, t: Any, v: Any, tb: Any) -> bool:
        return t is not None and issubclass(t, BrokenPipeError | ConnectionResetError)

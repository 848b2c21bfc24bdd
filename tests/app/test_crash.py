"""
Crash points: a real process killed (SIGKILL) at each step of the commit,
restarted as an operator would, and the VM checked to end on exactly one
host, byte-identical, where the coordinator's journal says.

Each cell runs two real ``twistd securemig`` daemons (the destination, and
the source host's own, which shares the source's ``--state-dir`` journal
and settles its unfinished departures) and a real ``securemig migrate``.
The process named by the cell is started with ``SECUREMIG_CRASH_POINTS=1``
and ``SECUREMIG_CRASH_AT=POINT`` (see :mod:`securemig.crashpoint`) and kills
itself there; a killed daemon is restarted on the same port.  Then, within
:data:`SETTLE_TIMEOUT` and with nothing done by hand:

- the VM exists on exactly one host, its images byte-identical;
- that host is the one the source's journal names (committed: the
  destination; otherwise: the source);
- nothing is left in staging or locked, and both journals have an outcome;
- a following migration (onwards from wherever the VM is) succeeds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

from securemig import files
from securemig.host import storage
from securemig.host.journal import Journal
from securemig.hypervisor.bundle import Bundle
from securemig.lab import processes
from securemig.lab.processes import Destination
from securemig.protocol import wire
from tests.support.bundles import bundle_digests
from tests.support.commands import RESOLVE_INTERVAL, crash_env
from tests.support.proxy import CuttingProxy

#: Seconds a cell may take to settle itself once every process runs again.
SETTLE_TIMEOUT = 30.0


class CrashBase(TestCase):
    """Two daemons (the source host's own, and the destination's), a VM at
    the source, and the checks every cell makes."""

    timeout = 120

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.vm_dir = self.base / "src-vms"
        self.src_state = self.base / "src-state"
        self.dst_state = self.base / "dst-state"
        created = processes.securemig(
            "vm", "create", "vm1", "--dir", str(self.vm_dir), "--ram-mib", "4", "--disk-mib", "1"
        )
        self.assertEqual(created.returncode, 0, created.stderr)
        self.before = bundle_digests(Bundle.find(self.vm_dir, "vm1"))
        self.source_daemon = self.daemon(self.src_state)

    def daemon(self, state: Path, env: dict[str, str] | None = None, port: int = 0) -> Destination:
        """A ``twistd securemig`` on ``state``, ended by the test."""
        process = processes.start_destination(
            state,
            "--resolve-interval",
            RESOLVE_INTERVAL,
            listen=f"tcp:{port}:interface=127.0.0.1",
            env=env,
            log_file=state.parent / f"{state.name}-{time.monotonic_ns()}.log",
        )
        self.addCleanup(process.stop)
        return process

    def migrate(
        self, vm_dir: Path, state: Path, to: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``securemig migrate vm1`` as a process (insecure variant)."""
        return processes.securemig(
            "migrate",
            "vm1",
            "--vm-dir",
            str(vm_dir),
            "--state-dir",
            str(state),
            "--to",
            to,
            "--insecure",
            "--json",
            "--no-progress",
            env=None if env is None else {**os.environ, **env},
        )

    def wait_dead(self, daemon: Destination) -> None:
        deadline = time.monotonic() + 30
        while daemon.process.poll() is None:
            self.assertLess(time.monotonic(), deadline, "the daemon did not reach its crash point")
            time.sleep(0.05)
        self.assertEqual(daemon.process.returncode, -signal.SIGKILL, daemon.log())

    # -- the checks every cell makes

    def settled(self) -> tuple[str, str] | None:
        """(where the VM is, what the source decided) once settled, else None."""
        source = Journal(self.src_state / "journal.sqlite")
        destination = Journal(self.dst_state / "journal.sqlite")
        try:
            mine = [r for r in source.records() if r.role == "source"]
            theirs = [r for r in destination.records() if r.role == "destination"]
            if not mine or any(r.outcome in (None, "in-doubt") for r in mine + theirs):
                return None
            if mine[0].reached("committed") and not mine[0].peer_settled:
                return None
            committed = mine[0].reached("committed")
        finally:
            source.close()
            destination.close()
        if list((self.dst_state / "staging").iterdir()):
            return None
        if committed and files.discarding(self.vm_dir):
            # The source's copy, set aside, is not yet removed (a migrate
            # killed before its remover started leaves it to recovery).
            return None
        at_source = (self.vm_dir / "vm1").exists()
        at_destination = (self.dst_state / "vms" / "vm1").exists()
        self.assertFalse(at_source and at_destination, "the VM is on both hosts")
        if not (at_source or at_destination):
            return None
        return ("destination" if at_destination else "source", "committed" if committed else "")

    def assertSettles(self, *logs: Destination) -> str:
        """Wait until the cell settles; check the VM is whole and where the
        coordinator's journal says; return where it is."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (result := self.settled()) is None:
            if time.monotonic() > deadline:
                self.fail("did not settle:\n" + "\n".join(d.log()[-3000:] for d in logs))
            time.sleep(0.2)
        where, decided = result
        self.assertEqual(where, "destination" if decided == "committed" else "source")
        bundle = Bundle.load(
            self.dst_state / "vms" / "vm1" if where == "destination" else self.vm_dir / "vm1"
        )
        self.assertEqual(bundle_digests(bundle), self.before)
        self.assertFalse(storage.is_locked(self.dst_state / "locks" / "vm1.lock"))
        self.assertFalse(storage.is_locked(bundle.lock_path))
        return where

    def assertNextMigrationSucceeds(self, where: str, destination: Destination) -> None:
        """From wherever the VM is, onwards: to the other host."""
        if where == "source":
            result = self.migrate(self.vm_dir, self.src_state, destination.address)
        else:
            result = self.migrate(
                self.dst_state / "vms", self.dst_state, self.source_daemon.address
            )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["outcome"], "done")


class CrashPointTests(CrashBase):
    """Each test is one cell: which process dies (or which message is cut), and where."""

    # -- cells: the source's `securemig migrate` dies

    def source_dies(self, point: str) -> None:
        destination = self.daemon(self.dst_state)
        result = self.migrate(self.vm_dir, self.src_state, destination.address, crash_env(point))
        self.assertEqual(result.returncode, -signal.SIGKILL, result.stderr)
        where = self.assertSettles(destination, self.source_daemon)
        self.assertNextMigrationSucceeds(where, destination)

    def test_source_dies_prepared_received(self) -> None:
        """PREPARED arrived, COMMITTED not journaled: the VM stays at the source."""
        self.source_dies("source-prepared-received")

    def test_source_dies_committed(self) -> None:
        """COMMITTED journaled, key and bundle still here, COMMIT not sent: the
        source's daemon removes the copy and the destination rolls forward."""
        self.source_dies("source-committed")

    def test_source_dies_released(self) -> None:
        """The copy is gone, COMMIT sent or not (the copy's removal overlaps
        it): RESOLVE, or the COMMIT, commits at the destination.  The copy
        was only set aside (its remover waits for the migration's end):
        the source's daemon removes it as it settles the migration."""
        self.source_dies("source-released")

    def test_source_dies_streaming(self) -> None:
        """Mid-stream (the first image bytes sent): the VM stays at the source."""
        self.source_dies("source-streaming")

    # -- cells: the destination daemon dies, and is restarted on its port

    def destination_dies(self, point: str) -> str:
        destination = self.daemon(self.dst_state, crash_env(point))
        result = self.migrate(self.vm_dir, self.src_state, destination.address)
        self.assertNotEqual(result.returncode, 0, result.stdout)
        self.wait_dead(destination)
        again = self.daemon(self.dst_state, port=destination.port)
        where = self.assertSettles(again, self.source_daemon)
        if where == "destination":
            # Settled means resumed there, not only in place.
            arrived = Bundle.load(self.dst_state / "vms" / "vm1")
            self.assertEqual(arrived.manifest.state, "resumed")
        self.assertNextMigrationSucceeds(where, again)
        return where

    def test_destination_dies_admitted(self) -> None:
        """Before WELCOME: nothing moved."""
        self.destination_dies("destination-admitted")

    def test_destination_dies_streaming(self) -> None:
        """Mid-stream (past half of the RAM image): staging is removed at restart."""
        self.destination_dies("destination-streaming")

    def test_destination_dies_prepared(self) -> None:
        """PREPARED journaled, not sent: the source never commits; RESOLVE
        (aborted) makes the restarted destination discard its staging."""
        self.destination_dies("destination-prepared")

    def test_destination_dies_commit_journaled(self) -> None:
        """COMMIT journaled, VM not moved: the restart rolls it forward (the
        old restart rule discarded it and the VM was lost)."""
        self.destination_dies("destination-commit-journaled")

    def test_destination_dies_in_place(self) -> None:
        """COMMIT journaled, VM moved into place, not resumed: the restart
        resumes it (it used to journal done and leave it suspended)."""
        self.assertEqual(self.destination_dies("destination-in-place"), "destination")

    def test_destination_dies_resumed(self) -> None:
        """Resumed, DONE not sent: the restart journals done, the source's
        RESOLVE is answered done."""
        self.destination_dies("destination-resumed")

    # -- cells: the connection is cut just before one message crosses it

    def connection_cut(self, frame: type, direction: str) -> None:
        destination = self.daemon(self.dst_state)
        proxy = CuttingProxy(("127.0.0.1", destination.port), wire.TYPE_CODES[frame], direction)
        self.addCleanup(proxy.close)
        result = self.migrate(self.vm_dir, self.src_state, proxy.address)
        self.assertTrue(proxy.cut.is_set(), result.stderr)
        self.assertNotEqual(json.loads(result.stdout or "{}").get("outcome"), "done")
        where = self.assertSettles(destination, self.source_daemon)
        self.assertNextMigrationSucceeds(where, destination)

    def test_prepared_cut(self) -> None:
        """PREPARED never reaches the source: it aborts and resumes the VM;
        the destination, in doubt, discards on RESOLVE (aborted)."""
        self.connection_cut(wire.Prepared, "to-source")

    def test_commit_cut(self) -> None:
        """COMMIT never reaches the destination: the source has committed;
        the destination, in doubt, rolls forward on RESOLVE (committed)."""
        self.connection_cut(wire.Commit, "to-destination")

    def test_done_cut(self) -> None:
        """DONE never reaches the source: RESOLVE is answered done."""
        self.connection_cut(wire.Done, "to-source")


class DaemonDrivesCrashTests(CrashBase):
    """Cells where the source host's daemon drives the migration
    (``securemig migrate --daemon``) and is itself killed at the point: its
    client is told the daemon went away; the daemon, restarted on its port,
    settles what it had journaled as any source does."""

    def daemon_dies(self, point: str) -> str:
        destination = self.daemon(self.dst_state)
        self.source_daemon.stop()
        crashing = self.daemon(self.src_state, crash_env(point))
        result = processes.securemig(
            "migrate",
            "vm1",
            "--vm-dir",
            str(self.vm_dir),
            "--state-dir",
            str(self.src_state),
            "--to",
            destination.address,
            "--insecure",
            "--json",
            "--no-progress",
            "--daemon",
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("closed the connection before the migration ended", result.stderr)
        self.wait_dead(crashing)
        self.source_daemon = self.daemon(self.src_state, port=crashing.port)
        where = self.assertSettles(destination, self.source_daemon)
        self.assertNextMigrationSucceeds(where, destination)
        return where

    def test_daemon_dies_streaming(self) -> None:
        """Mid-stream: the restarted daemon aborts; the VM stays at the source."""
        self.assertEqual(self.daemon_dies("source-streaming"), "source")

    def test_daemon_dies_committed(self) -> None:
        """COMMITTED journaled, COMMIT not sent: the restarted daemon removes
        the copy here and RESOLVE rolls the destination forward."""
        self.assertEqual(self.daemon_dies("source-committed"), "destination")

    def test_daemon_dies_prepared_received(self) -> None:
        """PREPARED arrived, COMMITTED not journaled: the VM stays at the source."""
        self.assertEqual(self.daemon_dies("source-prepared-received"), "source")


class ManualRecoveryTests(CrashBase):
    """The source host is gone for good (no daemon will ever RESOLVE): the
    operator exports its journal and settles the destination by hand; and a
    VM this host gave away is refused by `migrate` and `vm start`."""

    def test_export_and_recover(self) -> None:
        """COMMIT cut, the source daemon down: `journal export` on the source,
        `recover --source-journal` on the destination rolls it forward."""
        self.source_daemon.stop()
        destination = self.daemon(self.dst_state)
        proxy = CuttingProxy(
            ("127.0.0.1", destination.port), wire.TYPE_CODES[wire.Commit], "to-destination"
        )
        self.addCleanup(proxy.close)
        result = self.migrate(self.vm_dir, self.src_state, proxy.address)
        self.assertEqual(json.loads(result.stdout)["outcome"], "in-doubt", result.stderr)
        self.assertEqual(len(list((self.dst_state / "staging").iterdir())), 1)
        copy = self.base / "exported.sqlite"
        exported = processes.securemig(
            "journal", "export", str(copy), "--state-dir", str(self.src_state)
        )
        self.assertEqual(exported.returncode, 0, exported.stderr)
        self.assertFalse(Path(f"{copy}-wal").exists())
        recovered = processes.securemig(
            "recover", "--state-dir", str(self.dst_state), "--source-journal", str(copy)
        )
        self.assertEqual(recovered.returncode, 0, recovered.stderr)
        self.assertIn("resumed here", recovered.stdout)
        arrived = Bundle.load(self.dst_state / "vms" / "vm1")
        self.assertEqual(bundle_digests(arrived), self.before)
        self.assertEqual(list((self.dst_state / "staging").iterdir()), [])

    def test_cli_takes_the_daemons_lock(self) -> None:
        """`migrate` of a VM in a daemon's state directory is refused while
        that daemon holds its name lock (resuming it): the CLI and the daemon
        take the same lock (issue 22: it used to go ahead)."""
        self.source_daemon.stop()
        vms = self.dst_state / "vms"
        created = processes.securemig(
            "vm", "create", "vm2", "--dir", str(vms), "--ram-mib", "4", "--disk-mib", "1"
        )
        self.assertEqual(created.returncode, 0, created.stderr)
        (self.dst_state / "locks").mkdir(parents=True, exist_ok=True)
        held = storage.Lock(self.dst_state / "locks" / "vm2.lock")
        self.addCleanup(held.release)
        result = processes.securemig(
            "migrate", "vm2", "--vm-dir", str(vms), "--state-dir", str(self.dst_state),
            "--to", "127.0.0.1:9", "--insecure",
        )  # fmt: skip
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertIn("locked", result.stderr)
        self.assertFalse(storage.is_locked(vms / "vm2" / ".lock"))

    def test_garbage_source_journal(self) -> None:
        """A file that is no journal: one sentence, exit 1, nothing created."""
        junk = self.base / "junk.sqlite"
        junk.write_bytes(b"not a database at all" * 100)
        result = processes.securemig(
            "recover", "--state-dir", str(self.base / "fresh"), "--source-journal", str(junk)
        )
        self.assertEqual(result.returncode, 1)
        self.assertIn("is not a securemig journal", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertFalse((self.base / "fresh").exists())

    def test_given_away_vm_refused(self) -> None:
        """After a committed migration whose bundle a crash left behind (and
        before any recovery), `migrate` settles first: the copy is removed
        and the VM is refused with where it went, never sent to a third host."""
        self.source_daemon.stop()
        destination = self.daemon(self.dst_state)
        result = self.migrate(
            self.vm_dir, self.src_state, destination.address, crash_env("source-committed")
        )
        self.assertEqual(result.returncode, -signal.SIGKILL)
        self.assertTrue((self.vm_dir / "vm1").exists())  # the crash left the copy
        third = self.daemon(self.base / "third")
        again = self.migrate(self.vm_dir, self.src_state, third.address)
        self.assertEqual(again.returncode, 1)
        self.assertIn("was migrated to", again.stderr)
        self.assertFalse((self.vm_dir / "vm1").exists())
        self.assertFalse((self.base / "third" / "vms" / "vm1").exists())
        start = processes.securemig(
            "vm", "start", "vm1", "--dir", str(self.vm_dir), "--state-dir", str(self.src_state)
        )
        self.assertEqual(start.returncode, 1)
        self.assertIn("was migrated to", start.stderr)

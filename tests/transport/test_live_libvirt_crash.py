"""
Crash cells of a libvirt domain's live migration (issue 23 item 3): a real
process killed (SIGKILL) at a named step -- ``securemig migrate``, either
``twistd securemig`` -- with real libvirtds, the Linux guest and its
encrypted vTPM; killed daemons restart on their ports, and the cell settles
with nothing done by hand.

After each: the guest runs on exactly one host, the one the source's
journal names (committed: the destination), with its memory (heartbeat in
sequence, never restarted) and PCR 16 kept; its vTPM state on exactly that
host; its secret defined in neither libvirt; both journals closed, nothing
in staging.

The cells that matter most are those after libvirt completed: peer to peer,
``migrateToURI3`` returns only once the destination's Finish ran and the
source's QEMU ended, so from then on the paused destination domain is the
only copy of the guest's memory and aborting would lose it.  The source
commits what its hypervisor moved (``Departure.moved_by_hypervisor``; its
daemon's recovery: ``recovery.moved_away``) and the destination holds such
an arrival in doubt, never discards it (``Arrival.discard``,
``DestinationHost.arrived``).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from twisted.internet import threads

from securemig.host.journal import Journal
from securemig.lab import processes
from securemig.lab.libvirt import LibvirtHost
from securemig.protocol.phases import Phase
from tests.support.commands import crash_env
from tests.support.libvirt_live import LibvirtLiveBase
from tests.support.qemu import extended

#: Seconds a cell may take to settle once every process runs again.
SETTLE_TIMEOUT = 120.0


class LibvirtCrashCells(LibvirtLiveBase):
    """Each test is one cell: which process dies, and where."""

    def setUp(self) -> None:
        super().setUp()
        self.src_state = self.vm_dir / ".securemig"
        self.dst_state = self.base / "dst"

    def libvirt_daemon(
        self,
        state: Path,
        identity: Path,
        policy: Path,
        env: dict[str, str],
        port: int = 0,
        crash: str | None = None,
    ) -> processes.Destination:
        """A ``twistd securemig --backend libvirt`` on ``state`` (restarted
        on ``port``), dying at ``crash`` if given."""
        state.mkdir(parents=True, exist_ok=True)
        stamp = time.monotonic_ns()
        log = self.base / f"{state.name}-{stamp}.log"
        process, bound = processes.start_twistd(
            "securemig",
            "--state-dir", str(state),
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--identity", str(identity),
            "--policy-dir", str(policy),
            "--tofu",
            "--backend", "libvirt",
            "--resolve-interval", "0.5",
            port_file=self.base / f"port-{stamp}",
            log_file=log,
            env={**env, **(crash_env(crash) if crash else {})},
        )  # fmt: skip
        daemon = processes.Destination(process, bound, state, log)
        self.addCleanup(daemon.stop)
        return daemon

    def destination_daemon(self, port: int = 0, crash: str | None = None) -> processes.Destination:
        return self.libvirt_daemon(
            self.dst_state, self.dst_id, self.dst_policy, self.env(self.b), port, crash
        )

    def source_daemon(self) -> processes.Destination:
        return self.libvirt_daemon(self.src_state, self.src_id, self.src_policy, self.env(self.a))

    def wait_dead(self, daemon: processes.Destination) -> None:
        deadline = time.monotonic() + 300
        while daemon.process.poll() is None:
            self.assertLess(time.monotonic(), deadline, "the daemon did not reach its crash point")
            time.sleep(0.1)
        self.assertEqual(daemon.process.returncode, -signal.SIGKILL, daemon.log()[-3000:])

    def settled(self, name: str) -> tuple[str, bool] | None:
        """(the host the guest runs on, whether the source committed) once
        both journals are closed and nothing is staged; else None."""
        source = Journal(self.src_state / "journal.sqlite")
        destination = Journal(self.dst_state / "journal.sqlite")
        try:
            mine = [r for r in source.records() if r.role == "source"]
            theirs = [r for r in destination.records() if r.role == "destination"]
            if not mine or any(r.outcome in (None, "in-doubt") for r in mine + theirs):
                return None
            committed = mine[0].reached("committed")
            if committed and not mine[0].peer_settled:
                return None
        finally:
            source.close()
            destination.close()
        staging = self.dst_state / "staging"
        if staging.exists() and list(staging.iterdir()):
            return None
        running = [h.name for h in (self.a, self.b) if self.state_at(h, name) == "1"]
        if len(running) != 1:
            return None
        return ("source" if running == [self.a.name] else "destination"), committed

    def incoming(self) -> bool:
        """Whether the destination's journal has a live arrival started."""
        journal = Journal(self.dst_state / "journal.sqlite")
        try:
            return any(r.reached(Phase.INCOMING) for r in journal.records())
        finally:
            journal.close()

    def kill_libvirtd_mid_stream(self, host: LibvirtHost, name: str) -> None:
        """Once the arrival started and the source's libvirt job for domain
        ``name`` is copying (some bytes processed, not finished), SIGKILL
        ``host``'s libvirtd, then start it again (its domains' QEMUs run on;
        it settles their interrupted jobs).  Timed by libvirt's own job, not
        by a sleep: on a quiet machine the whole copy takes a few seconds."""
        deadline = time.monotonic() + 300
        while not self.incoming():
            self.assertLess(time.monotonic(), deadline, "the arrival never started")
            time.sleep(0.1)
        conn = self.libvirt.open(self.a.uri)
        try:
            domain = conn.lookupByName(name)
            while True:
                self.assertLess(time.monotonic(), deadline, "libvirt's copy never started")
                info = domain.jobInfo()
                # [type, elapsed, remaining, data total, data processed, ...]
                if info[0] == self.libvirt.VIR_DOMAIN_JOB_UNBOUNDED and info[4] > 1 << 20:
                    break
                time.sleep(0.05)
        finally:
            conn.close()
        host.kill_daemon()
        host.start()

    async def crash_cell(self, name: str, kill: str, point: str = "") -> str:
        """Migrate ``name`` live with ``kill`` (``migrate`` or
        ``destination`` dying at ``point``; ``libvirtd-a`` or ``libvirtd-b``
        killed mid-stream); restart what died; check the cell settles as it
        must.  Returns where the guest ended."""
        self.source_daemon()
        destination = self.destination_daemon(crash=point if kill == "destination" else None)
        domain, bundle, watch = await threads.deferToThread(self.adopted_guest, name)
        first = await threads.deferToThread(watch.wait, 3, 120.0)
        self.assertEqual(first.pcr16, extended(self.pcr16))
        watch.follow(self.b.path(domain.heartbeat))
        running = threads.deferToThread(
            self.migrate_domain,
            destination,
            name,
            "--copy-storage",
            dying=crash_env(point) if kill == "migrate" else None,
        )
        if kill.startswith("libvirtd"):
            victim = self.a if kill == "libvirtd-a" else self.b
            await threads.deferToThread(self.kill_libvirtd_mid_stream, victim, name)
        result = await running
        if kill == "migrate":
            self.assertEqual(result.returncode, -signal.SIGKILL, result.stderr)
        elif kill == "destination":
            await threads.deferToThread(self.wait_dead, destination)
            self.assertNotEqual(result.returncode, 0, result.stdout)
            destination = self.destination_daemon(port=destination.port)
        else:
            self.assertNotEqual(result.returncode, 0, result.stdout)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (found := await threads.deferToThread(self.settled, name)) is None:
            if time.monotonic() > deadline:
                self.fail(f"did not settle: {result.stderr}\n" + destination.log()[-4000:])
            await threads.deferToThread(time.sleep, 0.5)
        where, committed = found
        self.assertEqual(where, "destination" if committed else "source")
        last = await threads.deferToThread(watch.wait, 5, 120.0)
        self.assertEqual(last.pcr16, extended(self.pcr16))
        self.assertTrue(watch.continuous(), [b.seq for b in watch.beats][-60:])
        self.assertGreater(last.seq, first.seq)
        here, there = (self.a, self.b) if where == "source" else (self.b, self.a)
        self.assertEqual(self.state_at(there, name), "undefined")
        uuid = self.domain_uuid(here, name)
        self.assertTrue(here.path(f"/var/lib/libvirt/swtpm/{uuid}").exists())
        self.assertFalse(there.path(f"/var/lib/libvirt/swtpm/{uuid}").exists())
        self.assertEqual(bundle.path.exists(), where == "source")
        self.assertEqual((self.dst_state / "vms" / name).exists(), where == "destination")
        self.assertSecretNowhere(domain.secret_uuid)
        return where

    def domain_uuid(self, host: object, name: str) -> str:
        conn = self.libvirt.open(host.uri)  # type: ignore[attr-defined]
        try:
            return str(conn.lookupByName(name).UUIDString())
        finally:
            conn.close()

    # -- securemig migrate dies

    async def test_migrate_dies_while_libvirt_migrates(self) -> None:
        """``securemig migrate`` (and the carrier it runs) dies as libvirt's
        migration starts: libvirt fails it, the guest runs on at the source;
        the destination's libvirt is left nothing, its secret undefined."""
        await self.crash_cell("lvc1", "migrate", "source-live-started")

    async def test_migrate_dies_after_libvirt_completed(self) -> None:
        """PREPARED received, COMMITTED not journaled -- libvirt completed at
        the destination (Finish).  If the source's libvirt confirmed it, the
        source's QEMU has ended and the paused destination is the only copy:
        the source's daemon commits what libvirt moved and the destination
        rolls forward.  If the carrier died (with ``migrate``) before Finish's
        answer reached the source, libvirt cancelled there and the source's
        guest runs on: the source aborts, the destination's copy goes.
        Either way one copy runs, where the source's journal says."""
        await self.crash_cell("lvc2", "migrate", "source-prepared-received")

    async def test_migrate_dies_committed_while_libvirt_ends_its_qemu(self) -> None:
        """COMMITTED journaled on libvirt's confirmed phase, while libvirt's
        source still ends its QEMU (``migrateToURI3`` not returned) and
        before COMMIT was sent: the source's daemon finds the committed
        departure, keeps the definition until the destination confirms, and
        RESOLVE(committed) rolls the paused destination forward; one copy,
        at the destination."""
        where = await self.crash_cell("lvc9", "migrate", "source-committed")
        self.assertEqual(where, "destination")

    # -- the destination's daemon dies

    async def test_destination_dies_with_secret_defined(self) -> None:
        """The destination defined the secret and dies before LIVE_READY:
        nothing moved; restarted, it undefines the secret; the guest runs on
        at the source."""
        self.assertEqual(
            await self.crash_cell("lvc3", "destination", "destination-incoming"), "source"
        )

    async def test_destination_dies_after_libvirt_completed(self) -> None:
        """libvirt completed at the destination, PREPARED not journaled
        there: restarted, it holds the paused domain in doubt (never
        discarded on its own).  If the source's libvirt confirmed (its QEMU
        ended) the source commits what libvirt moved and RESOLVE rolls it
        forward; if the carrier died with the daemon before Finish's answer
        reached the source, libvirt cancelled there (the guest runs on) and
        RESOLVE(aborted) removes the destination's paused copy.  Either way
        one copy runs, where the source's journal says."""
        await self.crash_cell("lvc4", "destination", "destination-loaded")

    async def test_destination_dies_prepared(self) -> None:
        """PREPARED journaled at the destination, not sent: the same, from
        its in-doubt staging."""
        await self.crash_cell("lvc5", "destination", "destination-prepared")

    # -- either libvirtd dies mid-stream, and is started again

    async def test_destination_libvirtd_dies_mid_stream(self) -> None:
        """The destination's libvirtd killed while libvirt copies: the
        source's libvirt fails the migration, the guest runs on at the
        source; the arrival is settled (its staging and any domain gone)."""
        self.assertEqual(await self.crash_cell("lvc6", "libvirtd-b"), "source")

    async def test_source_libvirtd_dies_mid_stream(self) -> None:
        """The source's libvirtd killed while libvirt copies (its QEMU runs
        on): the migration fails; started again, libvirt settles the
        interrupted job and the guest runs on at the source."""
        self.assertEqual(await self.crash_cell("lvc7", "libvirtd-a"), "source")

    # -- the destination's QEMU dies after libvirt completed: the window

    async def test_destination_qemu_dies_after_libvirt_completed(self) -> None:
        """The window libvirt leaves (doc/backend-libvirt.rst): libvirt
        completed, so the source's QEMU has ended, and the destination's
        QEMU is killed before the commit resumes it.  Its memory is lost --
        nothing runs the guest, on neither host -- and it is said so: the
        destination journals LOST, the source's ``migrate`` fails.  What is
        kept: the source's definition, vTPM state and sealed secret (given
        up only at DONE), so ``securemig vm start`` boots the guest there
        again with its vTPM; the secret is defined nowhere, the destination
        has no domain and no vTPM state of it."""
        self.source_daemon()
        destination = self.destination_daemon(crash="destination-loaded:guest")
        domain, bundle, watch = await threads.deferToThread(self.adopted_guest, "lvc8")
        await threads.deferToThread(watch.wait, 3, 120.0)
        result = await threads.deferToThread(
            self.migrate_domain, destination, "lvc8", "--copy-storage"
        )
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("LIVE_FAILED", result.stderr)
        self.assertIn("its memory is lost; `securemig vm start lvc8`", result.stderr)
        self.assertEqual(self.state_at(self.b, "lvc8"), "undefined")
        self.assertEqual(self.state_at(self.a, "lvc8"), "5")  # shut off, still defined
        uuid = self.domain_uuid(self.a, "lvc8")
        self.assertTrue(self.a.path(f"/var/lib/libvirt/swtpm/{uuid}").exists())
        self.assertFalse(self.b.path(f"/var/lib/libvirt/swtpm/{uuid}").exists())
        self.assertTrue(bundle.vtpm_key_path.exists())
        journal = Journal(self.dst_state / "journal.sqlite")
        self.addCleanup(journal.close)
        self.assertTrue(any(r.reached(Phase.LOST) for r in journal.records()))
        self.assertSecretNowhere(domain.secret_uuid)
        started = await threads.deferToThread(
            processes.securemig,
            "vm", "start", "lvc8", "--dir", str(self.vm_dir), "--identity", str(self.src_id),
        )  # fmt: skip
        self.assertEqual(started.returncode, 0, started.stderr)
        again = await threads.deferToThread(watch.wait, 3, 120.0)
        self.assertEqual(again.pcr16, extended(self.pcr16))
        self.assertEqual(self.state_at(self.a, "lvc8"), "1")
        self.assertSecretNowhere(domain.secret_uuid)

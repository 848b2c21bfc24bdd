"""
Crash cells of a libvirt domain's live migration at and after libvirt's
completion (issue 23 item 3), where a ``libvirtd`` dies: the known way the
guest was lost (``doc/backend-libvirt.rst``) and the cells after COMMITTED.

Each kills a real ``libvirtd`` (SIGKILL) at an exact step of a real
securemig process -- the crash point's ``NAME:other`` mode: the process
that reaches the point kills the one a pid file names -- and starts it
again as an operator would, once ``securemig migrate`` has returned (so
the source decides while its libvirtd cannot be asked).  After each: the
guest runs on exactly one host, with its memory (heartbeat in sequence,
never restarted) and PCR 16 kept; its vTPM state on exactly that host; its
secret defined in neither libvirt; both journals closed, nothing staged.

The helpers (daemons restarted on their ports, ``settled``) are
``tests/support/libvirt_cells.py``'s.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from twisted.internet import threads

from securemig.host.journal import Journal
from securemig.lab.libvirt import LibvirtHost
from securemig.protocol.phases import Phase
from tests.support.commands import crash_env
from tests.support.libvirt_cells import LibvirtCellsBase
from tests.support.qemu import extended

#: Seconds a cell may take to settle once every process runs again.
SETTLE_TIMEOUT = 180.0


class LibvirtCompletionCells(LibvirtCellsBase):
    """A libvirtd killed at libvirt's completion, or after COMMITTED."""

    def pidfile(self, host: LibvirtHost) -> Path:
        """A pid file naming ``host``'s libvirtd, for ``NAME:other``."""
        assert host.process is not None
        path = self.base / f"libvirtd-{host.name}-{time.monotonic_ns()}.pid"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(host.process.pid))
        return path

    def restart_when_killed(self, host: LibvirtHost) -> None:
        """Once ``host``'s libvirtd is dead (killed by the crash point),
        start it again with the same trees, as an operator would."""
        assert host.process is not None
        deadline = time.monotonic() + 300
        while host.process.poll() is None:
            self.assertLess(time.monotonic(), deadline, "libvirtd was never killed")
            time.sleep(0.1)
        host.start()

    async def libvirtd_cell(
        self, name: str, victim: LibvirtHost, point: str, killer: str
    ) -> tuple[str, str]:
        """Migrate ``name`` live; ``killer`` (``destination``'s daemon or
        ``migrate``) SIGKILLs ``victim``'s libvirtd at crash point
        ``point``; once ``migrate`` returned, ``victim``'s libvirtd is
        started again; the cell must settle as the module says.  Returns
        where the guest ended and ``migrate``'s output."""
        dying = {**crash_env(f"{point}:other"), "SECUREMIG_CRASH_PIDFILE": ""}
        self.source_daemon()
        domain, bundle, watch = await threads.deferToThread(self.adopted_guest, name)
        dying["SECUREMIG_CRASH_PIDFILE"] = str(self.pidfile(victim))
        # Whatever happens, the next test finds the host's libvirtd running.
        self.addCleanup(
            lambda: victim.process is None or victim.process.poll() is None or victim.start()
        )
        destination = self.libvirt_daemon(
            self.dst_state,
            self.dst_id,
            self.dst_policy,
            {**self.env(self.b), **(dying if killer == "destination" else {})},
        )
        first = await threads.deferToThread(watch.wait, 3, 120.0)
        self.assertEqual(first.pcr16, extended(self.pcr16))
        watch.follow(self.b.path(domain.heartbeat))
        result = await threads.deferToThread(
            self.migrate_domain,
            destination,
            name,
            "--copy-storage",
            dying=dying if killer == "migrate" else None,
        )
        said = result.stdout + result.stderr
        await threads.deferToThread(self.restart_when_killed, victim)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (found := await threads.deferToThread(self.settled, name)) is None:
            if time.monotonic() > deadline:
                self.fail(f"did not settle: {said}\n" + destination.log()[-4000:])
            await threads.deferToThread(time.sleep, 0.5)
        where, committed = found
        self.assertEqual(where, "destination" if committed else "source", said)
        await threads.deferToThread(self.assert_one_copy, name, where, domain, bundle, watch, first)
        return where, said

    async def test_source_libvirtd_dies_at_completion(self) -> None:
        """The source's libvirtd killed the moment the destination journaled
        PREPARED (libvirt's Finish ran there: its domain paused, the only
        complete copy unless the source's QEMU runs on).  Unless its libvirt
        saved its confirmed phase first (then the source commits on it, as
        it does without a crash), the source's job fails with end of file
        and its libvirt cannot be asked: nothing is decided (``migrate``
        says so, no ``aborted``, no RESOLVE(aborted));
        the destination holds its paused copy; once libvirtd is back the
        source's daemon decides from the domain -- forward unless it
        demonstrably runs on -- and the guest runs on exactly one host
        with its memory.  (Before the fix: the source aborted, the
        destination removed its paused copy, and libvirt, restarted, left
        the source's domain shut off: the guest lost.)"""
        where, said = await self.libvirtd_cell(
            "lvk1", self.a, "destination-prepared", "destination"
        )
        if '"outcome": "done"' in said:
            # The other branch of the race: the source's libvirt had saved
            # its confirmed phase before it died (restarted, it ends the
            # domain), so the source committed on it; its copy is removed
            # once its libvirtd is back.
            self.assertEqual(where, "destination")
        else:
            self.assertIn('"outcome": "in-doubt"', said)
            self.assertIn("is in doubt, neither committed nor aborted", said)
        self.assertNotIn("Traceback", said)
        # Decided while libvirt could not be asked, it would be a guess.
        self.assertNotIn('"outcome": "aborted"', said)

    async def test_source_libvirtd_dies_after_committed(self) -> None:
        """The source's libvirtd killed by ``migrate`` right after it
        journaled COMMITTED (libvirt completed: the source's domain shut off,
        migrated): the commit stands, the destination resumes the guest;
        the source's definition and vTPM state, which its dead libvirtd
        could not remove at DONE, are removed once it is back -- never left
        as a stale copy -- and the guest runs at the destination only."""
        where, _ = await self.libvirtd_cell("lvk2", self.a, "source-committed", "migrate")
        self.assertEqual(where, "destination")

    async def test_destination_libvirtd_dies_after_committed(self) -> None:
        """The destination's libvirtd killed by ``migrate`` right after the
        source journaled COMMITTED, before COMMIT reached the destination:
        its paused domain's QEMU runs on; the destination cannot resume it
        until its libvirtd is back, then the commit is rolled forward (the
        source's RESOLVE) and the guest runs there with its memory."""
        where, _ = await self.libvirtd_cell("lvk3", self.b, "source-committed", "migrate")
        self.assertEqual(where, "destination")

    def name_victims(self, pidfile: Path, name: str) -> None:
        """Once ``securemig migrate`` journaled its departure (its pid is
        the record's owner), write into ``pidfile`` the source's processes
        a crash of that host would take: ``migrate``, its libvirtd and
        domain ``name``'s QEMU (``NAME:other`` kills them all)."""
        deadline = time.monotonic() + 120
        while True:
            journal = Journal(self.src_state / "journal.sqlite")
            try:
                owners = [r.owner for r in journal.records() if r.role == "source" and r.owner]
            finally:
                journal.close()
            if owners:
                break
            self.assertLess(time.monotonic(), deadline, "migrate never journaled its departure")
            time.sleep(0.05)
        assert self.a.process is not None
        qemu = self.a.path(f"/run/libvirt/qemu/{name}.pid").read_text().strip()
        migrate = owners[0].partition(":")[0]
        pidfile.write_text(f"{migrate}\n{self.a.process.pid}\n{qemu}\n")

    async def test_source_dies_after_finish_before_prepared(self) -> None:
        """libvirt's Finish ran at the destination (its domain paused: the
        whole guest), and there its daemon SIGKILLs, at once, the source's
        ``securemig migrate``, libvirtd and QEMU (``destination-loaded:
        other``: a crash of the source host's processes) -- before
        PREPARED reached the source, whether or not the Finish's answer
        did.  Nothing is decided at the source while its libvirtd is down;
        started again, libvirt finds the domain shut off for a reason other
        than *migrated* (its QEMU is gone).  The source's daemon asks the
        destination what it holds (ASK): the whole guest, held in doubt --
        so it commits, and the guest runs on at the destination with its
        memory.  (Before the rule: the source aborted -- shut off, not
        migrated, PREPARED never seen -- and its RESOLVE(aborted)
        discarded the only copy: the guest lost.)"""
        name = "lvk4"
        self.source_daemon()
        domain, bundle, watch = await threads.deferToThread(self.adopted_guest, name)
        pidfile = self.base / "source-host.pids"
        pidfile.write_text("")
        dying = {
            **crash_env("destination-loaded:other"),
            "SECUREMIG_CRASH_PIDFILE": str(pidfile),
        }
        # Whatever happens, the next test finds the host's libvirtd running.
        self.addCleanup(
            lambda: self.a.process is None or self.a.process.poll() is None or self.a.start()
        )
        destination = self.libvirt_daemon(
            self.dst_state, self.dst_id, self.dst_policy, {**self.env(self.b), **dying}
        )
        first = await threads.deferToThread(watch.wait, 3, 120.0)
        self.assertEqual(first.pcr16, extended(self.pcr16))
        watch.follow(self.b.path(domain.heartbeat))
        running = threads.deferToThread(self.migrate_domain, destination, name, "--copy-storage")
        await threads.deferToThread(self.name_victims, pidfile, name)
        result = await running
        self.assertEqual(result.returncode, -signal.SIGKILL, result.stderr)
        assert self.a.process is not None
        await threads.deferToThread(self.a.process.wait, 60)
        # The state this cell is about: the destination holds the whole
        # guest; the source never saw PREPARED and decided nothing.
        self.assertTrue(self.journal_reached(self.dst_state, Phase.INCOMING))
        self.assertFalse(self.journal_reached(self.src_state, Phase.PREPARED))
        self.assertFalse(self.journal_reached(self.src_state, Phase.COMMITTED))
        self.a.start()
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (found := await threads.deferToThread(self.settled, name)) is None:
            if time.monotonic() > deadline:
                self.fail("did not settle:\n" + destination.log()[-4000:])
            await threads.deferToThread(time.sleep, 0.5)
        self.assertEqual(found, ("destination", True))
        await threads.deferToThread(
            self.assert_one_copy, name, "destination", domain, bundle, watch, first
        )

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

import os
import signal
from typing import Any

from twisted.internet import threads

from securemig.host.journal import Journal
from securemig.hypervisor.qemu import alive
from securemig.lab import processes
from securemig.protocol.phases import Phase
from tests.support.commands import crash_env
from tests.support.libvirt_cells import LibvirtCellsBase
from tests.support.qemu import extended


class LibvirtCrashCells(LibvirtCellsBase):
    """Each test is one cell: which process dies, and where."""

    #: The last cell's ``securemig migrate``, as it ended.
    result: Any = None

    async def crash_cell(self, name: str, kill: str, point: str = "", *extra: str) -> str:
        """Migrate ``name`` live with ``kill`` (``migrate`` or
        ``destination`` dying at ``point``; ``libvirtd-a`` or ``libvirtd-b``
        killed mid-stream); restart what died; check the cell settles as it
        must.  Returns where the guest ended."""
        self.source_daemon()
        destination = self.destination_daemon(crash=point if kill == "destination" else None)
        domain, bundle, watch, first = await threads.deferToThread(self.watched_guest, name)
        running = threads.deferToThread(
            self.migrate_domain,
            destination,
            name,
            "--copy-storage",
            *extra,
            dying=crash_env(point) if kill == "migrate" else None,
        )
        if kill.startswith("libvirtd"):
            victim = self.a if kill == "libvirtd-a" else self.b
            await threads.deferToThread(self.kill_libvirtd_mid_stream, victim, name)
        elif kill == "qemu-b":
            await threads.deferToThread(self.kill_destination_qemu_mid_stream, name)
        elif kill == "stop-qemu-b":
            pid = await threads.deferToThread(
                self.kill_destination_qemu_mid_stream, name, signal.SIGSTOP
            )

            def go_on() -> None:
                # Whatever ends it (the arrival's discard), never left stopped.
                if alive(pid):
                    os.kill(pid, signal.SIGCONT)

            self.addCleanup(go_on)
        result = self.result = await running
        if kill == "migrate":
            self.assertEqual(result.returncode, -signal.SIGKILL, result.stderr)
        elif kill == "destination":
            await threads.deferToThread(self.wait_dead, destination)
            self.assertNotEqual(result.returncode, 0, result.stdout)
            destination = self.destination_daemon(port=destination.port)
        else:
            self.assertNotEqual(result.returncode, 0, result.stdout)
        return await threads.deferToThread(
            self.settled_once, name, (domain, bundle, watch, first), destination
        )

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

    async def test_migrate_dies_after_removing_the_stale_copies(self) -> None:
        """After DONE, the source's definition undefined and the disk copies
        libvirt left here deleted, the bundle (with the sealed secret) not
        yet removed: the source's daemon redoes the release (deleting what
        is left, once) and the guest runs on at the destination, its disk
        there only."""
        where = await self.crash_cell("lvc10", "migrate", "source-copies-removed")
        self.assertEqual(where, "destination")

    # -- the destination's daemon dies

    async def test_destination_dies_with_secret_defined(self) -> None:
        """The destination defined the secret and dies before LIVE_READY:
        nothing moved; restarted, it undefines the secret; the guest runs on
        at the source."""
        self.assertEqual(
            await self.crash_cell("lvc3", "destination", "destination-incoming"), "source"
        )

    async def test_destination_dies_with_disks_listed(self) -> None:
        """``--copy-storage``: the disks to create listed in the arrival's
        staging, none created yet: restarted, the destination settles the
        arrival (deleting listed disks that are there, none here) and the
        guest runs on at the source; no disk is left at the destination."""
        self.assertEqual(
            await self.crash_cell("lvc11", "destination", "destination-disks-listed"), "source"
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

    async def test_destination_qemu_dies_mid_stream(self) -> None:
        """The QEMU the destination's libvirt started for the arriving
        domain killed while libvirt copies: libvirt fails the migration, the
        guest runs on at the source with its memory; the arrival is settled
        (its staging, the domain and its secret gone there)."""
        self.assertEqual(await self.crash_cell("lvc9", "qemu-b"), "source")

    async def test_destination_qemu_stalls_mid_stream(self) -> None:
        """The destination's QEMU stopped (SIGSTOP) while libvirt copies:
        the stream stalls while both libvirtds go on exchanging keepalives
        on the carried RPC connection.  Those are not progress: after
        ``--idle-timeout`` the migration ends (TIMEOUT), libvirt's job is
        cancelled, and the guest runs on at the source (a carrier that
        counted them would have held the migration until its one-hour
        deadline)."""
        where = await self.crash_cell("lvc10", "stop-qemu-b", "", "--idle-timeout", "12")
        self.assertIn("TIMEOUT", self.result.stderr)
        self.assertEqual(where, "source")

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

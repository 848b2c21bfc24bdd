"""
More crash cells of a libvirt domain's live migration (issue 23 item 3),
with real libvirtds, the Linux guest and its encrypted vTPM:

- the network between the source and the destination cut (a
  :class:`~tests.support.cable.CableProcess` every connection crosses:
  control, the carried sockets' carrier, later RESOLVEs; SIGKILLed by a
  securemig process at its crash point, ``NAME:other``) as the source is
  about to send the wrapped key, while libvirt copies, as the destination
  journaled PREPARED and as the source journaled COMMITTED (each before
  the message crossed); the network then heals;
- the source host's daemon (``twistd securemig``) killed (SIGKILL) while it
  settles the departures a killed ``securemig migrate`` left, then
  restarted on its port.

After each: the guest runs on exactly one host, the one the source's
journal names, with its memory (heartbeat in sequence, never restarted) and
PCR 16 kept; its vTPM state on exactly that host; its secret defined in
neither libvirt; both journals closed, nothing in the destination's staging.
(libvirt's own race -- whether Finish's answer reached the source before
the cut -- decides some of them either way; the journal always says which.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable

from twisted.internet import threads

from securemig.protocol.phases import Phase
from tests.support.cable import CableProcess, free_ports
from tests.support.commands import crash_env
from tests.support.libvirt_cells import LibvirtCellsBase

#: Where a cable cell cuts: which process cuts the cable at which of its
#: crash points (``NAME:other``: it SIGKILLs the cable's process and lives
#: on), or, mid-copy, the test once libvirt's job is copying.
CUTS = {
    # WRAPPED_KEY about to be sent: the secret not yet released.
    "before-key-release": ("migrate", "source-key-wrapped"),
    "mid-copy": ("test", ""),
    # PREPARED journaled (libvirt completed there), not yet sent.
    "destination-prepared": ("destination", "destination-prepared"),
    # COMMITTED journaled, COMMIT not yet sent.
    "source-committed": ("migrate", "source-committed"),
}


class LibvirtLiveCells(LibvirtCellsBase):
    """Each test is one cell: where the network is cut, or where the
    source's daemon dies."""

    async def cut_cell(
        self,
        name: str,
        when: str,
        dying: dict[str, str] | None = None,
        healed: Callable[[], None] | None = None,
        with_cut: Callable[[], None] | None = None,
    ) -> str:
        """Migrate ``name`` live through a cable (in a process of its own)
        cut at ``when`` (:data:`CUTS`), healed once ``migrate`` returned;
        check the cell settles as it must.  Returns where the guest ended.
        ``dying``: more of the destination daemon's environment (a crash
        point of its own); ``healed``: run (in a thread) once the cable
        healed, before the cell must settle; ``with_cut``: run as the test
        cuts (mid-copy), right after it."""
        cutter, point = CUTS[when]
        self.source_daemon()
        ports = free_ports(5)
        cable = CableProcess(ports, self.base)
        self.addCleanup(cable.close)
        destination = self.libvirt_daemon(
            self.dst_state,
            self.dst_id,
            self.dst_policy,
            {
                **self.env(self.b),
                **(cable.cut_at(point) if cutter == "destination" else {}),
                **(dying or {}),
            },
            ports[0],
            None,
            ("--data-ports", f"{ports[1]}-{ports[-1]}"),
        )
        self.assertEqual(destination.port, ports[0])
        domain, bundle, watch, first = await threads.deferToThread(self.watched_guest, name)
        running = threads.deferToThread(
            self.migrate_domain,
            destination,
            name,
            "--copy-storage",
            "--to",
            cable.address(destination.port),
            dying=cable.cut_at(point) if cutter == "migrate" else None,
        )
        if cutter == "test":
            await threads.deferToThread(self.wait_copying, name)
            cable.cut_now()
            if with_cut is not None:
                with_cut()
        result = await running
        self.assertTrue(cable.cut, f"the cable was not cut {when}: {result.stderr}")
        cable.heal()
        if when == "before-key-release":
            # Cut before the wrapped key crossed: the destination never
            # received it, so its libvirt never had the secret.
            self.assertFalse(self.journal_reached(self.dst_state, Phase.KEY_RECEIVED))
            self.assertFalse(self.journal_reached(self.dst_state, Phase.INCOMING))
        if when in ("before-key-release", "mid-copy"):
            self.assertNotEqual(result.returncode, 0, result.stdout)
        if healed is not None:
            await threads.deferToThread(healed)
        return await threads.deferToThread(
            self.settled_once, name, (domain, bundle, watch, first), destination
        )

    async def test_cut_before_key_release(self) -> None:
        """Cut as the source is about to send the wrapped vTPM secret (its
        crash point ``source-key-wrapped``): never released, nothing was
        defined at the destination; the guest runs on at the source, the
        migration aborted on both sides."""
        self.assertEqual(await self.cut_cell("lcut1", "before-key-release"), "source")

    async def test_cut_mid_copy(self) -> None:
        """Cut while libvirt copies memory and disk: libvirt fails its
        migration, the guest runs on at the source; the destination's
        domain, vTPM state and secret go with its arrival."""
        self.assertEqual(await self.cut_cell("lcut2", "mid-copy"), "source")

    async def test_cut_mid_copy_libvirtd_dies_discarding(self) -> None:
        """Cut while libvirt copies; the destination's libvirtd SIGKILLed as
        the destination discards the cut arrival (crash point
        ``destination-discarding``, after libvirt said it did not complete
        there, before its domain and secret are removed), started again
        once ``migrate`` returned.  The discard cannot reach libvirt: the
        name of the VM is freed all the same, the staging left for the
        source's RESOLVE(aborted), which removes it once libvirt is back
        (before, the failed discard kept the name held until a restart and
        every RESOLVE was answered "busy").  The guest runs on at the
        source."""
        libvirtd = self.b.path("/run/libvirt/libvirtd.pid")

        def restarted() -> None:
            # Killed by the destination's daemon at its crash point (the
            # cut came before migrate returned, so the discard has begun).
            deadline = time.monotonic() + 120
            while self.b.process is not None and self.b.process.poll() is None:
                self.assertLess(time.monotonic(), deadline, "the discard was never reached")
                time.sleep(0.1)
            self.b.restart()

        dying = {
            **crash_env("destination-discarding:other"),
            "SECUREMIG_CRASH_PIDFILE": str(libvirtd),
        }
        self.assertEqual(await self.cut_cell("lcut5", "mid-copy", dying, restarted), "source")
        # The discard did meet the dead libvirtd (the cell is about that path).
        self.assertIn("its staging is left for recovery", self.destination_logs())

    async def test_cut_mid_copy_libvirtd_stopped_discarding(self) -> None:
        """Cut while libvirt copies, the destination's libvirtd stopped
        (SIGSTOP) as the cut lands: the discard of the cut arrival waits on
        it, so the VM's name stays held there; meanwhile the source's
        RESOLVE(aborted) is answered that the aborted arrival is still
        being removed (and asked again), and the guest runs on at the
        source.  Continued (SIGCONT), libvirt answers, the discard
        finishes and the cell settles with the guest at the source."""
        assert self.b.process is not None
        libvirtd = self.b.process.pid

        def resume() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(libvirtd, signal.SIGCONT)

        # Whatever happens, the shared libvirtd runs again after this test.
        self.addCleanup(resume)

        def stopped_then_continued() -> None:
            deadline = time.monotonic() + 120
            while "is still being removed" not in self.destination_logs():
                self.assertLess(time.monotonic(), deadline, "RESOLVE was not told why")
                time.sleep(0.2)
            # The name held: nothing settled, the guest runs on at the source.
            self.assertIsNone(self.settled("lcut6"))
            self.assertEqual(self.state_at(self.a, "lcut6"), "1")
            resume()

        self.assertEqual(
            await self.cut_cell(
                "lcut6",
                "mid-copy",
                healed=stopped_then_continued,
                with_cut=lambda: os.kill(libvirtd, signal.SIGSTOP),
            ),
            "source",
        )

    def destination_logs(self) -> str:
        """What the destination's daemons logged in this test."""
        return "".join(p.read_text() for p in self.base.glob(f"{self.dst_state.name}-*.log"))

    async def test_cut_after_destination_prepared(self) -> None:
        """Cut as the destination journaled PREPARED, before sending it
        (libvirt completed there, the guest paused): the source commits what
        libvirt moved, or -- libvirt's race -- cancelled and runs on;
        RESOLVE through the healed network settles the destination
        accordingly.  One copy, where the source's journal says."""
        await self.cut_cell("lcut3", "destination-prepared")

    async def test_cut_after_source_committed(self) -> None:
        """Cut as the source journaled COMMITTED, before COMMIT was sent:
        the guest is the destination's; RESOLVE(committed) through the
        healed network rolls it forward there, and the source's definition
        and vTPM state go."""
        self.assertEqual(await self.cut_cell("lcut4", "source-committed"), "destination")

    # -- the source's daemon dies while it settles

    async def daemon_cell(self, name: str, migrate_at: str, settle_at: str) -> str:
        """``securemig migrate`` of ``name`` killed at ``migrate_at``; the
        source's daemon, settling what it left, killed at ``settle_at`` and
        restarted on its port; check the cell settles as it must."""
        source = self.source_daemon(crash=settle_at)
        destination = self.destination_daemon()
        domain, bundle, watch, first = await threads.deferToThread(self.watched_guest, name)
        result = await threads.deferToThread(
            self.migrate_domain, destination, name, "--copy-storage", dying=crash_env(migrate_at)
        )
        self.assertEqual(result.returncode, -signal.SIGKILL, result.stderr)
        await threads.deferToThread(self.wait_dead, source)
        source = self.source_daemon(port=source.port)
        where, committed = await threads.deferToThread(self.wait_settled, name, destination, source)
        self.assertEqual(where, "destination" if committed else "source")
        await threads.deferToThread(self.assert_one_copy, name, where, domain, bundle, watch, first)
        return where

    async def test_source_daemon_dies_settling_aborted(self) -> None:
        """``securemig migrate`` dies as libvirt's migration starts; the
        source's daemon journals it aborted and dies before making sure the
        guest runs on: restarted, it finishes (the guest never stopped), and
        RESOLVE(aborted) clears the destination."""
        self.assertEqual(
            await self.daemon_cell("ldae1", "source-live-started", "source-settle-aborted"),
            "source",
        )

    async def test_source_daemon_dies_settling_released(self) -> None:
        """``securemig migrate`` dies right after journaling COMMITTED; the
        source's daemon, told DONE by the destination it resolved, removes
        the copy here and dies before journaling done: restarted, it
        finishes idempotently; the guest runs at the destination."""
        self.assertEqual(
            await self.daemon_cell("ldae2", "source-committed", "source-settle-released"),
            "destination",
        )

"""The crash cells' helpers for a libvirt domain's live migration: the two
hosts' ``twistd securemig --backend libvirt`` daemons (restarted on their
ports, perhaps dying at a crash point), where a migration stands in the
journals and in libvirt, and the checks once a cell settled -- for every
module of such cells (a test module imports no other)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from securemig.host.journal import Journal
from securemig.hypervisor.bundle import Bundle
from securemig.hypervisor.heartbeat import Beat, Watch
from securemig.lab import processes
from securemig.lab.libvirt import LibvirtHost
from securemig.protocol.phases import Phase

from .commands import crash_env
from .libvirt_live import LibvirtLiveBase
from .qemu import extended

#: Seconds a cell may take to settle once every process runs again.
SETTLE_TIMEOUT = 120.0


class LibvirtCellsBase(LibvirtLiveBase):
    """What the live crash cells of a libvirt domain share: both hosts'
    ``twistd securemig --backend libvirt`` (killed and restarted on their
    ports), where a migration stands in the journals and in libvirt, and
    the checks made once a cell settled."""

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
        extra: tuple[str, ...] = (),
    ) -> processes.Destination:
        """A ``twistd securemig --backend libvirt`` on ``state`` (restarted
        on ``port``), dying at ``crash`` if given; ``extra`` options."""
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
            *extra,
            port_file=self.base / f"port-{stamp}",
            log_file=log,
            env={**env, **(crash_env(crash) if crash else {})},
        )  # fmt: skip
        daemon = processes.Destination(process, bound, state, log)
        self.addCleanup(daemon.stop)
        return daemon

    def destination_daemon(
        self, port: int = 0, crash: str | None = None, extra: tuple[str, ...] = ()
    ) -> processes.Destination:
        """dest-b's daemon, on its own libvirtd."""
        return self.libvirt_daemon(
            self.dst_state, self.dst_id, self.dst_policy, self.env(self.b), port, crash, extra
        )

    def source_daemon(self, port: int = 0, crash: str | None = None) -> processes.Destination:
        """source-a's daemon: it shares ``securemig migrate``'s state
        directory and settles its unfinished departures."""
        return self.libvirt_daemon(
            self.src_state, self.src_id, self.src_policy, self.env(self.a), port, crash
        )

    def watched_guest(self, name: str) -> tuple[Any, Bundle, Watch, Beat]:
        """:meth:`adopted_guest` ``name``, its first beats seen (PCR 16 as
        given), its heartbeat followed at the destination too: the domain,
        its bundle, the watch and the first beat."""
        domain, bundle, watch = self.adopted_guest(name)
        first = watch.wait(3, 120.0)
        self.assertEqual(first.pcr16, extended(self.pcr16))
        watch.follow(self.b.path(domain.heartbeat))
        return domain, bundle, watch, first

    def wait_dead(self, daemon: processes.Destination) -> None:
        """Until ``daemon`` died of SIGKILL (its crash point)."""
        deadline = time.monotonic() + 300
        while daemon.process.poll() is None:
            self.assertLess(time.monotonic(), deadline, "the daemon did not reach its crash point")
            time.sleep(0.1)
        self.assertEqual(daemon.process.returncode, -signal.SIGKILL, daemon.log()[-3000:])

    def settled(self, name: str) -> tuple[str, bool] | None:
        """(the host the guest runs on, whether the source committed) once
        both journals are closed (a committed source released its copy) and
        nothing is staged; else None."""
        source = Journal(self.src_state / "journal.sqlite")
        destination = Journal(self.dst_state / "journal.sqlite")
        try:
            mine = [r for r in source.records() if r.role == "source"]
            theirs = [r for r in destination.records() if r.role == "destination"]
            if not mine or any(r.outcome in (None, "in-doubt") for r in mine + theirs):
                return None
            committed = mine[0].reached(Phase.COMMITTED)
            # Committed: settled once the destination confirmed and this
            # host gave its copy up (``released``: after a libvirtd that was
            # down, its daemon's redone release may still be deleting).
            if committed and not (mine[0].peer_settled and mine[0].reached(Phase.RELEASED)):
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

    def journal_reached(self, state: Path, phase: Phase) -> bool:
        """Whether the journal in ``state`` has a migration at ``phase``."""
        journal = Journal(state / "journal.sqlite")
        try:
            return any(r.reached(phase) for r in journal.records())
        finally:
            journal.close()

    def incoming(self) -> bool:
        """Whether the destination's journal has a live arrival started."""
        return self.journal_reached(self.dst_state, Phase.INCOMING)

    def wait_copying(self, name: str) -> None:
        """Until the arrival started and the source's libvirt job for domain
        ``name`` is copying (some bytes processed, not finished).  Timed by
        libvirt's own job, not by a sleep: on a quiet machine the whole copy
        takes a few seconds."""
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

    def kill_libvirtd_mid_stream(self, host: LibvirtHost, name: str) -> None:
        """Once the source's libvirt job for domain ``name`` is copying,
        SIGKILL ``host``'s libvirtd, then start it again (its domains' QEMUs
        run on; it settles their interrupted jobs)."""
        self.wait_copying(name)
        host.kill_daemon()
        host.start()

    def kill_destination_qemu_mid_stream(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Once the source's libvirt job for domain ``name`` is copying,
        send ``sig`` to the QEMU the destination's libvirt started for it
        (by the pid in that libvirt's run directory: a process of this
        lab); its pid."""
        self.wait_copying(name)
        pid = int((self.b.run_dir / "qemu" / f"{name}.pid").read_text())
        os.kill(pid, sig)
        return pid

    def wait_settled(self, name: str, *logs: processes.Destination) -> tuple[str, bool]:
        """:meth:`settled`, waited for (at most :data:`SETTLE_TIMEOUT`)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (found := self.settled(name)) is None:
            if time.monotonic() > deadline:
                self.fail("did not settle:\n" + "\n".join(d.log()[-3000:] for d in logs))
            time.sleep(0.5)
        return found

    def assert_one_copy(
        self, name: str, where: str, domain: Any, bundle: Bundle, watch: Watch, first: Beat
    ) -> None:
        """After a cell settled at ``where``: the guest runs there with its
        memory (heartbeat in sequence, never restarted, PCR 16 kept), is
        undefined at the other host, its vTPM state on that host only, the
        bundle where the guest is, its secret defined in neither libvirt,
        and its disk (copied) on that host only: a copy left at the other
        host is gone (an aborted arrival's, or the source's once committed)."""
        last = watch.wait(5, 120.0)
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
        self.assertTrue(here.path(domain.disk).exists())
        self.assertFalse(there.path(domain.disk).exists(), f"a copy of the disk is left {there}")
        self.assertSecretNowhere(domain.secret_uuid)

    def settled_once(
        self,
        name: str,
        guest: tuple[Any, Bundle, Watch, Beat],
        *logs: processes.Destination,
    ) -> str:
        """Until the cell settled (:meth:`wait_settled`, ``logs`` shown if
        it does not), where the source's journal says; then the checks of
        :meth:`assert_one_copy` on ``guest`` (:meth:`watched_guest`'s).
        Returns where the guest runs."""
        where, committed = self.wait_settled(name, *logs)
        self.assertEqual(where, "destination" if committed else "source")
        self.assert_one_copy(name, where, *guest)
        return where

    def domain_uuid(self, host: LibvirtHost, name: str) -> str:
        """libvirt's UUID of domain ``name`` at ``host``."""
        conn = self.libvirt.open(host.uri)
        try:
            return str(conn.lookupByName(name).UUIDString())
        finally:
            conn.close()

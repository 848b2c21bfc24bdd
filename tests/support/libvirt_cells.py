"""The crash cells' helpers for a libvirt domain's live migration: the two
hosts' ``twistd securemig --backend libvirt`` daemons (restarted on their
ports, perhaps dying at a crash point) and the check that a cell settled.
(The same helpers as ``tests/transport/test_live_libvirt_crash.py``'s, for
the cells of other modules: a test module imports no other.)"""

from __future__ import annotations

import time
from pathlib import Path

from securemig.host.journal import Journal
from securemig.lab import processes

from .commands import crash_env
from .libvirt_live import LibvirtLiveBase


class LibvirtCellsBase(LibvirtLiveBase):
    """Both hosts' daemons and journals, for crash cells."""

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

    def domain_uuid(self, host: object, name: str) -> str:
        conn = self.libvirt.open(host.uri)  # type: ignore[attr-defined]
        try:
            return str(conn.lookupByName(name).UUIDString())
        finally:
            conn.close()

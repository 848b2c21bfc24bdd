"""
The migration journal: an SQLite record of every migration on each host.

Each side writes one row per migration and one event per phase it reaches,
with ``synchronous=FULL`` so that a phase the journal says was reached
survives a crash.  The commit point of the whole protocol is the source's
``committed`` event; ``securemig status`` reads the same file.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from securemig.protocol.phases import Phase, activity

SCHEMA = """
CREATE TABLE IF NOT EXISTS migrations (
    id           TEXT PRIMARY KEY,   -- local id; equals migration_id on a destination
    migration_id TEXT,               -- the destination's id, once known (hex)
    role         TEXT NOT NULL,      -- 'source' or 'destination'
    vm           TEXT NOT NULL,
    peer         TEXT NOT NULL,
    variant      TEXT NOT NULL,      -- 'full' or 'shared-storage'
    protocol     TEXT NOT NULL,      -- 'secure' or 'insecure'
    phase        TEXT NOT NULL,      -- the last phase reached
    outcome      TEXT,               -- NULL while running; see session.Outcome
    error        TEXT,               -- code and reason of a failure
    bytes        INTEGER NOT NULL DEFAULT 0,
    started      REAL NOT NULL,
    updated      REAL NOT NULL,
    peer_name    TEXT,               -- the peer's attested (TLS) name, secure variant
    bundle       TEXT,               -- source: the VM bundle's directory
    peer_settled INTEGER NOT NULL DEFAULT 0, -- source: the destination confirmed its outcome
    owner        TEXT                -- the process driving it: "pid:start time"
);
CREATE TABLE IF NOT EXISTS events (
    migration TEXT NOT NULL REFERENCES migrations(id),
    phase     TEXT NOT NULL,
    at        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_migration ON events(migration);
CREATE TABLE IF NOT EXISTS abort_requests (  -- `securemig abort`, read by the source's process
    migration TEXT PRIMARY KEY REFERENCES migrations(id),
    at        REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS refusals (  -- destination: arrivals refused before admission
    at        REAL NOT NULL,
    peer      TEXT NOT NULL,      -- address:port
    peer_name TEXT,               -- the source's attested (TLS) name, secure variant
    vm        TEXT,
    code      TEXT NOT NULL,
    reason    TEXT NOT NULL
);
"""

#: Columns added after the first release, with their definitions: an older
#: journal gains them when opened.
ADDED_COLUMNS = {
    "peer_name": "TEXT",
    "bundle": "TEXT",
    "peer_settled": "INTEGER NOT NULL DEFAULT 0",
    "owner": "TEXT",
    "total": "INTEGER",
    #: Live mode, source: QEMU's downtime of the migration (ms), once known.
    "downtime_ms": "INTEGER",
    #: Live mode, source: QEMU's total time (ms) and bytes transferred, and
    #: the guest's downtime bounded here (stop to the destination's DONE, ms).
    "qemu_total_ms": "INTEGER",
    "qemu_bytes": "INTEGER",
    "guest_downtime_ms": "INTEGER",
}

#: How many refused arrivals the journal keeps (the newest): a source that
#: is refused again and again cannot grow it without bound.
MAX_REFUSALS = 1000

#: Seconds between the journal updates of a running migration's bytes (and
#: the source's look for an abort request): live for ``securemig jobs``,
#: at most two journal writes a second per migration.
PROGRESS_INTERVAL = 0.5


def this_process() -> str:
    """This process as an owner: its pid and start time (a pid alone can be
    reused by another process after we die)."""
    return f"{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


#: The records this process is driving right now (a departure between its
#: ``begin`` and the end of its session, its release included): see
#: :func:`driven_now`.
_DRIVING: set[str] = set()


def driving(local_id: str) -> None:
    """This process drives the migration ``local_id`` from now on (until
    :func:`driven`): recovery in this process leaves it alone."""
    _DRIVING.add(local_id)


def driven(local_id: str) -> None:
    """This process no longer drives the migration ``local_id``: whatever
    its session left unfinished is recovery's, in this process too."""
    _DRIVING.discard(local_id)


def driven_now(record: MigrationRecord) -> bool:
    """Whether a process drives ``record`` right now: another process that
    journaled it and still runs (it may be at any step), or this process
    with the record in a session under way.  A record this process
    journaled but no longer drives (a daemon's ``migrate --daemon`` that
    ended, its copy here not yet removed) is not: this process's recovery
    settles it as it settles a dead process's."""
    if record.owner is not None and record.owner == this_process():
        return record.id in _DRIVING
    return owner_alive(record.owner)


def owner_alive(owner: str | None) -> bool:
    """Whether the process that journaled ``owner`` still runs (not a zombie)."""
    if not owner:
        return False
    pid, _, started = owner.partition(":")
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0] != "Z" and fields[19] == started


@dataclass
class MigrationRecord:
    """One migration as the journal knows it."""

    id: str
    migration_id: str | None
    role: str
    vm: str
    peer: str
    variant: str
    protocol: str
    phase: str
    outcome: str | None
    error: str | None
    bytes: int
    started: float
    updated: float
    peer_name: str | None
    bundle: str | None
    peer_settled: bool
    owner: str | None
    #: Bytes of images the migration streams (None in journals from before).
    total: int | None
    events: list[tuple[str, float]]

    def reached(self, phase: Phase) -> bool:
        """Whether this migration ever journaled ``phase``."""
        return any(p == phase for p, _ in self.events)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``securemig status --json``)."""
        return asdict(self)

    def phase_times(self) -> dict[str, float]:
        """Seconds spent in each activity, from consecutive journaled phases
        (see :func:`securemig.protocol.phases.activity`)."""
        times: dict[str, float] = {}
        for (phase, at), (following, after) in zip(self.events, self.events[1:], strict=False):
            name = activity(phase, following)
            times[name] = times.get(name, 0.0) + after - at
        return times


class Journal:
    """The journal file of one host (or one source VM directory)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        # Another process (the daemon and `securemig migrate` share a host's
        # journal) may hold the write lock for a moment: first, so that even
        # the switch to WAL waits for it.
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a phase the journal reports survives power loss, not just a crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        # Under the write lock: processes opening one new journal at once
        # would otherwise each see a column missing and each add it (the
        # second fails, "duplicate column name").
        self._db.execute("BEGIN IMMEDIATE")
        try:
            have = {row[1] for row in self._db.execute("PRAGMA table_info(migrations)")}
            for column, definition in ADDED_COLUMNS.items():
                if column not in have:
                    self._db.execute(f"ALTER TABLE migrations ADD COLUMN {column} {definition}")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        """Fold the write-ahead log into the database file, then close it:
        afterwards ``journal.sqlite`` alone holds everything."""
        # Another connection may be reading; its own close checkpoints then.
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()

    def export(self, target: Path) -> None:
        """A consistent copy of the whole journal in ``target`` (SQLite's
        backup API: safe while migrations run), in a single file that needs
        no write-ahead log beside it."""
        if target.exists():
            raise FileExistsError(f"{target} exists; not overwriting it")
        copy = sqlite3.connect(target)
        try:
            self._db.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")
        finally:
            copy.close()

    def begin(
        self,
        *,
        role: str,
        vm: str,
        peer: str,
        variant: str,
        protocol: str,
        id: str | None = None,
        peer_name: str | None = None,
        bundle: str | None = None,
        total: int | None = None,
    ) -> str:
        """Record a new migration; returns its local id."""
        local_id = id or uuid.uuid4().hex
        now = time.time()
        with self._db:
            self._db.execute(
                "INSERT INTO migrations (id, migration_id, role, vm, peer, variant, protocol,"
                " phase, started, updated, peer_name, bundle, owner, total)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    local_id,
                    id,
                    role,
                    vm,
                    peer,
                    variant,
                    protocol,
                    Phase.STARTED,
                    now,
                    now,
                    peer_name,
                    bundle,
                    this_process(),
                    total,
                ),
            )
            self._db.execute("INSERT INTO events VALUES (?, ?, ?)", (local_id, Phase.STARTED, now))
        return local_id

    def phase(self, local_id: str, phase: Phase, *, nbytes: int | None = None) -> None:
        """Record that a migration reached ``phase``."""
        # Typed, and checked at run time too (no assert: -O strips those):
        # a name that is no phase raises ValueError before anything is written.
        phase = Phase(phase)
        now = time.time()
        with self._db:
            self._db.execute(
                "UPDATE migrations SET phase = ?, updated = ?, bytes = COALESCE(?, bytes)"
                " WHERE id = ?",
                (phase, now, nbytes, local_id),
            )
            self._db.execute("INSERT INTO events VALUES (?, ?, ?)", (local_id, phase, now))

    def phases(self, local_id: str, *phases: Phase) -> None:
        """Record that a migration reached each of ``phases``, in order, in
        one durable write: one fsync, where consecutive :meth:`phase` calls
        take one each (the source's PREPARED and COMMITTED sit on a live
        guest's switchover path).  All or none of them survive a crash."""
        checked = [Phase(phase) for phase in phases]  # all checked before any write
        if not checked:
            return
        now = time.time()
        with self._db:
            self._db.execute(
                "UPDATE migrations SET phase = ?, updated = ? WHERE id = ?",
                (checked[-1], now, local_id),
            )
            self._db.executemany(
                "INSERT INTO events VALUES (?, ?, ?)", [(local_id, p, now) for p in checked]
            )

    def progress(self, local_id: str, nbytes: int) -> None:
        """Record the bytes a running migration has streamed so far (at most
        every :data:`PROGRESS_INTERVAL`; no event)."""
        with self._db:
            self._db.execute(
                "UPDATE migrations SET bytes = ?, updated = ? WHERE id = ?",
                (nbytes, time.time(), local_id),
            )

    def set_downtime(self, local_id: str, downtime_ms: int) -> None:
        """Record QEMU's downtime of a live migration (source; no event)."""
        with self._db:
            self._db.execute(
                "UPDATE migrations SET downtime_ms = ? WHERE id = ?", (downtime_ms, local_id)
            )

    def set_live_numbers(
        self,
        local_id: str,
        downtime_ms: int,
        total_ms: int,
        transferred: int,
        guest_downtime_ms: int | None,
    ) -> None:
        """Record QEMU's numbers of a live migration (its downtime, total
        time, bytes transferred) and the guest's downtime as the source
        bounds it (source, once the destination's guest runs; no event)."""
        with self._db:
            self._db.execute(
                "UPDATE migrations SET downtime_ms = ?, qemu_total_ms = ?, qemu_bytes = ?,"
                " guest_downtime_ms = ? WHERE id = ?",
                (downtime_ms, total_ms, transferred, guest_downtime_ms, local_id),
            )

    def request_abort(self, local_id: str) -> None:
        """Ask the process driving a migration to abort it (``securemig abort``)."""
        with self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO abort_requests VALUES (?, ?)", (local_id, time.time())
            )

    def abort_requested(self, local_id: str) -> bool:
        """Whether ``securemig abort`` asked for this migration to end."""
        row = self._db.execute(
            "SELECT 1 FROM abort_requests WHERE migration = ?", (local_id,)
        ).fetchone()
        return row is not None

    def refused(
        self, *, peer: str, peer_name: str | None, vm: str | None, code: str, reason: str
    ) -> None:
        """Destination: record an arrival refused before it was admitted
        (the newest :data:`MAX_REFUSALS` are kept)."""
        with self._db:
            self._db.execute(
                "INSERT INTO refusals VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), peer, peer_name, vm, code, reason),
            )
            self._db.execute(
                "DELETE FROM refusals WHERE rowid <= (SELECT MAX(rowid) FROM refusals) - ?",
                (MAX_REFUSALS,),
            )

    def refusals(self, limit: int = 20) -> list[Refusal]:
        """The newest refused arrivals first."""
        rows = self._db.execute(
            "SELECT at, peer, peer_name, vm, code, reason FROM refusals"
            " ORDER BY rowid DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [Refusal(*row) for row in rows]

    def running(self) -> list[MigrationRecord]:
        """Migrations with no outcome whose process still runs (``securemig jobs``)."""
        return [r for r in self.unfinished() if owner_alive(r.owner)]

    def set_peer_name(self, local_id: str, name: str) -> None:
        """Record the peer's attested name (it is known after the TLS handshake)."""
        with self._db:
            self._db.execute("UPDATE migrations SET peer_name = ? WHERE id = ?", (name, local_id))

    def set_peer_settled(self, local_id: str) -> None:
        """Source: the destination confirmed how it settled this migration."""
        with self._db:
            self._db.execute("UPDATE migrations SET peer_settled = 1 WHERE id = ?", (local_id,))

    def set_migration_id(self, local_id: str, migration_id: str) -> None:
        """Record the id the destination chose."""
        with self._db:
            self._db.execute(
                "UPDATE migrations SET migration_id = ? WHERE id = ?", (migration_id, local_id)
            )

    def finish(
        self, local_id: str, outcome: str, *, error: str | None = None, nbytes: int | None = None
    ) -> None:
        """Record how a migration ended."""
        phase = {"done": Phase.DONE, "in-doubt": Phase.IN_DOUBT}.get(outcome, Phase.ABORTED)
        now = time.time()
        with self._db:
            self._db.execute(
                "UPDATE migrations SET outcome = ?, error = ?, updated = ?,"
                " bytes = COALESCE(?, bytes) WHERE id = ?",
                (outcome, error, now, nbytes, local_id),
            )
            current = self._db.execute(
                "SELECT phase FROM migrations WHERE id = ?", (local_id,)
            ).fetchone()
            if current and current[0] != phase:
                self._db.execute("UPDATE migrations SET phase = ? WHERE id = ?", (phase, local_id))
                self._db.execute("INSERT INTO events VALUES (?, ?, ?)", (local_id, phase, now))

    def get(self, local_id: str) -> MigrationRecord | None:
        """One migration, with its events."""
        rows = self._query("WHERE id = ?", (local_id,))
        return rows[0] if rows else None

    def by_migration_id(self, migration_id: str) -> MigrationRecord | None:
        """The record (on a source: the latest) of the migration with this id."""
        rows = self._query("WHERE migration_id = ? ORDER BY started DESC", (migration_id,))
        return rows[0] if rows else None

    def records(self, limit: int = 50) -> list[MigrationRecord]:
        """The newest migrations first."""
        return self._query("ORDER BY started DESC LIMIT ?", (limit,))

    def unfinished(self) -> list[MigrationRecord]:
        """Migrations with no outcome yet (interrupted by a crash)."""
        return self._query("WHERE outcome IS NULL ORDER BY started", ())

    def departures(self) -> list[MigrationRecord]:
        """Source records recovery may still have work for: no outcome yet,
        in doubt, admitted by a destination that has not confirmed how it
        ended (it may hold staging in doubt: it sent PREPARED, which a cut
        connection may have lost), or done but not yet ``released`` (the
        copy here could not be removed at the commit: its hypervisor was
        down)."""
        return self._query(
            "WHERE role = 'source' AND (outcome IS NULL OR outcome = 'in-doubt'"
            " OR (peer_settled = 0 AND migration_id IS NOT NULL AND outcome != 'done')"
            " OR (outcome = 'done' AND NOT EXISTS (SELECT 1 FROM events"
            "     WHERE events.migration = migrations.id AND events.phase = 'released')))"
            " ORDER BY started",
            (),
        )

    def given_away(self, vm: str) -> MigrationRecord | None:
        """The migration that gave VM ``vm`` away from this host, if it has
        not come back since (a later arrival of it here that is done)."""
        rows = self._query("WHERE vm = ? ORDER BY started DESC", (vm,))
        for record in rows:
            if record.role == "destination" and record.outcome == "done":
                return None
            if record.role == "source" and record.reached(Phase.RECLAIMED):
                return None  # the destination's QEMU ended before the guest ran there
            if record.role == "source" and record.reached(Phase.COMMITTED):
                return record
        return None

    def _query(self, where: str, args: tuple[Any, ...]) -> list[MigrationRecord]:
        columns = (
            "id, migration_id, role, vm, peer, variant, protocol, phase, outcome, error,"
            " bytes, started, updated, peer_name, bundle, peer_settled, owner, total"
        )
        rows = self._db.execute(f"SELECT {columns} FROM migrations {where}", args).fetchall()
        result = []
        for row in rows:
            events = self._db.execute(
                "SELECT phase, at FROM events WHERE migration = ? ORDER BY rowid", (row[0],)
            ).fetchall()
            values: list[Any] = [
                *row[:-3],
                bool(row[-3]),
                row[-2],
                row[-1],
                [(p, a) for p, a in events],
            ]
            result.append(MigrationRecord(*values))
        return result


@dataclass
class Refusal:
    """An arrival a destination refused before admitting it."""

    at: float
    peer: str
    peer_name: str | None
    vm: str | None
    code: str
    reason: str


def dumps(records: list[MigrationRecord]) -> str:
    """Records as JSON text."""
    return json.dumps([r.as_dict() for r in records], indent=2)

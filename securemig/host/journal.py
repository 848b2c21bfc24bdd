"""
The migration journal: an SQLite record of every migration on each host.

Each side writes one row per migration and one event per phase it reaches,
with ``synchronous=FULL`` so that a phase the journal says was reached
survives a crash.  The commit point of the whole protocol is the source's
``committed`` event; ``securemig status`` reads the same file.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
    updated      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    migration TEXT NOT NULL REFERENCES migrations(id),
    phase     TEXT NOT NULL,
    at        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_migration ON events(migration);
"""

#: Phases both sides journal, in protocol order (see doc/protocol.rst).
PHASES = (
    "started",
    "connected",
    "admitted",
    "peer-attested",  # secure: the peer's evidence passed every check
    "key-offered",  # secure, source: the destination's certified migration key arrived
    "key-received",  # secure, destination: the wrapped vTPM key arrived
    "streaming",
    "prepared",
    "committed",
    "resumed",
    "done",
    "aborted",
    "in-doubt",
)

#: What happens between a phase and the next one journaled, for phase tables:
#: by the pair (phase, next phase), else by the phase it starts from.
ACTIVITY_BETWEEN = {
    ("connected", "peer-attested"): "hello + attest destination",
    ("peer-attested", "key-offered"): "attest source",
    ("key-offered", "streaming"): "key transfer",
    ("admitted", "peer-attested"): "attest both ways",
    ("peer-attested", "key-received"): "key transfer",
    ("key-received", "streaming"): "first stream",
}
ACTIVITY_AFTER = {
    "started": "connect",  # source: TCP (and TLS) set-up
    "connected": "hello",  # HELLO to WELCOME
    "admitted": "hello",  # destination: WELCOME to the first stream
    "streaming": "streams",  # every image sent, received, verified and fsynced
    "prepared": "commit",  # source: journal COMMITTED, give the VM up
    "committed": "resume",  # destination moves the VM into place and resumes it
    "resumed": "confirm",
}


@dataclass
class Record:
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
    events: list[tuple[str, float]]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``securemig status --json``)."""
        return asdict(self)

    def phase_times(self) -> dict[str, float]:
        """Seconds spent in each activity, from consecutive journaled phases
        (see :data:`ACTIVITY_AFTER`)."""
        times: dict[str, float] = {}
        for (phase, at), (following, after) in zip(self.events, self.events[1:], strict=False):
            name = ACTIVITY_BETWEEN.get((phase, following)) or ACTIVITY_AFTER.get(phase, phase)
            times[name] = times.get(name, 0.0) + after - at
        return times


class Journal:
    """The journal file of one host (or one source VM directory)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a phase the journal reports survives power loss, not just a crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def begin(
        self,
        *,
        role: str,
        vm: str,
        peer: str,
        variant: str,
        protocol: str,
        id: str | None = None,
    ) -> str:
        """Record a new migration; returns its local id."""
        local_id = id or uuid.uuid4().hex
        now = time.time()
        with self._db:
            self._db.execute(
                "INSERT INTO migrations (id, migration_id, role, vm, peer, variant, protocol,"
                " phase, started, updated) VALUES (?, ?, ?, ?, ?, ?, ?, 'started', ?, ?)",
                (local_id, id, role, vm, peer, variant, protocol, now, now),
            )
            self._db.execute("INSERT INTO events VALUES (?, 'started', ?)", (local_id, now))
        return local_id

    def phase(self, local_id: str, phase: str, *, nbytes: int | None = None) -> None:
        """Record that a migration reached ``phase``."""
        assert phase in PHASES, phase
        now = time.time()
        with self._db:
            self._db.execute(
                "UPDATE migrations SET phase = ?, updated = ?, bytes = COALESCE(?, bytes)"
                " WHERE id = ?",
                (phase, now, nbytes, local_id),
            )
            self._db.execute("INSERT INTO events VALUES (?, ?, ?)", (local_id, phase, now))

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
        phase = {"done": "done", "in-doubt": "in-doubt"}.get(outcome, "aborted")
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

    def get(self, local_id: str) -> Record | None:
        """One migration, with its events."""
        rows = self._query("WHERE id = ?", (local_id,))
        return rows[0] if rows else None

    def by_migration_id(self, migration_id: str) -> Record | None:
        """The record (on a source: the latest) of the migration with this id."""
        rows = self._query("WHERE migration_id = ? ORDER BY started DESC", (migration_id,))
        return rows[0] if rows else None

    def records(self, limit: int = 50) -> list[Record]:
        """The newest migrations first."""
        return self._query("ORDER BY started DESC LIMIT ?", (limit,))

    def unfinished(self) -> list[Record]:
        """Migrations with no outcome yet (interrupted by a crash)."""
        return self._query("WHERE outcome IS NULL ORDER BY started", ())

    def _query(self, where: str, args: tuple[Any, ...]) -> list[Record]:
        columns = (
            "id, migration_id, role, vm, peer, variant, protocol, phase, outcome, error,"
            " bytes, started, updated"
        )
        rows = self._db.execute(f"SELECT {columns} FROM migrations {where}", args).fetchall()
        result = []
        for row in rows:
            events = self._db.execute(
                "SELECT phase, at FROM events WHERE migration = ? ORDER BY rowid", (row[0],)
            ).fetchall()
            values: list[Any] = [*row, [(p, a) for p, a in events]]
            result.append(Record(*values))
        return result


def dumps(records: list[Record]) -> str:
    """Records as JSON text."""
    return json.dumps([r.as_dict() for r in records], indent=2)

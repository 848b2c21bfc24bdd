"""Journal phases and activities as types (``securemig.protocol.phases``),
and what the journal does with them: the same bytes on disk as the string
literals they replaced, old journals still readable, and a name that is no
phase refused even when Python runs with ``-O``."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from securemig.host.journal import Journal
from securemig.protocol.phases import (
    ACTIVITY_AFTER,
    ACTIVITY_BETWEEN,
    Activity,
    Phase,
    activity,
    known,
)
from securemig.protocol.recovery import DestinationState, SourceState

#: Every phase name journals held before the names became a type, in the
#: order they were appended: the values are journaled data, never renamed.
JOURNALED = (
    "started",
    "suspended",
    "connected",
    "admitted",
    "peer-attested",
    "key-offered",
    "key-received",
    "streaming",
    "prepared",
    "committed",
    "released",
    "resumed",
    "done",
    "aborted",
    "in-doubt",
    "live",
    "incoming",
    "lost",
    "reclaimed",
    "continuing",
)


class PhaseTests(SynchronousTestCase):
    def test_values_are_the_journaled_names(self) -> None:
        """Each member's value is the name journals already hold, in the
        same order (a renamed or reordered value would strand old journals)."""
        self.assertEqual([p.value for p in Phase], list(JOURNALED))

    def test_member_is_its_string(self) -> None:
        """A phase formats, compares and serialises as the plain name."""
        self.assertEqual(f"{Phase.IN_DOUBT}", "in-doubt")
        self.assertEqual(json.dumps([Phase.KEY_OFFERED]), '["key-offered"]')
        self.assertTrue(Phase.COMMITTED in {"committed"})

    def test_activities(self) -> None:
        """The tables name the time between phases; a phase in neither table,
        or one this release does not know, names its own time."""
        self.assertEqual(activity("connected", "peer-attested"), "hello + attest destination")
        self.assertEqual(activity("connected", "streaming"), "hello")
        self.assertEqual(activity("aborted", "done"), "aborted")
        self.assertEqual(activity("from-a-newer-release", "done"), "from-a-newer-release")
        self.assertIsNone(known("from-a-newer-release"))
        used = set(ACTIVITY_BETWEEN.values()) | set(ACTIVITY_AFTER.values())
        self.assertEqual(used, set(Activity), "an activity no table names")
        self.assertEqual(
            {a for a in Activity if a.varies_with_size},
            {Activity.STREAMS, Activity.COMMIT, Activity.RELEASE_COPY, Activity.RESUME},
        )

    def test_recovery_states_are_phases(self) -> None:
        """Recovery's journal states are spelled by phases, and read a
        journal's plain strings."""
        self.assertIs(SourceState.COMMITTED.value, Phase.COMMITTED)
        self.assertIs(
            SourceState.from_journal(["started", "streaming", "prepared"], None),
            SourceState.PREPARED_RECEIVED,
        )
        self.assertIs(
            DestinationState.from_journal(["admitted", "committed"], "aborted"),
            DestinationState.COMMIT_RECEIVED,
        )


class JournalPhaseTests(SynchronousTestCase):
    def test_stored_bytes_unchanged(self) -> None:
        """The journal stores a phase as the TEXT of its name, byte for byte
        what the string literal stored (checked with SQLite's own ``hex``)."""
        path = Path(self.mktemp())
        journal = Journal(path)
        mid = journal.begin(role="source", vm="vm1", peer="h:1", variant="full", protocol="secure")
        journal.phase(mid, Phase.KEY_OFFERED)
        journal.finish(mid, "in-doubt")
        journal.close()
        db = sqlite3.connect(path)
        rows = db.execute("SELECT typeof(phase), hex(phase) FROM events ORDER BY rowid").fetchall()
        db.close()
        names = ("started", "key-offered", "in-doubt")
        self.assertEqual(rows, [("text", name.encode().hex().upper()) for name in names])

    def test_old_journal_loads(self) -> None:
        """A journal whose phases were written as plain strings (every one
        an older release wrote, and one from a newer release) loads, and
        its records answer in phases."""
        path = Path(self.mktemp())
        Journal(path).close()
        db = sqlite3.connect(path)
        db.execute(
            "INSERT INTO migrations (id, role, vm, peer, variant, protocol, phase, started,"
            " updated) VALUES ('m', 'source', 'vm1', 'p', 'full', 'secure', 'reclaimed', 1, 2)"
        )
        names = (*JOURNALED, "from-a-newer-release")
        db.executemany(
            "INSERT INTO events VALUES ('m', ?, ?)", [(n, float(i)) for i, n in enumerate(names)]
        )
        db.commit()
        db.close()
        record = Journal(path).get("m")
        assert record is not None
        self.assertEqual([p for p, _ in record.events], list(names))
        self.assertTrue(record.reached(Phase.RECLAIMED))
        self.assertEqual(record.phase_times()["reclaimed"], 1.0)  # before the unknown one
        self.assertEqual(record.phase_times()["release copy"], 1.0)  # committed -> released

    def test_typo_refused_under_optimize(self) -> None:
        """A name that is no phase is refused before anything is written,
        also under ``python -O`` (which strips the ``assert`` that used to
        be the only check)."""
        path = Path(self.mktemp())
        code = (
            "import sys\n"
            "from pathlib import Path\n"
            "from securemig.host.journal import Journal\n"
            "j = Journal(Path(sys.argv[1]))\n"
            "m = j.begin(role='source', vm='v', peer='p', variant='full', protocol='secure')\n"
            "try:\n"
            "    j.phase(m, 'comitted')\n"
            "except ValueError:\n"
            "    print('refused', [p for p, _ in j.get(m).events])\n"
        )
        out = subprocess.run(
            [sys.executable, "-O", "-c", code, str(path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        self.assertEqual(out, "refused ['started']\n")

"""The journal (:mod:`securemig.host.journal`): what is journaled survives
reopening, and two processes can open a new journal at once."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from securemig.host.journal import ADDED_COLUMNS, SCHEMA, Journal
from securemig.protocol.phases import Phase


class JournalTests(SynchronousTestCase):
    def test_opened_while_another_process_adds_the_columns(self) -> None:
        """Two processes opening one new journal at once: the second sees
        the columns the first is adding under the write lock and adds none
        itself (before, both added them: "duplicate column name")."""
        path = Path(self.mktemp())
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("PRAGMA journal_mode=WAL")
        other.executescript(SCHEMA)
        other.execute("BEGIN IMMEDIATE")  # the other opener, mid-upgrade
        opened: list[BaseException | Journal] = []

        def open_journal() -> None:
            try:
                journal = Journal(path)
                journal.close()
                opened.append(journal)
            except BaseException as e:
                opened.append(e)

        thread = threading.Thread(target=open_journal)
        thread.start()
        time.sleep(0.5)  # it now waits for the lock (or, before, for its ALTER)
        have = {row[1] for row in other.execute("PRAGMA table_info(migrations)")}
        missing = {c: d for c, d in ADDED_COLUMNS.items() if c not in have}
        self.assertTrue(missing)  # a new journal is upgraded when opened
        for column, definition in missing.items():
            other.execute(f"ALTER TABLE migrations ADD COLUMN {column} {definition}")
        other.execute("COMMIT")
        other.close()
        thread.join(20)
        self.assertIsInstance(opened[0], Journal, repr(opened))
        # Reopened here (a connection belongs to its thread): the columns are
        # there and a migration can be journaled.
        journal = Journal(path)
        mid = journal.begin(
            role="source", vm="vm1", peer="h:1", variant="full", protocol="insecure"
        )
        self.assertIsNotNone(journal.get(mid))
        journal.close()

    def test_phases_and_reopen(self) -> None:
        """What was journaled is there after reopening, in order."""
        path = Path(self.mktemp())
        journal = Journal(path)
        mid = journal.begin(
            role="source", vm="vm1", peer="h:1", variant="full", protocol="insecure"
        )
        for phase in ("connected", "streaming", "prepared", "committed"):
            journal.phase(mid, phase, nbytes=10)
        journal.finish(mid, "done")
        journal.close()
        record = Journal(path).get(mid)
        assert record is not None
        self.assertEqual(
            [p for p, _ in record.events],
            ["started", "connected", "streaming", "prepared", "committed", "done"],
        )
        self.assertEqual((record.outcome, record.bytes), ("done", 10))
        self.assertEqual(
            set(record.phase_times()), {"connect", "hello", "streams", "commit", "resume"}
        )

    def test_phases_in_one_write(self) -> None:
        """``phases`` journals several phases in order in one transaction
        (one fsync: the source's PREPARED and COMMITTED): both are there,
        with one time, and the record's phase is the last; a name that is no
        phase writes none of them."""
        path = Path(self.mktemp())
        journal = Journal(path)
        mid = journal.begin(role="source", vm="vm1", peer="h:1", variant="full", protocol="x")
        with self.assertRaises(ValueError):
            journal.phases(mid, Phase.PREPARED, "no-such-phase")  # type: ignore[arg-type]
        changes = journal._db.total_changes
        journal.phases(mid, Phase.PREPARED, Phase.COMMITTED)
        # One UPDATE and two INSERTs, all in the one transaction.
        self.assertEqual(journal._db.total_changes - changes, 3)
        journal.close()
        record = Journal(path).get(mid)
        assert record is not None
        self.assertEqual([p for p, _ in record.events], ["started", "prepared", "committed"])
        self.assertEqual(record.events[1][1], record.events[2][1])
        self.assertEqual(record.phase, "committed")

    def test_unfinished(self) -> None:
        journal = Journal(Path(self.mktemp()))
        a = journal.begin(role="source", vm="a", peer="p", variant="full", protocol="insecure")
        b = journal.begin(role="source", vm="b", peer="p", variant="full", protocol="insecure")
        journal.finish(a, "aborted", error="X")
        self.assertEqual([r.id for r in journal.unfinished()], [b])

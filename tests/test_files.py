"""Durable files (:mod:`securemig.files`): atomic replacement, and the
temporaries a killed or failed writer leaves."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from securemig import files


class DurableFileTests(SynchronousTestCase):
    def test_write_durably_replaces(self) -> None:
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_durably(path, b"one")
        files.write_durably(path, b"two")
        self.assertEqual(path.read_bytes(), b"two")
        self.assertEqual([p.name for p in path.parent.iterdir()], [path.name])

    def test_stale_temporaries_of_dead_writers_removed(self) -> None:
        """A writer killed mid-write leaves ``.NAME.PID.TID.tmp``; the next
        write removes it, but not a live writer's (this process's pid)."""
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        dead = subprocess.Popen(["true"])
        dead.wait()
        stale = path.with_name(f".{path.name}.{dead.pid}.1.tmp")
        live = path.with_name(f".{path.name}.{os.getpid()}.0.tmp")
        other = path.with_name(f".other.{dead.pid}.1.tmp")
        for p in (stale, live, other):
            p.write_bytes(b"half")
        files.write_durably(path, b"whole")
        self.assertEqual(path.read_bytes(), b"whole")
        self.assertFalse(stale.exists())
        self.assertTrue(live.exists())
        self.assertTrue(other.exists())  # another file's temporaries are its own

    def test_failed_write_leaves_no_temporary(self) -> None:
        """A write that fails (here: data that is not bytes, as a full disk
        fails mid-write) keeps the old file and leaves no temporary."""
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_durably(path, b"old")
        self.assertRaises(TypeError, files.write_durably, path, "not bytes")  # type: ignore[arg-type]
        self.assertEqual(path.read_bytes(), b"old")
        self.assertEqual([p.name for p in path.parent.iterdir()], [path.name])

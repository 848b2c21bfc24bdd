"""Durable files (:mod:`securemig.files`): atomic replacement, and the
temporaries a killed or failed writer leaves."""

from __future__ import annotations

import os
import subprocess
import time
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


class DiscardTreeTests(SynchronousTestCase):
    """:func:`files.discard_tree`: the name is free at once, the tree is
    unlinked by a detached remover, and what a killed remover left goes with
    the next one."""

    def tree(self, parent: Path, name: str) -> Path:
        path = parent / name
        (path / "sub").mkdir(parents=True)
        (path / "ram.img").write_bytes(os.urandom(1 << 16))
        (path / "sub" / "f").write_bytes(b"x")
        return path

    def wait_removed(self, parent: Path) -> None:
        # The remover is not ours to wait for: wait for what it does.
        deadline = time.monotonic() + 30
        while files.discarding(parent) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertFalse(files.discarding(parent), "the detached remover did not finish")

    def test_name_free_at_once_tree_removed_after(self) -> None:
        parent = Path(self.mktemp())
        path = self.tree(parent, "vm1")
        files.discard_tree(path)
        self.assertFalse(path.exists())
        self.assertEqual(sorted(p.name for p in parent.iterdir()), [files.DISCARDED])
        self.wait_removed(parent)
        self.assertEqual(list((parent / files.DISCARDED).iterdir()), [])

    def test_leftover_of_a_killed_remover_swept(self) -> None:
        """A remover killed half-way leaves part of a tree in DISCARDED: the
        next discard (or a recovery's sweep, with nothing to discard) removes
        it as well."""
        parent = Path(self.mktemp())
        trash = parent / files.DISCARDED
        left = self.tree(trash, "vm0.0123456789abcdef")
        files.discard_tree(self.tree(parent, "vm1"))
        self.wait_removed(parent)
        self.assertFalse(left.exists())
        left = self.tree(trash, "vm2.0123456789abcdef")
        files.discard_tree(parent / "absent")
        self.wait_removed(parent)
        self.assertFalse(left.exists())
        self.assertEqual(list(trash.iterdir()), [])

    def test_removal_deferred_until_the_block_ends(self) -> None:
        """In a :func:`files.removals_deferred` block (a migration's), a
        discarded tree is only set aside: its name is free, and it is still
        there after a while; a block of another directory does not defer
        it; it goes once the block ends (each block's end starts the
        remover: another migration's may run much longer)."""
        parent = Path(self.mktemp())
        other = Path(self.mktemp())
        path = self.tree(parent, "vm1")
        with files.removals_deferred(parent):
            with files.removals_deferred(other):
                files.discard_tree(path)
            self.assertFalse(path.exists())
            self.assertTrue(files.removals_deferred_in(parent))
            self.assertFalse(files.removals_deferred_in(other))
            time.sleep(0.5)  # a remover, had one started, would be done
            (kept,) = (parent / files.DISCARDED).iterdir()
            self.assertEqual((kept / "sub" / "f").read_bytes(), b"x")
        self.assertFalse(files.removals_deferred_in(parent))
        self.wait_removed(parent)
        self.assertFalse(kept.exists())


class PidFileTests(SynchronousTestCase):
    """:func:`files.pid_file_alive`, which the commit of a libvirt arrival
    asks instead of libvirtd: a process that ended, even one not yet
    reaped, is dead; a file that names none leaves the question open."""

    def setUp(self) -> None:
        self.path = Path(self.mktemp())

    def test_running_process(self) -> None:
        self.path.write_text(f"{os.getpid()}\n")
        self.assertIs(files.pid_file_alive(self.path), True)

    def test_no_file_or_no_pid_tells_nothing(self) -> None:
        self.assertIsNone(files.pid_file_alive(self.path))
        self.path.write_text("")
        self.assertIsNone(files.pid_file_alive(self.path))
        self.path.write_text("not a pid\n")
        self.assertIsNone(files.pid_file_alive(self.path))

    def test_ended_and_zombie_are_dead(self) -> None:
        child = subprocess.Popen(["true"])
        self.addCleanup(child.wait)
        self.path.write_text(f"{child.pid}\n")
        # Not waited for: a zombie, which kill(pid, 0) still finds.
        deadline = time.monotonic() + 10
        while "Z" not in Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2][:3]:
            self.assertLess(time.monotonic(), deadline, "the child never ended")
            time.sleep(0.01)
        self.assertTrue(files.process_alive(child.pid))
        self.assertIs(files.pid_file_alive(self.path), False)
        child.wait()
        self.assertIs(files.pid_file_alive(self.path), False)

"""Runtime directories (:mod:`securemig.runtime`): one short directory per
host state directory for sockets and links, and the clean-up that removes
what no running program holds."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from securemig import runtime

DIGEST = "0123456789abcdef"
MID = "ab" * 16


class ForStateDirTests(SynchronousTestCase):
    def test_short_state_dir_keeps_it_inside(self) -> None:
        """A state directory short enough holds its runtime directory, ``run``."""
        self.assertEqual(
            runtime.for_state_dir(Path("/var/lib/securemig")), Path("/var/lib/securemig/run")
        )

    def test_long_state_dir_gets_a_short_one(self) -> None:
        """A state directory too long for socket paths gets one in the
        temporary directory, named by its path: the same for the same
        directory, another for another; every name put there fits."""
        long = Path("/srv") / ("d" * 90) / "state"
        run = runtime.for_state_dir(long)
        self.assertNotEqual(run.parent, long)
        self.assertTrue(run.name.startswith("securemig-run-"))
        self.assertEqual(run, runtime.for_state_dir(long))
        self.assertNotEqual(run, runtime.for_state_dir(long.with_name("other")))
        for state in (long, Path("/var/lib/securemig")):
            path = runtime.for_state_dir(state) / f"live-{MID}-d.sock"
            self.assertLessEqual(len(os.fsencode(path)), runtime.SOCKET_PATH_MAX)

    def test_use_is_inherited(self) -> None:
        """:func:`use` makes the directory (private) and the process's own,
        for the programs it starts too (the environment)."""
        previous = os.environ.get(runtime.ENV)
        self.addCleanup(
            lambda: (
                os.environ.pop(runtime.ENV, None)
                if previous is None
                else os.environ.__setitem__(runtime.ENV, previous)
            )
        )
        state = Path(self.mktemp()).absolute()
        run = runtime.use(state)
        self.assertEqual(runtime.current(), run)
        self.assertEqual(os.environ[runtime.ENV], str(run))
        self.assertEqual(run.stat().st_mode & 0o777, 0o700)
        runtime.remove_if_empty(run)
        self.assertFalse(run.exists())


class PrivateTests(SynchronousTestCase):
    def test_squatted_runtime_directory_refused(self) -> None:
        """The name of a long state directory's runtime directory is
        predictable, in a temporary directory anyone writes: made first by
        another user (here nobody's, mode 0777), or a link to elsewhere,
        it is refused with a sentence saying whose it is, and nothing is
        put in it; one of ours with a loose mode is tightened to 0700."""
        if os.geteuid() != 0:
            self.fail("this test needs root, to make a directory another uid owns")
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        squatted = base / "theirs"
        squatted.mkdir()
        os.chmod(squatted, 0o777)
        os.chown(squatted, 65534, 65534)
        with self.assertRaises(runtime.NotPrivate) as cm:
            runtime.private(squatted)
        self.assertIn("belongs to uid 65534", str(cm.exception))
        self.assertEqual(list(squatted.iterdir()), [])
        (base / "link").symlink_to(base / "elsewhere")
        (base / "elsewhere").mkdir(mode=0o700)
        with self.assertRaises(runtime.NotPrivate) as cm:
            runtime.private(base / "link")
        self.assertIn("is a symbolic link", str(cm.exception))
        loose = base / "ours"
        loose.mkdir(mode=0o755)
        os.chmod(loose, 0o755)
        self.assertEqual(runtime.private(loose), loose)
        self.assertEqual(loose.stat().st_mode & 0o777, 0o700)

    def test_daemon_refuses_a_squatted_runtime_directory(self) -> None:
        """``twistd securemig`` on a long state directory whose runtime
        directory another user made first: a usage error naming it, exit
        1, no traceback."""
        if os.geteuid() != 0:
            self.fail("this test needs root, to make a directory another uid owns")
        tmp = Path(self.mktemp()).absolute()
        tmp.mkdir()
        state = tmp / ("d" * 100) / "state"
        env = {**os.environ, "TMPDIR": str(tmp)}
        env.pop(runtime.ENV, None)
        squatted = tmp / runtime.for_state_dir(state).name
        squatted.mkdir()
        os.chown(squatted, 65534, 65534)
        done = subprocess.run(
            [str(Path(sys.executable).with_name("twistd")), "-n", "securemig",
             "--state-dir", str(state), "--insecure-listen", "tcp:0:interface=127.0.0.1"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        said = done.stdout + done.stderr
        self.assertIn(f"runtime directory {squatted} belongs to uid 65534", said)
        self.assertNotIn("Traceback", said)


class CleanTests(SynchronousTestCase):
    """What a killed process left goes; what a running one holds stays."""

    def setUp(self) -> None:
        # Short, for the socket paths: in the temporary directory.
        self.run = Path(tempfile.mkdtemp(prefix="smrt-"))
        self.addCleanup(shutil.rmtree, self.run, True)
        self.bundle = Path(self.mktemp()).absolute()
        (self.bundle / "vtpm").mkdir(parents=True)

    def listening(self, name: str) -> socket.socket:
        """A socket bound at ``name`` and listening, as QEMU's QMP is."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(self.run / name))
        s.listen(1)
        self.addCleanup(s.close)
        return s

    def left(self, name: str) -> None:
        """A socket file whose program is gone (SIGKILLed: nobody unlinked it)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(self.run / name))
        s.close()

    def test_held_group_stays_dead_group_goes(self) -> None:
        """A running VM's QMP socket keeps its vTPM socket and state link;
        a dead VM's go together; a killed live stream's socket goes; a
        link-only group stays while its vTPM state exists; a link to
        nothing and a stray file go."""
        alive, dead, starting, gone = DIGEST, "f" * 16, "e" * 16, "d" * 16
        self.listening(f"qmp-{alive}.sock")
        self.left(f"vtpm-{alive}.sock")
        (self.run / f"vtpm-state-{alive}").symlink_to(self.bundle / "vtpm")
        self.left(f"qmp-{dead}.sock")
        self.left(f"vtpm-{dead}.sock")
        (self.run / f"vtpm-state-{dead}").symlink_to(self.bundle / "vtpm")
        self.left(f"live-{MID}-d.sock")
        self.listening(f"live-{MID}-s.sock")
        (self.run / f"vtpm-state-{starting}").symlink_to(self.bundle / "vtpm")
        (self.run / f"vtpm-state-{gone}").symlink_to(self.bundle / "nothing")
        (self.run / "stray").write_text("x")
        removed = runtime.clean(self.run)
        self.assertEqual(
            sorted(removed),
            sorted(
                [
                    f"qmp-{dead}.sock",
                    f"vtpm-{dead}.sock",
                    f"vtpm-state-{dead}",
                    f"live-{MID}-d.sock",
                    f"vtpm-state-{gone}",
                    "stray",
                ]
            ),
        )
        self.assertEqual(
            sorted(p.name for p in self.run.iterdir()),
            sorted(
                [
                    f"qmp-{alive}.sock",
                    f"vtpm-{alive}.sock",
                    f"vtpm-state-{alive}",
                    f"live-{MID}-s.sock",
                    f"vtpm-state-{starting}",
                ]
            ),
        )

    def test_no_connection_is_made(self) -> None:
        """Which sockets are held is read, never tried: a connection would be
        taken for a live stream by the QEMU listening there."""
        listener = self.listening(f"live-{MID}-d.sock")
        listener.setblocking(False)
        runtime.clean(self.run)
        with self.assertRaises(BlockingIOError):
            listener.accept()

    def test_missing_directory(self) -> None:
        self.assertEqual(runtime.clean(self.run / "none"), [])


class OwnRunDirTests(SynchronousTestCase):
    def test_lab_files_in_its_run_dir_unless_chosen(self) -> None:
        """A lab's TPM lock files and its own runtime files go to its run
        directory while it runs, each variable as before afterwards; a
        directory chosen already (the suite's, an operator's) is kept."""
        names = (runtime.TPM_LOCK_ENV, runtime.ENV)
        chosen = {name: os.environ.get(name) for name in names}
        work = Path(tempfile.mkdtemp(prefix="smor-"))
        self.addCleanup(shutil.rmtree, work, True)
        with runtime.own_run_dir(work):
            self.assertEqual({name: os.environ.get(name) for name in names}, chosen)
        for name in names:
            os.environ.pop(name, None)
        try:
            with runtime.own_run_dir(work):
                self.assertEqual(os.environ[runtime.TPM_LOCK_ENV], str(work / "run"))
                self.assertEqual(runtime.current(), work / "run")
                self.assertTrue((work / "run").is_dir())
            self.assertFalse(set(names) & set(os.environ))
        finally:
            for name, value in chosen.items():
                if value is not None:
                    os.environ[name] = value

"""Pre-authentication limits (``transport/limits.py``): the caps in
isolation, then against a real ``twistd securemig --listen`` flooded with
idle sockets on loopback."""

from __future__ import annotations

import contextlib
import json
import random
import resource
import socket
import subprocess
import threading
import time

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from securemig.lab import processes
from securemig.transport.limits import Caps, PendingConnections, raise_descriptor_limit
from tests.support.secure import SecureBase


class FakeGuard:
    """A pending connection as PendingConnections sees it."""

    def __init__(self, limits: PendingConnections, address: str) -> None:
        self.limits = limits
        self.address = address
        self.dropped = False
        limits.add(self)  # type: ignore[arg-type]

    def drop(self) -> None:
        self.dropped = True
        self.limits.remove(self)  # type: ignore[arg-type]


class CapsTests(TestCase):
    """The decisions, with no sockets."""

    def limits(self, *caps: int, seed: int = 1) -> PendingConnections:
        return PendingConnections(Caps(*caps), Clock(), random.Random(seed))

    def connect(self, limits: PendingConnections, address: str = "192.0.2.1") -> FakeGuard | None:
        if not limits.admit(address):
            return None
        return FakeGuard(limits, address)

    def test_below_start_nothing_is_dropped(self) -> None:
        limits = self.limits(5, 30, 10, 100)
        guards = [self.connect(limits) for _ in range(5)]
        self.assertEqual(len(limits.pending), 5)
        self.assertFalse(any(g.dropped for g in guards if g))

    def test_never_more_than_full_and_oldest_dropped_first(self) -> None:
        """At FULL every newcomer is let in and the oldest pending one closed."""
        limits = self.limits(5, 30, 10, 1000)
        guards = [self.connect(limits) for _ in range(200)]
        self.assertEqual(len(limits.pending), 10)
        alive = [g for g in guards if g and not g.dropped]
        # The survivors are the newest ones.
        self.assertEqual(alive, guards[-10:])
        self.assertEqual(limits.dropped, 190)

    def test_early_drop_is_random_between_start_and_full(self) -> None:
        """With RATE 30, at START about 30 % of newcomers make room."""
        drops = 0
        for seed in range(400):
            limits = self.limits(10, 30, 1000, 1000, seed=seed)
            for _ in range(10):
                self.connect(limits)
            self.connect(limits)
            drops += limits.dropped
        self.assertTrue(80 < drops < 160, drops)

    def test_per_address_cap_refuses_the_extra(self) -> None:
        limits = self.limits(100, 30, 200, 3)
        first = [self.connect(limits, "192.0.2.1") for _ in range(3)]
        self.assertIsNone(self.connect(limits, "192.0.2.1"))
        self.assertEqual(limits.refused, 1)
        # Another address is not affected; a freed slot is usable again.
        self.assertIsNotNone(self.connect(limits, "192.0.2.2"))
        assert first[0] is not None
        limits.remove(first[0])  # type: ignore[arg-type]
        self.assertIsNotNone(self.connect(limits, "192.0.2.1"))

    def test_caps_derive_from_the_descriptor_limit(self) -> None:
        self.assertEqual(Caps.from_descriptors(1024), Caps(128, 30, 256, 25))
        self.assertEqual(Caps.from_descriptors(1 << 20).full, 1000)
        self.assertEqual(Caps.from_descriptors(16).full, 8)

    def test_max_startups_syntax(self) -> None:
        self.assertEqual(Caps.parse_startups("10:30:100"), (10, 30, 100))
        self.assertEqual(Caps.parse_startups("50"), (50, 100, 50))
        for bad in ("10:30", "20:30:10", "1:101:5", "x"):
            self.assertRaises(ValueError, Caps.parse_startups, bad)

    def test_descriptor_limit_raised_to_hard(self) -> None:
        before = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, before)
        if before[1] != resource.RLIM_INFINITY:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, before[1]), before[1]))
            self.assertEqual(raise_descriptor_limit(), before[1])
            self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], before[1])


def idle_sockets(port: int, n: int) -> list[socket.socket]:
    """``n`` connections to the destination that never send a byte."""
    sockets = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        sockets.append(s)
    return sockets


def closed_by_peer(s: socket.socket, within: float) -> bool:
    """Did the peer close (or reset) ``s`` within ``within`` seconds?"""
    s.settimeout(within)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


class FloodTests(SecureBase):
    """A real destination, flooded with idle pre-handshake sockets."""

    def close_all(self, sockets: list[socket.socket]) -> None:
        for s in sockets:
            s.close()

    def test_valid_source_gets_through_a_full_cap(self) -> None:
        """The unauthenticated cap is held full by idle sockets, refilled as
        fast as the destination drops them, while a secure migration runs:
        the migration succeeds, and the destination never has more than
        FULL pending."""
        destination = self.start_destination(
            "--tofu", "--max-startups", "4:30:8", "--per-source-max-startups", "1000"
        )
        flood = idle_sockets(destination.port, 8)
        self.addCleanup(self.close_all, flood)
        stop = threading.Event()

        def refill() -> None:
            # Holds the cap: one new idle socket every 50 ms.
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    flood.append(socket.create_connection(("127.0.0.1", destination.port)))
                time.sleep(0.05)

        flooder = threading.Thread(target=refill, daemon=True)
        flooder.start()
        self.addCleanup(stop.set)
        self.create_vm()
        result = self.migrate(destination, "--tofu")
        stop.set()
        flooder.join()
        self.assertEqual(result.returncode, 0, result.stderr + destination.log()[-3000:])
        self.assertEqual(json.loads(result.stdout)["outcome"], "done")
        self.assertIn("unauthenticated connections at their caps", destination.log())
        # Most of the flood was closed to make room (only 8 may be pending).
        still_open = sum(not closed_by_peer(s, 0.01) for s in flood)
        self.assertLessEqual(still_open, 8)

    def test_idle_connection_closed_at_handshake_timeout(self) -> None:
        """A connection that never completes a handshake is closed after
        --handshake-timeout, long before the idle timeout."""
        destination = self.start_destination("--handshake-timeout", "1.5", "--idle-timeout", "60")
        started = time.monotonic()
        (idle,) = idle_sockets(destination.port, 1)
        self.addCleanup(idle.close)
        self.assertFalse(closed_by_peer(idle, 1.0))
        self.assertTrue(closed_by_peer(idle, 5.0))
        self.assertLess(time.monotonic() - started, 6.0)
        # A partial ClientHello does not buy more time either.
        (partial,) = idle_sockets(destination.port, 1)
        self.addCleanup(partial.close)
        partial.sendall(b"\x16\x03\x01\x02\x00\x01")
        self.assertTrue(closed_by_peer(partial, 5.0))

    def test_per_address_cap_refuses_the_extra(self) -> None:
        """With --per-source-max-startups 3, a fourth idle socket from the
        same address is closed at once; the first three are not."""
        destination = self.start_destination(
            "--per-source-max-startups", "3", "--handshake-timeout", "30"
        )
        first = idle_sockets(destination.port, 3)
        self.addCleanup(self.close_all, first)
        time.sleep(0.3)
        (extra,) = idle_sockets(destination.port, 1)
        self.addCleanup(extra.close)
        self.assertTrue(closed_by_peer(extra, 5.0))
        self.assertFalse(any(closed_by_peer(s, 0.2) for s in first))
        self.assertIn("refused (per address, max 3)", destination.log())

    def test_bad_max_startups_is_a_usage_error(self) -> None:
        state = self.base / "dst"
        state.mkdir(parents=True)
        run = subprocess.run(
            [
                processes.script("twistd"),
                "-n",
                "--pidfile=",
                "securemig",
                "--state-dir",
                str(state),
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--identity",
                str(self.dst_id),
                "--max-startups",
                "20:30:10",
            ],
            capture_output=True,
            timeout=60,
        )
        self.assertNotEqual(run.returncode, 0)
        self.assertIn(b"--max-startups", run.stdout + run.stderr)

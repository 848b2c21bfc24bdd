#!/usr/bin/env python3
"""
Many secure migrations into one destination while strangers hold sockets.

Starts a lab on loopback (a privacy CA, a destination host and two source
hosts, each with its own swtpm host TPM; see ``securemig/lab/lab.py``) and a
real ``twistd securemig`` destination with its default pre-authentication
caps (``securemig/transport/limits.py``: derived from the descriptor limit,
which it raises to the hard limit).  Then:

1. one secure migration of a ``--size-mib`` VM alone (the reference);
2. ``--stranger`` idle connections to the destination's secure port, spread
   over ``--stranger-addresses`` loopback addresses (an attacker with many
   addresses; one address would meet the per-address cap), each reopened as
   soon as the destination closes it, so the flood lasts the whole run;
3. ``-n`` secure migrations at once, half from each source host, each as its
   own ``securemig migrate`` process.

While it runs it samples the destination's descriptor count; at the end it
prints the successes, the total time, the aggregate MiB/s against the
migration alone, the destination's peak RSS (VmHWM) and peak descriptor count,
and what the flood saw.  Not a test: nothing here is timed against a goal.

Usage::

    .venv/bin/python scripts/load-bench.py            # 16 x 64 MiB, 500 strangers

Exit status 0 when every migration succeeded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from securemig.lab.lab import SOURCE, Lab

#: The second source host.
SOURCE_2 = "source-c"


class Strangers:
    """``count`` idle TCP connections to ``port``, from ``addresses``
    loopback addresses, reopened when the peer closes them."""

    def __init__(self, port: int, count: int, addresses: int) -> None:
        self.port = port
        self.count = count
        self.addresses = [f"127.0.{2 + i // 250}.{1 + i % 250}" for i in range(addresses)]
        self.sockets: list[socket.socket] = []
        self.opened = 0
        self.closed_by_destination = 0
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._hold, daemon=True)

    def _open(self, i: int) -> socket.socket | None:
        s = socket.socket()
        try:
            s.bind((self.addresses[i % len(self.addresses)], 0))
            s.settimeout(2)
            s.connect(("127.0.0.1", self.port))
        except OSError:
            s.close()
            self.refused += 1
            return None
        s.setblocking(False)
        self.opened += 1
        return s

    def start(self) -> None:
        """Open them all, then keep them open in a thread."""
        for i in range(self.count):
            s = self._open(i)
            if s is not None:
                self.sockets.append(s)
        self._thread.start()

    def _hold(self) -> None:
        i = self.count
        while not self._stop.is_set():
            alive = []
            for s in self.sockets:
                try:
                    gone = s.recv(1) == b""
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    self.closed_by_destination += 1
                    s.close()
                else:
                    alive.append(s)
            while len(alive) < self.count and not self._stop.is_set():
                new = self._open(i)
                i += 1
                if new is None:
                    break
                alive.append(new)
            self.sockets = alive
            self._stop.wait(0.2)

    def stop(self) -> None:
        """Close every socket."""
        self._stop.set()
        self._thread.join(10)
        for s in self.sockets:
            s.close()


def descriptors(pid: int) -> int:
    """Open descriptors of ``pid`` now (0 once it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def main() -> int:
    """Run the load; print the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=16, help="concurrent migrations (default 16)")
    parser.add_argument("--size-mib", type=int, default=64, help="each VM's RAM image (64)")
    parser.add_argument("--strangers", type=int, default=500, help="idle connections (500)")
    parser.add_argument(
        "--stranger-addresses", type=int, default=50, help="loopback addresses they use (50)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the lab's directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="securemig-load-"))
    lab = Lab(work, print)
    strangers: Strangers | None = None
    peak_fds = 0
    results: list[tuple[str, str]] = []
    try:
        print(f"load bench in {work}")
        lab.start()
        lab.add_host(SOURCE_2)
        destination = lab.start_destination()
        pid = destination.process.pid
        idle_fds = descriptors(pid)
        print(f"destination pid {pid} on port {destination.port}, {idle_fds} descriptors idle")

        lab.create_vm("alone", args.size_mib, None, secure=True)
        t = time.monotonic()
        lab.migrate(destination, "alone", secure=True)
        alone_s = time.monotonic() - t
        print(f"one {args.size_mib} MiB secure migration alone: {alone_s:.2f} s")

        sources = [SOURCE if i % 2 == 0 else SOURCE_2 for i in range(args.n)]
        for i, source in enumerate(sources):
            lab.create_vm(f"vm{i}", args.size_mib, None, secure=True, source=source)

        strangers = Strangers(destination.port, args.strangers, args.stranger_addresses)
        strangers.start()
        time.sleep(1)
        flood_fds = descriptors(pid)
        print(
            f"{len(strangers.sockets)} strangers connected from "
            f"{len(strangers.addresses)} addresses; destination holds {flood_fds} descriptors"
        )

        def one(i: int) -> tuple[str, str]:
            try:
                summary, _ = lab.migrate(destination, f"vm{i}", secure=True, source=sources[i])
            except RuntimeError as e:
                return f"vm{i}", (str(e).splitlines() or ["?"])[-1]
            return f"vm{i}", str(summary["outcome"])

        stop_sampling = threading.Event()

        def sample() -> None:
            nonlocal peak_fds
            while not stop_sampling.is_set():
                peak_fds = max(peak_fds, descriptors(pid))
                stop_sampling.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t = time.monotonic()
        with ThreadPoolExecutor(args.n) as pool:
            results = list(pool.map(one, range(args.n)))
        total_s = time.monotonic() - t
        stop_sampling.set()
        sampler.join()
        usage = destination.stop()
    finally:
        if strangers is not None:
            strangers.stop()
        lab.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    done = sum(outcome == "done" for _, outcome in results)
    for name, outcome in results:
        if outcome != "done":
            print(f"{name}: FAILED: {outcome}")
    aggregate = done * args.size_mib / total_s
    alone = args.size_mib / alone_s
    print(
        f"\n{done} of {args.n} secure migrations of {args.size_mib} MiB succeeded "
        f"({args.n // 2 + args.n % 2} from {SOURCE}, {args.n // 2} from {SOURCE_2}) "
        f"with {args.strangers} strangers holding connections"
    )
    print(f"total time {total_s:.2f} s; aggregate {aggregate:.1f} MiB/s")
    print(f"one alone: {alone_s:.2f} s, {alone:.1f} MiB/s; aggregate/alone {aggregate / alone:.2f}")
    print(
        f"destination: peak RSS {usage.peak_rss_mib:.0f} MiB, peak descriptors {peak_fds} "
        f"(idle {idle_fds}, with the flood {flood_fds}); CPU {usage.cpu_s:.1f} s"
    )
    print(
        f"strangers: {strangers.opened if strangers else 0} opened, "
        f"{strangers.closed_by_destination if strangers else 0} closed by the destination, "
        f"{strangers.refused if strangers else 0} refused"
    )
    return 0 if done == args.n else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)

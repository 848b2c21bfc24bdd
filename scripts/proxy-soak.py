#!/usr/bin/env python3
"""
Soak the secure variant behind a slow, jittery control connection.

Starts a lab on loopback (a privacy CA, two hosts with swtpm host TPMs, a
``twistd securemig`` destination; see ``securemig/lab/lab.py``), puts a
forwarding TCP proxy in front of the destination's secure port, and runs N
secure migrations through it, moving the VM back after each success.

The proxy delays every segment of the control connection, in both
directions, by a random 0..``--max-delay`` seconds, keeping TCP's order (a
segment is never released before the one read before it) and forwarding
half-closes.  The data channel does not pass through it: the source
connects to the data port directly, as on a network where the control
connection suffers a retransmission.  So the first data record usually
reaches the destination before WRAPPED_KEY, and the destination's ABORT
reaches the source after the data channel closed: the two orderings that
``doc/protocol.rst`` ("The data channel", Ordering) makes safe.

Usage::

    .venv/bin/python scripts/proxy-soak.py -n 200

prints one line per failure and, at the end, the success count.  Exit
status 0 when every migration succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from securemig.lab.lab import Lab


class DelayingProxy:
    """A TCP proxy on loopback, in a thread of its own (asyncio): every
    segment read from either side is written to the other after a random
    delay, in the order read."""

    def __init__(self, target_port: int, max_delay: float, seed: int | None) -> None:
        self.target_port = target_port
        self.max_delay = max_delay
        self.random = random.Random(seed)
        self.port = 0
        self.segments = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        """Listen on a free loopback port (then :attr:`port`)."""
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")

    def stop(self) -> None:
        """Stop listening and end the thread."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._accepted, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            # End the connections still open (their tasks would warn at exit).
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.close()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )
        for w in (writer, up_writer):
            w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward one direction; a reset on one side resets the other."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()

        async def release() -> None:
            while True:
                when, data = await queue.get()
                delay = when - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(release())
        last = loop.time()
        try:
            while data := await reader.read(65536):
                self.segments += 1
                # Never before the previous segment: TCP delivers in order.
                last = max(last, loop.time() + self.random.uniform(0, self.max_delay))
                queue.put_nowait((last, data))
            queue.put_nowait((last, None))
            await sender
        except (ConnectionError, OSError):
            sender.cancel()
            writer.transport.abort()


def main() -> int:
    """Run the soak; print the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200, help="migrations to run (default 200)")
    parser.add_argument(
        "--max-delay", type=float, default=0.3, help="largest delay per segment, seconds"
    )
    parser.add_argument("--size-mib", type=int, default=4, help="the VM's RAM image size")
    parser.add_argument("--seed", type=int, default=None, help="seed of the delays")
    parser.add_argument("--keep", action="store_true", help="keep the lab's directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="securemig-soak-"))
    lab = Lab(work, print)
    proxy: DelayingProxy | None = None
    outcomes: Counter[str] = Counter()
    started = time.monotonic()
    try:
        print(f"proxy soak in {work}")
        lab.start()
        destination = lab.start_destination()
        proxy = DelayingProxy(destination.port, args.max_delay, args.seed)
        proxy.start()
        print(
            f"destination on port {destination.port}, proxy on port {proxy.port} "
            f"(0-{args.max_delay * 1000:g} ms per control segment)"
        )
        behind = dataclasses.replace(destination, port=proxy.port)
        lab.create_vm("soak-vm", args.size_mib, None, secure=True)
        times = []
        for i in range(args.n):
            t = time.monotonic()
            try:
                summary, _ = lab.migrate(behind, "soak-vm", secure=True)
            except RuntimeError as e:
                reason = str(e).splitlines()[-1] if str(e) else "?"
                outcomes["failed"] += 1
                print(f"{i + 1:4d}/{args.n} FAILED: {reason}", flush=True)
                if not (lab.vm_dir / "soak-vm").exists():
                    print("the VM is no longer at the source; stopping", flush=True)
                    break
                continue
            times.append(time.monotonic() - t)
            outcomes[summary["outcome"]] += 1
            lab.return_vm(destination, "soak-vm")
            if (i + 1) % 10 == 0:
                print(f"{i + 1:4d}/{args.n} ok={outcomes['done']}", flush=True)
    finally:
        if proxy is not None:
            proxy.stop()
        lab.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ran = sum(outcomes.values())
    mean = sum(times) / len(times) if times else 0.0
    print(
        f"succeeded {outcomes['done']} of {ran} secure migrations through the proxy "
        f"(failed {ran - outcomes['done']}); {mean:.2f} s per migration, "
        f"{time.monotonic() - started:.0f} s in all; "
        f"{proxy.segments if proxy else 0} control segments delayed"
    )
    return 0 if ran == args.n and outcomes["done"] == ran else 1


if __name__ == "__main__":
    sys.exit(main())

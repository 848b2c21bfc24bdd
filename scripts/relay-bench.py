"""The live relay in isolation: N MiB through the real source and destination
relays, each in its own process, between two UNIX sockets over loopback TCP,
with real keys; each side's CPU-seconds and the throughput.

What QEMU does in a live migration is played by this script's parent
process: it listens on the destination's UNIX socket (QEMU's
``migrate-incoming``), connects to the source's (QEMU's ``migrate``) and
pushes N MiB in 256 KiB writes (QEMU's writes are at most about that),
on one connection (``--mode live``: :class:`LiveSender` and
:class:`LiveReceiver`) or on K at once (``--mode carried --channels K``:
:class:`CarrierSource` and :class:`CarrierDestination`, the multifd
channels' path).  Each relay process reports its own user+system CPU from
the moment it is ready until every byte reached the sink.

  .venv/bin/python scripts/relay-bench.py [--mib N] [--mode live|carried]
      [--channels K] [--rounds R] [--old OLD_ROOT] [--spy DIR] [--verify]

With ``--old OLD_ROOT`` (a tree holding an old ``securemig`` package, e.g.
``mkdir /tmp/old && git archive main securemig | tar -x -C /tmp/old``)
every round runs the old relays and this checkout's, their order swapped
every round, and prints the medians of each.  ``--spy DIR`` records each
relay under ``py-spy`` (collapsed stacks, all threads, native frames) for
a profile.  Keep N small on a shared machine, and note ``uptime``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CIPHER = "TLS_AES_128_GCM_SHA256"
WRITE = 256 << 10


def _cpu() -> tuple[float, float, int, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, usage.ru_nvcsw, usage.ru_nivcsw


def child(role: str, mode: str, path: str, key: bytes, mid: bytes, port: int, k: int) -> None:
    """One relay: builds it, says ready (with its port), reports its CPU
    when told to stop (a line on stdin)."""
    from twisted.internet import reactor

    from securemig.protocol import records

    keep: list[Any] = []
    if mode == "live":
        from securemig.transport.live import LIVE_RECORD_PLAINTEXT, LiveReceiver, LiveSender

        if role == "source":
            keep.append(
                LiveSender(reactor, path, "127.0.0.1", port, records.Sealer(CIPHER, key, mid))
            )
        else:
            receiver = LiveReceiver(
                reactor,
                path,
                lambda: records.Opener(CIPHER, key, mid, LIVE_RECORD_PLAINTEXT),
            )
            keep.append(receiver)
            port = receiver.address[1]
    else:
        from securemig.transport.carried import CarrierDestination, CarrierSource

        limits = {"memory": k}
        if role == "source":
            keep.append(
                CarrierSource(
                    reactor, {"memory": path}, "127.0.0.1", port, CIPHER, key, mid, limits=limits
                )
            )
        else:
            carrier = CarrierDestination(reactor, {"memory": path}, CIPHER, key, mid, limits=limits)
            keep.append(carrier)
            port = carrier.address[1]
    start = _cpu()

    def stop() -> None:
        end = _cpu()
        errors = getattr(keep[0], "errors", None) or [str(getattr(keep[0], "error", "") or "")]
        print(
            json.dumps(
                {
                    "user": end[0] - start[0],
                    "system": end[1] - start[1],
                    "voluntary_switches": end[2] - start[2],
                    "involuntary_switches": end[3] - start[3],
                    "errors": [e for e in errors if e],
                    # Records sealed or opened (the live stream's only).
                    "records": getattr(
                        getattr(keep[0], "sealer", None) or getattr(keep[0], "opener", None),
                        "sequence",
                        None,
                    ),
                }
            ),
            flush=True,
        )
        reactor.stop()

    def wait_for_stop() -> None:
        sys.stdin.readline()
        reactor.callFromThread(stop)

    threading.Thread(target=wait_for_stop, daemon=True).start()
    print(json.dumps({"port": port}), flush=True)
    reactor.run()


def _spawn(args: list[str], pythonpath: str | None, spy: Path | None, name: str) -> Any:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    command = [sys.executable, __file__, *args]
    if spy is not None:
        spy_bin = str(Path(sys.executable).parent / "py-spy")
        command = [spy_bin, "record", "--threads", "--native", "-r", "250", "-f", "raw"]
        command += ["-o", str(spy / f"{name}.txt"), "--", sys.executable, __file__, *args]
    return subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )


def _line(process: Any) -> dict[str, Any]:
    # py-spy, when it runs the relay, says things on the same stdout.
    while line := process.stdout.readline():
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise RuntimeError(f"relay process ended: {process.wait()}")


def one_run(
    mib: int, mode: str, k: int, pythonpath: str | None, spy: Path | None, verify: bool, name: str
) -> dict[str, Any]:
    """Push ``mib`` MiB through a fresh relay pair; the record."""
    base = Path(tempfile.mkdtemp(prefix="rb-"))
    key, mid = os.urandom(16), os.urandom(8)
    sink_path, source_path = str(base / "dst.sock"), str(base / "src.sock")
    connections = k if mode == "carried" else 1
    pattern = memoryview(os.urandom(1 << 20))
    per_connection = (mib << 20) // connections
    received = [0] * connections
    wrong: list[str] = []
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sink.bind(sink_path)
    sink.listen(connections)
    ended = threading.Event()
    lock = threading.Lock()
    done = [0]

    def drain(conn: socket.socket, index: int) -> None:
        buffer = memoryview(bytearray(1 << 20))
        offset = 0
        while n := conn.recv_into(buffer):
            if verify:
                got = buffer[:n]
                while got:
                    at = offset % len(pattern)
                    take = min(len(got), len(pattern) - at)
                    if got[:take] != pattern[at : at + take]:
                        wrong.append(f"connection {index}: wrong bytes at {offset}")
                    offset += take
                    got = got[take:]
            received[index] += n
        conn.close()
        with lock:
            done[0] += 1
            if done[0] == connections:
                ended.set()

    def accept() -> None:
        for index in range(connections):
            conn, _ = sink.accept()
            threading.Thread(target=drain, args=(conn, index), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    common = [mode, key.hex(), mid.hex(), str(k)]
    destination = _spawn(
        ["child", "destination", sink_path, *common, "0"], pythonpath, spy, f"{name}-destination"
    )
    port = _line(destination)["port"]
    source = _spawn(
        ["child", "source", source_path, *common, str(port)], pythonpath, spy, f"{name}-source"
    )
    _line(source)

    def feed(conn: socket.socket) -> None:
        left = per_connection
        offset = 0
        while left:
            n = min(WRITE, left, len(pattern) - offset)
            conn.sendall(pattern[offset : offset + n])
            offset = (offset + n) % len(pattern)
            left -= n
        conn.close()

    started = time.perf_counter()
    feeders = []
    for _ in range(connections):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(source_path)
        feeder = threading.Thread(target=feed, args=(conn,))
        feeder.start()
        feeders.append(feeder)
    for feeder in feeders:
        feeder.join()
    if not ended.wait(120):
        raise RuntimeError("the sink did not see every stream end")
    elapsed = time.perf_counter() - started
    sides = {}
    for side, process in (("source", source), ("destination", destination)):
        process.stdin.write("stop\n")
        process.stdin.flush()
        sides[side] = _line(process)
        process.wait()
    sink.close()
    shutil.rmtree(base, ignore_errors=True)
    gib = (per_connection * connections) / (1 << 30)
    if sum(received) != per_connection * connections:
        wrong.append(f"received {sum(received)} of {per_connection * connections} bytes")
    record = {
        "name": name,
        "mib": mib,
        "mode": mode,
        "channels": connections,
        "seconds": round(elapsed, 3),
        "mib_s": round(mib / elapsed, 1),
        "load": round(os.getloadavg()[0], 2),
        "wrong": wrong,
    }
    for side, usage in sides.items():
        cpu = usage["user"] + usage["system"]
        record[f"{side}_cpu_s_per_gib"] = round(cpu / gib, 3)
        record[f"{side}_user_system"] = [round(usage["user"], 3), round(usage["system"], 3)]
        record[f"{side}_switches"] = [usage["voluntary_switches"], usage["involuntary_switches"]]
        if usage.get("records"):
            record[f"{side}_records"] = usage["records"]
        if usage["errors"]:
            record[f"{side}_errors"] = usage["errors"]
    return record


def main() -> None:
    """Parse the command line; run the rounds (or be one relay)."""
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        role, path, mode, key, mid, k, port = sys.argv[2:9]
        child(role, mode, path, bytes.fromhex(key), bytes.fromhex(mid), int(port), int(k))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--mode", choices=("live", "carried"), default="live")
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--old", help="a tree with the old securemig package")
    parser.add_argument("--spy", type=Path, help="record py-spy profiles into this folder")
    parser.add_argument("--verify", action="store_true", help="compare every byte received")
    options = parser.parse_args()
    if options.spy is not None:
        options.spy.mkdir(parents=True, exist_ok=True)
    labels = ["new"] if options.old is None else ["old", "new"]
    records: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for r in range(options.rounds):
        for label in labels if r % 2 == 0 else labels[::-1]:
            path = options.old if label == "old" else None
            record = one_run(
                options.mib,
                options.mode,
                options.channels,
                path,
                options.spy,
                options.verify,
                f"{label}-{r}",
            )
            records[label].append(record)
            print(json.dumps(record), flush=True)
    for label, runs in records.items():
        summary = {
            key: statistics.median(run[key] for run in runs)
            for key in ("seconds", "mib_s", "source_cpu_s_per_gib", "destination_cpu_s_per_gib")
        }
        print(label, "medians", json.dumps(summary))


if __name__ == "__main__":
    main()

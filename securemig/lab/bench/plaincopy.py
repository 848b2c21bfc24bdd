"""The baseline of ``securemig bench``: a plain socket copy into an fsynced file.

``python -m securemig.lab.bench.plaincopy recv PORT_FILE OUT [ADDRESS]`` listens
on ADDRESS (loopback by default), writes everything one connection sends
into OUT and fsyncs it; ``... send PORT FILE [ADDRESS]`` sends FILE there
with ``sendfile(2)``.  No framing, no
hashing, no journal: the least any migration of the same bytes must cost.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from securemig.files import write_all
from securemig.host.storage import WriteBehind


def receive(port_file: Path, out: Path, address: str = "127.0.0.1") -> None:
    """Accept one connection and store what it sends, durably."""
    with socket.create_server((address, 0)) as server:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(server.getsockname()[1]))
        tmp.rename(port_file)
        conn, _ = server.accept()
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        # The same write-behind as a destination's, so the floor stays a floor.
        with conn, open(out, "wb", buffering=0) as f:
            behind = WriteBehind(f.fileno())
            while n := conn.recv_into(buf):
                write_all(f, view[:n])
                behind.wrote(n)
            os.fsync(f.fileno())


def send(port: int, path: Path, address: str = "127.0.0.1") -> None:
    """Send a file to the receiver."""
    with socket.create_connection((address, port)) as conn, open(path, "rb") as f:
        conn.sendfile(f)


if __name__ == "__main__":
    where = sys.argv[4:5] or ["127.0.0.1"]
    if sys.argv[1] == "recv":
        receive(Path(sys.argv[2]), Path(sys.argv[3]), *where)
    else:
        send(int(sys.argv[2]), Path(sys.argv[3]), *where)
    # Our own peak memory (see securemig.lab.processes.peak_rss_mib for why not wait4's).
    with open("/proc/self/status") as status:
        print(next(line.split()[1] for line in status if line.startswith("VmHWM:")))

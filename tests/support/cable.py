"""A network cable between a source and a destination on one machine, that
a test can cut: every TCP connection the source opens to the destination
(control, data channel, carried sockets, later RESOLVEs) goes through it."""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path

#: The address a source dials to reach the destination through the cable
#: (loopback too: all of 127/8 is; the destination listens on 127.0.0.1).
NEAR = "127.0.0.2"
FAR = "127.0.0.1"


#: Where :func:`free_ports` looks: below Linux's ephemeral range (32768 up),
#: where no outgoing connection takes a port between the probe and the bind.
PORT_BASES = range(23000, 32768 - 64, 97)


def free_ports(count: int) -> list[int]:
    """``count`` consecutive TCP ports free on both ends of the cable (for a
    destination's ``--data-ports``: the source dials the data port it is
    told at the address it reached, so the cable must carry them too).
    Probed from a random base: two test processes (``trial -j2``) probing
    at once would otherwise both find the same free ports and both bind
    them later (one cable failed "Address already in use")."""
    start = random.randrange(len(PORT_BASES))
    for base in (*PORT_BASES[start:], *PORT_BASES[:start]):
        probes: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                for host in (FAR, NEAR):
                    probe = socket.socket()
                    probes.append(probe)
                    probe.bind((host, port))
            return list(range(base, base + count))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError("no free ports for the cable")


class Cable:
    """Listens on :data:`NEAR` at each of ``ports`` and forwards every
    connection to the same port on :data:`FAR` (the destination daemon's
    listener and its ``--data-ports``).

    :meth:`cut` is a network partition at that instant: every connection
    it carries is ended both ways and no byte more crosses; connections
    opened after it pass again (the network healed, as an operator's would:
    RESOLVE, reconnecting daemons)."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.connections = 0  #: connections accepted so far
        self.cuts = 0  #: connections :meth:`cut` ended
        self._lock = threading.Lock()
        self._live: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self._listeners = [socket.create_server((NEAR, port)) for port in ports]
        for listener in self._listeners:
            threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def address(self, port: int) -> str:
        """``HOST:PORT`` a source dials to reach ``port`` through the cable."""
        return f"{NEAR}:{port}"

    def cut(self) -> int:
        """End every connection the cable carries now, both ways; returns
        how many there were."""
        with self._lock:
            live, self._live = self._live, []
        for client, server, dead in live:
            dead.set()  # checked before every forward: nothing more crosses
            for s in (client, server):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
        self.cuts += len(live)
        return len(live)

    def close(self) -> None:
        """Stop listening and end every connection."""
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.close()
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        port = listener.getsockname()[1]
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection((FAR, port), timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            dead = threading.Event()
            with self._lock:
                self._live.append((client, server, dead))
                self.connections += 1
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst, dead), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, dead: threading.Event) -> None:
        try:
            while chunk := src.recv(1 << 18):
                if dead.is_set():
                    return
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            if not dead.is_set():
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)


class CableProcess:
    """A :class:`Cable` in a process of its own, so that a crash point's
    ``NAME:other`` mode (``SECUREMIG_CRASH_PIDFILE``, :mod:`securemig.crashpoint`)
    cuts it at an exact step of a securemig process: SIGKILLed, every
    connection it carries dies at once.  :meth:`heal` starts it again on
    the same ports (the network back, as an operator's would come back)."""

    def __init__(self, ports: list[int], directory: Path) -> None:
        self.ports = ports
        self.pidfile = directory / "cable.pid"
        self.process: subprocess.Popen[str] | None = None
        self.heal()

    def address(self, port: int) -> str:
        """``HOST:PORT`` a source dials to reach ``port`` through the cable."""
        return f"{NEAR}:{port}"

    def cut_at(self, point: str) -> dict[str, str]:
        """The environment that makes a securemig process cut the cable
        when it reaches crash point ``point`` (and live on)."""
        return {
            "SECUREMIG_CRASH_POINTS": "1",
            "SECUREMIG_CRASH_AT": f"{point}:other",
            "SECUREMIG_CRASH_PIDFILE": str(self.pidfile),
        }

    @property
    def cut(self) -> bool:
        """Whether the cable was cut (its process is gone)."""
        return self.process is None or self.process.poll() is not None

    def cut_now(self) -> None:
        """Cut it from here (SIGKILL), at once."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def heal(self) -> None:
        """(Re)start the cable on its ports once it is cut; returns when it
        listens."""
        if self.process is not None:
            if self.process.poll() is None:
                return
            self.process.wait()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.cable", *map(str, self.ports)],
            cwd=Path(__file__).resolve().parents[2],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        ready = self.process.stdout.readline()
        if ready.strip() != "ready":
            self.process.kill()
            raise RuntimeError(f"the cable did not start: {ready!r}")
        self.pidfile.write_text(f"{self.process.pid}\n")

    def close(self) -> None:
        """End it."""
        self.cut_now()


if __name__ == "__main__":
    # python -m tests.support.cable PORT...: a Cable until killed.
    Cable([int(port) for port in sys.argv[1:]])
    print("ready", flush=True)
    threading.Event().wait()

"""A TCP forwarder on loopback that cuts a connection at a chosen frame."""

from __future__ import annotations

import contextlib
from typing import Any

from securemig.protocol import wire


class CuttingProxy:
    """A TCP forwarder on loopback that cuts the first connection, both
    ways, just before a frame of type ``frame_type`` would cross it in
    direction ``direction`` (``"to-destination"`` or ``"to-source"``); that
    frame is never delivered.  Later connections (RESOLVE) pass untouched.
    A real network partition, at a chosen message: for the insecure
    variant, whose frames are readable on the wire."""

    def __init__(self, target: tuple[str, int], frame_type: int, direction: str) -> None:
        import socket
        import threading

        self.target = target
        self.frame_type = frame_type
        self.direction = direction
        self.cut = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[Any] = []
        self._first = True
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop accepting and drop every connection."""
        for s in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self._sockets += [client, server]
            watch, self._first = self._first, False
            for src, dst, way in (
                (client, server, "to-destination"),
                (server, client, "to-source"),
            ):
                threading.Thread(
                    target=self._pump, args=(src, dst, watch and way == self.direction), daemon=True
                ).start()

    def _pump(self, src: Any, dst: Any, watch: bool) -> None:
        import socket

        buffer = b""
        try:
            while chunk := src.recv(1 << 20):
                if not watch:
                    dst.sendall(chunk)
                    continue
                buffer += chunk
                # Forward whole frames only, so a cut falls exactly before one.
                while len(buffer) >= wire.HEADER.size:
                    kind, length = wire.HEADER.unpack_from(buffer)
                    if kind == self.frame_type:
                        self.cut.set()
                        for s in (src, dst):
                            with contextlib.suppress(OSError):
                                s.shutdown(socket.SHUT_RDWR)
                        return
                    end = wire.HEADER.size + length
                    if len(buffer) < end:
                        break
                    dst.sendall(buffer[:end])
                    buffer = buffer[end:]
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

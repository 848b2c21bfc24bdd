"""
The live relays' data path: each direction of a relayed connection (QEMU's
stream, a multifd channel, libvirt's RPC, NBD) runs on a thread of its own,
on blocking duplicates of the connection's two sockets.

Measured on the reactor (``scripts/relay-bench.py``, ``doc/backend-qemu.rst``),
a relayed GiB cost each side about a CPU-second, most of it not the AEAD
(AES-GCM runs at about 10 GiB per CPU-second here) but a trip around the
reactor per 64 KiB read: ``epoll``, ``recvmsg`` into a fresh ``bytes``, a
record sealed into another one, joined again in the transport's write
buffer, sent when the socket is writable.  And every channel of a migration
took its turn on the one reactor thread.  Here instead a thread reads into
one buffer it keeps (``recv_into``), seals or opens into a second
(``encrypt_into``, ``decrypt_into``), and sends that with one blocking
``sendall``: two system calls per record, no Python object per byte, and
the GIL released in each call, so the channels of one migration run side
by side.  A full socket blocks the thread, which stops reading: the flow
control end to end that producers and consumers gave before.

Twisted still accepts and connects the sockets, keeps strangers out
(:mod:`securemig.protocol.strangers`) and owns each socket's close; a
relay is started only when the connection is bound and its peer is there.
The record format and its checks are the same (:mod:`securemig.protocol.records`):
a record is authenticated before a byte of it is written on, a stream that
ends without its END record is refused, and so is anything after END.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from securemig.protocol import records
from securemig.protocol.errors import ErrorCode, PeerViolation
from securemig.transport.tcp import dup_socket, no_delay

#: A relay reports progress to the reactor thread once per this many bytes,
#: or once this many seconds passed (and at its end): each report wakes the
#: reactor thread, which then contends for the GIL with the relays.
PROGRESS_BATCH = 4 << 20
PROGRESS_EVERY = 0.25
#: The opening direction reads into a buffer of this many records' worth:
#: a record that straddles reads is moved to the front at most once per
#: record's worth of bytes (a memory copy, cheap beside the system calls).
READ_RECORDS = 2


def blocking_dup(transport: Any) -> socket.socket:
    """A blocking duplicate of a Twisted TCP or UNIX transport's socket, for
    a relay thread.  Blocking is a property of the socket both descriptors
    share: Twisted must not read or write it any more, except a read it is
    told is ready (a peer's close), which never blocks."""
    sock = dup_socket(transport)
    if sock is None:
        raise RuntimeError(f"no socket to relay on: {transport!r}")
    sock.settimeout(None)
    no_delay(sock)
    return sock


def _end_of_file(sink: socket.socket) -> None:
    """Tell ``sink``'s peer the stream ended, once all of it was sent.  A
    peer that already closed its end (a hypervisor done with its socket:
    ENOTCONN) has everything: not an error of the stream."""
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


class Relay:
    """One direction of a relayed connection, on its own thread: reads
    ``source``, writes ``sink`` (both sockets of its own, closed at its
    end).  ``on_progress(n)`` (plaintext bytes) and, once, ``on_done(error)``
    (None: the stream ended as it should) are called on the reactor
    thread."""

    def __init__(
        self,
        reactor: Any,
        source: socket.socket,
        sink: socket.socket,
        on_progress: Callable[[int], None],
        on_done: Callable[[Exception | None], None],
        name: str,
    ) -> None:
        self.reactor = reactor
        self.source, self.sink = source, sink
        self.on_progress = on_progress
        self.on_done = on_done
        #: Set by :meth:`abort`: the thread ends without an END record.
        self.aborted = False
        self._unreported = 0
        self._reported = 0
        self._last_report = 0.0
        # abort() may come from the reactor thread as the relay closes its
        # sockets: never a shutdown of a descriptor already closed (and
        # perhaps reused).
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._last_report = time.monotonic()
        self._thread.start()

    def abort(self) -> None:
        """End the relay now, from any thread: both sockets are shut down
        (the peers see the connections end; a thread blocked in them
        returns), and no END record is sent."""
        self.aborted = True
        with self._lock:
            if self._closed:
                return
            for sock in (self.source, self.sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _progress(self, n: int) -> None:
        # Batched (see PROGRESS_BATCH); the first piece at once, so the
        # session sees the stream start.
        self._unreported += n
        now = time.monotonic()
        if (
            self._unreported >= PROGRESS_BATCH
            or now - self._last_report >= PROGRESS_EVERY
            or not self._reported
        ):
            self._flush(now)

    def _flush(self, now: float) -> None:
        if self._unreported:
            self.reactor.callFromThread(self.on_progress, self._unreported)
            self._reported += self._unreported
            self._unreported = 0
        self._last_report = now

    def _main(self) -> None:
        error: Exception | None = None
        try:
            self.run()
        except Exception as e:
            error = e
        finally:
            self._flush(time.monotonic())
            with self._lock:
                self._closed = True
                for sock in (self.source, self.sink):
                    sock.close()
        if self.aborted and error is None:
            error = ConnectionAbortedError("the relay was aborted")
        self.reactor.callFromThread(self.on_done, error)

    def run(self) -> None:
        """The relay's loop (on its thread)."""
        raise NotImplementedError


class SealingRelay(Relay):
    """Plaintext in (the hypervisor's socket), records out (the wire): each
    read becomes one record of at most ``max_plaintext`` bytes.  With
    ``opening``, an empty record goes first (it proves the key to the
    receiver's port), and before it ``preface``, clear bytes (the carried
    connection's preamble).  The source's end of file becomes the END
    record and the wire's end of file."""

    def __init__(
        self,
        reactor: Any,
        source: socket.socket,
        sink: socket.socket,
        sealer: records.Sealer,
        max_plaintext: int,
        on_progress: Callable[[int], None],
        on_done: Callable[[Exception | None], None],
        name: str,
        opening: bool = False,
        preface: bytes = b"",
    ) -> None:
        super().__init__(reactor, source, sink, on_progress, on_done, name)
        self.sealer = sealer
        self.max_plaintext = max_plaintext
        self.opening = opening
        self.preface = preface

    def finish(self) -> None:
        """End as if the source had ended, from any thread: what it holds
        is read and sealed, then the END record goes (the source's reading
        side is shut down)."""
        with self._lock, contextlib.suppress(OSError):
            if not self._closed:
                self.source.shutdown(socket.SHUT_RD)

    def run(self) -> None:
        """Read, seal, send, until the source ends (END) or fails."""
        plain = memoryview(bytearray(self.max_plaintext))
        out = memoryview(bytearray(records.RECORD_HEADER.size + self.max_plaintext + records.TAG))
        sealer, source, sink = self.sealer, self.source, self.sink
        if self.preface:
            sink.sendall(self.preface)
        if self.opening:
            sink.sendall(out[: sealer.seal_into(plain[:0], out)])
        while n := source.recv_into(plain):
            sink.sendall(out[: sealer.seal_into(plain[:n], out)])
            self._progress(n)
        if self.aborted:
            return  # shut down by abort(): not the source's end
        # Every byte is counted before END leaves: once the receiver has
        # it, this side's count is whole.
        self._flush(time.monotonic())
        sink.sendall(out[: sealer.seal_into(plain[:0], out, records.Kind.END)])
        _end_of_file(sink)


class OpeningRelay(Relay):
    """Records in (the wire), plaintext out (the hypervisor's socket): each
    record is authenticated by ``opener`` before its plaintext is written;
    ``leftover`` is what was received before the relay started (from
    :meth:`~securemig.protocol.records.Opener.take_buffered`).  After the
    END record the sink's writing side is shut down (the hypervisor's end
    of file); a refused record, or an end of file before END, raises the
    opener's ``PeerViolation`` and writes nothing more."""

    def __init__(
        self,
        reactor: Any,
        source: socket.socket,
        sink: socket.socket,
        opener: records.Opener,
        on_progress: Callable[[int], None],
        on_done: Callable[[Exception | None], None],
        name: str,
        leftover: bytes = b"",
    ) -> None:
        super().__init__(reactor, source, sink, on_progress, on_done, name)
        self.opener = opener
        self.leftover = leftover

    def run(self) -> None:
        """Receive, open each whole record, send its plaintext, until END."""
        opener, source, sink = self.opener, self.source, self.sink
        header = records.RECORD_HEADER.size
        largest = header + opener.max_plaintext + records.TAG
        # Room for the leftover and a whole record behind it, so a read
        # never gets an empty buffer (which would read as an end of file).
        size = max(READ_RECORDS * largest, len(self.leftover) + largest)
        buffer = memoryview(bytearray(size))
        out = memoryview(bytearray(opener.max_plaintext))
        end = len(self.leftover)
        buffer[:end] = self.leftover
        self.leftover = b""
        start = 0
        while True:
            # Open every whole record received; the header is checked (its
            # bound) before the record's body is waited for.
            while end - start >= header:
                kind, length = opener.header(buffer[start : start + header])
                if end - start < header + length:
                    break
                body = buffer[start + header : start + header + length]
                n = opener.open_into(kind, body, out)
                start += header + length
                if opener.ended:
                    if end > start:
                        raise PeerViolation(ErrorCode.RECORD_REFUSED, "data after the END record")
                    # Every byte is counted before the sink's end of file:
                    # the reactor runs this report before it can see the
                    # hypervisor close its socket in answer (a receiver done
                    # on that close used to count short, now and then).
                    self._flush(time.monotonic())
                    _end_of_file(sink)
                    return
                sink.sendall(out[:n])
                self._progress(n)
            if start == end:
                start = end = 0
            elif len(buffer) - start < largest:
                # The record in progress may not fit behind it: move it to
                # the front (at most one record, once per few records).
                buffer[: end - start] = buffer[start:end]
                start, end = 0, end - start
            n = source.recv_into(buffer[end:])
            if not n:
                if self.aborted:
                    return
                opener.closed()  # raises: no END record came
            end += n

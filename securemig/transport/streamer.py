"""
The source's image streamer: a push producer of stream frames (or records).
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import time
from collections import deque
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from twisted.internet import interfaces
from twisted.python.failure import Failure
from zope.interface import implementer

from securemig import crashpoint
from securemig.crashpoint import CrashPoint
from securemig.protocol import records, wire
from securemig.protocol.connection import IDLE_TIMEOUT
from securemig.protocol.errors import ErrorCode, MigrationError, ProtocolError
from securemig.transport.control import failure_to_error
from securemig.transport.executor import Executor, ThreadExecutor
from securemig.transport.tcp import dup_socket

#: A frame to send: buffers for writeSequence, image bytes in it, ends a stream.
Frame = tuple[list[bytes], int, bool]


class _SendFailed(Exception):
    """The data channel's socket refused a send (the connection is gone)."""


@implementer(interfaces.IPushProducer)
class ImageStreamer:
    """A push producer writing every image as STREAM_BEGIN, DATA*, STREAM_END.

    Reading and hashing happen on a worker thread, a few chunks ahead of the
    transport, so the reactor thread only writes: the two overlap instead of
    taking turns.  The frames come from :meth:`_frames`, a generator that
    the worker advances one frame at a time (never two at once: the worker
    is a single thread), so the SHA-256 that ends a stream is of exactly the
    bytes read for it.  ``images`` is a list of ``(path, size)`` in manifest
    order.

    On the data channel over TCP (a ``sealer`` and a real socket) the worker
    does it all instead, in :meth:`_send_sealed`: it reads each chunk into
    a buffer behind its DATA header, seals that into a second buffer and
    sends it on a duplicate of the socket's descriptor, with no copy in
    Python and nothing per byte on the reactor thread, which only counts
    progress.  The two buffers are reused for every record (no fresh
    memory per chunk), and the reads and sends release the GIL, so the
    source's two threads do not take turns.  The records are the same
    bytes either way.  With a ``bandwidth`` limit the reactor's timers pace
    the frames, so that path is taken instead.
    """

    #: How many frames may be read ahead of the transport.
    READ_AHEAD = 4
    #: The sending thread reports progress to the reactor thread once per
    #: this many image bytes, or once this many seconds passed (a slow
    #: link), and at each image's end: the idle timer and the progress bar
    #: still move several times a second.
    PROGRESS_BATCH = 8 << 20
    PROGRESS_EVERY = 0.25

    def __init__(
        self,
        transport: Any,
        images: list[tuple[Path, int]],
        chunk_size: int,
        executor: Executor,
        on_progress: Callable[[int], None],
        on_done: Callable[[], None],
        on_error: Callable[[MigrationError], None],
        sealer: records.Sealer | None = None,
        hashed: bool = True,
        bandwidth: float | None = None,
        clock: Any = None,
        send_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.transport = transport
        #: At most this many image bytes a second (``migrate --bandwidth``),
        #: paced on ``clock``; None: as fast as the transport takes them.
        self.bandwidth = bandwidth
        self.clock = clock
        self._paced_from: float | None = None
        self._paced_bytes = 0
        self._pacing: Any = None
        #: Whether STREAM_END carries each image's SHA-256 (TLS without the
        #: data channel); else :data:`wire.UNHASHED`.
        self.hashed = hashed and sealer is None
        #: Data channel: seals each frame into a record (on the worker thread).
        self.sealer = sealer
        #: The sending thread waits this long at most for room to send
        #: (the session's idle timeout).
        self.send_timeout = send_timeout
        self.images = images
        self.chunk_size = chunk_size
        self.executor = executor
        self.on_progress = on_progress
        self.on_done = on_done
        self.on_error = on_error
        self.paused = False
        self.stopped = False
        self._frames_left: Generator[Frame, None, None] = (
            self._frames() if sealer is None else self._records(self._frames())
        )
        self._ready: deque[Frame] = deque()
        self._streams_sent = 0
        self._in_flight = 0
        self._eof = False
        self._requesting = False
        #: The sending thread's socket (data channel over TCP), else None.
        self._socket: socket.socket | None = None

    def start(self) -> None:
        """Register with the transport and begin reading ahead; on the data
        channel over TCP, start the sending thread instead."""
        # Paced (--bandwidth): the reactor's timers pace the frames instead.
        if (
            self.sealer is not None
            and self.bandwidth is None
            and isinstance(self.executor, ThreadExecutor)
        ):
            self._socket = dup_socket(self.transport)
        if self._socket is not None:
            self.executor.submit(self._send_sealed, self._socket).addCallbacks(
                self._sent, self._send_failed
            )
            return
        self.transport.registerProducer(self, True)
        self._request()

    def resumeProducing(self) -> None:
        """The transport wants more."""
        self.paused = False
        self._pump()

    def pauseProducing(self) -> None:
        """The transport's buffer is full."""
        self.paused = True

    def stopProducing(self) -> None:
        """Stop for good (abort, or the connection went away)."""
        if not self.stopped:
            self.stopped = True
            if self._pacing is not None and self._pacing.active():
                self._pacing.cancel()
            if self._socket is not None:
                # The sending thread stops after the record it is sending
                # (whole records only); the connection stays open until the
                # caller cuts it (:meth:`cut`).
                self.executor.shutdown()
                return
            self._ready.clear()
            self.transport.unregisterProducer()
            # Close the generator (and its open file) on the thread that runs it.
            self.executor.submit(self._frames_left.close)
            self.executor.shutdown()

    def cut(self) -> None:
        """The data channel is being cut: end the sending thread's send at
        once (its duplicate descriptor would keep the socket open, and the
        thread waiting for room, after Twisted closed its own)."""
        self.stopped = True
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)

    def _frames(self) -> Generator[Frame, None, None]:
        """Each frame to send: buffers for writeSequence, the image bytes in it,
        and whether it ends a stream."""
        for index, (path, size) in enumerate(self.images):
            yield [wire.encode(wire.StreamBegin(index))], 0, False
            # On the data channel the records' AEAD already authenticates
            # every byte, their order and the end: no second hash.  The
            # insecure twin does no cryptography at all (it measures what
            # security costs), so it sends no hash either.
            digest = hashlib.sha256() if self.hashed else None
            sent = 0
            with open(path, "rb") as f:
                while chunk := f.read(self.chunk_size):
                    sent += len(chunk)
                    if sent > size:
                        raise ProtocolError(ErrorCode.IO_ERROR, f"{path} grew during the migration")
                    if digest is not None:
                        digest.update(chunk)
                    yield [wire.data_header(len(chunk)), chunk], len(chunk), False
            if sent != size:
                raise ProtocolError(ErrorCode.IO_ERROR, f"{path} shrank during the migration")
            end = wire.StreamEnd(wire.UNHASHED if digest is None else digest.digest())
            yield [wire.encode(end)], 0, True

    def _send_sealed(self, sock: socket.socket) -> None:
        """The sending thread of the data channel: every stream, sealed into
        the same records :meth:`_records` makes, then the END record."""
        assert isinstance(self.executor, ThreadExecutor)
        call = self.executor.call_from_thread
        sealer = self._sealer()
        header = wire.HEADER.size
        frame = memoryview(bytearray(header + self.chunk_size))
        record = memoryview(bytearray(records.max_record(self.chunk_size)))
        chunk = frame[header:]

        def send(plain: memoryview, kind: records.Kind = records.Kind.FRAMES) -> None:
            n = sealer.seal_into(plain, record, kind)
            try:
                sock.sendall(record[:n])
            except OSError as e:
                raise _SendFailed(str(e)) from None

        try:
            # Non-blocking (shared with Twisted's descriptor): sendall waits
            # for room, at most this long.  A stalled peer stops the
            # progress first, which the session's idle timer notices.
            sock.settimeout(self.send_timeout)
            reported = unreported = 0
            last_report = time.monotonic()
            for index, (path, size) in enumerate(self.images):
                send(memoryview(wire.encode(wire.StreamBegin(index))))
                sent = 0
                with open(path, "rb", buffering=0) as f:
                    while not self.stopped and (n := f.readinto(chunk)):
                        sent += n
                        if sent > size:
                            raise ProtocolError(
                                ErrorCode.IO_ERROR, f"{path} grew during the migration"
                            )
                        frame[:header] = wire.data_header(n)
                        send(frame[: header + n])
                        unreported += n
                        # Progress in batches: each report wakes the reactor
                        # thread, which then contends for the GIL with this
                        # one (a wake-up per MiB cost both threads ~0.03
                        # CPU-s/GiB).  The first record is reported at once
                        # (the streaming crash point is "first bytes sent").
                        now = time.monotonic()
                        if (
                            unreported >= self.PROGRESS_BATCH
                            or now - last_report >= self.PROGRESS_EVERY
                            or reported == 0
                        ):
                            call(self._sent_chunk, unreported)
                            reported += unreported
                            unreported, last_report = 0, now
                if unreported:
                    call(self._sent_chunk, unreported)
                    reported += unreported
                    unreported = 0
                if self.stopped:
                    return
                if sent != size:
                    raise ProtocolError(ErrorCode.IO_ERROR, f"{path} shrank during the migration")
                send(memoryview(wire.encode(wire.StreamEnd(wire.UNHASHED))))
            send(memoryview(b""), records.Kind.END)
        finally:
            sock.close()

    def _sent_chunk(self, n: int) -> None:
        if not self.stopped:
            self.on_progress(n)
            crashpoint.reached(CrashPoint.SOURCE_STREAMING)

    def _sent(self, _: object) -> None:
        # Every record is in the kernel's send buffer: the peer may answer
        # PREPARED now.  Twisted's descriptor stays open, to close gracefully.
        if not self.stopped:
            self.stopped = True
            self.executor.shutdown()
            self.on_done()

    def _send_failed(self, failure: Failure) -> None:
        if self.stopped:
            return
        if isinstance(failure.value, _SendFailed):
            # The connection is gone: its loss (and the destination's ABORT,
            # which may follow on the control connection) is what Twisted's
            # side reports; abort it, so it is reported at once.
            self.stopProducing()
            self.transport.abortConnection()
            return
        self.stopProducing()
        self.on_error(failure_to_error(failure, "reading an image"))

    def _sealer(self) -> records.Sealer:
        # Only the data channel's paths seal (sealer given).
        if self.sealer is None:
            raise RuntimeError("this stream is not sealed")
        return self.sealer

    def _records(self, frames: Generator[Frame, None, None]) -> Generator[Frame, None, None]:
        """The frames sealed into data channel records, one frame per record,
        and the END record after the last."""
        ended = 0
        sealer = self._sealer()
        for buffers, n, ends_stream in frames:
            sealed = sealer.seal(buffers)
            ended += ends_stream
            if ended == len(self.images):
                sealed += sealer.end()
            yield sealed, n, ends_stream

    def _request(self) -> None:
        # Guard against re-entry: an inline executor answers within submit().
        if self._requesting:
            return
        self._requesting = True
        try:
            while (
                not self.stopped
                and not self._eof
                and self._in_flight + len(self._ready) < self.READ_AHEAD
            ):
                self._in_flight += 1
                d = self.executor.submit(next, self._frames_left, None)
                d.addCallbacks(self._arrived, self._failed)
        finally:
            self._requesting = False

    def _arrived(self, frame: Frame | None) -> None:
        self._in_flight -= 1
        if self.stopped:
            return
        if frame is None:
            self._eof = True
        else:
            self._ready.append(frame)
        self._pump()

    def _failed(self, failure: Failure) -> None:
        self._in_flight -= 1
        if not self.stopped:
            self.stopProducing()
            self.on_error(failure_to_error(failure, "reading an image"))

    def _wait_for_bandwidth(self, n: int) -> bool:
        """With a bandwidth limit: whether sending ``n`` more bytes now would
        exceed it; if so, :meth:`_pump` is called again when it would not."""
        if self.bandwidth is None or not n:
            return False
        now = self.clock.seconds()
        if self._paced_from is None:
            self._paced_from = now
        due = self._paced_from + self._paced_bytes / self.bandwidth
        if now < due:
            if self._pacing is None or not self._pacing.active():
                self._pacing = self.clock.callLater(due - now, self._pump)
            return True
        self._paced_bytes += n
        return False

    def _pump(self) -> None:
        while self._ready and not self.paused and not self.stopped:
            if self._wait_for_bandwidth(self._ready[0][1]):
                return
            buffers, n, ends_stream = self._ready.popleft()
            self.transport.writeSequence(buffers)
            if n:
                self.on_progress(n)
                crashpoint.reached(CrashPoint.SOURCE_STREAMING)
            if ends_stream:
                self._streams_sent += 1
                if self._streams_sent == len(self.images):
                    # Done the moment the last byte is written: the peer may
                    # answer PREPARED before the reader thread says "no more".
                    self.stopProducing()
                    self.on_done()
                    return
        if not self.stopped:
            self._request()

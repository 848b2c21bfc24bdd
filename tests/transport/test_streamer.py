"""The source's streamer on a real TCP connection (the reactor, a loopback
socket, its worker thread): on the data channel it seals and sends on its
own thread (:meth:`ImageStreamer._send_sealed`), and what arrives must be
the very records the reactor-thread path makes, and open."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from securemig.protocol import records, wire
from securemig.protocol.errors import ErrorCode, MigrationError
from securemig.transport.executor import ThreadExecutor
from securemig.transport.streamer import ImageStreamer

CIPHER = "TLS_AES_128_GCM_SHA256"
MID = bytes(range(16))
CHUNK = 64 * 1024


class Collect(Protocol):
    """The receiving end: keeps every byte, fires ``lost`` when closed."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.lost.callback(None)


def expected(key: bytes, images: list[bytes]) -> bytes:
    """The records of the reactor-thread path (``Sealer.seal``) for these images."""
    sealer = records.Sealer(CIPHER, key, MID)
    out = []
    for index, data in enumerate(images):
        out += sealer.seal([wire.encode(wire.StreamBegin(index))])
        for i in range(0, len(data), CHUNK):
            out += sealer.seal([wire.data_header(len(data[i : i + CHUNK])), data[i : i + CHUNK]])
        out += sealer.seal([wire.encode(wire.StreamEnd(wire.UNHASHED))])
    return b"".join(out + sealer.end())


class SealedSenderTests(TestCase):
    async def connected(self) -> tuple[Collect, Protocol]:
        server = Collect()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: server)
        )
        self.addCleanup(port.stopListening)
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol()
        )
        return server, client

    def streamer(
        self, transport: Any, images: list[tuple[Path, int]], key: bytes
    ) -> tuple[ImageStreamer, Deferred[None], list[int]]:
        done: Deferred[None] = Deferred()
        progress: list[int] = []
        streamer = ImageStreamer(
            transport,
            images,
            CHUNK,
            ThreadExecutor(reactor),  # type: ignore[arg-type]
            progress.append,
            lambda: done.callback(None),
            done.errback,
            records.Sealer(CIPHER, key, MID),
        )
        return streamer, done, progress

    def image(self, name: str, data: bytes) -> Path:
        path = Path(self.mktemp() + name)
        path.write_bytes(data)
        return path

    async def test_same_records_as_the_reactor_path(self) -> None:
        """Two images (one ending in a short chunk) arrive as exactly the
        records ``Sealer.seal`` makes, END last; they open to the frames;
        progress counts every image byte."""
        images = [os.urandom(3 * CHUNK + 1000), os.urandom(CHUNK)]
        key = os.urandom(16)
        server, client = await self.connected()
        paths = [(self.image(str(i), d), len(d)) for i, d in enumerate(images)]
        streamer, done, progress = self.streamer(client.transport, paths, key)
        streamer.start()
        await done
        self.assertIsNotNone(streamer._socket, "the sending thread was not used")
        client.transport.loseConnection()
        await server.lost
        self.assertEqual(bytes(server.data), expected(key, images))
        self.assertEqual(sum(progress), sum(map(len, images)))
        opener = records.Opener(CIPHER, key, MID, records.max_plaintext(CHUNK))
        opener.feed(bytes(server.data))
        while opener.next_record() is not None:
            pass
        self.assertTrue(opener.ended)

    async def test_progress_in_batches(self) -> None:
        """The sending thread reports progress in batches, not per record
        (each report wakes the reactor thread): the first record at once,
        then at most one report per ``PROGRESS_BATCH`` bytes (no time limit
        here), the rest at the image's end; every byte counted once."""
        images = [os.urandom(40 * CHUNK + 7)]
        key = os.urandom(16)
        server, client = await self.connected()
        paths = [(self.image("p", images[0]), len(images[0]))]
        streamer, done, progress = self.streamer(client.transport, paths, key)
        streamer.PROGRESS_BATCH = 16 * CHUNK
        streamer.PROGRESS_EVERY = 3600.0
        streamer.start()
        await done
        client.transport.loseConnection()
        await server.lost
        self.assertEqual(progress, [CHUNK, 16 * CHUNK, 16 * CHUNK, 7 * CHUNK + 7])
        self.assertEqual(bytes(server.data), expected(key, images))

    async def test_image_shorter_than_announced_fails_without_end(self) -> None:
        """An image that shrank fails with IO_ERROR and the channel gets no
        END record, so the destination cannot take it for complete."""
        key = os.urandom(16)
        server, client = await self.connected()
        data = os.urandom(CHUNK + 10)
        image = [(self.image("a", data), CHUNK * 4)]
        streamer, done, _ = self.streamer(client.transport, image, key)
        streamer.start()
        with self.assertRaises(MigrationError) as caught:
            await done
        self.assertEqual(caught.exception.code, ErrorCode.IO_ERROR)
        client.transport.loseConnection()
        await server.lost
        opener = records.Opener(CIPHER, key, MID, records.max_plaintext(CHUNK))
        opener.feed(bytes(server.data))
        while opener.next_record() is not None:
            pass
        self.assertFalse(opener.ended)
        self.assertEqual(opener.sequence, 3)  # STREAM_BEGIN and two DATA

    async def test_stop_leaves_the_channel_open_for_the_cut(self) -> None:
        """Stopped mid-stream (an abort), the thread stops after whole
        records and leaves the connection open (the destination must learn
        why from ABORT on the control connection first); the cut ends it,
        without END."""
        key = os.urandom(16)
        server, client = await self.connected()
        data = os.urandom(256 * CHUNK)
        streamer, done, _ = self.streamer(
            client.transport, [(self.image("a", data), len(data))], key
        )
        streamer.start()
        streamer.stopProducing()
        await deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(server.lost.called, "the channel was cut before the caller cut it")
        self.assertLess(len(server.data), len(data))
        streamer.cut()
        client.transport.abortConnection()
        await server.lost
        self.assertFalse(done.called)
        opener = records.Opener(CIPHER, key, MID, records.max_plaintext(CHUNK))
        opener.feed(bytes(server.data))
        while opener.next_record() is not None:  # whole records, all authentic
            pass
        self.assertEqual(opener.buffered, 0)
        self.assertFalse(opener.ended)

    async def test_cut_wakes_a_blocked_send(self) -> None:
        """A peer that stopped reading leaves the thread waiting for room
        to send; stopping alone cannot end that, the cut does at once."""
        key = os.urandom(16)
        server, client = await self.connected()
        server.transport.pauseProducing()  # reads nothing: the send blocks
        data = os.urandom(1024 * CHUNK)
        streamer, done, _ = self.streamer(
            client.transport, [(self.image("a", data), len(data))], key
        )
        streamer.start()
        await deferLater(reactor, 0.3, lambda: None)
        streamer.stopProducing()
        await deferLater(reactor, 0.3, lambda: None)
        sock = streamer._socket
        assert sock is not None
        self.assertNotEqual(sock.fileno(), -1, "the thread ended without the cut")
        streamer.cut()
        await deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(sock.fileno(), -1, "the cut did not end the thread")
        client.transport.abortConnection()
        server.transport.resumeProducing()
        await server.lost
        self.assertFalse(done.called)


class ThreadExecutorTests(TestCase):
    async def settle(self) -> None:
        await deferLater(reactor, 0.2, lambda: None)
        gc.collect()  # an unhandled failure is logged when its Deferred goes

    async def test_shutdown_twice(self) -> None:
        """Asked twice, the executor stops its pool once and logs no error
        (a second removal of its shutdown trigger raises ValueError)."""
        executor = ThreadExecutor(reactor)  # type: ignore[arg-type]
        executor.shutdown()
        executor.shutdown()
        await self.settle()
        self.assertFalse(executor._pool.started)
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_shutdown_as_the_reactor_shuts_down(self) -> None:
        """The reactor's shutdown trigger ran (and stopped the pool) before
        the executor's own stop: that is no error either."""
        executor = ThreadExecutor(reactor)  # type: ignore[arg-type]
        executor.shutdown()
        # What firing the "during shutdown" trigger does.
        reactor.removeSystemEventTrigger(executor._trigger)
        executor._pool.stop()
        await self.settle()
        self.assertEqual(self.flushLoggedErrors(), [])

"""The relay threads (:mod:`securemig.transport.relay`) on real socket pairs:
what one seals the other opens, byte for byte; a record that does not
authenticate, a stream cut before END and bytes after END are refused, and
nothing of a refused record reaches the sink; an abort wakes a blocked
relay and sends no END."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from securemig.protocol import records
from securemig.protocol.errors import ErrorCode, PeerViolation
from securemig.transport.relay import OpeningRelay, SealingRelay

CIPHER = "TLS_AES_128_GCM_SHA256"
MAX = 1 << 20


def read_all(sock: socket.socket) -> bytes:
    """Everything until the peer's end of file (on a thread)."""
    parts = []
    while data := sock.recv(1 << 20):
        parts.append(data)
    sock.close()
    return b"".join(parts)


class RelayTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.key, self.mid = os.urandom(16), os.urandom(16)

    def pair(self) -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        return a, b

    def opening(self, wire: socket.socket, mid: bytes | None = None) -> tuple[Any, ...]:
        """An opening relay reading ``wire``; its sink's far end, the
        progress seen and its outcome."""
        sink_far, sink = self.pair()
        done: Deferred[Exception | None] = Deferred()
        progress: list[int] = []
        opener = records.Opener(CIPHER, self.key, mid or self.mid, MAX)
        relay = OpeningRelay(
            reactor, wire.dup(), sink.dup(), opener, progress.append, done.callback, "test-open"
        )
        sink.close()
        relay.start()
        return relay, sink_far, progress, done

    def sealer(self, mid: bytes | None = None) -> records.Sealer:
        return records.Sealer(CIPHER, self.key, mid or self.mid)

    async def test_sealed_then_opened(self) -> None:
        """Six MiB in odd-sized writes through a sealing and an opening
        relay arrive whole and in order, and END ends both cleanly."""
        plain_far, plain = self.pair()
        wire_in, wire_out = self.pair()
        sealed: Deferred[Exception | None] = Deferred()
        sent: list[int] = []
        sealing = SealingRelay(
            reactor,
            plain.dup(),
            wire_in.dup(),
            self.sealer(),
            MAX,
            sent.append,
            sealed.callback,
            "test-seal",
            opening=True,
        )
        plain.close()
        wire_in.close()
        sealing.start()
        _, sink_far, progress, opened = self.opening(wire_out)
        payload = os.urandom(6 << 20)

        def write() -> None:
            view = memoryview(payload)
            while view:
                plain_far.sendall(view[:333_333])
                view = view[333_333:]
            plain_far.close()

        got = threads.deferToThread(read_all, sink_far)
        await threads.deferToThread(write)
        self.assertEqual(await got, payload)
        self.assertIsNone(await sealed)
        self.assertIsNone(await opened)
        await deferLater(reactor, 0, lambda: None)  # the last progress report
        self.assertEqual(sum(sent), len(payload))
        self.assertEqual(sum(progress), len(payload))

    async def records_then(self, tail: list[bytes], mid: bytes | None = None) -> tuple[bytes, Any]:
        """Two authentic records ("first", "second"), then ``tail`` (raw
        bytes, each a write), then the wire's end; what reached the sink and
        the relay's outcome."""
        far, near = self.pair()
        sealer = self.sealer()
        _, sink_far, _, done = self.opening(near, mid)
        near.close()
        got = threads.deferToThread(read_all, sink_far)
        # The relay may refuse and close before the last of these is sent.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for piece in (sealer.seal([b""]), sealer.seal([b"first"]), sealer.seal([b"second"])):
                far.sendall(b"".join(piece))
            for piece in tail:
                far.sendall(piece)
            far.shutdown(socket.SHUT_WR)
        return await got, await done

    def assertRefused(self, error: Any, code: ErrorCode) -> None:
        self.assertIsInstance(error, PeerViolation)
        self.assertEqual(error.code, code)

    async def test_flipped_bit_never_reaches_the_sink(self) -> None:
        """A record altered in transit is refused, and not one byte of it
        (GCM writes the plaintext before it checks the tag) is written."""
        sealer = self.sealer()
        for _ in range(3):
            sealer.seal([b""])
        forged = bytearray(b"".join(sealer.seal([b"forged pages"])))
        forged[8] ^= 1
        got, error = await self.records_then([bytes(forged), b"".join(sealer.end())])
        self.assertEqual(got, b"firstsecond")
        self.assertRefused(error, ErrorCode.RECORD_REFUSED)

    async def test_truncated_refused(self) -> None:
        """A stream that ends without its END record is refused."""
        got, error = await self.records_then([])
        self.assertEqual(got, b"firstsecond")
        self.assertRefused(error, ErrorCode.RECORD_REFUSED)
        self.assertIn("truncated", str(error))

    async def test_record_of_another_migration_refused(self) -> None:
        """Records sealed for another migration (or channel) do not open."""
        got, error = await self.records_then([], mid=os.urandom(16))
        self.assertEqual(got, b"")
        self.assertRefused(error, ErrorCode.RECORD_REFUSED)

    async def test_data_after_end_refused(self) -> None:
        """Bytes after the END record, in the same read, are refused."""
        sealer = self.sealer()
        for _ in range(3):
            sealer.seal([b""])
        end = b"".join(sealer.end())
        got, error = await self.records_then([end + b"more"])
        self.assertEqual(got, b"firstsecond")
        self.assertRefused(error, ErrorCode.RECORD_REFUSED)

    async def test_oversize_record_refused_from_its_header(self) -> None:
        """A header announcing more than the bound is refused before the
        relay waits for (or keeps) its body."""
        header = records.RECORD_HEADER.pack(records.Kind.FRAMES, MAX + records.TAG + 1)
        got, error = await self.records_then([header])
        self.assertEqual(got, b"firstsecond")
        self.assertRefused(error, ErrorCode.FRAME_TOO_LARGE)

    async def test_abort_wakes_a_blocked_relay_without_end(self) -> None:
        """abort() from the reactor thread wakes a relay blocked reading
        an idle source; the wire then holds the opening record and no END
        (the receiver refuses it as truncated)."""
        _, plain = self.pair()
        wire_in, wire_out = self.pair()
        done: Deferred[Exception | None] = Deferred()
        relay = SealingRelay(
            reactor,
            plain.dup(),
            wire_in.dup(),
            self.sealer(),
            MAX,
            lambda n: None,
            done.callback,
            "test-seal",
            opening=True,
        )
        wire_in.close()
        relay.start()
        await deferLater(reactor, 0.1, lambda: None)
        relay.abort()
        self.assertIsInstance(await done, ConnectionAbortedError)
        received = await threads.deferToThread(read_all, wire_out)
        opener = records.Opener(CIPHER, self.key, self.mid, MAX)
        opener.feed(received)
        self.assertEqual(opener.next_record(), b"")  # the opening record
        self.assertIsNone(opener.next_record())
        self.assertEqual(opener.sequence, 1)
        self.assertRaises(PeerViolation, opener.closed)

    async def test_every_byte_counted_before_the_sinks_end_of_file(self) -> None:
        """The opening relay reports all it wrote before it shuts the sink's
        writing side: a receiver that ends when the hypervisor closes in
        answer then counts the whole stream (it counted short, now and
        then, when the last report came after the end of file)."""
        shut = []

        class Sink(socket.socket):
            def shutdown(self, how: int) -> None:
                shut.append(how)
                super().shutdown(how)

        class Reactor:
            """The real reactor, told whether the sink was shut at each report."""

            def callFromThread(self, f: Any, *args: Any) -> None:
                reports.append((args, bool(shut)))
                reactor.callFromThread(f, *args)

        reports: list[tuple[Any, bool]] = []
        far, near = self.pair()
        sink_far, sink = self.pair()
        done: Deferred[Exception | None] = Deferred()
        progress: list[int] = []
        relay = OpeningRelay(
            Reactor(),
            near.dup(),
            Sink(fileno=os.dup(sink.fileno())),
            records.Opener(CIPHER, self.key, self.mid, MAX),
            progress.append,
            done.callback,
            "test-open",
        )
        near.close()
        sink.close()
        relay.start()
        got = threads.deferToThread(read_all, sink_far)
        sealer = self.sealer()
        # Small records, quickly: the last ones are left in the relay's
        # batch (PROGRESS_BATCH, PROGRESS_EVERY) when END comes.
        pieces = [b"".join(sealer.seal([b""]))]
        pieces += [b"".join(sealer.seal([bytes([i]) * 1000])) for i in range(50)]
        far.sendall(b"".join(pieces) + b"".join(sealer.end()))
        self.assertEqual(len(await got), 50_000)
        self.assertIsNone(await done)
        self.assertEqual(sum(progress), 50_000)
        counted_before_end = sum(args[0] for args, after in reports if args and not after)
        self.assertEqual(counted_before_end, 50_000)

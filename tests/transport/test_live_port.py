"""The live stream's port before authentication (issue 16): real loopback
TCP connections to a :class:`~securemig.transport.live.LiveReceiver`, whose
QEMU side is a unix socket this test listens on.  A stranger is closed, the
port listens on for the source; time, connections and bytes before the
first authenticated record are bounded."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from securemig.protocol import records
from securemig.transport.live import LIVE_RECORD_PLAINTEXT, LiveReceiver, LiveSender
from securemig.transport.tcp import NoFreePort, listen_in_range

CIPHER = "TLS_AES_128_GCM_SHA256"


class _Sink(Protocol):
    """Stands where the destination's QEMU listens: keeps what arrives."""

    def __init__(self, got: list[bytes], closed: Deferred[None]) -> None:
        self.got, self.closed = got, closed

    def dataReceived(self, data: bytes) -> None:
        self.got.append(data)

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(None)


class LivePortTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        # In the temporary directory, for a short socket path; removed
        # whatever is in it (an empty one used to stay: the cleanup's
        # list of unlinks was false, so no rmdir).
        self.dir = Path(tempfile.mkdtemp(prefix="securemig-live-port-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.key, self.migration_id = os.urandom(16), os.urandom(16)
        self.got: list[bytes] = []
        self.qemu_closed: Deferred[None] = Deferred()
        self.accepted = 0
        test = self

        class SinkFactory(Factory):
            def buildProtocol(self, addr: object) -> _Sink:
                test.accepted += 1
                return _Sink(test.got, test.qemu_closed)

        qemu = reactor.listenUNIX(str(self.dir / "incoming.sock"), SinkFactory())
        self.addCleanup(qemu.stopListening)

    def receiver(self, **limits: Any) -> LiveReceiver:
        receiver = LiveReceiver(
            reactor,
            str(self.dir / "incoming.sock"),
            lambda: records.Opener(CIPHER, self.key, self.migration_id, LIVE_RECORD_PLAINTEXT),
            **limits,
        )
        self.addCleanup(receiver.cut)
        return receiver

    def stranger(self, receiver: LiveReceiver, data: bytes = b"") -> socket.socket:
        s = socket.create_connection(receiver.address)
        self.addCleanup(s.close)
        s.settimeout(20)
        if data:
            s.sendall(data)
        return s

    async def until(self, condition: object) -> None:
        for _ in range(400):
            if condition():  # type: ignore[operator]
                return
            await deferLater(reactor, 0.05, lambda: None)
        self.fail("condition never held")

    async def closed(self, s: socket.socket) -> None:
        """The receiver closed this connection (EOF or reset)."""
        try:
            data = await threads.deferToThread(s.recv, 1)
        except ConnectionResetError:
            data = b""
        self.assertEqual(data, b"")

    def forged(self) -> bytes:
        """A well-formed opening record sealed under another key."""
        sealer = records.Sealer(CIPHER, os.urandom(16), self.migration_id)
        return b"".join(sealer.seal([b""]))

    def test_listens_in_data_ports(self) -> None:
        """Given the destination's ``--data-ports`` listener, the live port
        is one of that range (it used to be any free port, whatever the
        firewall allowed); a range whose every port is taken is refused
        with the sentence that names it."""
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        ports = range(port, port + 1)

        def listen(interface: str, factory: Factory) -> object:
            return listen_in_range(reactor, ports, factory, interface)

        receiver = self.receiver(listen=listen)
        self.assertEqual(receiver.address, ("127.0.0.1", port))
        with self.assertRaises(NoFreePort) as caught:
            self.receiver(listen=listen)
        self.assertIn("--data-ports", str(caught.exception))

    async def test_source_gets_through_after_strangers(self) -> None:
        """A stranger sends a well-formed record under another key (closed
        at once), another sends nothing; then the source's sender connects:
        it is the stream, the silent stranger is closed, and QEMU's socket
        gets exactly the source's bytes, none of a stranger's."""
        receiver = self.receiver()
        address = receiver.address
        forger = self.stranger(receiver, self.forged())
        silent = self.stranger(receiver)
        await self.until(lambda: receiver.strangers_closed == 1)
        self.assertIn("does not authenticate", str(receiver.last_refusal))
        await self.closed(forger)
        self.assertEqual(self.accepted, 0)
        source = self.dir / "source.sock"
        sender = LiveSender(
            reactor, str(source), *receiver.address,
            records.Sealer(CIPHER, self.key, self.migration_id),
        )  # fmt: skip
        self.addCleanup(sender.cut)
        payload = os.urandom(3 << 20)
        qemu = socket.socket(socket.AF_UNIX)
        self.addCleanup(qemu.close)
        await threads.deferToThread(qemu.connect, str(source))
        await threads.deferToThread(qemu.sendall, payload)
        qemu.close()
        await self.qemu_closed
        await receiver.done
        self.assertIsNone(receiver.error)
        self.assertEqual(b"".join(self.got), payload)
        self.assertEqual(receiver.delivered, len(payload))
        self.assertEqual(receiver.strangers_closed, 2)
        await self.closed(silent)
        # The stream is bound: the port is closed.
        await receiver.port_closed
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(address).close()

    async def test_silent_stranger_closed_at_its_deadline(self) -> None:
        """A connection that sends nothing is closed after the first-record
        timeout; the port still listens."""
        receiver = self.receiver(first_record_timeout=0.5)
        s = self.stranger(receiver)
        await self.closed(s)
        self.assertEqual(receiver.last_refusal, "no authenticated record within 0.5 s")
        self.assertFalse(receiver.done.called)
        self.stranger(receiver).close()

    async def test_long_first_record_refused_from_its_header(self) -> None:
        """A header announcing a megabyte: refused before a byte of it is
        buffered (the opening record is empty), the connection closed."""
        receiver = self.receiver()
        header = records.RECORD_HEADER.pack(records.Kind.FRAMES, LIVE_RECORD_PLAINTEXT)
        s = self.stranger(receiver, header)
        await self.closed(s)
        self.assertIn(f"data record of {LIVE_RECORD_PLAINTEXT} bytes", str(receiver.last_refusal))
        self.assertEqual(self.accepted, 0)

    async def test_pending_cap_closes_the_oldest(self) -> None:
        """Above the cap of connections waiting for a first record, the
        oldest is closed; the newer ones wait on."""
        receiver = self.receiver(max_pending=2)
        oldest = self.stranger(receiver)
        await self.until(lambda: len(receiver.pool) == 1)
        self.stranger(receiver)
        self.stranger(receiver)
        await self.closed(oldest)
        self.assertIn("more than 2 live stream connections", str(receiver.last_refusal))
        await self.until(lambda: len(receiver.pool) == 2)

    async def test_no_source_in_time(self) -> None:
        """Only strangers until the accept deadline: the receiver ends with an
        error that names the deadline and the last refusal, the port closed,
        QEMU's socket never connected."""
        receiver = self.receiver(accept_timeout=1.0)
        address = receiver.address
        self.stranger(receiver, b"\x07" * 64)
        await receiver.done
        self.assertIn("authenticated within 1 s", str(receiver.error))
        self.assertIn("unknown record kind 7", str(receiver.error))
        self.assertFalse(receiver.reached_qemu)
        self.assertEqual(self.accepted, 0)
        await receiver.port_closed
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(address).close()

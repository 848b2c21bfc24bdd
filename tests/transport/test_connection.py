"""The Twisted shell over in-memory connections (iosim), with real files,
real SQLite journals and a deterministic Clock."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from securemig.host import storage
from securemig.hypervisor import image
from securemig.hypervisor.bundle import Bundle
from securemig.protocol import wire
from securemig.protocol.connection import CLOSE_GRACE
from securemig.protocol.effects import Outcome
from securemig.protocol.errors import ErrorCode, ProtocolError
from securemig.transport.destination import DestinationProtocol
from securemig.transport.options import DestinationOptions
from tests.support.bundles import bundle_digests
from tests.support.memory import InMemory, Recorder


def hello_for(name: str, sizes: dict[str, int], chunk: int = 4096, **kw: Any) -> wire.Hello:
    args: dict[str, Any] = dict(
        version=1,
        variant=wire.Variant.FULL,
        vm_name=name,
        chunk_size=chunk,
        images=tuple(wire.ImageInfo(n, s) for n, s in sizes.items()),
        shared_disk="",
    )
    args.update(kw)
    return wire.Hello(**args)


class InMemoryMigrationTests(SynchronousTestCase):
    """Whole migrations through both protocols, in memory."""

    def setUp(self) -> None:
        self.env = InMemory(Path(self.mktemp()), self)

    def test_full_variant(self) -> None:
        """RAM and disk arrive identical; the source copy is gone; both journals say done."""
        bundle = self.env.vm(ram_mib=2, disk_mib=1)
        before = bundle_digests(bundle)
        src, _, departure = self.env.migrate(bundle)
        self.assertEqual(self.successResultOf(src.finished).outcome, Outcome.DONE)
        arrived = Bundle.load(self.env.host.vms / "vm1")
        self.assertEqual(bundle_digests(arrived), before)
        self.assertEqual(arrived.manifest.state, "resumed")
        self.assertFalse(bundle.path.exists())
        self.assertEqual(list(self.env.host.staging.iterdir()), [])
        self.assertFalse(storage.is_locked(self.env.host.locks / "vm1.lock"))
        record = self.env.host.journal.records()[0]
        self.assertEqual((record.outcome, record.bytes), ("done", 3 << 20))
        self.assertEqual(self.env.source_journal.get(departure.id).outcome, "done")
        phases = [p for p, _ in self.env.source_journal.get(departure.id).events]
        self.assertEqual(
            phases,
            ["started", "connected", "streaming", "prepared", "committed", "released", "done"],
        )

    def test_commit_does_not_wait_for_the_copy_removal(self) -> None:
        """After COMMITTED the removal of the source's copy overlaps the
        destination's resume instead of delaying the COMMIT: the
        destination resumes and says DONE while it is still under way, and
        the source ends (journaling done) only once it finished."""
        removals: list[Deferred[None]] = []

        def held(function: Any, *args: Any) -> Deferred[None]:
            removal: Deferred[None] = Deferred()
            removal.addCallback(lambda _: function(*args))
            removals.append(removal)
            return removal

        self.patch(image, "run_blocking", held)
        bundle = self.env.vm(ram_mib=2)
        src, _, departure = self.env.migrate(bundle)
        # The destination committed and resumed; the source's copy is still
        # there, and the source has not ended.
        self.assertEqual(self.env.host.journal.records()[0].outcome, "done")
        self.assertEqual(Bundle.load(self.env.host.vms / "vm1").manifest.state, "resumed")
        self.assertEqual(len(removals), 1)
        self.assertTrue(bundle.path.exists())
        self.assertNoResult(src.finished)
        self.assertIsNone(self.env.source_journal.get(departure.id).outcome)
        removals[0].callback(None)
        self.assertEqual(self.successResultOf(src.finished).outcome, Outcome.DONE)
        self.assertFalse(bundle.path.exists())
        phases = [p for p, _ in self.env.source_journal.get(departure.id).events]
        self.assertEqual(phases[-3:], ["committed", "released", "done"])

    def test_shared_storage_variant(self) -> None:
        """Only RAM moves; the destination's manifest points at the shared disk."""
        shared = Path(self.mktemp()).absolute()
        shared.mkdir()
        bundle = self.env.vm(ram_mib=1, shared_disk=shared / "vm1.disk")
        disk_digest = hashlib.sha256((shared / "vm1.disk").read_bytes()).hexdigest()
        src, _, _ = self.env.migrate(bundle, wire.Variant.SHARED_STORAGE)
        self.assertEqual(self.successResultOf(src.finished).outcome, Outcome.DONE)
        arrived = Bundle.load(self.env.host.vms / "vm1")
        self.assertEqual([i.name for i in arrived.manifest.images], ["ram"])
        self.assertEqual(arrived.manifest.shared_disk, str(shared / "vm1.disk"))
        self.assertEqual(
            hashlib.sha256((shared / "vm1.disk").read_bytes()).hexdigest(), disk_digest
        )

    def test_refused_vm_stays_at_source(self) -> None:
        """A destination that already has the VM refuses; the source keeps it unlocked."""
        (self.env.host.vms / "vm1").mkdir()
        bundle = self.env.vm()
        before = bundle_digests(bundle)
        src, _, _ = self.env.migrate(bundle)
        result = self.successResultOf(src.finished)
        self.assertEqual((result.outcome, result.code), (Outcome.ABORTED, ErrorCode.VM_BUSY))
        self.assertEqual(bundle_digests(Bundle.load(bundle.path)), before)
        self.assertFalse(storage.is_locked(bundle.lock_path))

    def test_insufficient_space(self) -> None:
        """A VM bigger than the free space is refused at HELLO."""
        dst, peer = self.env.destination(), Recorder()
        pump = self.env.connect(dst, peer)
        peer.transport.write(wire.encode(hello_for("big", {"ram": 1 << 43})))
        pump.flush()
        abort = peer.messages()[-1]
        self.assertEqual(abort.code, ErrorCode.INSUFFICIENT_SPACE)  # type: ignore[union-attr]
        self.assertEqual(list(self.env.host.staging.iterdir()), [])

    def test_shared_disk_not_visible(self) -> None:
        """A shared disk the destination cannot see is refused by policy."""
        dst, peer = self.env.destination(), Recorder()
        pump = self.env.connect(dst, peer)
        hello = hello_for(
            "vm2",
            {"ram": 4096},
            variant=wire.Variant.SHARED_STORAGE,
            shared_disk="/nonexistent/disk.img",
        )
        peer.transport.write(wire.encode(hello))
        pump.flush()
        self.assertEqual(peer.messages()[-1].code, ErrorCode.POLICY_REFUSED)  # type: ignore


class HostilePeerTests(SynchronousTestCase):
    """A destination facing a hand-driven, misbehaving source."""

    def setUp(self) -> None:
        self.env = InMemory(Path(self.mktemp()), self, idle_timeout=10.0, deadline=100.0)
        self.dst = self.env.destination()
        self.peer = Recorder()
        self.pump = self.env.connect(self.dst, self.peer)

    def send(self, *messages: Any) -> None:
        for m in messages:
            self.peer.transport.write(m if isinstance(m, bytes) else wire.encode(m))
        self.pump.flush()

    def assertAborted(self, code: ErrorCode) -> None:
        """The destination sent ABORT with ``code``, half-closed, and dropped
        the connection after the grace period; nothing is left staged."""
        self.env.clock.advance(CLOSE_GRACE)
        self.pump.flush()
        last = self.peer.messages()[-1]
        self.assertIsInstance(last, wire.Abort)
        self.assertEqual(last.code, code)  # type: ignore[union-attr]
        self.assertTrue(self.peer.lost, "the destination did not drop the connection")
        self.assertEqual(list(self.env.host.staging.iterdir()), [])

    def test_insecure_twin_checks_sizes_not_digests(self) -> None:
        """The insecure twin does no cryptography: a stream of the right size
        is prepared whatever its digest field says."""
        self.send(
            hello_for("vm1", {"ram": 8}),
            wire.StreamBegin(0),
            wire.data_header(8) + b"12345678",
            wire.StreamEnd(wire.UNHASHED),
        )
        self.assertIsInstance(self.peer.messages()[-1], wire.Prepared)

    def test_short_stream(self) -> None:
        """Fewer bytes than announced: refused, staging removed, name unlocked."""
        self.send(
            hello_for("vm1", {"ram": 8}),
            wire.StreamBegin(0),
            wire.data_header(7) + b"1234567",
            wire.StreamEnd(wire.UNHASHED),
        )
        self.assertAborted(ErrorCode.STREAM_MISMATCH)
        self.assertFalse(storage.is_locked(self.env.host.locks / "vm1.lock"))
        self.assertEqual(self.env.host.journal.records()[0].outcome, "aborted")

    def test_long_stream(self) -> None:
        """More bytes than announced: refused at the DATA frame that overruns."""
        self.send(
            hello_for("vm1", {"ram": 8}),
            wire.StreamBegin(0),
            wire.data_header(9) + b"123456789",
        )
        self.assertAborted(ErrorCode.STREAM_MISMATCH)

    def test_digest_mismatch(self) -> None:
        """A hashed stream (images inside TLS) of the right size whose SHA-256
        differs is refused when it is closed."""
        arrival = self.env.host.admit(hello_for("vm1", {"ram": 8}), "peer", "secure")
        arrival.open_stream(0, hashed=True)
        arrival.write((b"1234", memoryview(b"5678")))
        with self.assertRaises(ProtocolError) as cm:
            arrival.close_stream(wire.UNHASHED)
        self.assertEqual(cm.exception.code, ErrorCode.STREAM_MISMATCH)
        arrival.discard()

    def test_oversize_frame(self) -> None:
        """A frame length over the bound is refused from its header."""
        self.send(wire.HEADER.pack(0x01, 1 << 30))
        self.assertAborted(ErrorCode.FRAME_TOO_LARGE)

    def test_data_over_chunk_size(self) -> None:
        """A DATA frame larger than the agreed chunk size is refused."""
        self.send(
            hello_for("vm1", {"ram": 1 << 20}, chunk=4096),
            wire.StreamBegin(0),
            wire.data_header(4097),
        )
        self.assertAborted(ErrorCode.FRAME_TOO_LARGE)

    def test_garbage(self) -> None:
        """Bytes that are no frame at all end the connection."""
        self.send(b"GET / HTTP/1.1\r\n\r\n")
        self.assertAborted(ErrorCode.UNKNOWN_TYPE)

    def test_out_of_order(self) -> None:
        """COMMIT before anything else is a protocol violation."""
        self.send(wire.Commit())
        self.assertAborted(ErrorCode.UNEXPECTED_MESSAGE)

    def test_idle_timeout(self) -> None:
        """A source that stalls is timed out and its staging removed."""
        self.send(hello_for("vm1", {"ram": 8}), wire.StreamBegin(0))
        self.env.clock.advance(9)
        self.assertFalse(self.peer.lost)
        self.env.clock.advance(2)
        self.pump.flush()
        self.assertAborted(ErrorCode.TIMEOUT)

    def test_deadline(self) -> None:
        """A source that trickles bytes forever hits the overall deadline."""
        self.send(hello_for("vm1", {"ram": 1000}), wire.StreamBegin(0))
        self.send(wire.data_header(100))
        for _ in range(30):  # one byte every 5 s: never idle, always slow
            self.env.clock.advance(5)
            self.send(b"x")
        self.pump.flush()
        self.assertAborted(ErrorCode.TIMEOUT)
        self.assertIn(b"deadline", self.peer.received)

    def test_second_arrival_of_same_vm(self) -> None:
        """While VM vm1 is arriving, a second HELLO for it is refused."""
        self.send(hello_for("vm1", {"ram": 8}))
        other = Recorder()
        pump = self.env.connect(self.env.destination(), other)
        other.transport.write(wire.encode(hello_for("vm1", {"ram": 8})))
        pump.flush()
        self.assertEqual(other.messages()[-1].code, ErrorCode.VM_BUSY)  # type: ignore


class ManualExecutor:
    """Queues jobs until the test runs them, to observe back-pressure."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []

    def submit(self, fn: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((d, fn, args))
        return d

    def run_all(self) -> None:
        while self.jobs:
            self.run_one()

    def run_one(self) -> None:
        d, fn, args = self.jobs.pop(0)
        d.callback(fn(*args))

    def shutdown(self) -> None:
        pass


class FlowControlTests(SynchronousTestCase):
    """The destination pauses reading while the disk lags, and resumes after."""

    def test_pause_above_high_water(self) -> None:
        env = InMemory(Path(self.mktemp()), self)
        executor = ManualExecutor()
        dst = DestinationProtocol(
            env.host, env.clock, lambda: executor, DestinationOptions(high_water=3 * 4096)
        )
        transport = StringTransport()
        dst.makeConnection(transport)
        chunk = b"z" * 4096
        dst.dataReceived(wire.encode(hello_for("vm1", {"ram": 8 * 4096})))
        dst.dataReceived(wire.encode(wire.StreamBegin(0)))
        for _ in range(3):
            dst.dataReceived(wire.data_header(4096) + chunk)
        self.assertEqual(transport.producerState, "producing")
        dst.dataReceived(wire.data_header(4096) + chunk)
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(dst.queued, 4 * 4096)
        executor.run_all()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(dst.queued, 0)


class SourceTimeoutTests(SynchronousTestCase):
    """The source gives up on a silent destination and keeps the VM."""

    def test_silent_destination(self) -> None:
        env = InMemory(Path(self.mktemp()), self, idle_timeout=5.0)
        bundle = env.vm()
        src, departure = env.source(bundle)
        silent = Recorder()
        env.connect(silent, src).flush()
        self.assertIsInstance(silent.messages()[0], wire.Hello)
        env.clock.advance(6)
        result = self.successResultOf(src.finished)
        self.assertEqual((result.outcome, result.code), (Outcome.ABORTED, ErrorCode.TIMEOUT))
        self.assertFalse(storage.is_locked(bundle.lock_path))
        self.assertTrue(bundle.path.exists())
        self.assertEqual(env.source_journal.get(departure.id).outcome, "aborted")


class AdmissionPolicyTests(SynchronousTestCase):
    """Each admission check, fed the HELLO it exists to refuse."""

    def refused(self, hello: wire.Hello, sealer: Any = None) -> wire.Abort:
        env = InMemory(Path(self.mktemp()), self)
        env.factory.options = DestinationOptions(key_keeper=sealer)
        peer = Recorder()
        pump = env.connect(env.destination(), peer)
        peer.transport.write(wire.encode(hello))
        pump.flush()
        abort = peer.messages()[-1]
        assert isinstance(abort, wire.Abort)
        self.assertEqual(list(env.host.staging.iterdir()), [])
        return abort

    def test_shared_disk_path_not_normalised(self) -> None:
        shared = Path(self.mktemp()).absolute()
        shared.mkdir()
        (shared / "d.img").write_bytes(b"x")
        sneaky = f"{shared}/../{shared.name}/d.img"
        abort = self.refused(
            hello_for("vm1", {"ram": 8}, variant=wire.Variant.SHARED_STORAGE, shared_disk=sneaky)
        )
        self.assertEqual(abort.code, ErrorCode.BAD_PARAMETER)

    def test_shared_disk_in_full_variant(self) -> None:
        abort = self.refused(hello_for("vm1", {"ram": 8}, shared_disk="/etc/hostname"))
        self.assertEqual(abort.code, ErrorCode.BAD_PARAMETER)

    def test_disk_image_in_shared_storage_variant(self) -> None:
        hello = hello_for("vm1", {"ram": 8, "disk": 8}, variant=wire.Variant.SHARED_STORAGE)
        self.assertEqual(self.refused(hello).code, ErrorCode.POLICY_REFUSED)

    def test_vtpm_without_a_tpm_here(self) -> None:
        """An insecure destination with no TPM identity cannot keep a vTPM key."""
        abort = self.refused(hello_for("vm1", {"ram": 8, "vtpm": 8}))
        self.assertEqual(abort.code, ErrorCode.POLICY_REFUSED)
        self.assertIn("no TPM identity", abort.reason)


class NeverSeals:
    """Test double for a destination's TPM sealer: the refusals below must
    happen before any key is sealed, so reaching it is a failure."""

    def seal(self, secret: bytes) -> bytes:
        raise AssertionError("a refused vTPM key was about to be sealed")


class ClearKeyRefusalTests(SynchronousTestCase):
    """The insecure variant's vTPM key: refused when missing or malformed."""

    def run_arrival(self, key: bytes | None, image: str = "ram") -> wire.Abort:
        env = InMemory(Path(self.mktemp()), self)
        env.factory.options = DestinationOptions(key_keeper=NeverSeals())
        peer = Recorder()
        pump = env.connect(env.destination(), peer)
        frames = [wire.encode(hello_for("vm1", {image: 4}))]
        if key is not None:
            frames.append(wire.encode(wire.ClearKey(key)))
        data = b"abcd"
        frames += [
            wire.encode(wire.StreamBegin(0)),
            wire.data_header(4) + data,
            wire.encode(wire.StreamEnd(hashlib.sha256(data).digest())),
        ]
        for frame in frames:
            peer.transport.write(frame)
        pump.flush()
        abort = peer.messages()[-1]
        assert isinstance(abort, wire.Abort)
        self.assertEqual(list(env.host.staging.iterdir()), [])
        return abort

    def test_malformed_key(self) -> None:
        """Key material of the wrong length is refused at PREPARE."""
        abort = self.run_arrival(b"short")
        self.assertEqual(abort.code, ErrorCode.KEY_TRANSFER_FAILED)

    def test_vtpm_state_without_key(self) -> None:
        """A vTPM state with no key for it is refused, not stored."""
        abort = self.run_arrival(None, image="vtpm")
        self.assertEqual(abort.code, ErrorCode.KEY_TRANSFER_FAILED)
        self.assertIn("without its key", abort.reason)


class InsecureSourceTests(SynchronousTestCase):
    def test_sends_no_hash(self) -> None:
        """The insecure twin's source does no cryptography: every STREAM_END
        carries wire.UNHASHED."""
        env = InMemory(Path(self.mktemp()), self)
        src, _ = env.source(env.vm(ram_mib=1))
        peer = Recorder()
        pump = env.connect(peer, src)
        peer.transport.write(wire.encode(wire.Welcome(b"m" * 16)))
        pump.flush()
        ends = [m for m in peer.messages() if isinstance(m, wire.StreamEnd)]
        self.assertTrue(ends)
        self.assertEqual({m.sha256 for m in ends}, {wire.UNHASHED})


class StreamEndRaceTests(SynchronousTestCase):
    """The source's reader thread runs ahead of the transport; once the last
    STREAM_END is written the source must accept PREPARED at once, even if
    the reader has not yet reported that there are no more frames."""

    def test_prepared_before_reader_reports_the_end(self) -> None:
        env = InMemory(Path(self.mktemp()), self)
        bundle = env.vm(ram_mib=1)
        reader = ManualExecutor()
        src, _ = env.source(bundle, chunk=1 << 20, executor=lambda: reader)
        peer = Recorder()
        pump = env.connect(peer, src)
        peer.transport.write(wire.encode(wire.Welcome(b"m" * 16)))
        pump.flush()
        while not any(isinstance(m, wire.StreamEnd) for m in peer.messages()):
            reader.run_one()
            pump.flush()
        self.assertEqual(src.session.phase, "awaitPrepared")
        peer.transport.write(wire.encode(wire.Prepared()))
        pump.flush()
        self.assertIsInstance(peer.messages()[-1], wire.Commit)


class EndDespiteFailureTests(SynchronousTestCase):
    """A session's end is carried out even when an effect before it raised."""

    def setUp(self) -> None:
        self.env = InMemory(Path(self.mktemp()), self)

    def test_hold_in_doubt_raises(self) -> None:
        """Destination: the connection drops after PREPARED and holding the
        staging fails with an OSError; the outcome is still journaled (in
        doubt, with the error) and the staging is kept."""
        dst, peer = self.env.destination(), Recorder()
        pump = self.env.connect(dst, peer)
        peer.transport.write(
            wire.encode(hello_for("vm1", {"ram": 8}))
            + wire.encode(wire.StreamBegin(0))
            + wire.data_header(8)
            + b"12345678"
            + wire.encode(wire.StreamEnd(hashlib.sha256(b"12345678").digest()))
        )
        pump.flush()
        self.assertIsInstance(peer.messages()[-1], wire.Prepared)

        def hold() -> None:
            raise OSError(5, "Input/output error")

        dst.arrival.hold = hold
        peer.transport.loseConnection()
        pump.flush()
        record = self.env.host.journal.records()[0]
        self.assertEqual(record.outcome, "in-doubt")
        self.assertIn("Input/output error", record.error)
        self.assertEqual(len(list(self.env.host.staging.iterdir())), 1)

    def test_rollback_raises(self) -> None:
        """Source: the destination refuses and rolling back raises; the
        caller still learns the outcome (``finished`` fires: ``migrate``
        would otherwise hang) and the journal records it."""
        bundle = self.env.vm()
        src, departure = self.env.source(bundle)

        def rollback() -> Deferred[None]:
            raise OSError(5, "Input/output error")

        departure.rollback = rollback  # type: ignore[method-assign]
        peer = Recorder()
        peer_pump = self.env.connect(src, peer)
        peer.transport.write(wire.encode(wire.Abort(ErrorCode.VM_BUSY, "already here")))
        peer_pump.flush()
        finished = self.successResultOf(src.finished)
        self.assertEqual(finished.outcome, Outcome.ABORTED)
        self.assertIn("Input/output error", finished.reason)
        self.assertEqual(self.env.source_journal.get(departure.id).outcome, "aborted")

"""Conformance tests for the session state machines, without a reactor.

Two sessions are joined by :class:`Link`, which delivers each side's
``Send`` effects to the other and answers host effects at once, the way the
Twisted shell would on success.  No sockets, threads or clocks.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from securemig.protocol import destination as destination_session
from securemig.protocol import effects as fx
from securemig.protocol import source as source_session
from securemig.protocol import wire
from securemig.protocol.errors import ErrorCode, ProtocolError
from securemig.protocol.session import Side, every_state
from tests.support.messages import EVIDENCE, OFFER, WRAPPED, make_hello

MID = b"M" * 16


class Link:
    """Two sessions, a queue of deliveries between them, and a log of every
    effect each side produced.  Deliveries are queued, as on a real link, so
    a reply never overtakes the rest of the sender's work."""

    def __init__(self, hello: wire.Hello, images: list[bytes]) -> None:
        self.src = source_session.SourceSession(hello)
        self.dst = destination_session.DestinationSession()
        self.images = images
        self.src_effects: list[Any] = []
        self.dst_effects: list[Any] = []
        self.written: list[bytes] = []
        self.queue: list[Any] = []

    def run(self) -> None:
        """Start the source and deliver until both sides are quiet."""
        self.queue.append(lambda: self.run_src(self.src.start()))
        while self.queue:
            self.queue.pop(0)()

    def run_src(self, batch: fx.SourceEffects) -> None:
        for e in batch:
            self.src_effects.append(e)
            if isinstance(e, fx.Send):
                self.queue.append(lambda m=e.message: self.run_dst(self.dst.receive(m)))
            elif isinstance(e, fx.StartStreams):
                for i, data in enumerate(self.images):
                    digest = hashlib.sha256(data).digest()
                    for m in (wire.StreamBegin(i), wire.Data.of(data), wire.StreamEnd(digest)):
                        self.queue.append(lambda m=m: self.run_dst(self.dst.receive(m)))
                self.run_src(self.src.streams_sent())
            elif isinstance(e, fx.CommitLocally):
                self.run_src(self.src.committed_locally())

    def run_dst(self, batch: fx.DestinationEffects) -> None:
        for e in batch:
            self.dst_effects.append(e)
            if isinstance(e, fx.Send):
                self.queue.append(lambda m=e.message: self.run_src(self.src.receive(m)))
            elif isinstance(e, fx.Admit):
                self.run_dst(self.dst.admitted(MID))
            elif isinstance(e, fx.WriteChunk):
                self.written.append(e.data.tobytes())
            elif isinstance(e, fx.Prepare):
                self.run_dst(self.dst.prepared())
            elif isinstance(e, fx.CommitInPlace):
                self.run_dst(self.dst.resumed())


def kinds(effects: list[Any]) -> list[str]:
    return [type(e).__name__ for e in effects]


def finished(effects: list[Any]) -> fx.Finished:
    done = [e for e in effects if isinstance(e, fx.Finished)]
    assert len(done) == 1, effects
    return done[0]


def destination_in(phase: str) -> tuple[destination_session.DestinationSession, wire.Hello]:
    """A destination session driven to ``phase`` by a well-behaved source."""
    hello = make_hello((4,))
    d = destination_session.DestinationSession()
    steps: list[Any] = [
        ("awaitHello", None),
        ("admitting", lambda: d.receive(hello)),
        ("awaitStream", lambda: d.admitted(MID)),
        ("receiving", lambda: d.receive(wire.StreamBegin(0))),
        (
            "preparing",
            lambda: (d.receive(wire.Data.of(b"abcd")), d.receive(wire.StreamEnd(b"x" * 32))),
        ),
        ("awaitCommit", lambda: d.prepared()),
        ("committing", lambda: d.receive(wire.Commit())),
    ]
    for name, step in steps:
        if step is not None:
            step()
        if name == phase:
            assert d.phase == phase, (d.phase, phase)
            return d, hello
    raise AssertionError(phase)


class HappyPathTests(SynchronousTestCase):
    """A well-behaved pair reaches DONE on both sides."""

    def test_full_migration(self) -> None:
        """Messages and host effects come in the order of the protocol."""
        link = Link(make_hello((5, 3)), [b"12345", b"abc"])
        link.run()
        self.assertEqual(link.src.phase, "done")
        self.assertEqual(link.dst.phase, "done")
        self.assertEqual(finished(link.src_effects).outcome, fx.Outcome.DONE)
        self.assertEqual(finished(link.dst_effects).outcome, fx.Outcome.DONE)
        self.assertEqual(
            [k for k in kinds(link.dst_effects) if k != "Send"],
            [
                "Admit",
                "OpenStream",
                "WriteChunk",
                "CloseStream",
                "OpenStream",
                "WriteChunk",
                "CloseStream",
                "Prepare",
                "CommitInPlace",
                "Finished",
            ],
        )
        self.assertEqual(
            kinds(link.src_effects),
            ["Send", "StartStreams", "CommitLocally", "Send", "Finished"],
        )
        self.assertEqual(link.written, [b"12345", b"abc"])
        self.assertEqual(link.dst.bytes_received, 8)
        self.assertEqual(link.src.migration_id, MID)

    def test_commit_only_after_prepared(self) -> None:
        """The source's commit comes after the destination's PREPARED was sent."""
        link = Link(make_hello((1,)), [b"x"])
        link.run()
        sends = [e.message for e in link.dst_effects if isinstance(e, fx.Send)]
        self.assertEqual([type(m) for m in sends], [wire.Welcome, wire.Prepared, wire.Done])
        self.assertLess(
            kinds(link.dst_effects).index("Prepare"), kinds(link.dst_effects).index("CommitInPlace")
        )


class DestinationOrderTests(SynchronousTestCase):
    """Every message out of order is refused with UNEXPECTED_MESSAGE."""

    def assertUnexpected(self, d: destination_session.DestinationSession, message: Any) -> None:
        with self.assertRaises(ProtocolError) as cm:
            d.receive(message)
        self.assertEqual(cm.exception.code, ErrorCode.UNEXPECTED_MESSAGE)

    def test_stream_before_hello(self) -> None:
        d, _ = destination_in("awaitHello")
        self.assertUnexpected(d, wire.StreamBegin(0))

    def test_data_before_stream(self) -> None:
        d, _ = destination_in("awaitStream")
        self.assertUnexpected(d, wire.Data.of(b"x"))

    def test_commit_before_prepared(self) -> None:
        """COMMIT while images are still arriving is a violation."""
        d, _ = destination_in("receiving")
        self.assertUnexpected(d, wire.Commit())

    def test_commit_while_preparing(self) -> None:
        d, _ = destination_in("preparing")
        self.assertUnexpected(d, wire.Commit())

    def test_second_hello(self) -> None:
        d, hello = destination_in("awaitStream")
        self.assertUnexpected(d, hello)

    def test_stream_out_of_order(self) -> None:
        """Streams must come in manifest order."""
        d = destination_session.DestinationSession()
        d.receive(make_hello((1, 1)))
        d.admitted(MID)
        self.assertUnexpected(d, wire.StreamBegin(1))

    def test_extra_stream(self) -> None:
        """No stream may begin after the last one ended."""
        d, _ = destination_in("awaitCommit")
        self.assertUnexpected(d, wire.StreamBegin(1))

    def test_source_only_messages(self) -> None:
        """Messages only a destination sends are refused when received by one."""
        d, _ = destination_in("awaitStream")
        for message in (wire.Welcome(MID), wire.Prepared(), wire.Done()):
            self.assertUnexpected(d, message)


class RecoveryConnectionTests(SynchronousTestCase):
    """A recovery connection: RESOLVE or ASK instead of HELLO, answered
    once with what the host said, then the end."""

    def test_ask_is_answered_and_ends(self) -> None:
        """ASK asks the host (Settle, carrying the ASK), sends its RESOLVED
        and ends; HELD is an answer, not a refusal (no error code)."""
        d = destination_session.DestinationSession()
        effects = d.receive(wire.Ask(MID))
        self.assertEqual(effects, [fx.Settle(wire.Ask(MID))])
        self.assertEqual(d.phase, "settling")
        held = wire.Resolved(MID, wire.Settled.HELD, "the whole guest, paused")
        effects = d.settled(held)
        self.assertEqual(effects[0], fx.Send(held))
        done = finished(effects)
        self.assertIsNone(done.code)
        self.assertEqual(d.phase, "done")

    def test_ask_only_first(self) -> None:
        """ASK after HELLO is no recovery connection: refused."""
        d, _ = destination_in("awaitStream")
        with self.assertRaises(ProtocolError):
            d.receive(wire.Ask(MID))


class DestinationStreamTests(SynchronousTestCase):
    """Stream sizes are enforced as the bytes arrive."""

    def test_overrun(self) -> None:
        """More bytes than announced: refused at the DATA frame that overruns."""
        d, _ = destination_in("receiving")
        d.receive(wire.Data.of(b"abc"))
        with self.assertRaises(ProtocolError) as cm:
            d.receive(wire.Data.of(b"de"))
        self.assertEqual(cm.exception.code, ErrorCode.STREAM_MISMATCH)

    def test_short_stream(self) -> None:
        """Fewer bytes than announced: refused at STREAM_END."""
        d, _ = destination_in("receiving")
        d.receive(wire.Data.of(b"abc"))
        with self.assertRaises(ProtocolError) as cm:
            d.receive(wire.StreamEnd(b"x" * 32))
        self.assertEqual(cm.exception.code, ErrorCode.STREAM_MISMATCH)

    def test_digest_checked_by_host(self) -> None:
        """The session hands the source's digest to the host with the stream."""
        d, _ = destination_in("receiving")
        d.receive(wire.Data.of(b"abcd"))
        effects = d.receive(wire.StreamEnd(b"D" * 32))
        self.assertEqual(effects, [fx.CloseStream(0, b"D" * 32), fx.Prepare()])


class HelloCheckTests(SynchronousTestCase):
    """HELLO parameters no destination could accept are refused."""

    def assertRefused(self, code: ErrorCode, hello: wire.Hello) -> None:
        with self.assertRaises(ProtocolError) as cm:
            destination_session.DestinationSession().receive(hello)
        self.assertEqual(cm.exception.code, code)

    def test_version(self) -> None:
        self.assertRefused(ErrorCode.UNSUPPORTED_VERSION, make_hello(version=3))
        self.assertRefused(ErrorCode.UNSUPPORTED_VERSION, make_hello(version=0))

    def test_version_one_has_no_tail(self) -> None:
        """Version 2's fields in a version-1 HELLO: refused, not half-read."""
        self.assertRefused(ErrorCode.BAD_PARAMETER, make_hello(version=1, guest="linux"))

    def test_live_streams_no_images_and_shares_storage(self) -> None:
        """Live mode moves memory in QEMU's own stream: a live HELLO that
        announces images, or the full variant (a disk copy), is refused."""
        live = wire.Mode.LIVE
        shared = wire.Variant.SHARED_STORAGE
        self.assertRefused(ErrorCode.BAD_PARAMETER, make_hello(mode=live, variant=shared))
        self.assertRefused(ErrorCode.BAD_PARAMETER, make_hello(sizes=(), mode=live))

    def test_chunk_too_small(self) -> None:
        self.assertRefused(ErrorCode.BAD_PARAMETER, make_hello(chunk_size=wire.MIN_CHUNK_SIZE - 1))

    def test_no_images(self) -> None:
        self.assertRefused(ErrorCode.BAD_PARAMETER, make_hello(sizes=()))

    def test_duplicate_images(self) -> None:
        hello = make_hello(images=(wire.ImageInfo("ram", 1), wire.ImageInfo("ram", 1)))
        self.assertRefused(ErrorCode.BAD_PARAMETER, hello)


class DestinationFailureTests(SynchronousTestCase):
    """Where the commit point is decides whether staging may be discarded."""

    def test_failure_before_prepared_discards(self) -> None:
        """Any failure before PREPARED discards staging and tells the source."""
        for phase in ("awaitHello", "admitting", "awaitStream", "receiving", "preparing"):
            d, _ = destination_in(phase)
            effects = d.fail(ErrorCode.IO_ERROR, "disk on fire")
            with self.subTest(phase=phase):
                self.assertEqual(kinds(effects), ["Send", "Discard", "Finished"])
                self.assertEqual(effects[0].message.code, ErrorCode.IO_ERROR)
                self.assertEqual(finished(effects).outcome, fx.Outcome.ABORTED)

    def test_lost_before_prepared_discards(self) -> None:
        for phase in ("awaitStream", "receiving", "preparing"):
            d, _ = destination_in(phase)
            with self.subTest(phase=phase):
                self.assertEqual(kinds(d.connection_lost()), ["Discard", "Finished"])

    def test_lost_after_prepared_holds(self) -> None:
        """After PREPARED the source may already have committed: never discard."""
        d, _ = destination_in("awaitCommit")
        effects = d.connection_lost()
        self.assertNotIn("Discard", kinds(effects))
        self.assertEqual(kinds(effects), ["HoldInDoubt", "Finished"])
        self.assertEqual(finished(effects).outcome, fx.Outcome.IN_DOUBT)

    def test_timeout_after_prepared_holds(self) -> None:
        """A local failure while awaiting COMMIT holds staging too."""
        d, _ = destination_in("awaitCommit")
        effects = d.fail(ErrorCode.TIMEOUT, "idle")
        self.assertNotIn("Discard", kinds(effects))
        self.assertIn("HoldInDoubt", kinds(effects))

    def test_source_abort_after_prepared_discards(self) -> None:
        """A source's ABORT proves it did not commit, so discarding is safe."""
        d, _ = destination_in("awaitCommit")
        effects = d.receive(wire.Abort(ErrorCode.CANCELLED, "operator"))
        self.assertEqual(kinds(effects), ["Discard", "Finished"])

    def test_after_commit_the_vm_stays(self) -> None:
        """After COMMIT a failed resume never discards the VM."""
        d, _ = destination_in("committing")
        effects = d.fail(ErrorCode.RESUME_FAILED, "qemu died")
        self.assertNotIn("Discard", kinds(effects))
        self.assertEqual(finished(effects).outcome, fx.Outcome.RESUME_FAILED)

    def test_lost_while_committing_continues(self) -> None:
        """The link dropping during the commit does not stop the resume."""
        d, _ = destination_in("committing")
        self.assertEqual(d.connection_lost(), [])
        self.assertEqual(finished(d.resumed()).outcome, fx.Outcome.DONE)

    def test_refused(self) -> None:
        """A refused HELLO sends ABORT with the host's code."""
        d, _ = destination_in("admitting")
        effects = d.refused(ErrorCode.VM_BUSY, "already here")
        self.assertEqual(effects[0], fx.Send(wire.Abort(ErrorCode.VM_BUSY, "already here")))

    def test_terminal_states_ignore_late_events(self) -> None:
        """A disk write finishing after an abort changes nothing."""
        d, _ = destination_in("receiving")
        d.fail(ErrorCode.TIMEOUT, "idle")
        self.assertEqual(d.phase, "failed")
        self.assertEqual(d.prepared(), [])
        self.assertEqual(d.connection_lost(), [])
        self.assertEqual(d.receive(wire.Data.of(b"x")), [])


class SourceTests(SynchronousTestCase):
    """The source rolls back before its commit and never after."""

    def source_in(self, phase: str) -> source_session.SourceSession:
        src = source_session.SourceSession(make_hello((1,)))
        steps = [
            ("awaitWelcome", src.start),
            ("streaming", lambda: src.receive(wire.Welcome(MID))),
            ("awaitPrepared", src.streams_sent),
            ("committing", lambda: src.receive(wire.Prepared())),
            ("awaitDone", src.committed_locally),
        ]
        for name, step in steps:
            step()
            if name == phase:
                return src
        raise AssertionError(phase)

    def test_rollback_before_commit(self) -> None:
        for phase in ("awaitWelcome", "streaming", "awaitPrepared"):
            for event in ("lost", "abort", "fail"):
                src = self.source_in(phase)
                effects = {
                    "lost": src.connection_lost,
                    "abort": lambda src=src: src.receive(wire.Abort(ErrorCode.DISK_FULL, "x")),
                    "fail": lambda src=src: src.fail(ErrorCode.TIMEOUT, "idle"),
                }[event]()
                with self.subTest(phase=phase, event=event):
                    self.assertIn("RollBack", kinds(effects))
                    self.assertEqual(finished(effects).outcome, fx.Outcome.ABORTED)

    def test_hello_refused_as_by_an_older_destination_says_upgrade_first(self) -> None:
        """An ABORT answering HELLO with MALFORMED or UNSUPPORTED_VERSION (what
        a destination of an older release sends: doc/protocol.rst, HELLO)
        tells the operator to upgrade destinations first; the same code later,
        or another code then, does not."""
        for code in (ErrorCode.MALFORMED, ErrorCode.UNSUPPORTED_VERSION):
            src = self.source_in("awaitWelcome")
            reason = finished(src.receive(wire.Abort(code, "9 trailing bytes in Hello"))).reason
            self.assertIn("9 trailing bytes in Hello", reason)
            self.assertIn(source_session.OLDER_DESTINATION_HINT, reason)
        src = self.source_in("awaitWelcome")
        reason = finished(src.receive(wire.Abort(ErrorCode.VM_BUSY, "here"))).reason
        self.assertNotIn("older release", reason)
        src = self.source_in("awaitPrepared")
        reason = finished(src.receive(wire.Abort(ErrorCode.MALFORMED, "bad frame"))).reason
        self.assertNotIn("older release", reason)

    def test_commit_whose_journal_write_failed_rolls_back(self) -> None:
        """Committing, the journal write of COMMITTED fails: nothing was
        committed, so the VM stays (ABORT, RollBack)."""
        src = self.source_in("committing")
        effects = src.commit_failed(ErrorCode.DISK_FULL, "journal: database or disk is full")
        self.assertEqual(kinds(effects), ["Send", "RollBack", "Finished"])
        self.assertEqual(finished(effects).outcome, fx.Outcome.ABORTED)

    def test_no_rollback_after_commit(self) -> None:
        """From ``committing`` on COMMITTED may be durable: the VM is the
        destination's, and no failure rolls back or sends ABORT (which would
        make a destination awaiting COMMIT discard the only copy)."""
        for phase, event in [
            (p, e) for p in ("committing", "awaitDone") for e in ("lost", "abort", "fail")
        ]:
            src = self.source_in(phase)
            effects = {
                "lost": src.connection_lost,
                "abort": lambda src=src: src.receive(wire.Abort(ErrorCode.RESUME_FAILED, "x")),
                "fail": lambda src=src: src.fail(ErrorCode.TIMEOUT, "idle"),
            }[event]()
            with self.subTest(phase=phase, event=event):
                self.assertNotIn("RollBack", kinds(effects))
                self.assertNotIn("Send", kinds(effects))
                self.assertEqual(finished(effects).outcome, fx.Outcome.IN_DOUBT)

    def test_prepared_before_streams_sent(self) -> None:
        """PREPARED before the source finished sending is a violation."""
        src = self.source_in("streaming")
        with self.assertRaises(ProtocolError) as cm:
            src.receive(wire.Prepared())
        self.assertEqual(cm.exception.code, ErrorCode.UNEXPECTED_MESSAGE)

    def test_done_before_commit(self) -> None:
        """DONE before the source committed is a violation."""
        src = self.source_in("awaitPrepared")
        with self.assertRaises(ProtocolError) as cm:
            src.receive(wire.Done())
        self.assertEqual(cm.exception.code, ErrorCode.UNEXPECTED_MESSAGE)

    def test_destination_only_messages(self) -> None:
        src = self.source_in("awaitWelcome")
        with self.assertRaises(ProtocolError):
            src.receive(wire.Commit())


class SecureSessionTests(SynchronousTestCase):
    """The secure variant's order: attestation both ways and key transfer
    before any image byte (the host checks are stood in by answers here)."""

    def test_full_secure_exchange(self) -> None:
        src = source_session.SourceSession(make_hello((1,)), secure=True)
        dst = destination_session.DestinationSession(secure=True)
        sent = src.start()
        self.assertEqual(kinds(dst.receive(sent[0].message)), ["Admit"])
        welcome = dst.admitted(MID)[0].message
        challenge = src.receive(welcome)[0].message
        self.assertIsInstance(challenge, wire.Challenge)
        attest = dst.receive(challenge)
        self.assertEqual(attest, [fx.Attest(challenge.nonce, "destination")])
        evidence, dst_challenge = (e.message for e in dst.attested(EVIDENCE))
        verify = src.receive(evidence)
        self.assertEqual(verify, [fx.VerifyPeer(EVIDENCE, challenge.nonce, "destination")])
        self.assertEqual(src.peer_verified(), [])
        self.assertEqual(src.receive(dst_challenge), [fx.Attest(dst_challenge.nonce, "source")])
        src_evidence = src.attested(EVIDENCE)[0].message
        self.assertEqual(dst.receive(src_evidence)[0].nonce, dst_challenge.nonce)
        self.assertEqual(dst.peer_verified(), [fx.OfferKey()])
        offer = dst.key_offered(OFFER)[0].message
        self.assertEqual(src.receive(offer), [fx.WrapKey(OFFER)])
        wrapped, start = src.key_wrapped(WRAPPED)
        self.assertEqual(start, fx.StartStreams())
        self.assertEqual(dst.receive(wrapped.message), [fx.AcceptKey(WRAPPED)])
        self.assertEqual((src.phase, dst.phase), ("streaming", "awaitStream"))

    def test_no_image_before_attestation(self) -> None:
        """A source that skips attestation cannot send images."""
        dst = destination_session.DestinationSession(secure=True)
        dst.receive(make_hello((1,)))
        dst.admitted(MID)
        with self.assertRaises(ProtocolError) as cm:
            dst.receive(wire.StreamBegin(0))
        self.assertEqual(cm.exception.code, ErrorCode.UNEXPECTED_MESSAGE)

    def test_no_image_before_key_transfer(self) -> None:
        dst = destination_session.DestinationSession(secure=True)
        dst.receive(make_hello((1,)))
        dst.admitted(MID)
        dst.receive(wire.Challenge(b"c" * 32))
        dst.attested(EVIDENCE)
        dst.receive(EVIDENCE)
        dst.peer_verified()
        dst.key_offered(OFFER)
        with self.assertRaises(ProtocolError):
            dst.receive(wire.StreamBegin(0))

    def test_offer_before_source_attested(self) -> None:
        """A key offer before the source proved itself is a violation."""
        src = source_session.SourceSession(make_hello((1,)), secure=True)
        src.start()
        src.receive(wire.Welcome(MID))
        with self.assertRaises(ProtocolError):
            src.receive(OFFER)

    def test_nonces_are_fresh(self) -> None:
        a = source_session.SourceSession(make_hello((1,)), secure=True)
        b = source_session.SourceSession(make_hello((1,)), secure=True)
        for src in (a, b):
            src.start()
        na = a.receive(wire.Welcome(MID))[0].message.nonce
        nb = b.receive(wire.Welcome(MID))[0].message.nonce
        self.assertNotEqual(na, nb)
        self.assertEqual(len(na), wire.NONCE_SIZE)


class ClearKeyTests(SynchronousTestCase):
    """The insecure variant's vTPM key in the clear: once, before the streams."""

    def destination(self) -> destination_session.DestinationSession:
        d = destination_session.DestinationSession()
        d.receive(make_hello((1, 1)))
        d.admitted(MID)
        return d

    def test_sent_after_welcome(self) -> None:
        src = source_session.SourceSession(make_hello((1,)), clear_key=b"k" * 64)
        src.start()
        effects = src.receive(wire.Welcome(MID))
        self.assertEqual(effects, [fx.Send(wire.ClearKey(b"k" * 64)), fx.StartStreams()])

    def test_accepted_first(self) -> None:
        d = self.destination()
        self.assertEqual(d.receive(wire.ClearKey(b"k")), [fx.AcceptKey(wire.ClearKey(b"k"))])

    def test_twice_or_late(self) -> None:
        d = self.destination()
        d.receive(wire.ClearKey(b"k"))
        with self.assertRaises(ProtocolError):
            d.receive(wire.ClearKey(b"k"))
        late = self.destination()
        late.receive(wire.StreamBegin(0))
        late.receive(wire.Data.of(b"x"))
        late.receive(wire.StreamEnd(b"d" * 32))
        with self.assertRaises(ProtocolError):
            late.receive(wire.ClearKey(b"k"))

    def test_never_in_the_secure_variant(self) -> None:
        """A key in the clear is a protocol violation in the secure variant."""
        d = destination_session.DestinationSession(secure=True)
        d.receive(make_hello((1,)))
        d.admitted(MID)
        with self.assertRaises(ProtocolError):
            d.receive(wire.ClearKey(b"k"))
        self.assertRaises(ValueError, source_session.SourceSession, make_hello((1,)), True, b"k")


def live_hello() -> wire.Hello:
    return make_hello(
        (), version=2, variant=wire.Variant.SHARED_STORAGE, mode=wire.Mode.LIVE, guest="linux"
    )


class LiveSessionTests(SynchronousTestCase):
    """Live mode's order: attestation and key release as in the secure
    variant, then the destination's QEMU is started (with the released key)
    and says LIVE_READY, only then does the source start QEMU's stream;
    PREPARED once the destination's QEMU loaded it, then the same commit."""

    def exchange(
        self,
    ) -> tuple[source_session.SourceSession, destination_session.DestinationSession, Any]:
        """Both sides driven up to the source's WRAPPED_KEY; its effects."""
        src = source_session.SourceSession(live_hello(), secure=True)
        dst = destination_session.DestinationSession(secure=True)
        dst.receive(src.start()[0].message)
        challenge = src.receive(dst.admitted(MID)[0].message)[0].message
        dst.receive(challenge)
        evidence, dst_challenge = (e.message for e in dst.attested(EVIDENCE))
        src.receive(evidence)
        src.peer_verified()
        src.receive(dst_challenge)
        dst.receive(src.attested(EVIDENCE)[0].message)
        dst.peer_verified()
        src.receive(dst.key_offered(OFFER)[0].message)
        return src, dst, src.key_wrapped(WRAPPED)

    def test_live_exchange(self) -> None:
        src, dst, (wrapped,) = self.exchange()
        self.assertEqual(src.phase, "awaitLiveReady")
        self.assertEqual(dst.receive(wrapped.message), [fx.AcceptKey(WRAPPED), fx.StartIncoming()])
        (ready,) = dst.incoming_ready(4242)
        self.assertEqual(ready.message, wire.LiveReady(4242))
        self.assertEqual(src.receive(ready.message), [fx.StartLive(4242)])
        self.assertEqual(dst.incoming_loaded(), [fx.Prepare()])
        prepared = dst.prepared()[0].message
        self.assertEqual(src.receive(prepared), [fx.CommitLocally()])
        commit = src.committed_locally()[0].message
        self.assertEqual(dst.receive(commit), [fx.CommitInPlace()])
        self.assertEqual(kinds(src.receive(dst.resumed()[0].message)), ["Finished"])
        self.assertEqual((src.phase, dst.phase), ("done", "done"))

    def test_no_stream_before_live_ready(self) -> None:
        """PREPARED before the destination said LIVE_READY is a violation;
        the live source never streams images."""
        src, _, effects = self.exchange()
        self.assertNotIn("StartStreams", kinds(effects))
        with self.assertRaises(ProtocolError):
            src.receive(wire.Prepared())

    def test_live_ready_only_in_live_mode(self) -> None:
        """A suspended-mode source refuses LIVE_READY."""
        src = source_session.SourceSession(make_hello((1,)), secure=True)
        src.start()
        src.receive(wire.Welcome(MID))
        with self.assertRaises(ProtocolError):
            src.receive(wire.LiveReady(1))

    def test_failure_before_commit_rolls_back_and_discards(self) -> None:
        """A failure while the stream runs: the source rolls back (its guest
        goes on), the destination discards (its QEMU ends)."""
        src, dst, (wrapped,) = self.exchange()
        dst.receive(wrapped.message)
        src.receive(dst.incoming_ready(1)[0].message)
        self.assertIn("RollBack", kinds(src.fail(ErrorCode.LIVE_FAILED, "QEMU failed")))
        self.assertIn("Discard", kinds(dst.connection_lost()))

    def test_insecure_live_refused(self) -> None:
        with self.assertRaises(ValueError):
            source_session.SourceSession(live_hello())


class StateTableTests(SynchronousTestCase):
    """States are enums whose table columns the machines are built from."""

    def test_commit_point_column(self) -> None:
        """Each state's side of the commit point: the destination holds its
        staging in doubt only in awaitCommit and owns the VM from committing
        on; the source is past the commit point from committing on."""
        D, S, side = destination_session.State, source_session.State, Side
        dst = {state: state.side for state in D}
        self.assertEqual(
            {s for s, v in dst.items() if v is not side.BEFORE},
            {D.AWAIT_COMMIT, D.COMMITTING, D.DONE, D.FAILED},
        )
        self.assertIs(dst[D.AWAIT_COMMIT], side.IN_DOUBT)
        self.assertIs(dst[D.COMMITTING], side.AFTER)
        src = {state: state.side for state in S}
        self.assertEqual(
            {s for s, v in src.items() if v is not side.BEFORE},
            {S.COMMITTING, S.AWAIT_DONE, S.DONE, S.FAILED},
        )
        self.assertEqual({src[S.COMMITTING], src[S.AWAIT_DONE]}, {side.AFTER})
        self.assertEqual({dst[D.DONE], dst[D.FAILED], src[S.DONE], src[S.FAILED]}, {side.ENDED})

    def test_values_are_the_names_shown(self) -> None:
        """A state formats as the name messages, logs and older tests use."""
        d, _ = destination_in("awaitStream")
        self.assertIs(d.phase, destination_session.State.AWAIT_STREAM)
        self.assertEqual(f"in phase {d.phase}", "in phase awaitStream")

    def test_every_state_needs_a_row(self) -> None:
        """A state table without a row for some state is refused (at import,
        so by every test), naming the state."""
        D = destination_session.State
        with self.assertRaises(TypeError) as cm:
            every_state(D, {state: Side.BEFORE for state in D if state is not D.SETTLING})
        self.assertIn("settling", str(cm.exception))

    def test_endings_in_every_state(self) -> None:
        """Every state of every machine takes ABORT, a local failure and a
        lost connection: the endings come from the side column, so none is
        missing for a state (Automat raises NoTransition for a missing one)."""
        machines = [
            *(destination_session.destination_machine(secure) for secure in (False, True)),
            *(source_session.source_machine(*variant) for variant in source_session.VARIANTS),
        ]
        for machine in machines:
            automaton = machine.__automat_automaton__
            handled = {(s.name, i) for s, i, _, _ in automaton.allTransitions()}
            names = {s.name for s in automaton.states()}
            for name in names:
                for ending in ("peer_abort", "fail", "connection_lost"):
                    self.assertIn((name, ending), handled)

    def test_refused_input_named(self) -> None:
        """An input the state does not allow is a violation that names the
        input and the state (the input's own name, from the machine)."""
        d, _ = destination_in("receiving")
        with self.assertRaises(ProtocolError) as cm:
            d.receive(wire.Commit())
        self.assertEqual(cm.exception.reason, "commit is not allowed in phase receiving")
        src = source_session.SourceSession(make_hello())
        with self.assertRaises(ProtocolError) as cm:
            src.committed_locally()
        self.assertEqual(cm.exception.reason, "committed_locally is not allowed in phase idle")

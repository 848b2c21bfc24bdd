"""The destination host (:mod:`securemig.host.arrival`): the key operations
the shell asks of it through host/contract.py between the wrapped key's
arrival and PREPARED, admission, and after a crash the staging it finds at
start, RESOLVE from the source and ``securemig recover`` from the source's
journal.  Real files and journal; the secure variant's unwrapping in the host
TPM is covered by tests/transport/test_secure.py."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from securemig.host import storage
from securemig.host.arrival import Arrival, DestinationHost
from securemig.host.contract import VtpmKey
from securemig.host.journal import Journal
from securemig.hypervisor.bundle import Bundle, create_image_vm
from securemig.hypervisor.contract import BACKEND_INFO_FILE
from securemig.protocol import wire
from securemig.protocol.errors import ErrorCode, ProtocolError
from securemig.trust.attestor import Attestor
from securemig.trust.identity import Identity
from securemig.trust.keyrelease import KeyTransferError
from securemig.trust.pki import Authority
from securemig.trust.policy import PolicyStore
from tests.support.tpm import shared_tpm

SECRET = bytes(range(32))
IDENTITY = bytes(range(32, 64))


def hello(*images: str) -> wire.Hello:
    """A HELLO of VM ``vm1`` carrying ``images`` (one byte each)."""
    infos = tuple(wire.ImageInfo(name, 1) for name in images)
    return wire.Hello(1, wire.Variant.FULL, "vm1", 4096, infos, "")


class KeyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.host = DestinationHost(Path(self.mktemp()))

    def admit(self, *images: str) -> Arrival:
        arrival = self.host.admit(hello(*images), "peer", "insecure")
        self.addCleanup(arrival.lock.release)
        return arrival

    def test_no_key_needed_without_a_vtpm(self) -> None:
        """Insecure, no key sent, no vTPM state: nothing to release."""
        self.assertFalse(self.admit("ram").key_expected(secure=False))

    def test_vtpm_state_without_its_key_refused(self) -> None:
        """A vTPM state that came without its key is refused (it could
        never run here)."""
        with self.assertRaises(KeyTransferError) as cm:
            self.admit("ram", "vtpm").key_expected(secure=False)
        self.assertEqual(cm.exception.code, ErrorCode.KEY_TRANSFER_FAILED)

    def test_secure_always_releases_a_key(self) -> None:
        """The secure variant always has a key to release and check."""
        self.assertTrue(self.admit("ram").key_expected(secure=True))

    def test_clear_key_released_once(self) -> None:
        """The insecure variant's key is its 32 bytes of secret, then the
        identity; journaled ``key-received`` when accepted; released once
        (a live arrival's key, released for its vTPM, is the one re-sealed)."""
        arrival = self.admit("ram", "vtpm")
        arrival.accept_key(wire.ClearKey(SECRET + IDENTITY), 7)
        record = self.host.journal.get(arrival.id)
        assert record is not None
        self.assertTrue(record.reached("key-received"))
        self.assertTrue(arrival.key_expected(secure=False))
        key = arrival.release_key(None)
        self.assertEqual((key.secret, key.identity), (SECRET, IDENTITY))
        arrival.accept_key(wire.ClearKey(bytes(64)), 8)
        self.assertIs(arrival.release_key(None), key)

    def test_clear_key_resealed_then_dropped(self) -> None:
        """The key is re-sealed to this host's TPM (a real swtpm: it unseals
        to the same secret, and the sealed form does not contain it); the
        prepare writes only the sealed key, and the arrival keeps no clear
        key after it (a backend that loads the VM at the prepare had it)."""
        _, tpm, _ = shared_tpm()
        attestor = Attestor(
            Identity(Path("unused"), "dest-b", "unused"),
            tpm,
            PolicyStore(Path(self.mktemp())),
            Authority.create("test privacy CA").cert,
            False,
        )
        arrival = self.admit("ram")
        arrival.accept_key(wire.ClearKey(SECRET + IDENTITY), 0)
        key = arrival.release_key(None)
        arrival.keep_key(attestor, key, IDENTITY.hex())
        sealed = arrival.sealed_vtpm_key
        assert sealed is not None
        self.assertNotIn(SECRET, sealed)
        self.assertEqual(attestor.unseal(sealed), SECRET)
        self.assertEqual(arrival.vtpm_identity, IDENTITY.hex())
        self.assertIs(arrival.vtpm_key, key)
        arrival.prepare()
        written = Bundle.load(arrival.staging).vtpm_key_path.read_bytes()
        self.assertEqual(written, sealed)
        self.assertIsNone(arrival.vtpm_key)

    def test_unusable_keys_refused(self) -> None:
        """A clear key of the wrong length, a wrapped key without this
        host's migration key to unwrap it, and no key at all are refused."""
        wrapped = wire.WrappedKey(bytes(65), bytes(12), bytes(48))
        for key in (wire.ClearKey(SECRET[:31]), wrapped, None):
            arrival = self.admit("ram")
            if key is not None:
                arrival.accept_key(key, 0)
            with self.assertRaises(KeyTransferError):
                arrival.release_key(None)
            self.assertIsNone(arrival.vtpm_key)
            arrival.lock.release()

    def test_live_needs_the_wrapped_key(self) -> None:
        """A live arrival's key must have come wrapped (live is secure only):
        a key in the clear is refused before anything starts."""
        arrival = self.admit("ram")
        arrival.accept_key(wire.ClearKey(SECRET + IDENTITY), 0)
        with self.assertRaises(KeyTransferError) as cm:
            arrival.release_key(None, live=True)
        self.assertIn("live mode needs the wrapped vTPM key", cm.exception.reason)

    def test_vtpm_checked_against_what_arrived(self) -> None:
        """No vTPM state and no identity: none to check; an identity whose
        state did not arrive is refused."""
        arrival = self.admit("ram")
        self.assertIsNone(arrival.check_vtpm(VtpmKey(SECRET, b"")))
        with self.assertRaises(KeyTransferError) as cm:
            arrival.check_vtpm(VtpmKey(SECRET, IDENTITY))
        self.assertIn("without its state", cm.exception.reason)

    def test_key_never_shown(self) -> None:
        """A released key's repr (a log line, a traceback) shows its
        identity, never its secret."""
        shown = repr(VtpmKey(SECRET, IDENTITY))
        self.assertIn(IDENTITY.hex(), shown)
        self.assertNotIn(SECRET.hex(), shown)
        self.assertNotIn(repr(SECRET), shown)


class AdmitTests(SynchronousTestCase):
    def test_vtpm_refused_where_no_key_can_be_kept(self) -> None:
        """A listener without a TPM identity refuses a VM with a vTPM at
        admission, saying why; nothing is journaled, staged or locked."""
        host = DestinationHost(Path(self.mktemp()))
        with self.assertRaises(ProtocolError) as cm:
            host.admit(hello("ram", "vtpm"), "peer", "insecure", keeps_keys=False)
        self.assertEqual(cm.exception.code, ErrorCode.POLICY_REFUSED)
        self.assertIn("no TPM identity to keep a vTPM key", cm.exception.reason)
        self.assertEqual(host.journal.records(), [])
        self.assertEqual(list(host.staging.iterdir()), [])
        # The name is free: the same VM is admitted where keys can be kept.
        arrival = host.admit(hello("ram", "vtpm"), "peer", "insecure")
        arrival.lock.release()
        # And a VM without a vTPM needs no key to keep.
        host.admit(hello("ram"), "peer", "insecure", keeps_keys=False).lock.release()

    def test_libvirt_domain_refused_where_no_key_can_be_kept(self) -> None:
        """A libvirt domain always comes with its vTPM's secret (libvirt
        keeps the vTPM state itself: no vTPM image names it): a libvirt
        listener without a TPM identity refuses it at admission, not after
        the whole stream (where its restore needed the secret)."""
        host = DestinationHost(Path(self.mktemp()), backend="libvirt")
        domain = replace(hello("ram", "disk"), backend="libvirt")
        with self.assertRaises(ProtocolError) as cm:
            host.admit(domain, "peer", "insecure", keeps_keys=False)
        self.assertEqual(cm.exception.code, ErrorCode.POLICY_REFUSED)
        self.assertIn("no TPM identity to keep a vTPM key", cm.exception.reason)
        self.assertEqual(host.journal.records(), [])

    def test_multifd_channels_checked_at_admission(self) -> None:
        """A live QEMU arrival asking for 2 multifd channels is admitted with
        them; 9, 0, a count that is not an integer or a field QEMU's
        description lacks is refused as BAD_PARAMETER before anything is
        journaled, staged or locked."""
        host = DestinationHost(Path(self.mktemp()), backend="qemu")
        live = replace(
            hello(),
            version=2,
            variant=wire.Variant.SHARED_STORAGE,
            mode=wire.Mode.LIVE,
            backend="qemu",
        )
        arrival = host.admit(replace(live, backend_info=b'{"multifd": 2}'), "peer", "secure")
        self.assertEqual(arrival.multifd, 2)
        arrival.lock.release()
        host.journal.finish(arrival.id, "aborted")
        arrival.staging.rmdir()  # as its discard does
        for info in (b'{"multifd": 9}', b'{"multifd": 0}', b'{"multifd": "2"}',
                     b'{"multifd": 2, "x": 1}', b"[2]", b"\xff"):  # fmt: skip
            with self.assertRaises(ProtocolError) as cm:
                host.admit(replace(live, backend_info=info), "peer", "secure")
            self.assertEqual(cm.exception.code, ErrorCode.BAD_PARAMETER, info)
        self.assertEqual(len(host.journal.records()), 1)
        # One stream (no backend_info) is what earlier sources send.
        host.admit(live, "peer", "secure").lock.release()

    def test_vm_with_a_leftover_arrival_refused(self) -> None:
        """An earlier arrival of vm1 whose staging is still here -- in doubt,
        or aborted but not yet removed (its hypervisor did not answer the
        discard; a libvirt leftover is removed by the domain's UUID, which
        would hit a new arrival of the same VM) -- refuses a new arrival of
        vm1 as VM_BUSY saying why; once the leftover is gone it is admitted,
        and another VM is admitted meanwhile."""
        for outcome, why in (("in-doubt", "is in doubt here"), ("aborted", "still being removed")):
            host = DestinationHost(Path(self.mktemp()))
            earlier = host.admit(hello("ram"), "peer", "insecure")
            earlier.lock.release()
            host.journal.finish(earlier.id, outcome)
            with self.assertRaises(ProtocolError) as cm:
                host.admit(hello("ram"), "peer", "insecure")
            self.assertEqual(cm.exception.code, ErrorCode.VM_BUSY)
            self.assertIn(why, cm.exception.reason)
            self.assertEqual(len(host.journal.records()), 1)
            other = replace(hello("ram"), vm_name="vm2")
            host.admit(other, "peer", "insecure").lock.release()
            earlier.staging.rmdir()
            host.admit(hello("ram"), "peer", "insecure").lock.release()


class RecoveryTests(SynchronousTestCase):
    """What a destination does at start with staging a crash left behind."""

    def setUp(self) -> None:
        self.state = Path(self.mktemp())
        self.host = DestinationHost(self.state)

    def stage(self, mid: str, phase: str) -> Path:
        self.host.journal.begin(
            role="destination", vm="vm1", peer="p", variant="full", protocol="insecure", id=mid
        )
        self.host.journal.phase(mid, phase)
        path = self.host.staging / mid
        path.mkdir()
        (path / "ram.img").write_bytes(b"x")
        return path

    def recover(self, host: DestinationHost | None = None) -> list[tuple[str, str]]:
        """Restart: what ``twistd securemig`` does first."""
        host = host or DestinationHost(self.state)
        result: list[tuple[str, str]] = self.successResultOf(Deferred.fromCoroutine(host.recover()))
        return result

    def test_unprepared_staging_removed(self) -> None:
        """Never PREPARED: the source cannot have committed; remove it."""
        path = self.stage("a" * 32, "streaming")
        self.assertIn("staging removed", self.recover()[0][1])
        self.assertFalse(path.exists())
        self.assertEqual(self.host.journal.get("a" * 32).outcome, "aborted")  # type: ignore

    def test_prepared_staging_held(self) -> None:
        """PREPARED: the source may have committed; keep it, in doubt, and
        refuse a new arrival of that VM until it is settled."""
        path = self.stage("b" * 32, "prepared")
        host = DestinationHost(self.state)
        self.assertIn("held in doubt", self.recover(host)[0][1])
        self.assertTrue(path.exists())
        self.assertEqual(host.journal.get("b" * 32).outcome, "in-doubt")  # type: ignore
        hello = wire.Hello(1, wire.Variant.FULL, "vm1", 4096, (wire.ImageInfo("ram", 1),), "")
        with self.assertRaises(ProtocolError) as cm:
            host.admit(hello, "p", "insecure")
        self.assertEqual(cm.exception.code, ErrorCode.VM_BUSY)
        self.assertIn("in doubt", cm.exception.reason)

    def stage_vm(self, mid: str, *phases: str) -> Path:
        """A real (image backend) VM staged by migration ``mid``."""
        self.host.journal.begin(
            role="destination", vm="vm1", peer="p", variant="full", protocol="insecure", id=mid
        )
        for phase in phases:
            self.host.journal.phase(mid, phase)
        bundle = create_image_vm(self.state / "tmp", "vm1", 1)
        os.rename(bundle.path, self.host.staging / mid)
        return self.host.staging / mid

    def test_journaled_commit_rolled_forward(self) -> None:
        """COMMIT journaled, crash before the move: the restart moves the VM
        into place, resumes it and journals DONE (the old rule discarded it,
        and the source had already given its copy up: the VM was lost)."""
        ram = (self.stage_vm("d" * 32, "prepared", "committed") / "ram.img").read_bytes()
        self.assertIn("resumed here", self.recover()[0][1])
        self.assertEqual((self.host.vms / "vm1" / "ram.img").read_bytes(), ram)
        self.assertEqual(list(self.host.staging.iterdir()), [])
        record = self.host.journal.get("d" * 32)
        assert record is not None
        self.assertEqual(record.outcome, "done")

    def test_ran_and_ended_is_no_arrival_any_more(self) -> None:
        """Committed and continued here (RESUMED), and the guest has ended
        since: done, not resumed again, and the arrival's record of what
        arrived (``backend-info.json``) goes, so that nothing takes the VM
        for an arrival to abort later."""
        staged = self.stage_vm("c" * 32, "prepared", "committed", "resumed")
        (staged / BACKEND_INFO_FILE).write_bytes(b"{}")
        bundle = Bundle.load(staged)
        bundle.manifest.state = "stopped"
        bundle.save()
        self.assertIn("its guest has ended since", self.recover()[0][1])
        self.assertFalse((self.host.vms / "vm1" / BACKEND_INFO_FILE).exists())
        self.assertTrue((self.host.vms / "vm1" / "ram.img").exists())
        record = self.host.journal.get("c" * 32)
        assert record is not None
        self.assertEqual(record.outcome, "done")

    def test_resumed_before_done_is_done(self) -> None:
        """Crash after the move and resume, before DONE: the VM is in place,
        and the journal says done, not aborted."""
        staged = self.stage_vm("e" * 32, "prepared", "committed")
        os.rename(staged, self.host.vms / "vm1")
        self.host.journal.phase("e" * 32, "resumed")
        self.recover()
        record = self.host.journal.get("e" * 32)
        assert record is not None
        self.assertEqual(record.outcome, "done")
        self.assertTrue((self.host.vms / "vm1").exists())


class InDoubtArrival(SynchronousTestCase):
    """An arrival of VM ``vm1`` from ``src-a``, prepared and held in doubt
    after a restart, for RESOLVE and ASK."""

    def setUp(self) -> None:
        base = Path(self.mktemp())
        self.host = DestinationHost(base / "dst")
        self.mid = bytes.fromhex("f" * 32)
        self.host.journal.begin(
            role="destination",
            vm="vm1",
            peer="10.0.0.1:5555",
            variant="full",
            protocol="secure",
            id=self.mid.hex(),
            peer_name="src-a",
        )
        self.host.journal.phase(self.mid.hex(), "prepared")
        bundle = create_image_vm(base / "tmp", "vm1", 1)
        self.ram = bundle.image_path("ram").read_bytes()
        os.rename(bundle.path, self.host.staging / self.mid.hex())
        self.successResultOf(Deferred.fromCoroutine(self.host.recover()))

    def resolve(
        self, decision: wire.Decision, peer: str = "src-a", protocol: str = "secure"
    ) -> wire.Resolved:
        message = wire.Resolve(self.mid, decision)
        answer: wire.Resolved = self.successResultOf(
            Deferred.fromCoroutine(self.host.resolve(message, peer, protocol))
        )
        return answer


class ResolveTests(InDoubtArrival):
    """RESOLVE: the source's decision for an arrival held in doubt, accepted
    only from the peer that started it."""

    def test_committed_rolls_forward(self) -> None:
        """COMMITTED: the VM is put in place and resumed; a repeat is idempotent."""
        self.assertEqual(self.resolve(wire.Decision.COMMITTED).settled, wire.Settled.DONE)
        self.assertEqual((self.host.vms / "vm1" / "ram.img").read_bytes(), self.ram)
        self.assertEqual(list(self.host.staging.iterdir()), [])
        self.assertEqual(self.resolve(wire.Decision.COMMITTED).settled, wire.Settled.DONE)
        record = self.host.journal.get(self.mid.hex())
        assert record is not None
        self.assertEqual(record.outcome, "done")

    def test_aborted_discards(self) -> None:
        """ABORTED: staging is removed and the arrival journaled aborted."""
        self.assertEqual(self.resolve(wire.Decision.ABORTED).settled, wire.Settled.ABORTED)
        self.assertEqual(list(self.host.staging.iterdir()), [])
        self.assertFalse((self.host.vms / "vm1").exists())
        self.assertEqual(self.resolve(wire.Decision.ABORTED).settled, wire.Settled.ABORTED)

    def test_not_under_a_running_session(self) -> None:
        """While the name is locked (this migration's session still runs),
        neither decision touches the staging: FAILED, try again."""
        with storage.Lock(self.host.locks / "vm1.lock"):
            for decision in (wire.Decision.ABORTED, wire.Decision.COMMITTED):
                self.assertEqual(self.resolve(decision).settled, wire.Settled.FAILED)
        self.assertTrue((self.host.staging / self.mid.hex()).exists())
        self.assertEqual(self.resolve(wire.Decision.ABORTED).settled, wire.Settled.ABORTED)

    def test_told_why_while_discarding(self) -> None:
        """While the session's discard still waits on its hypervisor (the
        name held), RESOLVE is told so, not only "busy"; nothing is touched,
        and once the name is free the decision is carried out."""
        with storage.Lock(self.host.locks / "vm1.lock"):
            self.host.discarding.add("vm1")
            answer = self.resolve(wire.Decision.ABORTED)
            self.host.discarding.discard("vm1")
            self.assertEqual(answer.settled, wire.Settled.FAILED)
            self.assertIn("still being removed", answer.reason)
            self.assertNotIn("still being removed", self.resolve(wire.Decision.ABORTED).reason)
        self.assertTrue((self.host.staging / self.mid.hex()).exists())
        self.assertEqual(self.resolve(wire.Decision.ABORTED).settled, wire.Settled.ABORTED)

    def test_from_another_source_refused(self) -> None:
        """Another (attested) host cannot decide this migration."""
        self.assertEqual(
            self.resolve(wire.Decision.ABORTED, peer="src-b").settled, wire.Settled.REFUSED
        )
        self.assertEqual(
            self.resolve(wire.Decision.COMMITTED, protocol="insecure").settled,
            wire.Settled.REFUSED,
        )
        self.assertTrue((self.host.staging / self.mid.hex()).exists())

    def test_unknown_migration(self) -> None:
        message = wire.Resolve(b"\0" * 16, wire.Decision.COMMITTED)
        answer = self.successResultOf(
            Deferred.fromCoroutine(self.host.resolve(message, "src-a", "secure"))
        )
        self.assertEqual(answer.settled, wire.Settled.UNKNOWN)


class AskTests(InDoubtArrival):
    """ASK: what the destination holds of an arrival, for a source that
    cannot decide alone; nothing is decided or removed here."""

    def ask(
        self, peer: str = "src-a", protocol: str = "secure", mid: bytes | None = None
    ) -> wire.Resolved:
        message = wire.Ask(self.mid if mid is None else mid)
        answer: wire.Resolved = self.successResultOf(
            Deferred.fromCoroutine(self.host.resolve(message, peer, protocol))
        )
        return answer

    def test_prepared_is_held_and_kept(self) -> None:
        """Held in doubt after PREPARED: HELD (the whole guest), and the
        staging and the record stay as they were, however often asked."""
        for _ in range(2):
            self.assertEqual(self.ask().settled, wire.Settled.HELD)
        self.assertTrue((self.host.staging / self.mid.hex()).exists())
        record = self.host.journal.get(self.mid.hex())
        assert record is not None
        self.assertEqual(record.outcome, "in-doubt")
        # The source may still decide either way.
        self.assertEqual(self.resolve(wire.Decision.COMMITTED).settled, wire.Settled.DONE)

    def test_after_the_decision(self) -> None:
        """Rolled forward: DONE (the whole guest, there); discarded:
        ABORTED (nothing)."""
        self.resolve(wire.Decision.ABORTED)
        self.assertEqual(self.ask().settled, wire.Settled.ABORTED)

    def test_rolled_forward(self) -> None:
        """Once RESOLVE(committed) rolled it forward: DONE."""
        self.resolve(wire.Decision.COMMITTED)
        self.assertEqual(self.ask().settled, wire.Settled.DONE)

    def test_not_final_while_busy(self) -> None:
        """While the name is locked, or the arrival's session still runs
        (no outcome yet): FAILED, ask again -- never "nothing"."""
        with storage.Lock(self.host.locks / "vm1.lock"):
            self.assertEqual(self.ask().settled, wire.Settled.FAILED)
        other = "9" * 32
        self.host.journal.begin(
            role="destination",
            vm="vm2",
            peer="10.0.0.1:5555",
            variant="full",
            protocol="secure",
            id=other,
            peer_name="src-a",
        )
        self.host.journal.phase(other, "streaming")
        self.assertEqual(self.ask(mid=bytes.fromhex(other)).settled, wire.Settled.FAILED)

    def test_only_its_source_asks(self) -> None:
        """Another host is refused; an unknown migration is UNKNOWN."""
        self.assertEqual(self.ask(peer="src-b").settled, wire.Settled.REFUSED)
        self.assertEqual(self.ask(mid=b"\0" * 16).settled, wire.Settled.UNKNOWN)


class SettleTests(SynchronousTestCase):
    """`securemig recover`: an in-doubt arrival settled from the source's
    journal, never by guessing."""

    def setUp(self) -> None:
        from securemig.hypervisor.bundle import create_image_vm

        base = Path(self.mktemp())
        self.host = DestinationHost(base / "dst")
        self.mid = "c" * 32
        self.host.journal.begin(
            role="destination", vm="vm1", peer="p", variant="full", protocol="secure", id=self.mid
        )
        self.host.journal.phase(self.mid, "prepared")
        bundle = create_image_vm(base / "tmp", "vm1", 1)
        os.rename(bundle.path, self.host.staging / self.mid)
        # A restart: prepared staging is held in doubt.
        self.successResultOf(Deferred.fromCoroutine(self.host.recover()))
        self.source = Journal(base / "src.sqlite")
        self.local = self.source.begin(
            role="source", vm="vm1", peer="d", variant="full", protocol="secure"
        )
        self.source.set_migration_id(self.local, self.mid)

    def settle(self) -> list[tuple[str, str]]:
        from twisted.internet.defer import Deferred

        result: list[tuple[str, str]] = self.successResultOf(
            Deferred.fromCoroutine(self.host.settle(self.source))
        )
        return result

    def test_source_committed(self) -> None:
        """The source journaled COMMITTED: the VM is put in place here."""
        self.source.phase(self.local, "committed")
        self.source.finish(self.local, "in-doubt", error="CONNECTION_LOST")
        self.assertIn("resumed here", self.settle()[0][1])
        self.assertTrue((self.host.vms / "vm1" / "ram.img").exists())
        self.assertFalse((self.host.staging / self.mid).exists())
        self.assertEqual(self.host.journal.get(self.mid).outcome, "done")  # type: ignore

    def test_source_did_not_commit(self) -> None:
        """The source ended without committing: its VM is still there; discard."""
        self.source.finish(self.local, "aborted", error="CONNECTION_LOST")
        self.assertIn("discarded", self.settle()[0][1])
        self.assertFalse((self.host.staging / self.mid).exists())
        self.assertFalse((self.host.vms / "vm1").exists())

    def test_source_undecided(self) -> None:
        """No outcome and no commit at the source yet: nothing is done."""
        self.assertIn("not decided", self.settle()[0][1])
        self.assertTrue((self.host.staging / self.mid).exists())

    def test_unknown_to_source(self) -> None:
        other = Journal(Path(self.mktemp()))
        self.source = other
        self.assertIn("unknown", self.settle()[0][1])
        self.assertTrue((self.host.staging / self.mid).exists())

    def test_busy_name_left_alone(self) -> None:
        """While something holds the VM's name here, nothing is moved."""
        self.source.phase(self.local, "committed")
        with storage.Lock(self.host.locks / "vm1.lock"):
            self.assertIn("busy", self.settle()[0][1])
        self.assertTrue((self.host.staging / self.mid).exists())


class LeftoverTests(TestCase):
    """Staging an aborted arrival's discard could not remove (its
    hypervisor failed then): the daemon's recheck removes it."""

    async def test_removed_once_the_name_is_free(self) -> None:
        """An arrival journaled aborted whose staging is still there: left
        alone while its VM's name is held (a session of it runs), removed
        by the next recheck once the name is free; other staging (in doubt)
        is never touched."""
        host = DestinationHost(Path(self.mktemp()))
        staged = {}
        for mid, outcome in (("a" * 32, "aborted"), ("b" * 32, "in-doubt")):
            host.journal.begin(
                role="destination", vm="vm1", peer="p", variant="full", protocol="insecure", id=mid
            )
            host.journal.phase(mid, "prepared")
            host.journal.finish(mid, outcome)
            staged[outcome] = host.staging / mid
            staged[outcome].mkdir()
            (staged[outcome] / "ram.img").write_bytes(b"x")
        with storage.Lock(host.locks / "vm1.lock"):
            self.assertEqual(await host.recheck_held(), [])
            self.assertTrue(staged["aborted"].exists())
        actions = await host.recheck_held()
        self.assertEqual([mid for mid, _ in actions], ["a" * 32])
        self.assertFalse(staged["aborted"].exists())
        self.assertTrue(staged["in-doubt"].exists())

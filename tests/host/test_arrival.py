"""The arrival's key operations (securemig.host.arrival): what the
destination's shell asks of it, through host/contract.py, between the
wrapped key's arrival and PREPARED.  Real files and journal; the secure
variant's unwrapping in the host TPM is covered by tests/transport/test_secure.py."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from securemig.host.arrival import Arrival, DestinationHost
from securemig.host.contract import VtpmKey
from securemig.protocol import wire
from securemig.protocol.errors import ErrorCode, ProtocolError
from securemig.trust.keyrelease import KeyTransferError

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

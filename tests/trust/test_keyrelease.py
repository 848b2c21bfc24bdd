"""Key release: the source's checks of the offered migration key, wrapping,
and unwrapping inside the destination's TPM, with a real swtpm."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from securemig.protocol import wire
from securemig.protocol.destination import DestinationSession
from securemig.protocol.errors import ErrorCode
from securemig.transport.control import failure_to_error
from securemig.trust import keyrelease as secure
from securemig.trust.keyrelease import DestinationSecurity, KeyTransferError, MigrationKey
from securemig.trust.tpm.tpm import TPMError
from tests.support.tpm import shared_tpm

PCRS = (0, 7, 16)
MID = b"M" * 16


class KeyReleaseTests(SynchronousTestCase):
    def setUp(self) -> None:
        _, self.tpm, _ = shared_tpm()
        self.ak = self.tpm.create_ak()
        self.values = self.tpm.pcr_read(PCRS)
        self.key = MigrationKey(self.tpm, PCRS)
        self.qualifying = os.urandom(32)
        self.offer = self.key.offer(self.ak, self.qualifying)

    def check(self, **overrides: object) -> object:
        args: dict[str, object] = dict(
            offer=self.offer,
            peer_ak=self.ak.public,
            qualifying=self.qualifying,
            pcrs=PCRS,
            peer_values=self.values,
        )
        args.update(overrides)
        return secure.check_offer(**args)  # type: ignore[arg-type]

    def assertRefused(self, text: str, **overrides: object) -> None:
        with self.assertRaises(KeyTransferError) as cm:
            self.check(**overrides)
        self.assertIn(text, str(cm.exception))

    def test_round_trip(self) -> None:
        """Wrapped to the certified key, the secret opens only in that TPM."""
        public = self.check()
        wrapped = secure.wrap(public, b"vtpm key 32 bytes long.........", MID)  # type: ignore
        self.assertEqual(self.key.unwrap(wrapped, MID), b"vtpm key 32 bytes long.........")

    def test_not_certified_by_the_attested_ak(self) -> None:
        """A key certified by another AK than the one just attested."""
        self.assertRefused("not certified by the attested AK", peer_ak=self.tpm.create_ak().public)

    def test_certification_from_another_session(self) -> None:
        self.assertRefused("not certified by the attested AK", qualifying=os.urandom(32))

    def test_other_key_than_certified(self) -> None:
        """A genuine certification, but presented with another key."""
        other = MigrationKey(self.tpm, PCRS)
        offer = wire.KeyOffer(other.blob.public, self.offer.attest, self.offer.signature)
        self.assertRefused("not certified by the attested AK", offer=offer)

    def test_key_bound_to_other_pcr_state(self) -> None:
        """The offered key's policy is not the PCR state just attested."""
        values = dict(self.values)
        values[16] = bytes(32) if values[16] != bytes(32) else b"\x01" * 32
        self.assertRefused("not bound to the attested PCR state", peer_values=values)

    def test_wrapped_for_another_migration(self) -> None:
        """A wrapped key replayed into another migration does not open."""
        wrapped = secure.wrap(self.check(), b"secret", MID)  # type: ignore[arg-type]
        with self.assertRaises(KeyTransferError):
            self.key.unwrap(wrapped, b"N" * 16)

    def test_wrapped_key_tampered(self) -> None:
        wrapped = secure.wrap(self.check(), b"secret", MID)  # type: ignore[arg-type]
        bad = wire.WrappedKey(
            wrapped.ephemeral,
            wrapped.nonce,
            bytes([wrapped.ciphertext[0] ^ 1]) + wrapped.ciphertext[1:],
        )
        with self.assertRaises(KeyTransferError):
            self.key.unwrap(bad, MID)

    def test_unwrap_after_pcr_change(self) -> None:
        """Once the destination's PCRs change, its TPM refuses to unwrap."""
        wrapped = secure.wrap(self.check(), b"secret", MID)  # type: ignore[arg-type]
        self.tpm.pcr_extend(16, b"changed after attestation")
        with self.assertRaises(TPMError):
            self.key.unwrap(wrapped, MID)

    def test_policy_refusal_reaches_the_peer_with_its_code(self) -> None:
        """A PCR moved between attestation and unwrap: the TPM's policy
        refusal is KEY_TRANSFER_FAILED in the ABORT the peer gets, never
        INTERNAL (which the protocol reserves for bugs)."""
        wrapped = secure.wrap(self.check(), b"k" * 32, MID)  # type: ignore[arg-type]
        self.tpm.pcr_extend(16, b"changed after attestation")
        security = DestinationSecurity(attestor=None, key=self.key)  # type: ignore[arg-type]
        with self.assertRaises(KeyTransferError) as cm:
            security.unwrap(wrapped, MID)
        error = failure_to_error(cm.exception, "Prepare")
        self.assertEqual(error.code, ErrorCode.KEY_TRANSFER_FAILED)
        self.assertIn("policy", error.reason)
        session = DestinationSession()
        abort = session.fail(error.code, error.reason)[0]
        self.assertEqual(abort.message.code, ErrorCode.KEY_TRANSFER_FAILED)  # type: ignore[union-attr]

    def test_key_usable_without_the_policy(self) -> None:
        """A genuinely certified key that the TPM would use with a plain
        password (userWithAuth), not only under the PCR policy, is refused."""
        from tpm2_pytss import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE
        from tpm2_pytss.constants import TPMA_OBJECT

        from securemig.trust.tpm.tpm import KeyBlob, pcr_policy_digest

        public = TPM2B_PUBLIC.parse(
            "ecc256:ecdh-sha256",
            objectAttributes=TPMA_OBJECT.FIXEDTPM
            | TPMA_OBJECT.FIXEDPARENT
            | TPMA_OBJECT.SENSITIVEDATAORIGIN
            | TPMA_OBJECT.DECRYPT
            | TPMA_OBJECT.USERWITHAUTH,
        )
        public.publicArea.authPolicy = pcr_policy_digest(PCRS, self.values)
        with self.tpm._srk() as srk:
            private, out, *_ = self.tpm.esapi.create(srk, TPM2B_SENSITIVE_CREATE(), public)
        loose = KeyBlob(bytes(private.marshal()), bytes(out.marshal()))
        certified = self.tpm.certify(loose, self.ak, self.qualifying)
        offer = wire.KeyOffer(loose.public, certified.attest, certified.signature)
        self.assertRefused("attributes are wrong", offer=offer)


class VTPMIdentityTests(SynchronousTestCase):
    """The destination's check that the vTPM which arrived is the announced one."""

    def setUp(self) -> None:
        from pathlib import Path

        from securemig.trust import vtpm

        _, _, tpm_base = shared_tpm()
        self.staging = Path(self.mktemp())
        self.staging.mkdir()
        self.key = os.urandom(32)
        self.identity = vtpm.create(self.staging, self.key, tpm_base / "ca")

    def test_announced_vtpm(self) -> None:
        got = DestinationSecurity.check_vtpm(self.staging, self.key, bytes.fromhex(self.identity))
        self.assertEqual(got, self.identity)

    def _ek_digests(self) -> tuple[str, str]:
        """SHA-256 of the vTPM's ECC and RSA EK public areas, recreated here
        from a copy of its state (tpm2-pytss, apart from the code checked)."""
        import hashlib
        import shutil
        from pathlib import Path

        from securemig.trust import vtpm
        from securemig.trust.tpm import swtpm
        from securemig.trust.tpm.tpm import TPM

        copy = Path(self.mktemp())
        shutil.copytree(self.staging / vtpm.STATE_DIR, copy)
        process = swtpm.start(copy, self.key, dies_with_parent=True)
        try:
            with TPM(process.tcti) as tpm:
                tpm.startup()
                return (
                    hashlib.sha256(tpm.ek_public("ecc")).hexdigest(),
                    hashlib.sha256(tpm.ek_public("rsa")).hexdigest(),
                )
        finally:
            process.stop()

    def test_identity_is_the_ecc_ek(self) -> None:
        """A vTPM's identity is the digest of its ECC P-256 EK (fast to
        recreate on a live arrival's switchover path), and a bundle that
        announces its RSA EK's digest (made before) still passes as itself;
        neither digest of another vTPM does."""
        ecc, rsa = self._ek_digests()
        self.assertEqual(self.identity, ecc)
        self.assertNotEqual(ecc, rsa)
        got = DestinationSecurity.check_vtpm(self.staging, self.key, bytes.fromhex(rsa))
        self.assertEqual(got, rsa)
        with self.assertRaises(KeyTransferError):
            DestinationSecurity.check_vtpm(self.staging, self.key, bytes.fromhex(rsa)[::-1])

    def test_other_identity(self) -> None:
        """A state that opens but is another vTPM (another EK) is refused."""
        with self.assertRaises(KeyTransferError) as cm:
            DestinationSecurity.check_vtpm(self.staging, self.key, os.urandom(32))
        self.assertIn("not the one announced", str(cm.exception))

    def test_wrong_key(self) -> None:
        with self.assertRaises(KeyTransferError):
            DestinationSecurity.check_vtpm(
                self.staging, os.urandom(32), bytes.fromhex(self.identity)
            )

    def test_state_without_identity(self) -> None:
        with self.assertRaises(KeyTransferError) as cm:
            DestinationSecurity.check_vtpm(self.staging, self.key, b"")
        self.assertIn("without its identity", str(cm.exception))

    def test_identity_without_state(self) -> None:
        from pathlib import Path

        empty = Path(self.mktemp())
        empty.mkdir()
        with self.assertRaises(KeyTransferError) as cm:
            DestinationSecurity.check_vtpm(empty, self.key, bytes.fromhex(self.identity))
        self.assertIn("without its state", str(cm.exception))

    def test_started_ahead(self) -> None:
        """The check's swtpm started before the state is there (a live
        arrival's, during the stream) reads it when asked: the announced
        vTPM passes, another EK or a wrong key is refused, and each time the
        swtpm ends and its scratch copy goes (outside the staging it
        checked)."""
        from pathlib import Path

        from securemig.trust import vtpm

        scratch = Path(self.mktemp())
        scratch.mkdir()

        def ahead(key: bytes) -> vtpm.IdentityCheck:
            check = vtpm.IdentityCheck(key, scratch)
            self.assertEqual(list(check.scratch.glob("state/*.permall")), [])
            return check

        check = ahead(self.key)
        got = DestinationSecurity.check_vtpm(
            self.staging, self.key, bytes.fromhex(self.identity), scratch, check
        )
        self.assertEqual(got, self.identity)
        self.assertIsNotNone(check.process.process.poll())
        for key, expected in ((self.key, os.urandom(32)), (os.urandom(32), b"")):
            check = ahead(key)
            with self.assertRaises(KeyTransferError):
                DestinationSecurity.check_vtpm(
                    self.staging, key, expected or bytes.fromhex(self.identity), scratch, check
                )
            self.assertIsNotNone(check.process.process.poll())
        self.assertEqual(list(scratch.iterdir()), [])

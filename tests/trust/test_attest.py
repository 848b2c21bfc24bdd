"""The quote verifier against real swtpm quotes: one valid quote, then
exactly one thing broken per test, each refused by its own named check.

Structural checks behind the signature (magic, type, clock) cannot be
reached with a genuine TPM, which never signs such structures; those tests
re-sign the broken structure with a *software* key dressed as an AK (its
public area has every AK attribute), standing in for a lying signer.
"""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss import TPMS_ATTEST
from tpm2_pytss.constants import TPM2_ALG, TPM2_ST, TPMA_OBJECT
from twisted.trial.unittest import SynchronousTestCase

from securemig.trust import attest
from securemig.trust.attest import AttestationError, Check, ClockState
from securemig.trust.pki import Authority
from securemig.trust.tpm.tpm import AK_ATTRIBUTES, KeyBlob, TPMError, pcr_selection
from tests.support.tpm import shared_tpm
from tests.support.trust import Forger

PCRS = [0, 1, 2, 3, 7, 16]


class QuoteTests(SynchronousTestCase):
    """Each check of verify_quote refuses exactly what it exists to refuse."""

    def setUp(self) -> None:
        _, self.tpm, _ = shared_tpm()
        self.ak = self.tpm.create_ak()
        self.nonce = os.urandom(32)
        self.quote = self.tpm.quote(self.ak, PCRS, self.nonce)
        self.values = self.tpm.pcr_read(PCRS)

    def verify(self, **overrides: object) -> ClockState:
        args: dict[str, object] = dict(
            ak_public=self.ak.public,
            attest=self.quote.attest,
            signature=self.quote.signature,
            qualifying=self.nonce,
            pcrs=PCRS,
            values=self.values,
        )
        args.update(overrides)
        return attest.verify_quote(**args)  # type: ignore[arg-type]

    def assertRefused(self, check: Check, **overrides: object) -> AttestationError:
        with self.assertRaises(AttestationError) as cm:
            self.verify(**overrides)
        self.assertEqual(cm.exception.check, check, str(cm.exception))
        return cm.exception

    def forged(self, mutate: object) -> dict[str, object]:
        """The genuine quote structure, mutated, signed by a software 'AK'."""
        parsed, _ = TPMS_ATTEST.unmarshal(self.quote.attest)
        mutate(parsed)  # type: ignore[operator]
        raw = bytes(parsed.marshal())
        forger = Forger.create()
        return dict(ak_public=forger.public, attest=raw, signature=forger.sign(raw))

    def test_valid(self) -> None:
        """The genuine quote verifies and reports the TPM's clock state."""
        state = self.verify(golden=dict(self.values))
        self.assertGreaterEqual(state.reset_count, 0)

    def test_forger_itself_is_accepted_when_honest(self) -> None:
        """The software signer used below passes when it changes nothing, so
        each refusal below is caused by its one mutation."""
        self.verify(**self.forged(lambda parsed: None))

    def test_signature_byte(self) -> None:
        sig = bytearray(self.quote.signature)
        sig[-1] ^= 1
        self.assertRefused(Check.SIGNATURE, signature=bytes(sig))

    def test_attest_byte(self) -> None:
        """Any change to the signed structure breaks the signature."""
        raw = bytearray(self.quote.attest)
        raw[-1] ^= 1
        self.assertRefused(Check.SIGNATURE, attest=bytes(raw))

    def test_other_ak(self) -> None:
        """A quote verified with another AK of the same TPM is refused."""
        self.assertRefused(Check.SIGNATURE, ak_public=self.tpm.create_ak().public)

    def test_nonce(self) -> None:
        """A quote for another nonce (replayed from another session)."""
        error = self.assertRefused(Check.QUALIFYING_DATA, qualifying=os.urandom(32))
        self.assertNotIn(self.nonce.hex(), str(error))

    def test_magic(self) -> None:
        def mutate(parsed: TPMS_ATTEST) -> None:
            parsed.magic = 0x12345678

        self.assertRefused(Check.MAGIC, **self.forged(mutate))

    def test_type(self) -> None:
        def mutate(parsed: TPMS_ATTEST) -> None:
            parsed.type = TPM2_ST.ATTEST_TIME

        self.assertRefused(Check.TYPE, **self.forged(mutate))

    def test_fewer_pcrs(self) -> None:
        """A genuine quote over fewer PCRs than requested."""
        partial = self.tpm.quote(self.ak, PCRS[:-1], self.nonce)
        self.assertRefused(Check.PCR_SELECTION, attest=partial.attest, signature=partial.signature)

    def test_reported_pcr_value(self) -> None:
        """A reported PCR value that is not the one quoted."""
        values = dict(self.values)
        values[16] = hashlib.sha256(b"lie").digest()
        self.assertRefused(Check.PCR_DIGEST, values=values)

    def test_missing_pcr_value(self) -> None:
        values = dict(self.values)
        del values[16]
        self.assertRefused(Check.PCR_DIGEST, values=values)

    def test_ak_without_scheme(self) -> None:
        """An AK whose public area fixes no signing scheme (no genuine
        restricted signing key has none) is refused before its signature
        is looked at."""
        forger = Forger.create(scheme=TPM2_ALG.NULL)
        with self.assertRaises(attest.AttestationError) as cm:
            self.verify(ak_public=forger.public, signature=forger.sign(self.quote.attest))
        self.assertEqual(cm.exception.check, Check.HASH_ALGORITHM)
        self.assertIn("signing scheme is NULL", cm.exception.detail)

    def test_hash_algorithm(self) -> None:
        """A signature claiming another hash algorithm is refused as such."""
        forger = Forger.create()
        self.assertRefused(
            Check.HASH_ALGORITHM,
            ak_public=forger.public,
            signature=forger.sign(self.quote.attest, TPM2_ALG.SHA1),
        )

    def test_golden_values(self) -> None:
        """Values that differ from the recorded golden values."""
        golden = dict(self.values)
        golden[7] = hashlib.sha256(b"expected").digest()
        error = self.assertRefused(Check.GOLDEN_VALUES, golden=golden)
        self.assertIn("[7]", str(error))
        self.assertNotIn(golden[7].hex(), str(error))

    def test_pcr_extended_after_recording(self) -> None:
        """Golden values recorded, then a PCR extended on the host: refused."""
        golden = dict(self.values)
        self.tpm.pcr_extend(16, b"a new measurement")
        values = self.tpm.pcr_read(PCRS)
        quote = self.tpm.quote(self.ak, PCRS, self.nonce)
        self.assertRefused(
            Check.GOLDEN_VALUES,
            attest=quote.attest,
            signature=quote.signature,
            values=values,
            golden=golden,
        )

    def test_clock_not_safe(self) -> None:
        def mutate(parsed: TPMS_ATTEST) -> None:
            parsed.clockInfo.safe = 0

        self.assertRefused(Check.CLOCK, **self.forged(mutate))

    def test_reset_count_backwards(self) -> None:
        """A quote older than one already seen from this TPM (a replay)."""
        state = self.verify()
        later = ClockState(state.reset_count + 1, 0)
        self.assertRefused(Check.CLOCK, previous=later)

    def test_ak_attributes(self) -> None:
        """A signing key that is not restricted cannot be an AK."""
        loose = int(AK_ATTRIBUTES & ~TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.USERWITHAUTH)
        forger = Forger.create(attributes=loose)
        self.assertRefused(
            Check.AK_ATTRIBUTES, ak_public=forger.public, signature=forger.sign(self.quote.attest)
        )

    def test_garbage_ak(self) -> None:
        self.assertRefused(Check.AK_ATTRIBUTES, ak_public=b"\x00\x01garbage")

    def test_ak_name(self) -> None:
        """The name the verifier keys an AK's counters by is the TPM's own
        (nameAlg SHA-256 || digest), computed from the public area."""
        name = attest.ak_name(self.ak.public)
        self.assertEqual(name, self.ak.name)
        self.assertEqual((name[:2], len(name)), (b"\x00\x0b", 34))
        self.assertNotEqual(name, attest.ak_name(self.tpm.create_ak().public))

    def test_ak_name_of_a_non_ak_refused(self) -> None:
        """No name (so no clock history) for a key that is not an AK."""
        loose = int(AK_ATTRIBUTES & ~TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.USERWITHAUTH)
        with self.assertRaises(AttestationError) as cm:
            attest.ak_name(Forger.create(attributes=loose).public)
        self.assertEqual(cm.exception.check, Check.AK_ATTRIBUTES)


class CertificationTests(SynchronousTestCase):
    """TPM2_Certify of a migration key by the AK."""

    def setUp(self) -> None:
        _, self.tpm, _ = shared_tpm()
        self.ak = self.tpm.create_ak()
        values = self.tpm.pcr_read([16])
        self.key = self.tpm.create_migration_key([16], values)
        self.nonce = os.urandom(16)
        self.cert = self.tpm.certify(self.key, self.ak, self.nonce)

    def test_valid(self) -> None:
        attest.verify_certification(
            self.ak.public,
            self.cert.attest,
            self.cert.signature,
            qualifying=self.nonce,
            name=self.key.name,
        )

    def test_other_key(self) -> None:
        """The certification of one key does not vouch for another."""
        other = self.tpm.create_migration_key([16], self.tpm.pcr_read([16]))
        with self.assertRaises(AttestationError) as cm:
            attest.verify_certification(
                self.ak.public,
                self.cert.attest,
                self.cert.signature,
                qualifying=self.nonce,
                name=other.name,
            )
        self.assertEqual(cm.exception.check, Check.CERTIFIED_NAME)

    def test_quote_is_not_a_certification(self) -> None:
        quote = self.tpm.quote(self.ak, [16], self.nonce)
        with self.assertRaises(AttestationError) as cm:
            attest.verify_certification(
                self.ak.public,
                quote.attest,
                quote.signature,
                qualifying=self.nonce,
                name=self.key.name,
            )
        self.assertEqual(cm.exception.check, Check.TYPE)

    def test_other_ak(self) -> None:
        """A key certified by an AK other than the attested one."""
        with self.assertRaises(AttestationError) as cm:
            attest.verify_certification(
                self.tpm.create_ak().public,
                self.cert.attest,
                self.cert.signature,
                qualifying=self.nonce,
                name=self.key.name,
            )
        self.assertEqual(cm.exception.check, Check.SIGNATURE)


class AKCertificateTests(SynchronousTestCase):
    """AK certificates: issued by the privacy CA, valid, this AK, this host."""

    def setUp(self) -> None:
        _, tpm, _ = shared_tpm()
        self.ak: KeyBlob = tpm.create_ak()
        self.pca = Authority.create("test privacy CA")
        self.key = attest.check_ak(self.ak.public)

    def cert(self, authority: Authority | None = None, host: str = "host-a", **kw: object) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding

        issued = (authority or self.pca).issue(self.key, host, tls=False, **kw)  # type: ignore
        return issued.public_bytes(Encoding.DER)

    def assertRefused(self, check: Check, cert: bytes, host: str = "host-a") -> None:
        with self.assertRaises(AttestationError) as cm:
            attest.verify_ak_certificate(cert, self.pca.cert, self.ak.public, host)
        self.assertEqual(cm.exception.check, check)

    def test_valid(self) -> None:
        attest.verify_ak_certificate(self.cert(), self.pca.cert, self.ak.public, "host-a")

    def test_other_host(self) -> None:
        """The certificate of host-a cannot vouch for host-b (a relay)."""
        self.assertRefused(Check.HOST_NAME, self.cert(), host="host-b")

    def test_other_ca(self) -> None:
        self.assertRefused(Check.AK_CERTIFICATE, self.cert(Authority.create("rogue")))

    def test_expired(self) -> None:
        past = datetime.now(UTC) - timedelta(days=30)
        self.assertRefused(Check.AK_CERTIFICATE, self.cert(not_before=past, days=1))

    def test_other_key(self) -> None:
        """A certificate for another AK."""
        _, tpm, _ = shared_tpm()
        other = attest.check_ak(tpm.create_ak().public)
        from cryptography.hazmat.primitives.serialization import Encoding

        cert = self.pca.issue(other, "host-a", tls=False).public_bytes(Encoding.DER)
        self.assertRefused(Check.AK_CERTIFICATE, cert)


class PCRPolicyTests(SynchronousTestCase):
    """Keys bound to PCR state stop working when the state changes."""

    def test_sealed_secret_after_pcr_change(self) -> None:
        _, tpm, _ = shared_tpm()
        values = tpm.pcr_read([23])
        blob = tpm.seal(b"vtpm state key", [23], values)
        self.assertEqual(tpm.unseal(blob, [23]), b"vtpm state key")
        tpm.pcr_extend(23, b"changed")
        error = self.assertRaises(TPMError, tpm.unseal, blob, [23])
        self.assertIn("policy", str(error))

    def test_migration_key_under_other_pcr_state(self) -> None:
        _, tpm, _ = shared_tpm()
        values = tpm.pcr_read([23])
        key = tpm.create_migration_key([23], values)
        peer = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
        point = (peer.x.to_bytes(32, "big"), peer.y.to_bytes(32, "big"))
        self.assertEqual(len(tpm.ecdh_zgen(key, [23], point)), 32)
        tpm.pcr_extend(23, b"changed")
        error = self.assertRaises(TPMError, tpm.ecdh_zgen, key, [23], point)
        self.assertIn("policy", str(error))

    def test_software_policy_digest_matches_tpm(self) -> None:
        """The policy digest computed here is the one the TPM enforces."""
        from securemig.trust.tpm.tpm import pcr_policy_digest

        _, tpm, _ = shared_tpm()
        values = tpm.pcr_read([16, 23])
        with tpm._policy_session(trial=True) as session:
            tpm.esapi.policy_pcr(session, b"", pcr_selection([16, 23]))
            digest = bytes(tpm.esapi.policy_get_digest(session))
        self.assertEqual(digest, pcr_policy_digest([16, 23], values))


class MalformedStructureTests(SynchronousTestCase):
    def test_code_appears_once(self) -> None:
        """A structure that does not parse is one ATTESTATION_FAILED naming
        the check, not ``ATTESTATION_FAILED: ...: MALFORMED: ...`` (issue 24)."""
        from securemig.protocol.errors import ErrorCode, ProtocolError

        with self.assertRaises(AttestationError) as caught:
            attest.check_ak(b"\x00\x05junk")
        error = caught.exception
        self.assertEqual(error.code, ErrorCode.ATTESTATION_FAILED)
        said = str(ProtocolError(error.code, error.reason))
        self.assertTrue(said.startswith("ATTESTATION_FAILED: "), said)
        self.assertNotIn("MALFORMED", said)
        self.assertEqual(said.count("ATTESTATION_FAILED"), 1, said)

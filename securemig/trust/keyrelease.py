"""
The secure variant's host side: evidence, its verification, key release.

What the session machines ask for (``Attest``, ``VerifyPeer``, ``OfferKey``,
``WrapKey``, ``AcceptKey``) is done here, with the host's TPM, identity and
golden values.  Every quote and certification is bound to this TLS session:
its qualifying data is ``SHA-256(label || exporter || role || nonce ||
migration id)``, so evidence relayed from another host or replayed from
another session does not verify.

Key release: the destination's *migration key* is an ECC P-256 decryption
key in its TPM, fixedTPM, usable only under a PCR policy equal to the state
it was created in (which it must prove in its quote).  The source checks the
key's TPM2_Certify by the attested AK, its attributes and that its policy
is exactly PolicyPCR over the values the destination just quoted, then
wraps the vTPM key to it: ECDH with an ephemeral key, HKDF-SHA256 with the
migration id as salt, AES-256-GCM with the migration id as associated data.
Only that TPM, in that state, can unwrap it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from tpm2_pytss import TPM2B_PUBLIC
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPMA_OBJECT

from securemig.protocol import wire
from securemig.protocol.errors import ErrorCode, ProtocolError, Refused
from securemig.trust import attest, vtpm
from securemig.trust.attest import AttestationError
from securemig.trust.attestor import Attestor
from securemig.trust.tpm.tpm import (
    TPM,
    KeyBlob,
    Malformed,
    TPMError,
    pcr_policy_digest,
    unmarshal_exact,
)

QUALIFYING_LABEL = b"securemig-attestation-v1"
#: The role under which the migration key's certification is bound.
MIGRATION_KEY_ROLE = "migration-key"
WRAP_INFO = b"securemig vtpm key wrap v1"


class KeyTransferError(Refused):
    """The offered migration key, or a wrapped key, was refused."""

    default_code = ErrorCode.KEY_TRANSFER_FAILED


def qualifying_data(exporter: bytes, role: str, nonce: bytes, migration_id: bytes) -> bytes:
    """What a quote (or certification) must carry as extraData."""
    return hashlib.sha256(
        QUALIFYING_LABEL + exporter + role.encode() + b"\0" + nonce + migration_id
    ).digest()


@dataclass
class SourceSecurity:
    """What a secure source needs: its attestor, the VM's vTPM key (unsealed
    for this migration only), the vTPM's identity (SHA-256 of its EK public
    area, hex; None for a VM without a vTPM state) and the name the
    destination must prove."""

    attestor: Attestor
    secret: bytes
    destination_name: str
    vtpm_identity: str | None = None

    def key_material(self) -> bytes:
        """What is wrapped: the key, then the vTPM identity the destination
        must find when it opens the state with it."""
        identity = bytes.fromhex(self.vtpm_identity) if self.vtpm_identity else b""
        return self.secret + identity


@dataclass
class DestinationSecurity:
    """What a secure destination needs: its attestor and migration key."""

    attestor: Attestor
    key: MigrationKey
    #: Source names allowed to migrate here (None: any the site CA certified).
    allowed_sources: frozenset[str] | None = None

    def check_source(self, name: str) -> None:
        """Refuse a source whose (TLS-verified) name is not allowed."""
        if self.allowed_sources is not None and name not in self.allowed_sources:
            raise ProtocolError(
                ErrorCode.POLICY_REFUSED, f"source {name} is not allowed to migrate here"
            )

    def unwrap(self, wrapped: wire.WrappedKey, migration_id: bytes) -> tuple[bytes, bytes]:
        """The vTPM key and the identity the source announced (host TPM: call
        from the thread that owns it)."""
        try:
            material = self.key.unwrap(wrapped, migration_id)
        except TPMError as e:
            # E.g. a policy check failed: a PCR moved since the attestation.
            raise KeyTransferError(f"unwrapping the vTPM key: {e}") from None
        return material[:32], material[32:]

    @staticmethod
    def check_vtpm(
        staging: Path,
        secret: bytes,
        expected: bytes,
        scratch_in: Path | None = None,
        ahead: vtpm.IdentityCheck | None = None,
    ) -> str | None:
        """If a vTPM state arrived, check it opens with the key and is the
        announced vTPM; returns its identity.  Uses only the vTPM's own swtpm,
        so it may run off the reactor thread; its scratch copy goes in
        ``scratch_in`` (default: beside the state); ``ahead``: that swtpm,
        started before the state arrived (ended here either way)."""
        state = staging / vtpm.STATE_DIR
        if (not expected or not state.exists()) and ahead is not None:
            ahead.close()
        if not expected:
            if state.exists():
                raise KeyTransferError("a vTPM state arrived without its identity")
            return None
        if not state.exists():
            raise KeyTransferError("the vTPM's identity arrived without its state")
        try:
            identity = vtpm.identity(state, secret, scratch_in, ahead, expected.hex())
        except vtpm.VTPMError as e:
            raise KeyTransferError(str(e)) from None
        if not hmac.compare_digest(identity, expected.hex()):
            raise KeyTransferError("the vTPM that arrived is not the one announced (EK differs)")
        return identity


class MigrationKey:
    """The destination's migration key, created once (at start) for the PCR
    state of the host, and certified per session."""

    def __init__(self, tpm: TPM, pcrs: tuple[int, ...]) -> None:
        self.tpm = tpm
        self.pcrs = pcrs
        self.values = tpm.pcr_read(pcrs)
        self.blob: KeyBlob = tpm.create_migration_key(pcrs, self.values)

    def offer(self, ak: KeyBlob, qualifying: bytes) -> wire.KeyOffer:
        """The key's public area, certified by ``ak`` for this session.  If
        the PCRs changed since the key was made, a new key is made for the
        state the host has (and just quoted): the source would refuse a key
        bound to another state anyway."""
        try:
            values = self.tpm.pcr_read(self.pcrs)
            if values != self.values:
                self.values = values
                self.blob = self.tpm.create_migration_key(self.pcrs, values)
            certified = self.tpm.certify(self.blob, ak, qualifying)
        except TPMError as e:
            raise KeyTransferError(f"certifying the migration key: {e}") from None
        return wire.KeyOffer(self.blob.public, certified.attest, certified.signature)

    def unwrap(self, wrapped: wire.WrappedKey, migration_id: bytes) -> bytes:
        """Recover the vTPM key: ECDH inside the TPM (under its PCR policy)."""
        point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), wrapped.ephemeral)
        numbers = point.public_numbers()
        shared = self.tpm.ecdh_zgen(
            self.blob, self.pcrs, (numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big"))
        )
        try:
            return AESGCM(_kek(shared, migration_id)).decrypt(
                wrapped.nonce, wrapped.ciphertext, migration_id
            )
        except Exception:
            raise KeyTransferError(
                "the wrapped vTPM key does not open here (wrapped for another migration?)"
            ) from None


def _kek(shared: bytes, migration_id: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=migration_id, info=WRAP_INFO).derive(
        shared
    )


def check_offer(
    offer: wire.KeyOffer,
    peer_ak: bytes,
    qualifying: bytes,
    pcrs: tuple[int, ...],
    peer_values: dict[int, bytes],
) -> ec.EllipticCurvePublicKey:
    """The source's checks of an offered migration key; returns its public key."""
    try:
        public = unmarshal_exact(TPM2B_PUBLIC, offer.public, "the migration key")
    except Malformed as e:
        raise KeyTransferError(str(e)) from None
    try:
        attest.verify_certification(
            peer_ak,
            offer.attest,
            offer.signature,
            qualifying=qualifying,
            name=bytes(public.get_name()),
        )
    except AttestationError as e:
        raise KeyTransferError(f"migration key not certified by the attested AK: {e}") from None
    area = public.publicArea
    attributes = int(area.objectAttributes)
    required = int(TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.DECRYPT)
    if attributes & required != required or attributes & int(TPMA_OBJECT.USERWITHAUTH):
        raise KeyTransferError(
            "migration key attributes are wrong "
            "(needs fixedTPM, fixedParent, decrypt, policy-only use)"
        )
    if area.type != TPM2_ALG.ECC or area.parameters.eccDetail.curveID != TPM2_ECC.NIST_P256:
        raise KeyTransferError("migration key must be ECC P-256")
    if not hmac.compare_digest(bytes(area.authPolicy), pcr_policy_digest(pcrs, peer_values)):
        raise KeyTransferError("migration key is not bound to the attested PCR state")
    key = serialization.load_der_public_key(bytes(area.to_der()))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def wrap(key: ec.EllipticCurvePublicKey, secret: bytes, migration_id: bytes) -> wire.WrappedKey:
    """Wrap ``secret`` to the migration key (see the module docstring)."""
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    shared = ephemeral.exchange(ec.ECDH(), key)
    nonce = os.urandom(12)
    ciphertext = AESGCM(_kek(shared, migration_id)).encrypt(nonce, secret, migration_id)
    point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return wire.WrappedKey(point, nonce, ciphertext)

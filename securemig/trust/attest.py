"""
Verifying what a peer's TPM says: quotes, key certifications, AK certificates.

Everything here fails closed.  Each check that can refuse has its own name
(:class:`Check`), so a refusal says exactly what failed, and its message
never contains the value that was expected (a nonce, golden PCR values).
The checklist, in the order applied to a quote:

1. the AK's public area: restricted signing key with fixedTPM, fixedParent
   and sensitiveDataOrigin, ECC P-256 or RSA-2048 (``AK_ATTRIBUTES``), name
   algorithm SHA-256, and a signing scheme of :data:`AK_SCHEMES` with
   SHA-256 (the privacy CA certifies no other: :func:`check_ak`);
2. the signature scheme and hash are pinned (ECDSA, or RSASSA or RSASSA-PSS,
   with SHA-256, and the AK's own scheme), then the signature is verified
   over the attestation structure;
3. ``magic`` is TPM_GENERATED_VALUE, ``type`` is TPM_ST_ATTEST_QUOTE;
4. ``extraData`` equals the expected qualifying data (constant time);
5. the signed PCR selection equals the requested one exactly (banks, their
   order and PCRs: what the verifier's policy asked for in its CHALLENGE);
6. the PCR digest equals SHA-256 of the reported values, recomputed here;
7. the clock is ``safe`` and reset/restart counters did not go backwards;
8. the reported values satisfy the policy (:mod:`securemig.trust.policy`:
   accepted values, or a measured-boot event log that replays to them and
   whose named events it allows: :mod:`securemig.trust.eventlog`).

This module needs no TPM: it parses with tpm2-pytss's types and verifies
with ``cryptography``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import TPM2B_PUBLIC, TPMS_ATTEST, TPMT_SIGNATURE
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPM2_GENERATED, TPM2_ST, TPMA_OBJECT

from securemig.protocol.errors import ErrorCode, Refused
from securemig.protocol.wire import DIGEST_SIZES, HashAlg, PcrBank
from securemig.trust.tpm.tpm import (
    AK_ATTRIBUTES,
    Malformed,
    bank_selection,
    unmarshal_exact,
)

T = TypeVar("T")


class Check(enum.Enum):
    """The named checks of the verifier."""

    AK_ATTRIBUTES = "ak-attributes"
    HASH_ALGORITHM = "hash-algorithm"
    SIGNATURE = "signature"
    MAGIC = "magic"
    TYPE = "type"
    QUALIFYING_DATA = "qualifying-data"
    PCR_SELECTION = "pcr-selection"
    PCR_DIGEST = "pcr-digest"
    GOLDEN_VALUES = "golden-values"
    EVENT_LOG = "event-log"
    CLOCK = "clock"
    CERTIFIED_NAME = "certified-name"
    AK_CERTIFICATE = "ak-certificate"
    HOST_NAME = "host-name"
    REVOKED = "revoked"


#: The signing schemes an AK may have, by key type (all with SHA-256).
AK_SCHEMES = {
    TPM2_ALG.ECC: (TPM2_ALG.ECDSA,),
    TPM2_ALG.RSA: (TPM2_ALG.RSASSA, TPM2_ALG.RSAPSS),
}


class AttestationError(Refused):
    """Evidence failed one check; ``check`` says which."""

    default_code = ErrorCode.ATTESTATION_FAILED

    def __init__(self, check: Check, detail: str) -> None:
        super().__init__(f"{check.value}: {detail}")
        self.check = check
        self.detail = detail


@dataclass(frozen=True)
class ClockState:
    """What a verifier remembers of a peer's TPM clock between attestations."""

    reset_count: int
    restart_count: int


def _parse(cls: type[T], raw: bytes, check: Check, what: str) -> T:
    try:
        return unmarshal_exact(cls, raw, what)
    except Malformed as e:
        raise AttestationError(check, e.reason) from None


def check_ak(ak_public: bytes) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """The AK's key, once its public area shows a restricted TPM signing key."""
    area = _parse(TPM2B_PUBLIC, ak_public, Check.AK_ATTRIBUTES, "the AK public area").publicArea
    attributes = int(area.objectAttributes)
    if attributes & int(AK_ATTRIBUTES) != int(AK_ATTRIBUTES):
        raise AttestationError(
            Check.AK_ATTRIBUTES,
            "AK must be restricted, signing, fixedTPM, fixedParent and sensitiveDataOrigin",
        )
    if attributes & int(TPMA_OBJECT.DECRYPT):
        raise AttestationError(Check.AK_ATTRIBUTES, "AK must not be a decryption key")
    if area.nameAlg != TPM2_ALG.SHA256:
        raise AttestationError(
            Check.HASH_ALGORITHM,
            f"the AK's name algorithm is {_alg(area.nameAlg)}; it must be SHA256",
        )
    if area.type in AK_SCHEMES:
        detail = (
            area.parameters.eccDetail if area.type == TPM2_ALG.ECC else area.parameters.rsaDetail
        )
        scheme, scheme_hash = detail.scheme.scheme, detail.scheme.details.anySig.hashAlg
        if scheme not in AK_SCHEMES[area.type] or scheme_hash != TPM2_ALG.SHA256:
            allowed = " or ".join(_alg(a) for a in AK_SCHEMES[area.type])
            raise AttestationError(
                Check.HASH_ALGORITHM,
                f"the AK's signing scheme is {_alg(scheme)}-{_alg(scheme_hash)}; "
                f"it must be {allowed} with SHA256",
            )
    key = serialization.load_der_public_key(bytes(area.to_der()))
    if area.type == TPM2_ALG.ECC and area.parameters.eccDetail.curveID == TPM2_ECC.NIST_P256:
        assert isinstance(key, ec.EllipticCurvePublicKey)
        return key
    if area.type == TPM2_ALG.RSA and area.parameters.rsaDetail.keyBits == 2048:
        assert isinstance(key, rsa.RSAPublicKey)
        return key
    raise AttestationError(Check.AK_ATTRIBUTES, "AK must be ECC P-256 or RSA-2048")


def _alg(alg: int) -> str:
    try:
        name = str(TPM2_ALG(alg)).upper()
        return "SHA1" if name == "SHA" else name
    except ValueError:
        return f"0x{int(alg):04x}"


def ak_name(ak_public: bytes) -> bytes:
    """The TPM name of an AK (nameAlg || SHA-256 of its public area), computed
    here, once :func:`check_ak` accepts it: what the verifier keys the AK's
    clock history by, and what the privacy CA certified."""
    check_ak(ak_public)
    area = _parse(TPM2B_PUBLIC, ak_public, Check.AK_ATTRIBUTES, "the AK public area")
    return bytes(area.get_name())


def verify_signature(ak_public: bytes, attest: bytes, signature: bytes) -> TPMS_ATTEST:
    """Check the AK and its signature over ``attest``; return the parsed structure."""
    key = check_ak(ak_public)
    sig = _parse(TPMT_SIGNATURE, signature, Check.SIGNATURE, "the signature")
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            if sig.sigAlg != TPM2_ALG.ECDSA or sig.signature.ecdsa.hash != TPM2_ALG.SHA256:
                raise AttestationError(Check.HASH_ALGORITHM, "ECC AKs must sign with ECDSA-SHA256")
            r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
            s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
            key.verify(encode_dss_signature(r, s), attest, ec.ECDSA(hashes.SHA256()))
        else:
            scheme = _parse(TPM2B_PUBLIC, ak_public, Check.AK_ATTRIBUTES, "the AK public area")
            own = scheme.publicArea.parameters.rsaDetail.scheme.scheme
            if sig.sigAlg != own or sig.signature.rsassa.hash != TPM2_ALG.SHA256:
                raise AttestationError(
                    Check.HASH_ALGORITHM, f"this RSA AK must sign with {_alg(own)}-SHA256"
                )
            # RSASSA and RSAPSS signatures share one layout (TPMS_SIGNATURE_RSA).
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15()
                if own == TPM2_ALG.RSASSA
                # The TPM's salt is as long as the digest (or longest for
                # its FIPS mode): accept the length the signature has.
                else padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.AUTO)
            )
            key.verify(bytes(sig.signature.rsassa.sig), attest, pad, hashes.SHA256())
    except InvalidSignature:
        raise AttestationError(Check.SIGNATURE, "signature does not verify with the AK") from None
    parsed = _parse(TPMS_ATTEST, attest, Check.TYPE, "the attestation structure")
    if parsed.magic != TPM2_GENERATED.VALUE:
        raise AttestationError(Check.MAGIC, "not generated by a TPM (magic)")
    return parsed


def _check_qualifying(parsed: TPMS_ATTEST, expected: bytes) -> None:
    if not hmac.compare_digest(bytes(parsed.extraData), expected):
        raise AttestationError(
            Check.QUALIFYING_DATA, "qualifying data is not this session's (replayed or relayed?)"
        )


def check_quote(
    ak_public: bytes,
    attest: bytes,
    signature: bytes,
    *,
    qualifying: bytes,
    banks: Sequence[PcrBank],
    values: Mapping[tuple[int, int], bytes],
    previous: ClockState | None = None,
) -> ClockState:
    """Verify a quote over the PCR selection ``banks`` and the PCR
    ``values`` (by bank algorithm and PCR) reported with it: checks 1 to 7
    of the module's list; the policy (8) is the caller's.

    Returns the TPM's clock state to remember for this AK.  Raises
    :class:`AttestationError` naming the first check that failed.
    """
    parsed = verify_signature(ak_public, attest, signature)
    if parsed.type != TPM2_ST.ATTEST_QUOTE:
        raise AttestationError(Check.TYPE, "not a quote")
    _check_qualifying(parsed, qualifying)
    quote = parsed.attested.quote
    if bytes(quote.pcrSelect.marshal()) != bytes(bank_selection(banks).marshal()):
        raise AttestationError(Check.PCR_SELECTION, "the quote covers other PCRs than requested")
    wanted = [(int(b.alg), p) for b in banks for p in b.indices]
    if sorted(values) != sorted(wanted) or any(
        len(values[k]) != DIGEST_SIZES[HashAlg(k[0])] for k in wanted
    ):
        raise AttestationError(Check.PCR_DIGEST, "reported PCR values do not match the selection")
    recomputed = hashlib.sha256(b"".join(values[k] for k in wanted)).digest()
    if not hmac.compare_digest(bytes(quote.pcrDigest), recomputed):
        raise AttestationError(Check.PCR_DIGEST, "reported PCR values are not the quoted ones")
    clock = parsed.clockInfo
    if not clock.safe:
        raise AttestationError(Check.CLOCK, "TPM clock is not safe (it may have gone back)")
    state = ClockState(int(clock.resetCount), int(clock.restartCount))
    if previous is not None and (
        state.reset_count < previous.reset_count
        or (
            state.reset_count == previous.reset_count
            and state.restart_count < previous.restart_count
        )
    ):
        raise AttestationError(Check.CLOCK, "reset or restart count went backwards (replay?)")
    return state


def verify_quote(
    ak_public: bytes,
    attest: bytes,
    signature: bytes,
    *,
    qualifying: bytes,
    pcrs: Sequence[int],
    values: dict[int, bytes],
    golden: dict[int, bytes] | None = None,
    previous: ClockState | None = None,
) -> ClockState:
    """:func:`check_quote` for a selection of SHA-256 PCRs, then the
    ``golden`` values of those PCRs (a golden value of a PCR outside the
    selection is ignored; PCRs that differ are named, and only they)."""
    bank = PcrBank.of(HashAlg.SHA256, list(pcrs))
    sha256 = int(HashAlg.SHA256)
    state = check_quote(
        ak_public,
        attest,
        signature,
        qualifying=qualifying,
        banks=[bank],
        values={(sha256, p): v for p, v in values.items()},
        previous=previous,
    )
    if golden is not None:
        differ = [
            p
            for p in bank.indices
            if p not in golden or not hmac.compare_digest(golden[p], values[p])
        ]
        if differ:
            raise AttestationError(
                Check.GOLDEN_VALUES, f"PCRs {differ} differ from the golden values"
            )
    return state


def verify_certification(
    ak_public: bytes, attest: bytes, signature: bytes, *, qualifying: bytes, name: bytes
) -> None:
    """Verify a TPM2_Certify by the AK of the key whose name is ``name``
    (computed by the caller from the key's public area)."""
    parsed = verify_signature(ak_public, attest, signature)
    if parsed.type != TPM2_ST.ATTEST_CERTIFY:
        raise AttestationError(Check.TYPE, "not a key certification")
    _check_qualifying(parsed, qualifying)
    if not hmac.compare_digest(bytes(parsed.attested.certify.name), name):
        raise AttestationError(Check.CERTIFIED_NAME, "the certified key is not the one offered")


def verify_ak_certificate(
    cert_der: bytes,
    ca_cert: x509.Certificate,
    ak_public: bytes,
    host: str,
    now: datetime | None = None,
) -> None:
    """The AK certificate was issued by the privacy CA, is valid now, names
    ``host`` and certifies exactly this AK."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError:
        raise AttestationError(Check.AK_CERTIFICATE, "AK certificate does not parse") from None
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise AttestationError(
            Check.AK_CERTIFICATE, "AK certificate is not issued by the privacy CA"
        ) from None
    now = now or datetime.now(UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise AttestationError(Check.AK_CERTIFICATE, "AK certificate is not valid now")
    key = check_ak(ak_public)
    der = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(serialization.Encoding.DER, der) != key.public_bytes(
        serialization.Encoding.DER, der
    ):
        raise AttestationError(Check.AK_CERTIFICATE, "AK certificate is for another key")
    try:
        names = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if host not in names:
        raise AttestationError(Check.HOST_NAME, f"AK certificate does not name host {host!r}")

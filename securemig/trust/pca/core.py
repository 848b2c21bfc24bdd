"""
The privacy CA's logic, sans-IO: enrollment of a host's attestation key.

Enrollment is two steps, as in Keylime's registrar:

1. ``begin``: the host sends its host name, EK certificate, EK public area
   and AK public area.  The PCA verifies the EK certificate against the
   trusted TPM-vendor CAs, checks that the EK public key is the
   certificate's, checks the AK's attributes, computes the AK's *name*
   itself, and runs MakeCredential: a random secret that only the TPM
   holding that EK can recover, and only for a key with that name.
2. ``finish``: the host answers with what ActivateCredential returned.
   Only if it equals the secret (constant-time compare) does the PCA issue
   an X.509 AK certificate naming the host.  A wrong answer ends that
   enrollment.  A host name already enrolled with another EK is refused.

The state directory holds ``ca.key``/``ca.pem`` (the PCA's signing CA),
``vendors/*.pem`` (trusted TPM-vendor CAs) and ``pca.sqlite`` (hosts).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from tpm2_pytss import TPM2B_PUBLIC
from tpm2_pytss.utils import make_credential

from securemig.trust.attest import AttestationError, check_ak
from securemig.trust.pki import Authority, check_host_name
from securemig.trust.tpm.tpm import Malformed, unmarshal_exact

#: Extended key usage of an EK certificate (TCG EK Credential Profile).
EK_CERTIFICATE_EKU = x509.ObjectIdentifier("2.23.133.8.1")
#: How long a host has to answer its credential challenge.
CHALLENGE_TTL = 120.0
SECRET_SIZE = 32


class EnrollmentError(Exception):
    """An enrollment was refused; ``reason`` is a stable word, ``detail`` prose."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Challenge:
    """What ``begin`` returns to the host (and remembers until ``finish``)."""

    enrollment_id: str
    credential_blob: bytes
    encrypted_secret: bytes


@dataclass
class _Pending:
    host: str
    ek_fingerprint: str
    ak_public: bytes
    secret: bytes
    expires: float


class VendorCAError(ValueError):
    """A file given as a trusted TPM-vendor CA is not a CA certificate; the
    message says what it is instead."""


def check_vendor_ca(path: Path) -> list[x509.Certificate]:
    """The certificates in PEM file ``path``, each a CA certificate
    (basicConstraints CA:TRUE, and keyCertSign if it states its key usage),
    or :class:`VendorCAError` saying why ``path`` cannot be a TPM-vendor CA."""
    todo = (
        "give the TPM vendor's root or intermediate CA certificate (PEM) "
        "that issues EK certificates"
    )
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise VendorCAError(f"cannot read vendor CA {path}: {e.strerror or e}") from None
    try:
        certs = x509.load_pem_x509_certificates(raw)
    except ValueError:
        try:
            x509.load_der_x509_certificate(raw)
        except ValueError:
            raise VendorCAError(f"{path} holds no PEM certificate; {todo}") from None
        raise VendorCAError(
            f"{path} is a DER certificate; convert it to PEM "
            f"(openssl x509 -inform der -in {path} -out {path.stem}.pem)"
        ) from None
    for cert in certs:
        subject = cert.subject.rfc4514_string() or "(no subject)"
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise VendorCAError(
                f"{path}: certificate {subject!r} is not a CA certificate (no basicConstraints "
                f"CA:TRUE); {todo}"
            )
        try:
            usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is not None and not usage.key_cert_sign:
            raise VendorCAError(
                f"{path}: CA certificate {subject!r} may not sign certificates (its key usage "
                f"lacks keyCertSign); {todo}"
            )
    return certs


def load_vendor_cas(directory: Path) -> list[x509.Certificate]:
    """Every certificate in ``directory/*.pem`` (the trusted TPM vendors)."""
    certs: list[x509.Certificate] = []
    for path in sorted(directory.glob("*.pem")):
        certs.extend(x509.load_pem_x509_certificates(path.read_bytes()))
    return certs


class PrivacyCA:
    """A privacy CA rooted in ``directory``."""

    def __init__(self, directory: Path, clock: object = time) -> None:
        self.directory = directory
        self.authority = Authority.load(directory)
        self.vendors = load_vendor_cas(directory / "vendors")
        self._db = sqlite3.connect(directory / "pca.sqlite", isolation_level=None)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS hosts (host TEXT PRIMARY KEY, ek TEXT NOT NULL,"
            " ak_name TEXT NOT NULL, serial TEXT NOT NULL, enrolled REAL NOT NULL)"
        )
        self._pending: dict[str, _Pending] = {}
        self._clock = clock

    @classmethod
    def init(
        cls, directory: Path, vendor_cas: list[Path], name: str = "securemig privacy CA"
    ) -> PrivacyCA:
        """Create a new privacy CA trusting ``vendor_cas``, each checked to
        be a CA certificate first (:class:`VendorCAError`; nothing is
        created then)."""
        for path in vendor_cas:
            check_vendor_ca(path)
        Authority.create(name).save(directory)
        vendors = directory / "vendors"
        vendors.mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(vendor_cas):
            (vendors / f"{i:02d}-{path.name}").write_bytes(path.read_bytes())
        return cls(directory)

    # -- step 1

    def begin(self, host: str, ek_cert: bytes, ek_public: bytes, ak_public: bytes) -> Challenge:
        """Check the EK and AK and challenge the TPM; see the module docstring."""
        _check_host_name(host)
        cert = self._verify_ek_certificate(ek_cert)
        ek = _parse_public(ek_public, "ek-public")
        ek_key = serialization.load_der_public_key(bytes(ek.publicArea.to_der()))
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(serialization.Encoding.DER, spki) != ek_key.public_bytes(
            serialization.Encoding.DER, spki
        ):
            raise EnrollmentError("ek-mismatch", "the EK public key is not the certificate's")
        try:
            check_ak(ak_public)
        except AttestationError as e:
            raise EnrollmentError("ak-attributes", e.detail) from None
        fingerprint = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
        known = self._db.execute("SELECT ek FROM hosts WHERE host = ?", (host,)).fetchone()
        if known is not None and known[0] != fingerprint:
            raise EnrollmentError("host-has-other-tpm", f"host {host} is enrolled with another TPM")
        # The AK's name is computed here, from the public area we were given:
        # the credential can only be activated for a key with this very name.
        name = _parse_public(ak_public, "ak-public").get_name()
        secret = os.urandom(SECRET_SIZE)
        blob, encrypted = make_credential(ek, secret, name)
        enrollment_id = os.urandom(16).hex()
        self._expire()
        self._pending[enrollment_id] = _Pending(
            host, fingerprint, ak_public, secret, self._now() + CHALLENGE_TTL
        )
        return Challenge(enrollment_id, bytes(blob.marshal()), bytes(encrypted.marshal()))

    # -- step 2

    def finish(self, enrollment_id: str, answer: bytes) -> bytes:
        """Issue the AK certificate (DER) if ``answer`` is the activated secret."""
        self._expire()
        pending = self._pending.pop(enrollment_id, None)
        if pending is None:
            raise EnrollmentError("unknown-enrollment", "no such enrollment (expired or used)")
        if not hmac.compare_digest(answer, pending.secret):
            raise EnrollmentError(
                "activation-failed", "the credential was not activated by the enrolling TPM"
            )
        known = self._db.execute("SELECT ek FROM hosts WHERE host = ?", (pending.host,)).fetchone()
        if known is not None and known[0] != pending.ek_fingerprint:
            raise EnrollmentError(
                "host-has-other-tpm", f"host {pending.host} is enrolled with another TPM"
            )
        key = check_ak(pending.ak_public)
        cert = self.authority.issue(key, pending.host, tls=False, days=365)
        name = _parse_public(pending.ak_public, "ak-public").get_name()
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO hosts VALUES (?, ?, ?, ?, ?)",
                (
                    pending.host,
                    pending.ek_fingerprint,
                    bytes(name).hex(),
                    format(cert.serial_number, "x"),
                    self._now(),
                ),
            )
        return cert.public_bytes(serialization.Encoding.DER)

    # -- helpers

    def _now(self) -> float:
        return float(self._clock.time())  # type: ignore[attr-defined]

    def _expire(self) -> None:
        now = self._now()
        for key in [k for k, p in self._pending.items() if p.expires < now]:
            del self._pending[key]

    def _verify_ek_certificate(self, der: bytes) -> x509.Certificate:
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise EnrollmentError("ek-certificate", "EK certificate does not parse") from None
        try:
            usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is None or EK_CERTIFICATE_EKU not in usage:
            raise EnrollmentError("ek-certificate", "not an EK certificate (EKU 2.23.133.8.1)")
        now = datetime.now(UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise EnrollmentError("ek-certificate", "EK certificate is not valid now")
        # Every certificate in vendors/ is a trust anchor (roots and the
        # intermediates that issue EK certificates alike).
        for issuer in self.vendors:
            if issuer.subject != cert.issuer:
                continue
            try:
                cert.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return cert
        raise EnrollmentError(
            "ek-certificate", "EK certificate is not issued by a trusted TPM vendor CA"
        )


def _parse_public(raw: bytes, what: str) -> TPM2B_PUBLIC:
    try:
        return unmarshal_exact(TPM2B_PUBLIC, raw, what)
    except Malformed as e:
        raise EnrollmentError(what, str(e)) from None


def _check_host_name(host: str) -> None:
    try:
        check_host_name(host)
    except ValueError as e:
        raise EnrollmentError("host-name", str(e)) from None

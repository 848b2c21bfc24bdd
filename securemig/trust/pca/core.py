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
   enrollment.  A host name already enrolled with another EK is refused
   until the operator says the TPM was replaced (:meth:`PrivacyCA.replace`).

A genuine TPM is not enough to claim a host name: ``begin`` also needs the
operator's authorization (:class:`Authorization`): the enrolling client's
site-CA TLS certificate for that very name (mutual TLS, when the PCA was
given the site CA), or a one-time token that :meth:`PrivacyCA.authorize`
issued for that name and that has not expired (only its SHA-256 is kept;
it is spent when the certificate is issued).  A host enrolled before,
with the same EK and not revoked, renews its AK on the strength of its TPM
alone: activating the credential proves the EK.

Revocation: :meth:`PrivacyCA.revoke` revokes a host's AK certificates (all,
or one AK); :meth:`PrivacyCA.crl` is the signed X.509 CRL of every revoked
AK certificate, which the verifiers fetch (:mod:`securemig.trust.revocation`).

The state directory holds ``ca.key``/``ca.pem`` (the PCA's signing CA),
``vendors/*.pem`` (trusted TPM-vendor CAs), ``site-ca.pem`` (optional: the
site CA whose TLS certificates authorize enrollments) and ``pca.sqlite``
(hosts, their AKs, enrollment tokens).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from tpm2_pytss import TPM2B_PUBLIC
from tpm2_pytss.utils import make_credential

from securemig.trust.attest import AttestationError, check_ak
from securemig.trust.pki import EK_CERTIFICATE_EKU, Authority, check_host_name
from securemig.trust.tpm.tpm import Malformed, unmarshal_exact

#: The most intermediate CA certificates an EK certificate may come with.
MAX_EK_INTERMEDIATES = 4
#: How long a host has to answer its credential challenge.
CHALLENGE_TTL = 120.0
SECRET_SIZE = 32
#: How long an enrollment token is valid unless told otherwise (24 h).
TOKEN_TTL = 24 * 3600.0
#: The longest a token may be valid (30 days).
MAX_TOKEN_TTL = 30 * 24 * 3600.0
#: A token is this many bytes of randomness (printed in URL-safe base64).
TOKEN_BYTES = 32
#: The longest token string accepted from a client (bounded before hashing).
MAX_TOKEN_LENGTH = 128
#: How long a verifier may use a CRL before the next one is due (its
#: nextUpdate); the verifiers' own --crl-max-age is what fails them closed.
CRL_VALIDITY = timedelta(days=1)
#: A CRL is signed anew when the revocations change, or when it is this old.
CRL_RESIGN = 60.0


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
    #: What authorized it: "site certificate", "token", or "same TPM" (a renewal).
    authorized_by: str = ""


@dataclass(frozen=True)
class Authorization:
    """What a client shows for enrolling a host name: the DNS names of its
    site-CA TLS client certificate (verified by the TLS handshake) and/or
    an enrollment token."""

    certificate_names: Sequence[str] = ()
    token: str | None = None


@dataclass
class _Pending:
    host: str
    ek_fingerprint: str
    ak_public: bytes
    secret: bytes
    expires: float
    #: The SHA-256 of the token that authorized it, spent at ``finish``.
    token_hash: str | None = None


@dataclass
class EnrolledAK:
    """One AK certificate a host was given."""

    ak_name: str
    serial: str
    enrolled: float
    not_after: float | None
    revoked: float | None


@dataclass
class EnrolledHost:
    """A host as ``securemig pca list`` shows it."""

    host: str
    #: SHA-256 of its EK certificate; empty after ``pca replace``.
    ek: str
    revoked: float | None
    aks: list[EnrolledAK] = field(default_factory=list)


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
        site_ca = directory / SITE_CA
        self.site_ca = (
            x509.load_pem_x509_certificate(site_ca.read_bytes()) if site_ca.exists() else None
        )
        self._db = sqlite3.connect(directory / "pca.sqlite", isolation_level=None, timeout=30)
        _create_tables(self._db)
        self._pending: dict[str, _Pending] = {}
        self._clock = clock
        self._crl: tuple[tuple[tuple[str, float], ...], float, bytes] | None = None

    @classmethod
    def init(
        cls,
        directory: Path,
        vendor_cas: list[Path],
        name: str = "securemig privacy CA",
        site_ca: Path | None = None,
    ) -> PrivacyCA:
        """Create a new privacy CA trusting ``vendor_cas``, each checked to
        be a CA certificate first (:class:`VendorCAError`; nothing is
        created then).  With ``site_ca`` (the site CA's ``ca.pem``), a
        client's TLS certificate from it authorizes enrolling its name."""
        for path in vendor_cas:
            check_vendor_ca(path)
        site = check_vendor_ca(site_ca)[0] if site_ca else None
        Authority.create(name).save(directory)
        vendors = directory / "vendors"
        vendors.mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(vendor_cas):
            (vendors / f"{i:02d}-{path.name}").write_bytes(path.read_bytes())
        if site is not None:
            (directory / SITE_CA).write_bytes(site.public_bytes(serialization.Encoding.PEM))
        return cls(directory)

    # -- the operator's commands

    def authorize(self, host: str, ttl: float = TOKEN_TTL) -> str:
        """A one-time token that authorizes one enrollment of ``host`` within
        ``ttl`` seconds; only its SHA-256 is stored.  Shown once, by the
        caller."""
        _check_host_name(host)
        if not 0 < ttl <= MAX_TOKEN_TTL:
            raise ValueError(f"a token expires within {MAX_TOKEN_TTL / 86400:g} days")
        token = secrets.token_urlsafe(TOKEN_BYTES)
        with self._db:
            self._db.execute(
                "INSERT INTO tokens (hash, host, expires) VALUES (?, ?, ?)",
                (_token_hash(token), host, self._now() + ttl),
            )
        return token

    def replace(self, host: str) -> int:
        """Let the next (authorized) enrollment of ``host`` come from another
        TPM: forget its EK and revoke every AK certificate it has (the old
        TPM may be in the wrong hands).  Returns how many were revoked;
        ``KeyError`` for a host never enrolled."""
        with self._db:
            if self._db.execute("UPDATE hosts SET ek = '' WHERE host = ?", (host,)).rowcount == 0:
                raise KeyError(host)
            return self._revoke(host, None)

    def revoke(self, host: str, ak: str | None = None) -> int:
        """Revoke ``host``'s AK certificates: all of them (and its next
        enrollment then needs authorization again), or those of the AK whose
        name (hex, as ``pca list`` shows it) starts with ``ak``.  Returns
        how many were revoked now; ``KeyError`` for an unknown host or AK."""
        with self._db:
            if self._db.execute("SELECT 1 FROM hosts WHERE host = ?", (host,)).fetchone() is None:
                raise KeyError(host)
            if ak is None:
                self._db.execute("UPDATE hosts SET revoked = ? WHERE host = ?", (self._now(), host))
            elif not self._db.execute(
                "SELECT 1 FROM aks WHERE host = ? AND ak_name LIKE ?", (host, _prefix(ak))
            ).fetchone():
                raise KeyError(ak)
            return self._revoke(host, ak)

    def _revoke(self, host: str, ak: str | None) -> int:
        query = "UPDATE aks SET revoked = ? WHERE host = ? AND revoked IS NULL"
        args: tuple[object, ...] = (self._now(), host)
        if ak is not None:
            query += " AND ak_name LIKE ?"
            args += (_prefix(ak),)
        return self._db.execute(query, args).rowcount

    def hosts(self) -> list[EnrolledHost]:
        """Every enrolled host with its EK and AKs, by name."""
        listed = {
            host: EnrolledHost(host, ek, revoked)
            for host, ek, revoked in self._db.execute(
                "SELECT host, ek, revoked FROM hosts ORDER BY host"
            )
        }
        for row in self._db.execute(
            "SELECT host, ak_name, serial, enrolled, not_after, revoked FROM aks ORDER BY enrolled"
        ):
            if row[0] in listed:
                listed[row[0]].aks.append(EnrolledAK(*row[1:]))
        return list(listed.values())

    def crl(self) -> bytes:
        """The signed CRL (DER) of every revoked AK certificate; signed anew
        when the revocations change or every :data:`CRL_RESIGN` seconds, so
        its lastUpdate says how fresh it is."""
        revoked = tuple(
            (str(serial), float(when))
            for serial, when in self._db.execute(
                "SELECT serial, revoked FROM aks WHERE revoked IS NOT NULL ORDER BY serial"
            )
        )
        now = self._now()
        if self._crl and self._crl[0] == revoked and now - self._crl[1] < CRL_RESIGN:
            return self._crl[2]
        signed = datetime.fromtimestamp(now, UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.authority.cert.subject)
            .last_update(signed - timedelta(seconds=1))
            .next_update(signed + CRL_VALIDITY)
        )
        for serial, when in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(serial, 16))
                .revocation_date(datetime.fromtimestamp(when, UTC))
                .build()
            )
        der = builder.sign(self.authority.key, hashes.SHA256()).public_bytes(
            serialization.Encoding.DER
        )
        self._crl = (revoked, now, der)
        return der

    # -- step 1

    def begin(
        self,
        host: str,
        ek_cert: bytes,
        ek_public: bytes,
        ak_public: bytes,
        authorization: Authorization = Authorization(),
        ek_intermediates: Sequence[bytes] = (),
    ) -> Challenge:
        """Check the EK (its certificate chained to a trusted vendor CA,
        through ``ek_intermediates`` if need be; RSA or ECC), the AK and the
        authorization, and challenge the TPM; see the module docstring."""
        _check_host_name(host)
        cert = self._verify_ek_certificate(ek_cert, ek_intermediates)
        ek = _parse_public(ek_public, "ek-public")
        ek_key = serialization.load_der_public_key(bytes(ek.publicArea.to_der()))
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(serialization.Encoding.DER, spki) != ek_key.public_bytes(
            serialization.Encoding.DER, spki
        ):
            raise EnrollmentError("ek-mismatch", "the EK public key is not the certificate's")
        try:
            # The verifier's own rules: an AK whose quotes it would refuse
            # (a SHA-1 scheme or name algorithm) gets no certificate.
            check_ak(ak_public)
        except AttestationError as e:
            raise EnrollmentError(e.check.value, e.detail) from None
        fingerprint = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
        self._check_same_tpm(host, fingerprint)
        token_hash, proof = self._authorized(host, fingerprint, authorization)
        # The AK's name is computed here, from the public area we were given:
        # the credential can only be activated for a key with this very name.
        name = _parse_public(ak_public, "ak-public").get_name()
        secret = os.urandom(SECRET_SIZE)
        blob, encrypted = make_credential(ek, secret, name)
        enrollment_id = os.urandom(16).hex()
        self._expire()
        self._pending[enrollment_id] = _Pending(
            host, fingerprint, ak_public, secret, self._now() + CHALLENGE_TTL, token_hash
        )
        return Challenge(enrollment_id, bytes(blob.marshal()), bytes(encrypted.marshal()), proof)

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
        self._check_same_tpm(pending.host, pending.ek_fingerprint)
        key = check_ak(pending.ak_public)
        cert = self.authority.issue(key, pending.host, tls=False, days=365)
        name = bytes(_parse_public(pending.ak_public, "ak-public").get_name()).hex()
        serial, now = format(cert.serial_number, "x"), self._now()
        with self._db:
            if pending.token_hash is not None and (
                self._db.execute(
                    "UPDATE tokens SET used = ? WHERE hash = ? AND used IS NULL AND expires >= ?",
                    (now, pending.token_hash, now),
                ).rowcount
                != 1
            ):
                raise EnrollmentError("token", "the enrollment token was used or expired meanwhile")
            self._db.execute(
                "INSERT OR REPLACE INTO hosts (host, ek, ak_name, serial, enrolled, revoked)"
                " VALUES (?, ?, ?, ?, ?, NULL)",
                (pending.host, pending.ek_fingerprint, name, serial, now),
            )
            self._db.execute(
                "INSERT INTO aks (serial, host, ak_name, enrolled, not_after)"
                " VALUES (?, ?, ?, ?, ?)",
                (serial, pending.host, name, now, cert.not_valid_after_utc.timestamp()),
            )
        return cert.public_bytes(serialization.Encoding.DER)

    # -- helpers

    def _check_same_tpm(self, host: str, fingerprint: str) -> None:
        known = self._db.execute("SELECT ek FROM hosts WHERE host = ?", (host,)).fetchone()
        if known is not None and known[0] not in ("", fingerprint):
            raise EnrollmentError(
                "host-has-other-tpm",
                f"host {host} is enrolled with another TPM; if its TPM was replaced, "
                f"run `securemig pca replace {host}` first",
            )

    def _authorized(
        self, host: str, fingerprint: str, given: Authorization
    ) -> tuple[str | None, str]:
        """Whether ``given`` authorizes enrolling ``host``: the hash of the
        token to spend at ``finish`` (if a token did), and what did."""
        if host in given.certificate_names:
            return None, "site certificate"
        if given.token is not None:
            return self._check_token(host, given.token), "token"
        known = self._db.execute("SELECT ek, revoked FROM hosts WHERE host = ?", (host,)).fetchone()
        if known is not None and known[0] == fingerprint and known[1] is None:
            return None, "same TPM"  # a renewal, which activation proves
        shown = (
            f"the client's TLS certificate names {', '.join(given.certificate_names)}, not {host}"
            if given.certificate_names
            else "no site-CA TLS certificate and no token were presented"
        )
        raise EnrollmentError(
            "not-authorized",
            f"enrolling {host} needs authorization ({shown}): enroll with {host}'s site-CA "
            f"TLS certificate, or with a token from `securemig pca authorize {host}`",
        )

    def _check_token(self, host: str, token: str) -> str:
        if len(token) > MAX_TOKEN_LENGTH:
            raise EnrollmentError("token", "the enrollment token is not one this PCA issued")
        digest = _token_hash(token)
        row = self._db.execute(
            "SELECT host, expires, used FROM tokens WHERE hash = ?", (digest,)
        ).fetchone()
        if row is None:
            raise EnrollmentError("token", "the enrollment token is not one this PCA issued")
        if row[0] != host:
            raise EnrollmentError("token", f"the enrollment token is not for host {host}")
        if row[2] is not None:
            raise EnrollmentError("token", "the enrollment token was already used")
        if row[1] < self._now():
            raise EnrollmentError("token", "the enrollment token has expired")
        return digest

    def _now(self) -> float:
        return float(self._clock.time())  # type: ignore[attr-defined]

    def _expire(self) -> None:
        now = self._now()
        for key in [k for k, p in self._pending.items() if p.expires < now]:
            del self._pending[key]

    def _verify_ek_certificate(
        self, der: bytes, intermediates: Sequence[bytes] = ()
    ) -> x509.Certificate:
        """The EK certificate, once it chains to a trusted vendor CA, directly
        or through the vendor's ``intermediates`` (DER) the host sent."""
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
        if len(intermediates) > MAX_EK_INTERMEDIATES:
            raise EnrollmentError(
                "ek-certificate", f"more than {MAX_EK_INTERMEDIATES} intermediate certificates"
            )
        try:
            chain = [x509.load_der_x509_certificate(c) for c in intermediates]
        except ValueError:
            raise EnrollmentError(
                "ek-certificate", "an intermediate certificate does not parse"
            ) from None
        # Every certificate in vendors/ is a trust anchor (roots and the
        # intermediates that issue EK certificates alike); the host's
        # intermediates are not, and each must be a valid CA certificate.
        current, below = cert, 0
        for _ in range(MAX_EK_INTERMEDIATES + 1):
            if any(_issued(current, anchor, below) for anchor in self.vendors):
                return cert
            step = next((c for c in chain if _issued(current, c, below, now)), None)
            if step is None:
                break
            current, below = step, below + 1
        raise EnrollmentError(
            "ek-certificate",
            "EK certificate is not issued by a trusted TPM vendor CA"
            + (" (nor through the intermediates sent)" if chain else ""),
        )


def _issued(
    cert: x509.Certificate, issuer: x509.Certificate, below: int, now: datetime | None = None
) -> bool:
    """Whether CA certificate ``issuer`` signed ``cert``, with ``below`` CA
    certificates under it in the chain (its path length constraint); with
    ``now``, also whether ``issuer`` is valid then."""
    if issuer.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    if not constraints.ca or (
        constraints.path_length is not None and below > constraints.path_length
    ):
        return False
    return now is None or issuer.not_valid_before_utc <= now <= issuer.not_valid_after_utc


#: The site CA's certificate in a PCA's directory (``pca init --site-ca``).
SITE_CA = "site-ca.pem"


def _create_tables(db: sqlite3.Connection) -> None:
    """The PCA's tables; an older database (one AK per host) gains the
    revocation columns and its AKs are listed in ``aks``."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS hosts (host TEXT PRIMARY KEY, ek TEXT NOT NULL,"
        " ak_name TEXT NOT NULL, serial TEXT NOT NULL, enrolled REAL NOT NULL, revoked REAL)"
    )
    columns = {row[1] for row in db.execute("PRAGMA table_info(hosts)")}
    if "revoked" not in columns:
        db.execute("ALTER TABLE hosts ADD COLUMN revoked REAL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS aks (serial TEXT PRIMARY KEY, host TEXT NOT NULL,"
        " ak_name TEXT NOT NULL, enrolled REAL NOT NULL, not_after REAL, revoked REAL)"
    )
    db.execute(
        "INSERT OR IGNORE INTO aks (serial, host, ak_name, enrolled)"
        " SELECT serial, host, ak_name, enrolled FROM hosts"
    )
    db.execute(
        "CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, host TEXT NOT NULL,"
        " expires REAL NOT NULL, used REAL)"
    )


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _prefix(ak: str) -> str:
    """A LIKE pattern for AK names starting with ``ak`` (hex only)."""
    if not ak or not all(c in "0123456789abcdef" for c in ak.lower()):
        raise KeyError(ak)
    return ak.lower() + "%"


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

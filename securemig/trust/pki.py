"""
Small X.509 helpers: a certificate authority and the certificates it issues.

Used for the site CA that issues host TLS certificates (``securemig ca``)
and by the privacy CA for AK certificates.  Keys are ECDSA P-256; the host
name always goes in subjectAltName, which is what service-identity and the
verifier check.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securemig import files

#: Extended key usage of an EK certificate (TCG EK Credential Profile).
EK_CERTIFICATE_EKU = x509.ObjectIdentifier("2.23.133.8.1")


def check_host_name(host: str) -> None:
    """Refuse anything but a DNS host name (host names become file names)."""
    labels = host.split(".")
    if not (0 < len(host) <= 253) or not all(
        label and len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
        for label in labels
    ):
        raise ValueError(f"{host!r} is not a DNS host name")


@dataclass
class Authority:
    """A CA's key and certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str, days: int = 3650, path_length: int = 0) -> Authority:
        """A new self-signed CA; ``path_length`` CAs may be below it."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def intermediate(self, name: str, days: int = 3650) -> Authority:
        """A new CA whose certificate this one issues (a vendor's root ->
        intermediate chain)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return Authority(key, cert)

    def issue(
        self,
        public_key: CertificatePublicKeyTypes,
        host: str,
        *,
        days: int = 825,
        tls: bool = True,
        not_before: datetime | None = None,
    ) -> x509.Certificate:
        """A certificate for ``public_key`` naming ``host`` (subjectAltName);
        ``tls`` adds server and client authentication usage."""
        now = datetime.now(UTC)
        start = not_before or now - timedelta(minutes=5)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if tls:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        return builder.sign(self.key, hashes.SHA256())

    def save(self, directory: Path) -> None:
        """Write ``ca.key`` (mode 0600) and ``ca.pem`` into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        key_pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        files.write_durably(directory / "ca.key", key_pem, mode=0o600)
        files.write_durably(
            directory / "ca.pem", self.cert.public_bytes(serialization.Encoding.PEM)
        )

    @classmethod
    def load(cls, directory: Path) -> Authority:
        """Read what :meth:`save` wrote."""
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{directory / 'ca.key'} is not an ECDSA key")
        return cls(key, x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes()))

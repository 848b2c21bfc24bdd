"""
Mutual TLS 1.3 for the secure variant, and the channel binding.

Both sides present a host certificate from the site CA.  The destination
requires one (endpoint strings cannot demand client certificates, so the
server options are built here in code) and may restrict which source names
it accepts; the source checks the destination's name with
service-identity.  TLS 1.2 and older are refused by both.

The channel binding is the TLS exporter (RFC 8446, 7.5) of this session:
quotes are bound to it, so a quote relayed from another connection, or
replayed from an earlier one, does not verify.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from OpenSSL import SSL
from service_identity.exceptions import DNSMismatch, IPAddressMismatch, VerificationError
from twisted.internet import ssl
from twisted.internet.ssl import TLSVersion

from securemig.protocol.errors import ErrorCode, LocalFault

#: Label of the exporter that binds attestation to the TLS session.
EXPORTER_LABEL = b"EXPORTER-securemig-attestation-v1"
EXPORTER_LENGTH = 32


class ChannelBindingUnavailable(LocalFault):
    """The transport is not TLS (or the handshake is not complete)."""

    default_code = ErrorCode.ATTESTATION_FAILED


def _load(identity: Path) -> tuple[ssl.PrivateCertificate, ssl.Certificate]:
    """Our key and certificate, and the site CA, from an identity directory."""
    key = (identity / "tls.key").read_bytes()
    cert = (identity / "tls.pem").read_bytes()
    # Twisted does not annotate these (mypy --strict: no-untyped-call).
    ca = ssl.Certificate.loadPEM((identity / "site-ca.pem").read_bytes())
    own = ssl.PrivateCertificate.loadPEM(key + cert)  # type: ignore[no-untyped-call]
    return own, ca


#: TLS 1.3 cipher suites by short name (the evaluation compares them).
CIPHERS = {
    "aes128": "TLS_AES_128_GCM_SHA256",
    "aes256": "TLS_AES_256_GCM_SHA384",
    "chacha20": "TLS_CHACHA20_POLY1305_SHA256",
}


def server_options(identity: Path, cipher: str | None = None) -> ssl.CertificateOptions:
    """TLS 1.3 server options that require a client certificate from the site
    CA.  ``cipher`` (a key of :data:`CIPHERS`) restricts the cipher suite; in
    TLS 1.3 the server's choice is the one used."""
    own, ca = _load(identity)
    options = ssl.CertificateOptions(
        privateKey=own.privateKey.original,
        certificate=own.original,
        # A trustRoot makes the server verify, and require, a client certificate.
        trustRoot=ssl.trustRootFromCertificates([ca]),  # type: ignore[no-untyped-call]
        raiseMinimumTo=TLSVersion.TLSv1_3,
    )
    if cipher is not None:
        if cipher not in CIPHERS:
            raise ValueError(f"unknown cipher {cipher!r}; one of {', '.join(CIPHERS)}")
        # CertificateOptions keeps one context, so this applies to every connection.
        options.getContext().set_tls13_ciphersuites(CIPHERS[cipher].encode())
    return options


def client_options(identity: Path, destination: str) -> Any:
    """TLS 1.3 client options: our certificate, and the destination's name
    checked against its certificate (service-identity)."""
    own, ca = _load(identity)
    return ssl.optionsForClientTLS(
        destination,
        trustRoot=ssl.trustRootFromCertificates([ca]),  # type: ignore[no-untyped-call]
        clientCertificate=own,
        extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_3},
    )


def peer_names(transport: Any) -> list[str]:
    """The DNS names in the peer's verified certificate (subjectAltName)."""
    from cryptography import x509

    certificate = transport.getPeerCertificate()
    if certificate is None:
        return []
    cert = certificate.to_cryptography()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.DNSName))


def _connection(transport: Any) -> SSL.Connection:
    handle = getattr(transport, "getHandle", lambda: None)()
    if not isinstance(handle, SSL.Connection):
        raise ChannelBindingUnavailable("not a TLS connection")
    return handle


def is_tls(transport: Any) -> bool:
    """Whether ``transport`` (or the transport it wraps) is Twisted's TLS."""
    handle = getattr(transport, "getHandle", lambda: None)()
    return isinstance(handle, SSL.Connection)


def exported(transport: Any, label: bytes, length: int, context: bytes = b"") -> bytes:
    """``length`` bytes of this TLS session's exporter (RFC 8446, 7.5)."""
    value = _connection(transport).export_keying_material(label, length, context)
    if value is None or len(value) != length:
        raise ChannelBindingUnavailable("TLS exporter unavailable")
    return bytes(value)


def channel_binding(transport: Any) -> bytes:
    """This TLS session's exporter value, for binding quotes to it."""
    return exported(transport, EXPORTER_LABEL, EXPORTER_LENGTH)


def cipher_suite(transport: Any) -> str:
    """The TLS 1.3 cipher suite this session negotiated (IANA name)."""
    name = _connection(transport).get_cipher_name()
    if name is None:
        raise ChannelBindingUnavailable("no cipher negotiated yet")
    return str(name)


def describe_failure(reason: Any) -> str:
    """A connection's end as a sentence: a TLS name check that failed says
    which name the peer's certificate did not match and what to give (not
    service-identity's ``VerificationError(errors=[DNSMismatch(...)])``);
    anything else as its message."""
    error = getattr(reason, "value", reason)
    if not isinstance(error, VerificationError):
        return str(reason.getErrorMessage() if hasattr(reason, "getErrorMessage") else reason)
    sentences = []
    for mismatch in error.errors:
        # The ids are service-identity's DNS_ID and IPAddress_ID (typed as
        # their base, which declares neither attribute).
        wanted: Any = mismatch.mismatched_id
        if isinstance(mismatch, IPAddressMismatch):
            sentences.append(
                f"the destination's TLS certificate names a host, not the address "
                f"{wanted.ip}: give --destination-name HOST, the host name "
                "it was issued for (securemig host init --name there)"
            )
        elif isinstance(mismatch, DNSMismatch):
            name = wanted.hostname.decode("ascii", "replace")
            sentences.append(
                f"the destination's TLS certificate is not for {name!r}: check "
                "--destination-name (default: the host of --to) against the name it was "
                "issued for (securemig host init --name there)"
            )
        else:
            sentences.append(f"the destination's TLS certificate does not match: {mismatch}")
    return "; ".join(sentences)

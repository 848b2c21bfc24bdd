"""
The privacy CA's HTTPS+JSON service (twisted.web) over :class:`PrivacyCA`.

``POST /v1/enroll``   ``{"host", "ek_certificate", "ek_public", "ak_public"[, "token"]``
                      ``[, "ek_intermediates": [...]]}``
                      → ``{"enrollment_id", "credential_blob", "encrypted_secret"}``
``POST /v1/activate`` ``{"enrollment_id", "secret"}`` → ``{"ak_certificate"}``
``GET /v1/crl``       the revocation list, DER (``application/pkix-crl``)

Binary fields are base64.  A refusal is HTTP 403 (400 for malformed
requests) with ``{"error": reason, "detail": text}``.  Bodies over 64 KiB
are refused before they are parsed.  The names of a TLS client certificate
(verified against the site CA during the handshake, when the PCA has one)
authorize enrolling those names; ``token`` is the other way.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.logger import Logger
from twisted.web import resource, server

from securemig.trust.pca.core import (
    MAX_EK_INTERMEDIATES,
    MAX_TOKEN_LENGTH,
    Authorization,
    EnrollmentError,
    PrivacyCA,
)

MAX_BODY = 64 * 1024
log = Logger()


def _b64(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise EnrollmentError("malformed", f"{field} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EnrollmentError("malformed", f"{field} is not base64") from None


def _b64_list(value: Any, field: str) -> list[bytes]:
    if not isinstance(value, list) or len(value) > MAX_EK_INTERMEDIATES:
        raise EnrollmentError(
            "malformed", f"{field} must be a list of at most {MAX_EK_INTERMEDIATES}"
        )
    return [_b64(v, field) for v in value]


class _Endpoint(resource.Resource):
    isLeaf = True

    def __init__(self, pca: PrivacyCA) -> None:
        super().__init__()
        self.pca = pca

    def render_POST(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        try:
            body = request.content.read(MAX_BODY + 1) if request.content else b""
            if len(body) > MAX_BODY:
                raise EnrollmentError("malformed", "request body too large")
            try:
                data = json.loads(body)
            except ValueError:
                raise EnrollmentError("malformed", "request body is not JSON") from None
            if not isinstance(data, dict):
                raise EnrollmentError("malformed", "request body is not a JSON object")
            answer = self.handle(data, request)
        except EnrollmentError as e:
            request.setResponseCode(400 if e.reason == "malformed" else 403)
            log.warn("enrollment refused: {reason}: {detail}", reason=e.reason, detail=e.detail)
            return json.dumps({"error": e.reason, "detail": e.detail}).encode()
        return json.dumps(answer).encode()

    def handle(self, data: dict[str, Any], request: server.Request) -> dict[str, Any]:
        raise NotImplementedError


def client_names(request: server.Request) -> list[str]:
    """The DNS names of the client's TLS certificate, if it sent one (the
    handshake verified it against the site CA: the PCA asks for client
    certificates only when it has one) and it may authenticate clients."""
    transport: Any = request.channel.transport if request.channel else None
    get = getattr(transport, "getPeerCertificate", None)
    peer = get() if get is not None else None
    if peer is None:
        return []
    cert = peer.to_cryptography()
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
            return []
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(names.get_values_for_type(x509.DNSName))


class Enroll(_Endpoint):
    """Step 1: check EK, AK and authorization, return the credential challenge."""

    def handle(self, data: dict[str, Any], request: server.Request) -> dict[str, Any]:
        host = data.get("host")
        if not isinstance(host, str):
            raise EnrollmentError("malformed", "host must be a string")
        token = data.get("token")
        if token is not None and (not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH):
            raise EnrollmentError("malformed", "token must be a short string")
        challenge = self.pca.begin(
            host,
            _b64(data.get("ek_certificate"), "ek_certificate"),
            _b64(data.get("ek_public"), "ek_public"),
            _b64(data.get("ak_public"), "ak_public"),
            Authorization(client_names(request), token),
            _b64_list(data.get("ek_intermediates", []), "ek_intermediates"),
        )
        log.info(
            "enrollment {id} of host {host}, authorized by a {proof}: challenge sent",
            id=challenge.enrollment_id,
            host=host,
            proof=challenge.authorized_by,
        )
        return {
            "enrollment_id": challenge.enrollment_id,
            "credential_blob": base64.b64encode(challenge.credential_blob).decode(),
            "encrypted_secret": base64.b64encode(challenge.encrypted_secret).decode(),
        }


class Activate(_Endpoint):
    """Step 2: check the activated secret, issue the AK certificate."""

    def handle(self, data: dict[str, Any], request: server.Request) -> dict[str, Any]:
        enrollment_id = data.get("enrollment_id")
        if not isinstance(enrollment_id, str):
            raise EnrollmentError("malformed", "enrollment_id must be a string")
        cert = self.pca.finish(enrollment_id, _b64(data.get("secret"), "secret"))
        log.info("enrollment {id}: AK certificate issued", id=enrollment_id)
        return {"ak_certificate": base64.b64encode(cert).decode()}


class RevocationList(resource.Resource):
    """The PCA's signed CRL, for every verifier to fetch."""

    isLeaf = True

    def __init__(self, pca: PrivacyCA) -> None:
        super().__init__()
        self.pca = pca

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"application/pkix-crl")
        return self.pca.crl()


def site(pca: PrivacyCA) -> server.Site:
    """The web site of a privacy CA."""
    root = resource.Resource()
    v1 = resource.Resource()
    root.putChild(b"v1", v1)  # type: ignore[arg-type]  # zope interfaces
    v1.putChild(b"enroll", Enroll(pca))  # type: ignore[arg-type]
    v1.putChild(b"activate", Activate(pca))  # type: ignore[arg-type]
    v1.putChild(b"crl", RevocationList(pca))  # type: ignore[arg-type]
    return server.Site(root)

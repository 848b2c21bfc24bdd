"""
The privacy CA's HTTPS+JSON service (twisted.web) over :class:`PrivacyCA`.

``POST /v1/enroll``   ``{"host", "ek_certificate", "ek_public", "ak_public"}``
                      → ``{"enrollment_id", "credential_blob", "encrypted_secret"}``
``POST /v1/activate`` ``{"enrollment_id", "secret"}`` → ``{"ak_certificate"}``

Binary fields are base64.  A refusal is HTTP 403 (400 for malformed
requests) with ``{"error": reason, "detail": text}``.  Bodies over 64 KiB
are refused before they are parsed.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from twisted.logger import Logger
from twisted.web import resource, server

from securemig.trust.pca.core import EnrollmentError, PrivacyCA

MAX_BODY = 64 * 1024
log = Logger()


def _b64(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise EnrollmentError("malformed", f"{field} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EnrollmentError("malformed", f"{field} is not base64") from None


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
            answer = self.handle(data)
        except EnrollmentError as e:
            request.setResponseCode(400 if e.reason == "malformed" else 403)
            log.warn("enrollment refused: {reason}: {detail}", reason=e.reason, detail=e.detail)
            return json.dumps({"error": e.reason, "detail": e.detail}).encode()
        return json.dumps(answer).encode()

    def handle(self, data: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class Enroll(_Endpoint):
    """Step 1: check EK and AK, return the credential challenge."""

    def handle(self, data: dict[str, Any]) -> dict[str, Any]:
        host = data.get("host")
        if not isinstance(host, str):
            raise EnrollmentError("malformed", "host must be a string")
        challenge = self.pca.begin(
            host,
            _b64(data.get("ek_certificate"), "ek_certificate"),
            _b64(data.get("ek_public"), "ek_public"),
            _b64(data.get("ak_public"), "ak_public"),
        )
        log.info(
            "enrollment {id} of host {host}: challenge sent", id=challenge.enrollment_id, host=host
        )
        return {
            "enrollment_id": challenge.enrollment_id,
            "credential_blob": base64.b64encode(challenge.credential_blob).decode(),
            "encrypted_secret": base64.b64encode(challenge.encrypted_secret).decode(),
        }


class Activate(_Endpoint):
    """Step 2: check the activated secret, issue the AK certificate."""

    def handle(self, data: dict[str, Any]) -> dict[str, Any]:
        enrollment_id = data.get("enrollment_id")
        if not isinstance(enrollment_id, str):
            raise EnrollmentError("malformed", "enrollment_id must be a string")
        cert = self.pca.finish(enrollment_id, _b64(data.get("secret"), "secret"))
        log.info("enrollment {id}: AK certificate issued", id=enrollment_id)
        return {"ak_certificate": base64.b64encode(cert).decode()}


def site(pca: PrivacyCA) -> server.Site:
    """The web site of a privacy CA."""
    root = resource.Resource()
    v1 = resource.Resource()
    root.putChild(b"v1", v1)  # type: ignore[arg-type]  # zope interfaces
    v1.putChild(b"enroll", Enroll(pca))  # type: ignore[arg-type]
    v1.putChild(b"activate", Activate(pca))  # type: ignore[arg-type]
    return server.Site(root)

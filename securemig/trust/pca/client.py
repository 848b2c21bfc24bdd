"""Enrolling a host's AK with a privacy CA over HTTPS (used by ``securemig host``)."""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from securemig.trust.tpm.tpm import TPM, KeyBlob


class EnrollmentRefused(Exception):
    """The privacy CA refused; the message carries its reason."""


class PCAUnreachable(OSError):
    """The privacy CA could not be reached (down, wrong URL, TLS failure);
    the message names it and its URL."""

    def __str__(self) -> str:
        return str(self.args[0])


def _post(url: str, payload: dict[str, Any], context: ssl.SSLContext) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            answer: dict[str, Any] = json.loads(response.read(1 << 20))
            return answer
    except urllib.error.HTTPError as e:
        try:
            body = json.loads(e.read(1 << 16))
            message = f"{body.get('error')}: {body.get('detail')}"
        except ValueError:
            message = f"HTTP {e.code}"
        raise EnrollmentRefused(message) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        origin = url.rsplit("/v1/", 1)[0]
        raise PCAUnreachable(
            f"cannot reach the privacy CA at {origin}: {reason} (is twistd securemig-pca "
            "running there? check --pca)"
        ) from None


def https_context(trust: Path, client: Path | None = None) -> ssl.SSLContext:
    """TLS 1.3 to the PCA, whose certificate is checked against ``trust``
    (the CA that issued it, PEM); with ``client`` (a directory holding
    ``tls.key`` and ``tls.pem``), that certificate is presented."""
    context = ssl.create_default_context(cafile=str(trust))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if client is not None:
        context.load_cert_chain(client / "tls.pem", client / "tls.key")
    return context


def enroll(
    url: str,
    trust: Path,
    tpm: TPM,
    ak: KeyBlob,
    host: str,
    *,
    client: Path | None = None,
    token: str | None = None,
    ek_kind: str = "rsa",
    ek_chain: Sequence[bytes] = (),
) -> bytes:
    """Run both enrollment steps; returns the AK certificate (DER).

    ``trust`` is the CA certificate (PEM) that issued the PCA's HTTPS
    certificate; the PCA's host name is checked against it.  The PCA needs
    an authorization: the site-CA TLS certificate for ``host`` in
    ``client`` (``tls.key``, ``tls.pem``), or a ``token`` from
    ``securemig pca authorize``.  The TPM's EK of ``ek_kind`` (rsa, ecc)
    is used, its certificate sent with the vendor's intermediate CA
    certificates ``ek_chain`` (DER).
    """
    context = https_context(trust, client)
    url = url.rstrip("/")
    b64 = base64.b64encode
    request = {
        "host": host,
        "ek_certificate": b64(tpm.ek_certificate(ek_kind)).decode(),
        "ek_public": b64(tpm.ek_public(ek_kind)).decode(),
        "ak_public": b64(ak.public).decode(),
        "ek_intermediates": [b64(c).decode() for c in ek_chain],
    }
    if token is not None:
        request["token"] = token
    challenge = _post(f"{url}/v1/enroll", request, context)
    secret = tpm.activate_credential(
        ak,
        base64.b64decode(challenge["credential_blob"]),
        base64.b64decode(challenge["encrypted_secret"]),
        ek_kind,
    )
    answer = _post(
        f"{url}/v1/activate",
        {"enrollment_id": challenge["enrollment_id"], "secret": b64(secret).decode()},
        context,
    )
    return base64.b64decode(answer["ak_certificate"])

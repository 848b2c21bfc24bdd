"""
The privacy CA's revocation list, as every verifier holds it.

The PCA publishes a signed X.509 CRL of the AK certificates it revoked
(``GET /v1/crl``, :mod:`securemig.trust.pca.web`).  A verifier (a
destination daemon, a source's ``securemig migrate``) fetches it over
HTTPS every ``refresh`` seconds (the daemon; a source once, when it
starts), keeps the last good one in ``IDENTITY/crl.der`` for the next
process, and checks every peer's AK certificate against it.

It fails closed: a CRL not signed by the PCA (whose certificate is the
identity's ``pca.pem``) is refused and the one held is kept; with no CRL,
or one whose lastUpdate is more than ``max_age`` seconds old (the PCA was
unreachable for that long, or someone withholds newer lists), every peer is
refused, saying why.
"""

from __future__ import annotations

import contextlib
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from securemig import files
from securemig.trust.attest import AttestationError, Check
from securemig.trust.pca.client import https_context

#: Seconds between fetches of a daemon (``--crl-refresh``).
CRL_REFRESH = 300.0
#: How old (by its lastUpdate) a CRL may be before every peer is refused
#: (``--crl-max-age``).
CRL_MAX_AGE = 3600.0
#: The largest CRL read from the PCA (about 20 000 revoked certificates).
MAX_CRL = 1 << 20
#: How long one fetch may take.
FETCH_TIMEOUT = 10.0
#: Where an identity keeps the last good CRL.
CRL_FILE = "crl.der"


class CRLError(Exception):
    """A CRL could not be had or is not the PCA's; the message says which."""


def parse_crl(der: bytes, pca: x509.Certificate) -> x509.CertificateRevocationList:
    """The CRL in ``der``, once it is shown to be signed by the ``pca``."""
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError:
        raise CRLError("the revocation list does not parse") from None
    key = pca.public_key()
    if crl.issuer != pca.subject or not (
        isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey))
        and crl.is_signature_valid(key)
    ):
        raise CRLError("the revocation list is not signed by the privacy CA (forged?)")
    return crl


class RevocationList:
    """The CRL of the privacy CA ``pca`` at ``url`` (its base URL), fetched
    over HTTPS checked against ``trust`` (the site CA, PEM), kept in
    ``cache``."""

    def __init__(
        self,
        pca: x509.Certificate,
        url: str,
        trust: Path,
        cache: Path,
        *,
        max_age: float = CRL_MAX_AGE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pca = pca
        self.url = url.rstrip("/") + "/v1/crl"
        self.trust = trust
        self.cache = cache
        self.max_age = max_age
        self._clock = clock
        self._crl: x509.CertificateRevocationList | None = None
        #: Why the last fetch failed (None after a good one).
        self.last_error: str | None = None
        # None yet, or not the PCA's: fetched at start.
        with contextlib.suppress(OSError, CRLError):
            self.accept(cache.read_bytes(), save=False)

    def accept(self, der: bytes, save: bool = True) -> None:
        """Hold ``der`` if it is the PCA's and not older than the one held
        (a replayed old list cannot hide a revocation); :class:`CRLError`
        otherwise."""
        crl = parse_crl(der, self.pca)
        if self._crl is not None and crl.last_update_utc < self._crl.last_update_utc:
            raise CRLError("the revocation list is older than the one held (replayed?)")
        self._crl = crl
        if save:
            files.write_durably(self.cache, der)

    def fetch(self) -> None:
        """Fetch the CRL now; on failure keep the one held and remember why
        (:attr:`last_error`, also raised as :class:`CRLError`)."""
        try:
            context: ssl.SSLContext = https_context(self.trust)
            with urllib.request.urlopen(self.url, context=context, timeout=FETCH_TIMEOUT) as r:
                der = r.read(MAX_CRL + 1)
            if len(der) > MAX_CRL:
                raise CRLError(f"the revocation list is over {MAX_CRL} bytes")
            self.accept(der)
        except CRLError as e:
            self.last_error = str(e)
            raise
        except (OSError, urllib.error.URLError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            self.last_error = f"cannot fetch {self.url}: {reason}"
            raise CRLError(self.last_error) from None
        self.last_error = None

    def check(self, cert_der: bytes, host: str) -> None:
        """Refuse the AK certificate ``cert_der`` of ``host`` if it is
        revoked, or if no fresh CRL is held (fail closed)."""
        crl = self._crl
        if crl is None:
            raise AttestationError(
                Check.REVOKED,
                "no revocation list from the privacy CA yet, so no peer is accepted"
                + (f" ({self.last_error})" if self.last_error else ""),
            )
        age = self._clock() - crl.last_update_utc.timestamp()
        if age > self.max_age:
            raise AttestationError(
                Check.REVOKED,
                f"the revocation list is stale: signed {age:.0f} s ago, over the "
                f"--crl-max-age of {self.max_age:g} s, so no peer is accepted"
                + (f" ({self.last_error})" if self.last_error else ""),
            )
        try:
            serial = x509.load_der_x509_certificate(cert_der).serial_number
        except ValueError:
            raise AttestationError(Check.AK_CERTIFICATE, "AK certificate does not parse") from None
        entry = crl.get_revoked_certificate_by_serial_number(serial)
        if entry is not None:
            raise AttestationError(
                Check.REVOKED,
                f"the AK certificate of {host} (serial {serial:x}) was revoked by the "
                f"privacy CA on {entry.revocation_date_utc:%Y-%m-%d %H:%M:%S} UTC",
            )


def for_identity(
    identity_dir: Path, url: str | None, pca_url: str | None, max_age: float = CRL_MAX_AGE
) -> RevocationList | None:
    """The revocation list a host with this identity checks peers against:
    from ``url`` if given, else from the privacy CA it enrolled with
    (``pca_url``, recorded by ``host init``); None if it knows of neither
    (an identity from before revocation)."""
    base = url or pca_url
    if base is None:
        return None
    pca = x509.load_pem_x509_certificate((identity_dir / "pca.pem").read_bytes())
    return RevocationList(
        pca, base, identity_dir / "site-ca.pem", identity_dir / CRL_FILE, max_age=max_age
    )

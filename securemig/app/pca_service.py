"""``twistd securemig-pca``: the privacy CA's HTTPS service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import crypto
from twisted.application import service
from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from securemig.app.service import ListenService, ServiceOptions
from securemig.trust.pca.core import PrivacyCA
from securemig.trust.pca.web import site

reactor: Any = _reactor


class Options(ServiceOptions):
    """Command-line options of ``twistd securemig-pca``."""

    synopsis = "--dir DIR --listen ssl:PORT[:privateKey=KEY:certKey=CERT][:interface=ADDR]"
    longdesc = (
        "Run a securemig privacy CA: certify hosts' attestation keys after checking "
        "their EK certificates and proving, by credential activation, that each AK "
        "lives in the TPM of that EK, and only for a host name the operator authorized "
        "(a TLS client certificate for it from the site CA of `pca init --site-ca`, or "
        "a token from `securemig pca authorize`); publish the revocation list at "
        "/v1/crl.  DIR is made with `securemig pca init`."
    )
    directory_option = "dir"
    optParameters = [
        ["dir", None, None, "The privacy CA's directory (securemig pca init)."],
        [
            "listen",
            None,
            None,
            "An ssl: endpoint (HTTPS only); without privateKey= and certKey=, DIR/tls.key "
            "and DIR/tls.pem (securemig pca init --tls-name).",
        ],
        ["port-file", None, None, "Write the listening port number here once bound."],
    ]

    def postOptions(self) -> None:
        """Refuse incomplete or plain-HTTP configurations."""
        super().postOptions()
        if not self["dir"]:
            raise usage.UsageError("--dir is required")
        if not (Path(self["dir"]) / "ca.pem").exists():
            raise usage.UsageError(f"{self['dir']} is not a privacy CA (securemig pca init)")
        if not self["listen"] or not self["listen"].startswith("ssl:"):
            raise usage.UsageError("--listen must be an ssl: endpoint (HTTPS only)")
        tls = Path(self["dir"]).absolute()
        if "privateKey=" not in self["listen"]:
            if not (tls / "tls.key").is_file():
                raise usage.UsageError(
                    f"--listen needs privateKey=KEY:certKey=CERT, or {tls}/tls.key and tls.pem "
                    "(securemig pca init --tls-name NAME --site-ca DIR makes them)"
                )
            # The HTTPS key and certificate pca init --tls-name made.
            self["listen"] += f":privateKey={tls / 'tls.key'}:certKey={tls / 'tls.pem'}"


def makeService(options: Options) -> service.MultiService:
    """The privacy CA service."""
    top = service.MultiService()
    pca = PrivacyCA(Path(options["dir"]))
    endpoint = serverFromString(reactor, options["listen"])
    if pca.site_ca is not None:
        ask_for_client_certificates(endpoint, pca.site_ca.public_bytes(Encoding.PEM))
    port_file = Path(options["port-file"]) if options["port-file"] else None
    ListenService(endpoint, site(pca), port_file, "enrollments (HTTPS)").setServiceParent(top)
    return top


def ask_for_client_certificates(endpoint: Any, site_ca_pem: bytes) -> None:
    """Make the ssl: ``endpoint`` ask clients for a TLS certificate, verified
    against the site CA, but not require one (a client with a token has
    none).  Endpoint strings cannot say this, so the context factory that
    twistd parsed from ``--listen`` is remade with the same key and
    certificate."""
    parsed = endpoint._sslContextFactory
    endpoint._sslContextFactory = ssl.CertificateOptions(
        privateKey=parsed.privateKey,
        certificate=parsed.certificate,
        extraCertChain=parsed.extraCertChain,
        verify=True,
        caCerts=[crypto.load_certificate(crypto.FILETYPE_PEM, site_ca_pem)],
        requireCertificate=False,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_3,
    )

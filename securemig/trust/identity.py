"""
A host's identity directory: what ``securemig host init`` sets up, once.

::

    DIR/host.json        {"name": HOST, "tpm": TCTI}
    DIR/tls.key, tls.pem the host's TLS key and certificate (site CA)
    DIR/site-ca.pem      the site CA, to check peers' TLS certificates
    DIR/ak.blob          the attestation key (usable only in this TPM)
    DIR/ak.der           its certificate from the privacy CA
    DIR/pca.pem          the privacy CA, to check peers' AK certificates
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securemig import files
from securemig.trust.pca.client import enroll
from securemig.trust.pki import Authority
from securemig.trust.tpm.tpm import TPM, KeyBlob


@dataclass
class Identity:
    """A loaded identity directory."""

    directory: Path
    name: str
    tpm: str

    @property
    def ak(self) -> KeyBlob:
        """The attestation key blob."""
        return KeyBlob.from_bytes((self.directory / "ak.blob").read_bytes())

    @property
    def ak_certificate(self) -> bytes:
        """The AK certificate (DER)."""
        return (self.directory / "ak.der").read_bytes()

    def attestation_key(self) -> tuple[KeyBlob, bytes]:
        """The AK and its certificate, read from one version of the directory:
        both through one directory descriptor, so a renewal swapping the
        directory between the two reads cannot pair a new AK with the old
        certificate."""
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            blob, cert = (_read_at(fd, name) for name in ("ak.blob", "ak.der"))
        finally:
            os.close(fd)
        return KeyBlob.from_bytes(blob), cert

    @classmethod
    def load(cls, directory: Path) -> Identity:
        """Read ``host.json``."""
        data = json.loads((directory / "host.json").read_text())
        return cls(directory, data["name"], data["tpm"])


def _read_at(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def issue_tls(site_ca: Authority, name: str, directory: Path) -> None:
    """A TLS key (0600) and certificate for ``name`` from the site CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    files.write_durably(
        directory / "tls.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        mode=0o600,
    )
    cert = site_ca.issue(key.public_key(), name)
    files.write_durably(directory / "tls.pem", cert.public_bytes(serialization.Encoding.PEM))


def init_host(
    directory: Path, name: str, tcti: str, site_ca_dir: Path, pca_url: str, pca_ca: Path
) -> Identity:
    """Set up a host: TLS identity, AK, enrollment with the privacy CA."""
    site_ca = Authority.load(site_ca_dir)
    return write_identity(
        directory,
        name,
        tcti,
        site_ca,
        pca_ca.read_bytes(),
        lambda tpm, ak: enroll(pca_url, directory / "site-ca.pem", tpm, ak, name),
    )


def write_identity(
    directory: Path,
    name: str,
    tcti: str,
    site_ca: Authority,
    pca_pem: bytes,
    certify: Callable[[TPM, KeyBlob], bytes],
) -> Identity:
    """Fill an identity directory; ``certify`` obtains the AK certificate
    (enrollment with a privacy CA, over HTTPS or, in tests, in process)."""
    directory.mkdir(parents=True, exist_ok=True)
    issue_tls(site_ca, name, directory)
    files.write_durably(
        directory / "site-ca.pem", site_ca.cert.public_bytes(serialization.Encoding.PEM)
    )
    files.write_durably(directory / "pca.pem", pca_pem)
    with TPM(tcti) as tpm:
        ak = tpm.create_ak()
        files.write_durably(directory / "ak.blob", ak.to_bytes())
        cert = certify(tpm, ak)
    files.write_durably(directory / "ak.der", cert)
    files.write_durably(
        directory / "host.json", json.dumps({"name": name, "tpm": tcti}, indent=2).encode()
    )
    return Identity(directory, name, tcti)

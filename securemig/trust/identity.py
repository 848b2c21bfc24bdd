"""
A host's identity directory: what ``securemig host init`` sets up and
``securemig host renew`` renews.

::

    DIR/host.json        {"name": HOST, "tpm": TCTI, "pca": URL, "ak": ALG, "ek": KIND}
    DIR/ek-chain.pem     the TPM vendor's intermediate CAs of its EK certificate
                         (optional: sent with each enrollment)
    DIR/tls.key, tls.pem the host's TLS key and certificate (site CA)
    DIR/site-ca.pem      the site CA, to check peers' TLS certificates
    DIR/ak.blob          the attestation key (usable only in this TPM)
    DIR/ak.der           its certificate from the privacy CA
    DIR/pca.pem          the privacy CA, to check peers' AK certificates
    DIR/policy/          golden values of peers, by default (not made here)

An identity is never changed file by file: a reader could see a new AK with
the old AK's certificate, or a half-made directory after a crash.  It is
built in a temporary directory next to DIR and swapped in with one rename
(``renameat2(RENAME_EXCHANGE)`` where the file system has it, so DIR never
disappears; else two renames).  What it replaces is kept aside as
``DIR.old-TIMESTAMP``, for the operator to remove once satisfied (it holds
the old TLS private key).

``host init`` refuses a directory that already holds anything, unless told
to replace it (``force``).  ``host renew`` keeps the host's name and TPM and
gives it a new AK (enrolled again, so a new AK certificate) and a new TLS key
and certificate; everything else in DIR (the ``policy/`` directory of peers'
golden values) moves into the new identity, so peers' values and their AKs'
counters survive.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securemig import files
from securemig.trust.pca.client import enroll
from securemig.trust.pki import Authority
from securemig.trust.tpm.tpm import TPM, KeyBlob

#: The TPM vendor's intermediate CA certificates (PEM) of the EK certificate.
EK_CHAIN = "ek-chain.pem"
#: The files an identity consists of; anything else in DIR is the operator's
#: (``policy/``) and moves along on renewal.
IDENTITY_FILES = (
    "host.json",
    "tls.key",
    "tls.pem",
    "site-ca.pem",
    "ak.blob",
    "ak.der",
    "pca.pem",
    EK_CHAIN,
)


class IdentityExists(Exception):
    """``host init`` into a directory that already holds something."""


#: Given to the enrollment: the TPM, the new AK, and the directory holding
#: the host's new TLS key and certificate (to present to the PCA).
Certify = Callable[[TPM, KeyBlob, Path], bytes]


@dataclass
class Identity:
    """A loaded identity directory."""

    directory: Path
    name: str
    tpm: str
    #: The privacy CA's URL it enrolled with (where its CRL is); None for
    #: identities made before it was recorded.
    pca_url: str | None = None
    #: The kind of AK (:data:`securemig.trust.tpm.tpm.AK_TEMPLATES`).
    ak_alg: str = "ecc"
    #: The EK it enrolls with (:data:`securemig.trust.tpm.tpm.EK_KINDS`).
    ek_kind: str = "rsa"
    #: The vendor's intermediate CA certificates of the EK's (PEM; may be empty).
    ek_chain: bytes = b""

    def ek_chain_der(self) -> list[bytes]:
        """:attr:`ek_chain` as DER certificates, for the enrollment."""
        if not self.ek_chain:
            return []
        certs = x509.load_pem_x509_certificates(self.ek_chain)
        return [c.public_bytes(serialization.Encoding.DER) for c in certs]

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
        chain = directory / EK_CHAIN
        return cls(
            directory,
            data["name"],
            data["tpm"],
            data.get("pca"),
            data.get("ak", "ecc"),
            data.get("ek", "rsa"),
            chain.read_bytes() if chain.exists() else b"",
        )


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


def _pca_enrollment(
    pca_url: str, site_ca_dir: Path, identity: Identity, token: str | None = None
) -> Certify:
    # The PCA's HTTPS certificate is checked against the site CA's
    # certificate.  The host's new site-CA TLS certificate authorizes the
    # enrollment (when the PCA trusts the site CA), or the token: then no
    # certificate is presented (a PCA that trusts another site CA would
    # refuse the handshake).
    return lambda tpm, ak, tls_dir: enroll(
        pca_url,
        site_ca_dir / "ca.pem",
        tpm,
        ak,
        identity.name,
        client=None if token else tls_dir,
        token=token,
        ek_kind=identity.ek_kind,
        ek_chain=identity.ek_chain_der(),
    )


def init_host(
    directory: Path,
    name: str,
    tcti: str,
    site_ca_dir: Path,
    pca_url: str,
    pca_ca: Path,
    *,
    force: bool = False,
    token: str | None = None,
    ak_alg: str = "ecc",
    ek_kind: str = "rsa",
    ek_chain: Path | None = None,
) -> Identity:
    """Set up a host: TLS identity, AK (``ak_alg``), enrollment with the
    privacy CA (authorized by the new TLS certificate or by ``token``) with
    the TPM's EK of ``ek_kind`` and the vendor's intermediates ``ek_chain``.
    Refuses a ``directory`` that holds anything unless ``force`` (it is then
    kept aside, see :func:`write_identity`)."""
    check_replaceable(directory, force)
    site_ca = Authority.load(site_ca_dir)
    identity = Identity(
        directory,
        name,
        tcti,
        pca_url,
        ak_alg,
        ek_kind,
        ek_chain.read_bytes() if ek_chain else b"",
    )
    return write_identity(
        directory,
        name,
        tcti,
        site_ca,
        pca_ca.read_bytes(),
        _pca_enrollment(pca_url, site_ca_dir, identity, token),
        force=force,
        like=identity,
    )


def check_replaceable(directory: Path, force: bool) -> None:
    """Raise :class:`IdentityExists` if ``directory`` holds anything and
    ``force`` is not given (an empty directory is fine); a non-directory
    is never replaced."""
    if not directory.exists() and not directory.is_symlink():
        return
    if not directory.is_dir() or directory.is_symlink():
        raise IdentityExists(f"{directory} exists and is not a directory")
    if force or not any(directory.iterdir()):
        return
    what = "an identity" if (directory / "host.json").exists() else "files"
    raise IdentityExists(
        f"{directory} already holds {what}; to renew this host's AK and TLS certificate, "
        "use `securemig host renew`; to replace it, --force (the old one is kept aside)"
    )


def write_identity(
    directory: Path,
    name: str,
    tcti: str,
    site_ca: Authority,
    pca_pem: bytes,
    certify: Certify,
    *,
    force: bool = False,
    like: Identity | None = None,
) -> Identity:
    """Make an identity directory; ``certify`` obtains the AK certificate
    (enrollment with a privacy CA, over HTTPS or, in tests, in process);
    ``like`` gives its other attributes (PCA URL, kinds of AK and EK).

    Built in a temporary directory, then renamed into place: a failure leaves
    ``directory`` as it was.  A ``directory`` holding anything is refused
    (:class:`IdentityExists`) unless ``force``; it is then renamed aside
    (:func:`kept_aside` returns where) as a whole, ``policy/`` included."""
    check_replaceable(directory, force)
    identity = Identity(directory, name, tcti)
    if like is not None:
        identity = like
    new = _staging(directory)
    try:
        _fill(new, identity, site_ca, pca_pem, certify)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if directory.is_dir() and any(directory.iterdir()):
        _swap(new, directory)
    else:
        # Absent or empty: rename(2) replaces an empty directory in one step.
        os.rename(new, directory)
        files.fsync_dir(directory.parent)
    return identity


def renew_host(
    directory: Path, site_ca_dir: Path, pca_url: str, pca_ca: Path | None = None
) -> Identity:
    """``securemig host renew``: a new AK enrolled with the privacy CA (so a
    new AK certificate) and a new TLS key and certificate from the site CA,
    for the same host name and TPM; swapped in atomically, the old identity
    kept aside.  ``pca_ca`` defaults to the identity's ``pca.pem``."""
    old = Identity.load(directory)
    site_ca = Authority.load(site_ca_dir)
    pca_pem = (pca_ca or directory / "pca.pem").read_bytes()
    return renew_identity(
        directory, site_ca, pca_pem, _pca_enrollment(pca_url, site_ca_dir, old), pca_url
    )


def renew_identity(
    directory: Path,
    site_ca: Authority,
    pca_pem: bytes,
    certify: Certify,
    pca_url: str | None = None,
) -> Identity:
    """Renew the identity in ``directory`` (see :func:`renew_host`), with
    ``certify`` obtaining the new AK's certificate (from ``pca_url``, which
    the new identity records; default: the one it had)."""
    old = Identity.load(directory)
    old.pca_url = pca_url or old.pca_url
    new = _staging(directory)
    try:
        _fill(new, old, site_ca, pca_pem, certify)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    aside = _swap(new, directory)
    # The operator's files (policy/) move into the new identity: peers'
    # golden values and their AKs' counters belong to the host, not to its
    # key.  Moved after the swap, so that nothing written to them until then
    # is lost, and nothing of them is ever removed.
    for entry in sorted(p.name for p in aside.iterdir() if p.name not in IDENTITY_FILES):
        try:
            os.rename(aside / entry, directory / entry)
        except OSError as e:
            raise OSError(
                e.errno, f"{e.strerror}: move {aside / entry} into {directory} by hand"
            ) from None
    files.fsync_dir(directory)
    return old


def _staging(directory: Path) -> Path:
    """A new temporary directory next to ``directory`` (same file system, so
    it can be renamed into place)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{directory.name}.new-", dir=directory.parent))
    # mkdtemp makes it 0700; give it the mode a plain mkdir would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    return path


def _fill(
    directory: Path,
    identity: Identity,
    site_ca: Authority,
    pca_pem: bytes,
    certify: Certify,
) -> None:
    issue_tls(site_ca, identity.name, directory)
    files.write_durably(
        directory / "site-ca.pem", site_ca.cert.public_bytes(serialization.Encoding.PEM)
    )
    files.write_durably(directory / "pca.pem", pca_pem)
    with TPM(identity.tpm) as tpm:
        ak = tpm.create_ak(identity.ak_alg)
        files.write_durably(directory / "ak.blob", ak.to_bytes())
        cert = certify(tpm, ak, directory)
    files.write_durably(directory / "ak.der", cert)
    record = {
        "name": identity.name,
        "tpm": identity.tpm,
        "ak": identity.ak_alg,
        "ek": identity.ek_kind,
    }
    if identity.pca_url:
        record["pca"] = identity.pca_url
    if identity.ek_chain:
        files.write_durably(directory / EK_CHAIN, identity.ek_chain)
    files.write_durably(directory / "host.json", json.dumps(record, indent=2).encode())


def kept_aside(directory: Path) -> list[Path]:
    """The old identities kept aside next to ``directory``, oldest first."""
    return sorted(directory.parent.glob(f"{directory.name}.old-*"))


def _aside_path(directory: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    candidate = directory.with_name(f"{directory.name}.old-{stamp}")
    n = 1
    # Two renewals within one second get -1, -2, ...; sorted names stay in order.
    while candidate.exists() or candidate.is_symlink():
        candidate = directory.with_name(f"{directory.name}.old-{stamp}-{n}")
        n += 1
    return candidate


def _swap(new: Path, directory: Path) -> Path:
    """Put ``new`` in place of ``directory``, which goes to
    ``DIR.old-TIMESTAMP`` (returned); ``directory`` never stops existing
    where the file system can exchange two names atomically.  ``new`` is
    removed if the swap fails."""
    try:
        aside = _aside_path(directory)
        swapped = _exchange(new, directory)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    _after_swap(new, directory, aside, swapped)
    return aside


def _after_swap(new: Path, directory: Path, aside: Path, swapped: bool) -> None:
    if swapped:
        # ``new`` names the old identity now: it is kept, whatever happens.
        try:
            os.rename(new, aside)
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror}; the old identity is in {new}") from None
    else:
        try:
            os.rename(directory, aside)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        try:
            os.rename(new, directory)
        except BaseException:
            os.rename(aside, directory)
            shutil.rmtree(new, ignore_errors=True)
            raise
    files.fsync_dir(directory.parent)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with ``renameat2(RENAME_EXCHANGE)``; False
    where the C library or the file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(
        _AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), ctypes.c_uint(_RENAME_EXCHANGE)
    )
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))

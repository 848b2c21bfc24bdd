"""
A VM's vTPM: a swtpm state encrypted at rest, and the key that opens it.

The state lives in the bundle's ``vtpm/`` directory, encrypted by swtpm
with a 256-bit key; the key is sealed to the host TPM (``vtpm-key.sealed``)
and reaches swtpm only through a pipe, never a file.  The state travels as
the bundle's ``vtpm`` image, as stored (encrypted); the key travels wrapped
to the destination's attested TPM.  A bundle's manifest records a digest of
the vTPM's EK public key, its identity: after a migration the destination
checks that the state it received, opened with the key it unwrapped, is
that same vTPM.

The identity is SHA-256 of the public area of the ECC P-256 EK (the TCG
default template), recreated from the vTPM's endorsement seed.  Bundles
made before took the RSA-2048 EK's: the same seed, so the same vTPM; a
check that does not match the ECC digest tries that one too.  (Recreating
the RSA EK generates its primes, about 0.1 s in swtpm; the ECC one about
0.01 s, and a live arrival's check is on the guest's switchover path.)
"""

from __future__ import annotations

import hashlib
import hmac
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securemig.protocol.errors import ErrorCode, LocalFault
from securemig.trust.attestor import open_attestor
from securemig.trust.tpm import swtpm
from securemig.trust.tpm.tpm import TPM

#: Bundle-relative directory of the vTPM state, and swtpm's state file in it.
STATE_DIR = "vtpm"
STATE_FILE = swtpm.STATE_FILE
#: The image name under which the state travels.
IMAGE = "vtpm"
#: The directory, in a host's identity directory (or a lab's), of the CA that
#: signs the EK certificates of the vTPMs created there.
CA_DIR = "vtpm-ca"


#: HKDF label of the key swtpm encrypts its migration blobs with.
#: The key of swtpm's --migration-key (it encrypts the vTPM blobs inside QEMU's own
#: stream), derived from the vTPM state key; named apart from the TPM migration key
#: of key release (securemig.trust.keyrelease.MigrationKey).
STREAM_KEY_LABEL = b"securemig vtpm: swtpm migration key"


class VTPMError(LocalFault, RuntimeError):
    """The vTPM does not start with this key, or is not the expected one."""

    # The vTPM does not open with the key that came with it.
    default_code = ErrorCode.KEY_TRANSFER_FAILED


def create(bundle_dir: Path, key: bytes, vendor_ca: Path) -> str:
    """Manufacture a vTPM in ``bundle_dir/vtpm``, encrypted with ``key``;
    returns its identity (see :func:`identity`)."""
    state = bundle_dir / STATE_DIR
    swtpm.provision(state, vendor_ca, key)
    # swtpm_setup leaves copies of the EK certificates beside the state.
    for leftover in state.glob("ek-certs"):
        for f in leftover.iterdir():
            f.unlink()
        leftover.rmdir()
    return identity(state, key)


class IdentityCheck:
    """A TPM started ahead for :func:`identity`, before the state to check
    is there (a live arrival's vTPM state comes last in its guest's
    stream): when it comes, only the copy, the TPM's init and the EK's
    recreation remain (about 0.1 s instead of 0.25 s; the process's start
    is most of it).  The TPM is killed with the thread that started it, or
    its process: call :meth:`identity` (or :meth:`close`) from that thread."""

    def __init__(self, key: bytes, scratch_in: Path) -> None:
        self.scratch = Path(tempfile.mkdtemp(prefix=".vtpm-check-", dir=scratch_in))
        state = self.scratch / "state"
        state.mkdir()
        try:
            # Killed with this process: a crash mid-check leaves no TPM running.
            self.process = swtpm.start(state, key, dies_with_parent=True, initialized=False)
        except BaseException:
            shutil.rmtree(self.scratch, ignore_errors=True)
            raise

    def identity(self, state: Path, expected: str | None = None) -> str:
        """The identity of the vTPM in ``state`` (SHA-256 of its ECC EK's
        public area), read from a copy (still encrypted) in the scratch
        directory: a started TPM rewrites its state, and the state must stay
        exactly what was migrated.  ``expected``, when it is not that digest,
        may be the RSA EK's (an older bundle's identity): returned if it is.
        Fails if the key does not open the state.  Ends the TPM."""
        try:
            for f in state.iterdir():
                if f.is_file() and f.name != ".lock":  # the TPM holds its own lock
                    shutil.copyfile(f, self.scratch / "state" / f.name)
            self.process.init()
            with TPM(self.process.tcti) as tpm:
                tpm.startup()
                found = hashlib.sha256(tpm.ek_public("ecc")).hexdigest()
                if expected is None or hmac.compare_digest(found, expected):
                    return found
                older = hashlib.sha256(tpm.ek_public("rsa")).hexdigest()
                return older if hmac.compare_digest(older, expected) else found
        except Exception as e:
            raise VTPMError(f"the vTPM in {state} does not start with its key: {e}") from None
        finally:
            self.close()

    def close(self) -> None:
        """End the TPM and remove the scratch copy (once, however often asked)."""
        self.process.stop()
        shutil.rmtree(self.scratch, ignore_errors=True)


def identity(
    state: Path,
    key: bytes,
    scratch_in: Path | None = None,
    ahead: IdentityCheck | None = None,
    expected: str | None = None,
) -> str:
    """Start the vTPM with ``key`` and return its identity (see the module's
    docstring; ``expected``: :meth:`IdentityCheck.identity`).  Fails if the
    key does not open the state.

    It runs on a copy (still encrypted) beside the state, or in
    ``scratch_in``: a started TPM rewrites its state, and the state must
    stay exactly what was migrated.  (A live arrival's check runs while
    its staging may be moved into place: its copy is made outside it.)
    ``ahead``: the TPM started for it already (:class:`IdentityCheck`)."""
    try:
        check = ahead or IdentityCheck(key, scratch_in or state.parent)
    except Exception as e:
        raise VTPMError(f"the vTPM in {state} does not start with its key: {e}") from None
    return check.identity(state, expected)


def unsealer(identity: Path) -> Callable[[bytes], bytes]:
    """Unseals vTPM keys sealed to the TPM of the host whose identity
    directory is ``identity``; the TPM is opened for each call and closed
    after, so a long-lived process does not hold it."""

    def unseal(sealed: bytes) -> bytes:
        with open_attestor(identity, None, False) as attestor:
            return attestor.unseal(sealed)

    return unseal


def key_reader(unseal: Callable[[bytes], bytes]) -> Callable[[Any], bytes]:
    """The vTPM key of a bundle, read from its sealed copy and unsealed
    with ``unseal`` (what hypervisor backends take as ``vtpm_key``)."""
    return lambda bundle: unseal(bundle.vtpm_key_path.read_bytes())


def stream_key(key: bytes) -> bytes:
    """The key swtpm's ``--migration-key`` gets for a vTPM whose state key
    is ``key``: derived from it (HKDF-SHA256, its own label), so it is
    sealed, wrapped and released with it and never stored on its own."""
    return HKDF(SHA256(), 32, salt=None, info=STREAM_KEY_LABEL).derive(key)

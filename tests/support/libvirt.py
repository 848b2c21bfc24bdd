"""A libvirt domain's secret sealed to, and unsealed by, the shared TPM."""

from __future__ import annotations

from securemig.hypervisor.bundle import Bundle
from securemig.trust.attestor import DEFAULT_PCRS
from securemig.trust.tpm.tpm import KeyBlob

from .tpm import shared_tpm


def seal(value: bytes) -> bytes:
    """Seal to the test's host TPM, as ``securemig vm adopt --identity`` does."""
    tpm = shared_tpm()[1]
    return tpm.seal(value, DEFAULT_PCRS, tpm.pcr_read(DEFAULT_PCRS)).to_bytes()


def unseal(bundle: Bundle) -> bytes:
    """The bundle's secret value, unsealed by the test's host TPM."""
    tpm = shared_tpm()[1]
    return tpm.unseal(KeyBlob.from_bytes(bundle.vtpm_key_path.read_bytes()), DEFAULT_PCRS)

"""
A host's side of attestation: its TPM, identity, golden values of peers.

:class:`Attestor` quotes this host's PCRs for a peer, verifies a peer's
evidence, and seals and unseals vTPM keys to this host's TPM.  Open it with
:func:`open_attestor` and close it when done (it is a context manager): the
host TPM may be a simulator with three object slots and no resource manager.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from securemig.protocol import wire
from securemig.trust import attest
from securemig.trust.identity import Identity
from securemig.trust.policy import PolicyStore
from securemig.trust.tpm.tpm import TPM, KeyBlob

#: PCRs quoted and bound by default (firmware, its configuration, option
#: ROMs, boot loader, secure boot policy).
DEFAULT_PCRS = (0, 1, 2, 3, 4, 7)


@dataclass
class Attestor:
    """A host's side of attestation: its TPM, identity and view of peers."""

    identity: Identity
    tpm: TPM
    policy: PolicyStore
    pca: x509.Certificate
    tofu: bool = False
    pcrs: tuple[int, ...] = DEFAULT_PCRS

    def evidence(self, qualifying: bytes) -> wire.Evidence:
        """Quote our PCRs for ``qualifying``."""
        ak = self.identity.ak
        quote = self.tpm.quote(ak, self.pcrs, qualifying)
        values = self.tpm.pcr_read(self.pcrs)
        return wire.Evidence(
            attest=quote.attest,
            signature=quote.signature,
            pcrs=tuple(wire.PcrValue(p, v) for p, v in sorted(values.items())),
            ak_public=ak.public,
            ak_certificate=self.identity.ak_certificate,
        )

    def verify(
        self, evidence: wire.Evidence, qualifying: bytes, peer_name: str
    ) -> dict[int, bytes]:
        """Every check of the verifier, the AK certificate naming the TLS
        peer, and the peer's golden values (recorded on first use with tofu).
        Returns the verified PCR values."""
        attest.verify_ak_certificate(
            evidence.ak_certificate, self.pca, evidence.ak_public, peer_name
        )
        golden = self.policy.expected(peer_name, self.tofu)
        values = {v.index: v.value for v in evidence.pcrs}
        clock = attest.verify_quote(
            evidence.ak_public,
            evidence.attest,
            evidence.signature,
            qualifying=qualifying,
            pcrs=self.pcrs,
            values=values,
            golden=golden.pcrs if golden else None,
            previous=golden.clock if golden else None,
        )
        self.policy.seen(peer_name, values, clock)
        return values

    def seal(self, secret: bytes) -> bytes:
        """Seal a vTPM key to this host's TPM in its current PCR state."""
        return self.tpm.seal(secret, self.pcrs, self.tpm.pcr_read(self.pcrs)).to_bytes()

    def unseal(self, sealed: bytes) -> bytes:
        """Unseal a vTPM key sealed by :meth:`seal` on this host."""
        return self.tpm.unseal(KeyBlob.from_bytes(sealed), self.pcrs)

    def close(self) -> None:
        """Release the host TPM (a simulator has few object slots)."""
        self.tpm.close()

    def __enter__(self) -> Attestor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_attestor(identity_dir: Path, policy_dir: Path | None, tofu: bool) -> Attestor:
    """A host's attestor from its identity directory (``securemig host init``);
    golden values default to ``IDENTITY/policy``."""
    identity = Identity.load(identity_dir)
    pca = x509.load_pem_x509_certificate((identity_dir / "pca.pem").read_bytes())
    policy = PolicyStore(policy_dir or identity_dir / "policy")
    return Attestor(identity, TPM(identity.tpm), policy, pca, tofu)

"""
A host's side of attestation: its TPM, identity, golden values of peers.

:class:`Attestor` quotes this host's PCRs for a peer, verifies a peer's
evidence, and seals and unseals vTPM keys to this host's TPM.  Open it with
:func:`open_attestor` and close it when done (it is a context manager): the
host TPM may be a simulator with three object slots and no resource manager.

Trust on first use always says so: when ``tofu`` lets a peer's values be
recorded unverified, :attr:`Attestor.on_first_use` reports the peer, its AK
and the values (by default a warning in the Twisted log; the source's
command also prints it on stderr: :func:`warn_on_stderr`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from twisted.logger import Logger

from securemig.protocol import wire
from securemig.trust import attest
from securemig.trust.identity import Identity
from securemig.trust.policy import PolicyStore
from securemig.trust.tpm.tpm import TPM, KeyBlob

#: PCRs quoted and bound by default (firmware, its configuration, option
#: ROMs, boot loader, secure boot policy).
DEFAULT_PCRS = (0, 1, 2, 3, 4, 7)

_log = Logger()


@dataclass(frozen=True)
class FirstUse:
    """A peer's PCR values recorded on first use, without verification."""

    host: str
    ak_name: bytes
    pcrs: dict[int, bytes]

    @property
    def ak_short(self) -> str:
        """The AK's name in short hex (name algorithm and 6 bytes of digest)."""
        return self.ak_name.hex()[:16]

    def lines(self) -> list[str]:
        """The warning, one line per PCR value after the first."""
        return [
            f"trust on first use: recorded the PCR values of {self.host} (AK {self.ak_short}) "
            f"WITHOUT verifying them; from now on {self.host} must show exactly these. "
            f"Compare them with {self.host}'s known-good values:",
            *(f"  PCR {p:2d} sha256 {v.hex()}" for p, v in sorted(self.pcrs.items())),
        ]


def log_first_use(first_use: FirstUse) -> None:
    """Report a first use as a warning in the Twisted log (the destination's)."""
    # "detail", not "message" or "warning": Twisted's legacy log reserves those.
    _log.warn(
        "{detail}",
        detail="\n".join(first_use.lines()),
        peer=first_use.host,
        ak_name=first_use.ak_name.hex(),
        pcrs={str(p): v.hex() for p, v in sorted(first_use.pcrs.items())},
    )


def warn_on_stderr(first_use: FirstUse) -> None:
    """Report a first use on stderr (the source's terminal), and in the log."""
    for line in first_use.lines():
        print(f"securemig: WARNING: {line}", file=sys.stderr)
    log_first_use(first_use)


@dataclass
class Attestor:
    """A host's side of attestation: its TPM, identity and view of peers."""

    identity: Identity
    tpm: TPM
    policy: PolicyStore
    pca: x509.Certificate
    tofu: bool = False
    pcrs: tuple[int, ...] = DEFAULT_PCRS
    #: Told each time ``tofu`` records a peer's values unverified.
    on_first_use: Callable[[FirstUse], None] = log_first_use

    def evidence(self, qualifying: bytes) -> wire.Evidence:
        """Quote our PCRs for ``qualifying``."""
        ak, certificate = self.identity.attestation_key()
        quote = self.tpm.quote(ak, self.pcrs, qualifying)
        values = self.tpm.pcr_read(self.pcrs)
        return wire.Evidence(
            attest=quote.attest,
            signature=quote.signature,
            pcrs=tuple(wire.PcrValue(p, v) for p, v in sorted(values.items())),
            ak_public=ak.public,
            ak_certificate=certificate,
        )

    def verify(
        self, evidence: wire.Evidence, qualifying: bytes, peer_name: str
    ) -> dict[int, bytes]:
        """Every check of the verifier, the AK certificate naming the TLS
        peer, and the peer's golden values (recorded on first use with tofu,
        which :attr:`on_first_use` is told).  The clock counters are compared
        with those last seen from this very AK.  Returns the verified PCR
        values."""
        attest.verify_ak_certificate(
            evidence.ak_certificate, self.pca, evidence.ak_public, peer_name
        )
        ak_name = attest.ak_name(evidence.ak_public)
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
            previous=golden.clocks.get(ak_name) if golden else None,
        )
        if self.policy.seen(peer_name, ak_name, values, clock):
            self.on_first_use(FirstUse(peer_name, ak_name, values))
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


def open_attestor(
    identity_dir: Path,
    policy_dir: Path | None,
    tofu: bool,
    on_first_use: Callable[[FirstUse], None] = log_first_use,
) -> Attestor:
    """A host's attestor from its identity directory (``securemig host init``);
    golden values default to ``IDENTITY/policy``."""
    identity = Identity.load(identity_dir)
    pca = x509.load_pem_x509_certificate((identity_dir / "pca.pem").read_bytes())
    policy = PolicyStore(policy_dir or identity_dir / "policy")
    return Attestor(identity, TPM(identity.tpm), policy, pca, tofu, on_first_use=on_first_use)

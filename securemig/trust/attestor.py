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
from securemig.protocol.errors import ErrorCode, LocalFault, PeerViolation
from securemig.trust import attest
from securemig.trust.identity import Identity
from securemig.trust.policy import PolicyStore
from securemig.trust.revocation import RevocationList
from securemig.trust.tpm.tpm import TPM, KeyBlob

#: PCRs a host seals its vTPM keys and binds its migration key to, and
#: quotes when a verifier has no policy (firmware, its configuration, option
#: ROMs, boot loader, secure boot policy).
DEFAULT_PCRS = wire.DEFAULT_QUOTE_REQUEST.banks[0].indices
#: Where Linux publishes the measured-boot event log of the first TPM.
SYSFS_EVENT_LOG = Path("/sys/kernel/security/tpm0/binary_bios_measurements")

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
    #: This host's measured-boot event log, sent when a verifier asks.
    event_log: Path | None = None
    #: The privacy CA's revocation list every peer's AK certificate is
    #: checked against (None: an identity that knows no privacy CA URL).
    revocation: RevocationList | None = None

    def request_for(self, peer_name: str, *, binding: bool = False) -> wire.QuoteRequest:
        """What to ask ``peer_name`` to quote: exactly the selection of the
        policy that judges it (the default when none does).  ``binding``
        (the source verifying a destination) adds the SHA-256 PCRs the
        destination's migration key is bound to, which the key release
        checks against the quoted values; the policy ignores them."""
        try:
            policy = self.policy.policy_for(peer_name)
        except (attest.AttestationError, ValueError):
            policy = None  # refused, naming why, when the evidence is verified
        request = policy.request() if policy else wire.DEFAULT_QUOTE_REQUEST
        if not binding:
            return request
        banks = {b.alg: set(b.indices) for b in request.banks}
        banks.setdefault(wire.HashAlg.SHA256, set()).update(self.pcrs)
        return wire.QuoteRequest(
            tuple(wire.PcrBank.of(a, sorted(p)) for a, p in sorted(banks.items())),
            request.event_log,
        )

    def evidence(
        self, qualifying: bytes, request: wire.QuoteRequest = wire.DEFAULT_QUOTE_REQUEST
    ) -> wire.Evidence:
        """Quote what a verifier's ``request`` asks (once :func:`check_request`
        finds it sensible) for ``qualifying``; the event log if asked."""
        check_request(request)
        ak, certificate = self.identity.attestation_key()
        quote = self.tpm.quote(ak, request.banks, qualifying)
        values = self.tpm.pcr_values(request.banks)
        return wire.Evidence(
            attest=quote.attest,
            signature=quote.signature,
            pcrs=tuple(
                wire.PcrValue(p, v, wire.HashAlg(a)) for (a, p), v in sorted(values.items())
            ),
            ak_public=ak.public,
            ak_certificate=certificate,
            event_log=self._event_log() if request.event_log else b"",
        )

    def _event_log(self) -> bytes:
        """This host's event log; empty when it has none (the verifier
        whose policy needs one then refuses, saying so)."""
        if self.event_log is None:
            return b""
        try:
            raw = self.event_log.read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as e:
            raise LocalFault(
                f"cannot read the event log {self.event_log}: {e.strerror}",
                ErrorCode.IO_ERROR,
            ) from None
        if len(raw) > wire.MAX_EVENT_LOG:
            raise LocalFault(
                f"the event log {self.event_log} has {len(raw)} bytes, over the protocol's "
                f"limit of {wire.MAX_EVENT_LOG}",
                ErrorCode.ATTESTATION_FAILED,
            )
        return raw

    def verify(
        self,
        evidence: wire.Evidence,
        qualifying: bytes,
        peer_name: str,
        request: wire.QuoteRequest = wire.DEFAULT_QUOTE_REQUEST,
    ) -> dict[int, bytes]:
        """Every check of the verifier on a quote of what we requested,
        the AK certificate naming the TLS peer, and the policy that judges
        the peer (values recorded on first use with tofu, which
        :attr:`on_first_use` is told).  The clock counters are compared with
        those last seen from this very AK.  Returns the verified SHA-256 PCR
        values."""
        attest.verify_ak_certificate(
            evidence.ak_certificate, self.pca, evidence.ak_public, peer_name
        )
        if self.revocation is not None:
            self.revocation.check(evidence.ak_certificate, peer_name)
        ak_name = attest.ak_name(evidence.ak_public)
        policy = self.policy.expected(peer_name, self.tofu)
        values: dict[tuple[int, int], bytes] = {}
        for v in evidence.pcrs:
            if (int(v.alg), v.index) in values:
                raise attest.AttestationError(
                    attest.Check.PCR_DIGEST, f"PCR {v.index} of {v.alg.name} reported twice"
                )
            values[(int(v.alg), v.index)] = v.value
        clock = attest.check_quote(
            evidence.ak_public,
            evidence.attest,
            evidence.signature,
            qualifying=qualifying,
            banks=request.banks,
            values=values,
            previous=self.policy.previous(peer_name, ak_name),
        )
        if policy is not None:
            policy.check(values, evidence.event_log, peer_name)
        sha256 = {p: v for (a, p), v in values.items() if a == wire.HashAlg.SHA256}
        if self.policy.seen(peer_name, ak_name, values, clock, record=policy is None):
            self.on_first_use(FirstUse(peer_name, ak_name, sha256))
        return sha256

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
    revocation: RevocationList | None = None,
) -> Attestor:
    """A host's attestor from its identity directory (``securemig host init``);
    golden values default to ``IDENTITY/policy``; peers' AK certificates are
    checked against ``revocation`` when given."""
    identity = Identity.load(identity_dir)
    pca = x509.load_pem_x509_certificate((identity_dir / "pca.pem").read_bytes())
    policy = PolicyStore(policy_dir or identity_dir / "policy")
    return Attestor(
        identity,
        TPM(identity.tpm),
        policy,
        pca,
        tofu,
        on_first_use=on_first_use,
        event_log=event_log_path(identity_dir, identity.tpm),
        revocation=revocation,
    )


def event_log_path(identity_dir: Path, tcti: str) -> Path | None:
    """Where this host's event log is: ``IDENTITY/event-log`` if there is
    one (a file, or a link to the kernel's), else the kernel's for a TPM
    device, else none (a simulator has no firmware that measured)."""
    own = identity_dir / "event-log"
    if own.exists():
        return own
    return SYSFS_EVENT_LOG if tcti.startswith("device") else None


def check_request(request: wire.QuoteRequest) -> None:
    """Refuse a selection no sensible verifier asks for: no bank, a bank
    twice, or a bank with no PCR.  (The wire format already bounds the
    banks to known algorithms, one each, and PCRs to 0..23.)"""
    algs = [b.alg for b in request.banks]
    if not algs:
        raise PeerViolation(ErrorCode.BAD_PARAMETER, "the challenge selects no PCR bank")
    if len(set(algs)) != len(algs):
        raise PeerViolation(ErrorCode.BAD_PARAMETER, "the challenge selects a PCR bank twice")
    if any(not b.pcrs for b in request.banks):
        raise PeerViolation(ErrorCode.BAD_PARAMETER, "the challenge selects a bank with no PCR")
    if list(algs) != sorted(algs):
        raise PeerViolation(ErrorCode.BAD_PARAMETER, "the challenge's banks are out of order")

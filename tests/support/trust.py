"""Attestation fixtures: host attestors on a real TPM, a software key that
poses as an AK, and a clock for the privacy CA."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from tpm2_pytss import TPM2B_PUBLIC, TPMT_SIGNATURE
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from twisted.trial.unittest import SynchronousTestCase

from securemig.protocol import wire
from securemig.trust import attest
from securemig.trust.attestor import Attestor
from securemig.trust.identity import Identity
from securemig.trust.pki import Authority
from securemig.trust.policy import PolicyStore
from securemig.trust.tpm.tpm import AK_ATTRIBUTES


@dataclass
class Forger:
    """A software ECDSA key presented as an AK, to sign arbitrary structures."""

    key: ec.EllipticCurvePrivateKey
    public: bytes

    @classmethod
    def create(
        cls,
        attributes: int = int(AK_ATTRIBUTES | TPMA_OBJECT.USERWITHAUTH),
        scheme: TPM2_ALG = TPM2_ALG.ECDSA,
    ) -> Forger:
        """A key whose public area claims what a genuine AK's does (its
        signing scheme ECDSA-SHA256 unless told otherwise)."""
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        public = TPM2B_PUBLIC.from_pem(pem, objectAttributes=attributes)
        ecc = public.publicArea.parameters.eccDetail
        ecc.scheme.scheme = scheme
        ecc.scheme.details.anySig.hashAlg = TPM2_ALG.SHA256
        return cls(key, bytes(public.marshal()))

    def sign(self, data: bytes, hash_alg: TPM2_ALG = TPM2_ALG.SHA256) -> bytes:
        r, s = decode_dss_signature(self.key.sign(data, ec.ECDSA(hashes.SHA256())))
        sig = TPMT_SIGNATURE(sigAlg=TPM2_ALG.ECDSA)
        sig.signature.ecdsa.hash = hash_alg
        sig.signature.ecdsa.signatureR = r.to_bytes(32, "big")
        sig.signature.ecdsa.signatureS = s.to_bytes(32, "big")
        return bytes(sig.marshal())


def attester(test: SynchronousTestCase, tpm: Any, name: str, pca: Authority) -> Attestor:
    """A host's attestor on ``tpm``: a fresh AK certified for ``name``."""
    directory = Path(test.mktemp())
    directory.mkdir(parents=True)
    ak = tpm.create_ak()
    (directory / "ak.blob").write_bytes(ak.to_bytes())
    cert = pca.issue(attest.check_ak(ak.public), name, tls=False)
    (directory / "ak.der").write_bytes(cert.public_bytes(Encoding.DER))
    return Attestor(
        Identity(directory, name, tpm.tcti), tpm, PolicyStore(directory / "policy"), pca.cert
    )


def exchange(verifier: Attestor, host: Attestor) -> dict[int, bytes]:
    """One attestation as the protocol carries it: the verifier's CHALLENGE
    (its request for this peer) and the host's EVIDENCE, both through the
    wire codec; returns what the verifier's checks return."""
    nonce = os.urandom(32)
    frame = wire.encode(wire.Challenge(nonce, verifier.request_for(host.identity.name)))
    challenge = wire.decode_payload(frame[0], frame[wire.HEADER.size :])
    assert isinstance(challenge, wire.Challenge)
    frame = wire.encode(host.evidence(nonce, challenge.request))
    evidence = wire.decode_payload(frame[0], frame[wire.HEADER.size :])
    assert isinstance(evidence, wire.Evidence)
    return verifier.verify(evidence, nonce, host.identity.name, challenge.request)


class FakeTime:
    """A clock for the PCA: ``time()`` is ``now``."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

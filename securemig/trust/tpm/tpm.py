"""
The TPM 2.0 operations securemig needs, over tpm2-pytss.

A :class:`TPM` is opened from a TCTI string (``device:/dev/tpmrm0`` on a real
host, ``swtpm:host=127.0.0.1,port=N`` for a simulator); nothing else here
knows which it has.  swtpm has no resource manager: objects loaded into it
belong to the whole TPM (three slots) and survive a crashed client.  So
every operation loads what it needs and flushes it in ``finally``, and all
operations on one TPM take turns (:class:`Turns`): in a process, a lock per
TCTI, whichever thread asks; across processes (a host's daemon and its
``securemig migrate`` runs share the host TPM), an exclusive ``flock`` on a
lock file named after the TCTI.  Concurrent migrations then wait their turn
(an operation takes milliseconds; an RSA key half a second) instead of
failing with "out of memory for object contexts".

Production hosts use the kernel's resource manager (``device:/dev/tpmrm0``),
which gives each open file its own virtual slots and flushes them when it is
closed, so slots cannot run out across processes there.  The turns still
keep every operation whole (no other client's command between a policy
session's PolicyPCR and the Unseal or ECDH it authorises, none of which
the RM would break, but which keeps the load on the TPM to one command
stream) and keep a host's TPM load bounded by one operation at a time.

Every failure of the TSS becomes a :class:`TPMError` (a LocalFault with a
wire code), never a bare ``TSS2_Exception``.

Keys leave the TPM only as *blobs* (:class:`KeyBlob`: the TPM-encrypted
private part and the public area), which are useless without the TPM that
made them.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

# tpm2-tss logs expected probing failures (absent NV indices) as errors.
os.environ.setdefault("TSS2_LOG", "all+NONE")

from tpm2_pytss import (
    ESAPI,
    TPM2B_AUTH,
    TPM2B_DIGEST,
    TPM2B_ECC_POINT,
    TPM2B_NV_PUBLIC,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPML_PCR_SELECTION,
    TPMS_ECC_POINT,
    TPMS_NV_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TSS2_Exception,
)
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CC,
    TPM2_SE,
    TPM2_SU,
    TPMA_NV,
    TPMA_OBJECT,
)
from tpm2_pytss.utils import NVReadEK, create_ek_template

from securemig import metrics
from securemig.protocol.errors import ErrorCode, LocalFault, PeerViolation
from securemig.protocol.wire import HashAlg, PcrBank

logging.getLogger("tpm2_pytss").setLevel(logging.CRITICAL)

#: NV indices of the EK certificates (TCG EK Credential Profile, low range:
#: RSA-2048 and ECC P-256).
EK_CERT_NV = {"rsa": 0x01C00002, "ecc": 0x01C0000A}
#: The EK templates of those certificates (TCG's templates L-1 and L-2).
#: swtpm_setup makes an RSA-2048 EK and a P-384 one (at 0x01C00016, which
#: tpm2-pytss cannot recreate); an ECC P-256 EK certificate is written by
#: :func:`securemig.trust.tpm.swtpm.certify_ecc_ek`, or by a TPM's vendor.
EK_TEMPLATES = {"rsa": "EK-RSA2048", "ecc": "EK-ECC256"}
#: The kinds of EK a host may enroll with.
EK_KINDS = tuple(EK_TEMPLATES)

#: Attributes every attestation key must have, and the verifier checks.
AK_ATTRIBUTES = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
)
AK_TEMPLATES = {
    "ecc": "ecc256:ecdsa-sha256:null",
    "rsa": "rsa2048:rsassa-sha256:null",
    "rsa-pss": "rsa2048:rsapss-sha256:null",
}
SRK_TEMPLATE = "ecc256:aes128cfb"


class TPMError(LocalFault, RuntimeError):
    """A TPM operation failed; the message says which, never a secret."""

    # Quotes and verification are the TPM's work a peer meets first; key
    # release wraps its TPM errors as KEY_TRANSFER_FAILED (keyrelease).
    default_code = ErrorCode.ATTESTATION_FAILED


class Malformed(PeerViolation, ValueError):
    """A TPM structure from a peer does not parse exactly."""

    def __init__(self, reason: str) -> None:
        super().__init__(ErrorCode.MALFORMED, reason)


T = TypeVar("T")
P = ParamSpec("P")


def lock_path(tcti: str) -> Path:
    """The lock file every process of this host uses for the TPM at ``tcti``."""
    digest = hashlib.sha256(tcti.encode()).hexdigest()[:16]
    return Path(os.environ.get("SECUREMIG_TPM_LOCK_DIR", tempfile.gettempdir())) / (
        f"securemig-tpm-{digest}.lock"
    )


class Turns:
    """One TPM's queue: whoever holds the turn is the only one using the TPM.

    Re-entrant in a thread (an operation may call another); the ``flock``
    is taken by the outermost turn only, so the inner ones cost nothing.
    A waiter blocks its thread; on the destination that is the reactor
    thread, for at most the few operations ahead of it."""

    _by_tcti: dict[str, Turns] = {}
    _guard = threading.Lock()

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        self.path = lock_path(tcti)
        self._lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None
        #: Operations that had to wait for another process or thread.
        self.waited = 0

    @classmethod
    def of(cls, tcti: str) -> Turns:
        """The queue of the TPM at ``tcti``, shared by every TPM object of this process."""
        with cls._guard:
            turns = cls._by_tcti.get(tcti)
            if turns is None:
                turns = cls._by_tcti[tcti] = Turns(tcti)
            return turns

    @contextmanager
    def turn(self) -> Iterator[None]:
        asked = time.monotonic()
        if not self._lock.acquire(blocking=False):
            self.waited += 1
            self._lock.acquire()
        try:
            if self._depth == 0:
                self._lock_file()
                metrics.TPM_QUEUE_WAIT.observe(time.monotonic() - asked)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._lock.release()

    def _lock_file(self) -> None:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
            except OSError as e:
                raise TPMError(f"cannot open the TPM's lock file {self.path}: {e}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.waited += 1
            fcntl.flock(self._fd, fcntl.LOCK_EX)


def operation(what: str) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """A TPM operation: run in the TPM's turn, and any TSS failure turned
    into a :class:`TPMError` saying which operation failed (a LocalFault
    with a wire code: the peer gets an ABORT, the log one line)."""

    def wrap(method: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(method)
        def run(*args: P.args, **kwargs: P.kwargs) -> T:
            tpm: Any = args[0]
            with tpm.turns.turn():
                try:
                    return method(*args, **kwargs)
                except TSS2_Exception as e:
                    raise TPMError(f"the TPM refused {what}: {e}") from None

        return run

    return wrap


def unmarshal_exact(cls: type[T], raw: bytes, what: str) -> T:
    """Parse a TPM structure a peer sent, refusing garbage and trailing bytes."""
    try:
        value, used = cls.unmarshal(raw)  # type: ignore[attr-defined]
    except Exception:
        raise Malformed(f"{what} does not parse") from None
    if used != len(raw):
        raise Malformed(f"trailing bytes after {what}")
    return value  # type: ignore[no-any-return]


@dataclass(frozen=True)
class KeyBlob:
    """A key that lives in one TPM: its encrypted private part and public area."""

    private: bytes
    public: bytes

    @property
    def public_area(self) -> TPM2B_PUBLIC:
        """The parsed public area."""
        return TPM2B_PUBLIC.unmarshal(self.public)[0]

    @property
    def name(self) -> bytes:
        """The TPM name (nameAlg || H(public area)), computed here."""
        return bytes(self.public_area.get_name())

    def to_bytes(self) -> bytes:
        """A self-delimiting serialisation for files."""
        return len(self.private).to_bytes(4, "big") + self.private + self.public

    @classmethod
    def from_bytes(cls, raw: bytes) -> KeyBlob:
        """Parse :meth:`to_bytes` output."""
        n = int.from_bytes(raw[:4], "big")
        return cls(raw[4 : 4 + n], raw[4 + n :])


@dataclass(frozen=True)
class Signed:
    """A TPMS_ATTEST structure and the TPMT_SIGNATURE over it, as the TPM
    returned them (a quote, or a certification of a key)."""

    attest: bytes
    signature: bytes


def pcr_selection(pcrs: Sequence[int]) -> TPML_PCR_SELECTION:
    """A SHA-256 bank selection of ``pcrs``."""
    if not pcrs or any(not 0 <= p <= 23 for p in pcrs):
        raise ValueError(f"PCR selection {list(pcrs)} must be non-empty, within 0..23")
    return TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(p) for p in sorted(set(pcrs))))


def bank_selection(banks: Sequence[PcrBank]) -> TPML_PCR_SELECTION:
    """A selection of the PCRs of each of ``banks``, in their order (the
    order a quote's PCR digest concatenates their values in)."""
    if not banks or any(not b.pcrs for b in banks):
        raise ValueError("a PCR selection must choose at least one PCR in each bank")
    return TPML_PCR_SELECTION.parse(
        "+".join(f"{b.alg.name.lower()}:" + ",".join(map(str, b.indices)) for b in banks)
    )


def pcr_policy_digest(pcrs: Sequence[int], values: dict[int, bytes]) -> bytes:
    """The policy digest of TPM2_PolicyPCR over ``values``, computed in
    software (TPM 2.0 Part 3, 23.7): what a key bound to that PCR state
    carries as its authPolicy."""
    selection = pcr_selection(pcrs)
    pcr_digest = hashlib.sha256(b"".join(values[p] for p in sorted(set(pcrs)))).digest()
    return hashlib.sha256(
        bytes(32) + int(TPM2_CC.PolicyPCR).to_bytes(4, "big") + selection.marshal() + pcr_digest
    ).digest()


class TPM:
    """A TPM opened from a TCTI string, used by one owner at a time."""

    def __init__(self, tcti: str) -> None:
        try:
            self.esapi = ESAPI(tcti)
        except Exception as e:
            raise TPMError(f"cannot open TPM {tcti!r}: {e}") from None
        self.tcti = tcti
        self.turns = Turns.of(tcti)

    def close(self) -> None:
        """Release the connection to the TPM."""
        self.esapi.close()

    def __enter__(self) -> TPM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing

    @contextmanager
    def _loaded(self, handle: ESYS_TR) -> Iterator[ESYS_TR]:
        try:
            yield handle
        finally:
            self.esapi.flush_context(handle)

    def _primary(self, template: str, hierarchy: ESYS_TR) -> ESYS_TR:
        public = TPM2B_PUBLIC.parse(
            template, objectAttributes=TPMA_OBJECT.DEFAULT_TPM2_TOOLS_CREATEPRIMARY_ATTRS
        )
        handle, *_ = self.esapi.create_primary(TPM2B_SENSITIVE_CREATE(), public, hierarchy)
        return handle

    @contextmanager
    def _srk(self) -> Iterator[ESYS_TR]:
        """The storage root key: an ECC primary, recreated identically each time."""
        with self._loaded(self._primary(SRK_TEMPLATE, ESYS_TR.OWNER)) as srk:
            yield srk

    @contextmanager
    def _key(self, blob: KeyBlob) -> Iterator[ESYS_TR]:
        with self._srk() as srk:
            private = TPM2B_PRIVATE.unmarshal(blob.private)[0]
            try:
                handle = self.esapi.load(srk, private, blob.public_area)
            except TSS2_Exception as e:
                raise TPMError(
                    f"a key does not load into this TPM ({e}); one made by another TPM "
                    "never does: is this host's own identity directory in use?"
                ) from None
        with self._loaded(handle) as key:
            yield key

    @contextmanager
    def _ek(self, kind: str = "rsa") -> Iterator[tuple[ESYS_TR, TPM2B_PUBLIC]]:
        _, template = create_ek_template(EK_TEMPLATES[kind], NVReadEK(self.esapi))
        handle, public, *_ = self.esapi.create_primary(
            TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
        )
        with self._loaded(handle):
            yield handle, public

    @contextmanager
    def _policy_session(self, trial: bool = False) -> Iterator[ESYS_TR]:
        session = self.esapi.start_auth_session(
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.TRIAL if trial else TPM2_SE.POLICY,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA256,
        )
        with self._loaded(session):
            yield session

    # -- identity

    @operation("to read the EK certificate")
    def ek_certificate(self, kind: str = "rsa") -> bytes:
        """The EK certificate (DER) the manufacturer stored in NV."""
        handle = self.esapi.tr_from_tpmpublic(EK_CERT_NV[kind])
        public, _ = self.esapi.nv_read_public(handle)
        size = public.nvPublic.dataSize
        data = b""
        while len(data) < size:
            data += bytes(self.esapi.nv_read(handle, min(768, size - len(data)), len(data)))
        # NV areas may be padded: keep exactly the DER SEQUENCE.
        return data[: _der_length(data)]

    @operation("to start up (TPM2_Startup)")
    def startup(self) -> None:
        """TPM2_Startup(CLEAR): for a TPM initialized by its owner, as a
        platform does at boot (swtpm started to read its state later)."""
        self.esapi.startup(TPM2_SU.CLEAR)

    @operation("to recreate the EK")
    def ek_public(self, kind: str = "rsa") -> bytes:
        """The EK's public area (TPM2B_PUBLIC), recreated from its template:
        the RSA-2048 EK, or the ECC P-256 one (``kind``)."""
        with self._ek(kind) as (_, public):
            return bytes(public.marshal())

    @operation("to write an EK certificate")
    def write_ek_certificate(self, kind: str, der: bytes) -> None:
        """Store ``der`` as the EK certificate of ``kind`` in NV, replacing
        one there: what a TPM's manufacturer does (used for simulators)."""
        index = EK_CERT_NV[kind]
        with contextlib.suppress(TSS2_Exception):
            old = self.esapi.tr_from_tpmpublic(index)
            self.esapi.nv_undefine_space(old, ESYS_TR.RH_OWNER)
        public = TPM2B_NV_PUBLIC(
            nvPublic=TPMS_NV_PUBLIC(
                nvIndex=index,
                nameAlg=TPM2_ALG.SHA256,
                attributes=TPMA_NV.OWNERWRITE
                | TPMA_NV.AUTHREAD
                | TPMA_NV.OWNERREAD
                | TPMA_NV.NO_DA,
                dataSize=len(der),
            )
        )
        handle = self.esapi.nv_define_space(TPM2B_AUTH(), public, ESYS_TR.RH_OWNER)
        for offset in range(0, len(der), 768):
            self.esapi.nv_write(handle, der[offset : offset + 768], offset, ESYS_TR.RH_OWNER)

    @operation("to create an AK")
    def create_ak(
        self, alg: str = "ecc", template: str | None = None, name_alg: str = "sha256"
    ) -> KeyBlob:
        """A restricted signing key under the SRK: one of :data:`AK_TEMPLATES`
        (ECC P-256 by default), or ``template`` (a tpm2-tools algorithm
        string) with ``name_alg``: what tests use to make AKs a verifier
        must refuse."""
        public = TPM2B_PUBLIC.parse(
            template or AK_TEMPLATES[alg],
            objectAttributes=AK_ATTRIBUTES | TPMA_OBJECT.USERWITHAUTH,
            nameAlg=name_alg,
        )
        with self._srk() as srk:
            private, public_out, *_ = self.esapi.create(srk, TPM2B_SENSITIVE_CREATE(), public)
        return KeyBlob(bytes(private.marshal()), bytes(public_out.marshal()))

    @operation("ActivateCredential")
    def activate_credential(
        self, ak: KeyBlob, credential_blob: bytes, secret: bytes, ek_kind: str = "rsa"
    ) -> bytes:
        """Recover a credential made (by a privacy CA) for this AK and our
        EK (of ``ek_kind``)."""
        from tpm2_pytss import TPM2B_ENCRYPTED_SECRET, TPM2B_ID_OBJECT

        with (
            self._key(ak) as key,
            self._ek(ek_kind) as (ek, _),
            self._policy_session() as session,
        ):
            self.esapi.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
            credential = self.esapi.activate_credential(
                key,
                ek,
                TPM2B_ID_OBJECT.unmarshal(credential_blob)[0],
                TPM2B_ENCRYPTED_SECRET.unmarshal(secret)[0],
                session1=ESYS_TR.PASSWORD,
                session2=session,
            )
        return bytes(credential)

    # -- platform state

    @operation("to read PCRs")
    def pcr_read(self, pcrs: Sequence[int]) -> dict[int, bytes]:
        """Current SHA-256 values of ``pcrs``."""
        wanted = sorted(set(pcrs))
        values: dict[int, bytes] = {}
        while len(values) < len(wanted):
            rest = [p for p in wanted if p not in values]
            _, selection, digests = self.esapi.pcr_read(pcr_selection(rest))
            got = [p for p in rest if _selected(selection, p)]
            if not got:
                raise TPMError(f"TPM returned no value for PCRs {rest}")
            for p, digest in zip(got, digests, strict=False):
                values[p] = bytes(digest)
        return values

    @operation("to read PCRs")
    def pcr_values(self, banks: Sequence[PcrBank]) -> dict[tuple[int, int], bytes]:
        """Current values of the PCRs of ``banks``, by (bank algorithm, PCR).
        A bank this TPM does not have is an error that names it."""
        values: dict[tuple[int, int], bytes] = {}
        for bank in banks:
            wanted = list(bank.indices)
            while wanted:
                _, selection, digests = self.esapi.pcr_read(
                    bank_selection([PcrBank.of(bank.alg, wanted)])
                )
                got = [p for p in wanted if _selected(selection, p, bank.alg)]
                if not got:
                    raise TPMError(
                        f"this TPM has no {bank.alg.name.lower()} PCR bank (or PCRs {wanted})"
                    )
                for p, digest in zip(got, digests, strict=False):
                    values[(int(bank.alg), p)] = bytes(digest)
                wanted = [p for p in wanted if (int(bank.alg), p) not in values]
        return values

    def pcr_extend(self, index: int, data: bytes) -> None:
        """Extend PCR ``index`` (SHA-256 bank) with the SHA-256 of ``data``."""
        self.pcr_extend_digests(index, {int(TPM2_ALG.SHA256): hashlib.sha256(data).digest()})

    @operation("to extend a PCR")
    def pcr_extend_digests(self, index: int, digests: dict[int, bytes]) -> None:
        """Extend PCR ``index`` with one digest per bank (by algorithm id),
        as firmware does for each event of a measured boot."""
        from tpm2_pytss import TPML_DIGEST_VALUES, TPMT_HA

        values = []
        for alg, value in digests.items():
            digest = TPMT_HA(hashAlg=alg)
            setattr(digest.digest, HashAlg(alg).name.lower(), value)
            values.append(digest)
        self.esapi.pcr_extend(ESYS_TR.PCR0 + index, TPML_DIGEST_VALUES(values))

    @operation("a quote")
    def quote(
        self, ak: KeyBlob, pcrs: Sequence[int] | Sequence[PcrBank], qualifying: bytes
    ) -> Signed:
        """A quote over ``pcrs`` (SHA-256 PCR indices, or banks) with
        ``qualifying`` as extraData."""
        selection = (
            bank_selection(pcrs)  # type: ignore[arg-type]
            if pcrs and isinstance(pcrs[0], PcrBank)
            else pcr_selection(pcrs)  # type: ignore[arg-type]
        )
        with self._key(ak) as key:
            attest, signature = self.esapi.quote(
                key, selection, qualifying, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
            )
        return Signed(bytes(attest), bytes(signature.marshal()))

    @operation("to certify a key")
    def certify(self, key: KeyBlob, ak: KeyBlob, qualifying: bytes) -> Signed:
        """TPM2_Certify: the AK attests that ``key`` is loaded in this TPM."""
        with self._key(key) as obj, self._key(ak) as signer:
            attest, signature = self.esapi.certify(
                obj, signer, qualifying, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
            )
        return Signed(bytes(attest), bytes(signature.marshal()))

    # -- keys bound to PCR state

    def _pcr_policy(self, session: ESYS_TR, pcrs: Sequence[int]) -> None:
        self.esapi.policy_pcr(session, TPM2B_DIGEST(), pcr_selection(pcrs))

    @operation("to seal")
    def seal(self, secret: bytes, pcrs: Sequence[int], values: dict[int, bytes]) -> KeyBlob:
        """Seal ``secret`` (at most 128 bytes) to the PCR state ``values``."""
        public = TPM2B_PUBLIC.parse(
            "keyedhash", objectAttributes=TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
        )
        public.publicArea.authPolicy = pcr_policy_digest(pcrs, values)
        sensitive = TPM2B_SENSITIVE_CREATE()
        sensitive.sensitive.data = TPM2B_SENSITIVE_DATA(secret)
        with self._srk() as srk:
            private, public_out, *_ = self.esapi.create(srk, sensitive, public)
        return KeyBlob(bytes(private.marshal()), bytes(public_out.marshal()))

    @operation("to unseal")
    def unseal(self, blob: KeyBlob, pcrs: Sequence[int]) -> bytes:
        """Unseal; fails unless the PCRs hold the values it was sealed to."""
        with self._key(blob) as key, self._policy_session() as session:
            self._pcr_policy(session, pcrs)
            try:
                return bytes(self.esapi.unseal(key, session1=session))
            except Exception as e:
                raise TPMError(f"unseal refused by the TPM: {e}") from None

    @operation("to create the migration key")
    def create_migration_key(self, pcrs: Sequence[int], values: dict[int, bytes]) -> KeyBlob:
        """An ECC P-256 decryption key (ECDH), fixedTPM, usable only under
        a PCR policy equal to ``values``."""
        public = TPM2B_PUBLIC.parse(
            "ecc256:ecdh-sha256",
            objectAttributes=TPMA_OBJECT.FIXEDTPM
            | TPMA_OBJECT.FIXEDPARENT
            | TPMA_OBJECT.SENSITIVEDATAORIGIN
            | TPMA_OBJECT.DECRYPT,
        )
        public.publicArea.authPolicy = pcr_policy_digest(pcrs, values)
        with self._srk() as srk:
            private, public_out, *_ = self.esapi.create(srk, TPM2B_SENSITIVE_CREATE(), public)
        return KeyBlob(bytes(private.marshal()), bytes(public_out.marshal()))

    @operation("ECDH")
    def ecdh_zgen(self, key: KeyBlob, pcrs: Sequence[int], peer: tuple[bytes, bytes]) -> bytes:
        """The ECDH shared x coordinate of ``key`` and the peer's point (x, y),
        computed inside the TPM under the key's PCR policy."""
        point = TPM2B_ECC_POINT(TPMS_ECC_POINT(x=peer[0], y=peer[1]))
        with self._key(key) as handle, self._policy_session() as session:
            self._pcr_policy(session, pcrs)
            try:
                out = self.esapi.ecdh_zgen(handle, point, session1=session)
            except Exception as e:
                raise TPMError(f"ECDH refused by the TPM: {e}") from None
        return bytes(out.point.x)


def _selected(selection: TPML_PCR_SELECTION, pcr: int, alg: int = TPM2_ALG.SHA256) -> bool:
    return any(s.hash == alg and s.pcrSelect[pcr // 8] & (1 << (pcr % 8)) for s in selection)


def _der_length(data: bytes) -> int:
    """Length of the DER element at the start of ``data``."""
    if len(data) < 2 or data[0] != 0x30:
        raise TPMError("EK certificate in NV is not DER")
    if data[1] < 0x80:
        return 2 + data[1]
    n = data[1] & 0x7F
    return 2 + n + int.from_bytes(data[2 : 2 + n], "big")

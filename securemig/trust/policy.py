"""
Attestation policies as data, and what the verifier remembers of each peer.

A :class:`Policy` says what to quote and what to accept: the PCR *selection*
(banks and PCRs, SHA-256 PCRs 0-4 and 7 by default) that the verifier's
CHALLENGE asks the peer's TPM to quote, exactly; the accepted values of
those PCRs (one or several per PCR); and optionally rules for the
measured-boot event log (:mod:`securemig.trust.eventlog`), which then judges
the PCRs it accounts for by their named events instead of fixed values.  A
mismatch names the PCRs that differ, and only those; a PCR outside the
selection is never quoted, so never judged.

Policies attach to *classes* of hosts, so that a site writes one per
platform, not one per pair of hosts.  The directory of a verifier::

    POLICY_DIR/HOST.json           a peer: its own policy (optional) and the
                                   TPM counters seen from each of its AKs
    POLICY_DIR/classes/NAME.json   a class policy: "hosts" (name patterns,
                                   e.g. "compute-*") and/or "labels"
    POLICY_DIR/labels.json         {"HOST": ["LABEL", ...]}: hosts' labels

Which policy judges a peer (the most specific wins):

1. the peer's own policy in ``HOST.json`` (per-host values);
2. else the class policy whose matching host pattern is the most specific
   (the most characters that are not wildcards; an exact name beats any
   pattern);
3. else a class policy naming one of the peer's labels;
4. else none: refused, unless ``--tofu`` records what the peer shows under
   the default selection as its own policy (marked ``recorded_on_first_use``).

Two policies that apply equally (the same rank and specificity) make the
verifier refuse, naming both, rather than guess.

The verifier also remembers the reset and restart counters of the peer's TPM,
so that a TPM rolled back to an older state is refused.  They are kept per
attestation key (by its TPM name), not per host: a TPM shows an AK of the
owner hierarchy those counters through an offset of that AK's own, so the
counters of two AKs of one TPM cannot be compared.  A renewed AK starts a
history of its own; the policy, which belongs to the host, stays.

Files of format 2 (one ``bank`` and a ``pcrs`` map of single values, the
selection being those PCRs) and 1 (also a host-wide ``clock``, dropped: no AK
can be named for it) are read and converted; the next write is format 3.
"""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from securemig import files
from securemig.protocol import wire
from securemig.protocol.wire import DIGEST_SIZES, PCR_COUNT, HashAlg, PcrBank
from securemig.trust.attest import AttestationError, Check, ClockState
from securemig.trust.eventlog import BANK_NAMES, EventLogPolicy
from securemig.trust.pki import check_host_name

#: The format written; 1 and 2 are still read.
FORMAT = 3

#: What ``policy show`` says of values recorded on first use.
FIRST_USE_WARNING = (
    "recorded on first use (--tofu), not verified: compare them with the host's "
    "known-good values, or record those with `securemig policy record`"
)

#: PCR values by (bank algorithm id, PCR index).
Values = Mapping[tuple[int, int], bytes]

#: The selection quoted when no policy says otherwise (trust on first use).
DEFAULT_BANKS = wire.DEFAULT_QUOTE_REQUEST.banks


def bank_name(alg: int) -> str:
    """A bank's name in policy files (``sha256``)."""
    return HashAlg(alg).name.lower()


def parse_selection(text: str) -> tuple[PcrBank, ...]:
    """A selection written ``sha256:0-5,7+sha1:0`` (a bare ``0-5,7`` is
    SHA-256), as ``policy record --pcrs`` takes it."""
    banks: dict[HashAlg, set[int]] = {}
    for part in text.split("+"):
        name, _, pcrs = part.rpartition(":")
        alg = BANK_NAMES.get(name or "sha256")
        if alg is None:
            raise ValueError(f"unknown PCR bank {name!r} (known: {', '.join(BANK_NAMES)})")
        chosen = banks.setdefault(alg, set())
        for item in pcrs.split(","):
            low, _, high = item.strip().partition("-")
            try:
                chosen.update(range(int(low), int(high or low) + 1))
            except ValueError:
                raise ValueError(f"PCRs {pcrs!r}: give indices like 0-5,7") from None
    return _banks({a: sorted(p) for a, p in banks.items()})


def format_selection(banks: tuple[PcrBank, ...]) -> str:
    """The written form of a selection (what :func:`parse_selection` reads)."""
    return "+".join(f"{bank_name(b.alg)}:{','.join(map(str, b.indices))}" for b in banks)


def _banks(selection: Mapping[HashAlg, list[int]]) -> tuple[PcrBank, ...]:
    """Banks in one canonical order (by algorithm id), each checked."""
    if not selection:
        raise ValueError("a policy must select at least one PCR")
    for alg, pcrs in selection.items():
        if not pcrs or any(not 0 <= p < PCR_COUNT for p in pcrs):
            raise ValueError(
                f"the {bank_name(alg)} selection {pcrs} must name PCRs 0..{PCR_COUNT - 1}"
            )
    return tuple(PcrBank.of(alg, pcrs) for alg, pcrs in sorted(selection.items()))


@dataclass(frozen=True)
class Policy:
    """What to quote (``banks``) and what to accept: ``values`` (accepted
    values of each selected PCR, by bank algorithm and PCR) and the
    event-log rules, which judge the PCRs they name instead.  ``hosts`` and
    ``labels`` say which peers a class policy applies to."""

    banks: tuple[PcrBank, ...]
    values: Mapping[tuple[int, int], frozenset[bytes]]
    event_log: EventLogPolicy | None = None
    name: str = ""
    hosts: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    recorded: float = 0.0
    recorded_from: str = ""
    #: True when trust on first use recorded the values (nobody checked them).
    first_use: bool = False

    def __post_init__(self) -> None:
        selected = {(int(b.alg), p) for b in self.banks for p in b.indices}
        by_log = set(self.event_log.pcrs) if self.event_log else set()
        for alg, pcr in sorted(selected):
            if (alg, pcr) not in self.values and pcr not in by_log:
                raise ValueError(
                    f"{bank_name(alg)} PCR {pcr} is selected but has no accepted value "
                    "and no event-log rule"
                )
        for (alg, pcr), accepted in self.values.items():
            if (alg, pcr) not in selected:
                raise ValueError(f"{bank_name(alg)} PCR {pcr} has a value but is not selected")
            if any(len(v) != DIGEST_SIZES[HashAlg(alg)] for v in accepted) or not accepted:
                raise ValueError(f"{bank_name(alg)} PCR {pcr}: values of the wrong size")
        if self.event_log and self.log_bank() is None:
            raise ValueError("the event-log PCRs must all be selected in one bank")

    @classmethod
    def recorded_now(
        cls, values: Values, *, first_use: bool = False, recorded_from: str = "", **kw: object
    ) -> Policy:
        """A policy accepting exactly ``values``, selecting exactly their PCRs."""
        selection: dict[HashAlg, list[int]] = {}
        for alg, pcr in sorted(values):
            selection.setdefault(HashAlg(alg), []).append(pcr)
        return cls(
            _banks(selection),
            {k: frozenset((v,)) for k, v in values.items()},
            recorded=time.time(),
            recorded_from=recorded_from,
            first_use=first_use,
            **kw,  # type: ignore[arg-type]
        )

    def request(self) -> wire.QuoteRequest:
        """What the CHALLENGE asks for: exactly this selection, and the
        event log if there are event-log rules."""
        return wire.QuoteRequest(self.banks, int(self.event_log is not None))

    def log_bank(self) -> HashAlg | None:
        """The bank whose quoted values the event log is replayed against:
        SHA-256 if selected, else the first selected bank that covers every
        event-log PCR."""
        if self.event_log is None:
            return None
        need = set(self.event_log.pcrs)
        fits = [HashAlg(b.alg) for b in self.banks if need <= set(b.indices)]
        return HashAlg.SHA256 if HashAlg.SHA256 in fits else (fits[0] if fits else None)

    def check(self, values: Values, event_log: bytes, peer: str) -> None:
        """Judge verified quoted ``values`` (and the event log sent with
        them): refuses naming the PCRs that differ, and only those."""
        differ = [
            f"{bank_name(alg)}:{pcr}"
            for (alg, pcr), accepted in sorted(self.values.items())
            if values.get((alg, pcr)) not in accepted
        ]
        if differ:
            which = f"class policy {self.name!r}" if self.name else "its own policy"
            raise AttestationError(
                Check.GOLDEN_VALUES, f"PCRs {', '.join(differ)} of {peer} differ from {which}"
            )
        if self.event_log is not None:
            alg = self.log_bank()
            assert alg is not None  # __post_init__
            quoted = {pcr: v for (a, pcr), v in values.items() if a == alg}
            self.event_log.check(event_log, alg, quoted)

    def applies(self, host: str, labels: tuple[str, ...]) -> tuple[int, int] | None:
        """How specifically this class policy names ``host``: (2, literal
        characters of its best pattern), (1, 0) by a label, None if not."""
        best = [
            sum(c not in "*?[]" for c in pattern)
            for pattern in self.hosts
            if fnmatch.fnmatchcase(host, pattern)
        ]
        if best:
            return (2, max(best) + (1000 if host in self.hosts else 0))
        if set(labels) & set(self.labels):
            return (1, 0)
        return None

    # -- stored form

    def to_dict(self) -> dict[str, object]:
        """The stored (and exported) form."""
        data: dict[str, object] = {}
        if self.name:
            data["name"] = self.name
        if self.hosts or self.labels:
            data["applies_to"] = {"hosts": list(self.hosts), "labels": list(self.labels)}
        data["selection"] = {bank_name(b.alg): list(b.indices) for b in self.banks}
        pcrs: dict[str, dict[str, object]] = {}
        for (alg, pcr), accepted in sorted(self.values.items()):
            hexes = sorted(v.hex() for v in accepted)
            pcrs.setdefault(bank_name(alg), {})[str(pcr)] = hexes[0] if len(hexes) == 1 else hexes
        data["pcrs"] = pcrs
        if self.event_log is not None:
            data["event_log"] = self.event_log.to_dict()
        data["recorded"] = self.recorded
        if self.recorded_from:
            data["recorded_from"] = self.recorded_from
        data["recorded_on_first_use"] = self.first_use
        if self.first_use:
            data["warning"] = FIRST_USE_WARNING
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Policy:
        """Parse :meth:`to_dict`'s form; raises ValueError saying what is wrong."""
        selection: dict[HashAlg, list[int]] = {}
        for name, pcrs in _dict(data.get("selection"), "selection").items():
            alg = BANK_NAMES.get(name)
            if alg is None:
                raise ValueError(f"unknown PCR bank {name!r}")
            if not isinstance(pcrs, list):
                raise ValueError(f"selection.{name} must be a list of PCRs")
            selection[alg] = sorted({int(p) for p in pcrs})
        values: dict[tuple[int, int], frozenset[bytes]] = {}
        for name, by_pcr in _dict(data.get("pcrs", {}), "pcrs").items():
            alg = BANK_NAMES.get(name)
            if alg is None:
                raise ValueError(f"unknown PCR bank {name!r}")
            for pcr, accepted in _dict(by_pcr, f"pcrs.{name}").items():
                hexes = accepted if isinstance(accepted, list) else [accepted]
                values[(int(alg), int(pcr))] = frozenset(bytes.fromhex(str(h)) for h in hexes)
        log = data.get("event_log")
        applies = _dict(data.get("applies_to", {}), "applies_to")
        return cls(
            _banks(selection),
            values,
            EventLogPolicy.from_dict(_dict(log, "event_log")) if log is not None else None,
            str(data.get("name", "")),
            tuple(str(h) for h in applies.get("hosts", []) or []),
            tuple(str(lb) for lb in applies.get("labels", []) or []),
            float(data.get("recorded", 0.0)),  # type: ignore[arg-type]
            str(data.get("recorded_from", "")),
            bool(data.get("recorded_on_first_use", False)),
        )

    @classmethod
    def from_legacy(cls, data: Mapping[str, object]) -> Policy:
        """A format 1 or 2 host file's values: one SHA-256 value per PCR,
        the selection being exactly those PCRs."""
        if data.get("bank") != "sha256":
            raise ValueError("only the sha256 PCR bank is supported in format 1 and 2 files")
        pcrs = {int(p): bytes.fromhex(str(v)) for p, v in _dict(data["pcrs"], "pcrs").items()}
        if any(len(v) != 32 or not 0 <= p < PCR_COUNT for p, v in pcrs.items()):
            raise ValueError("PCR values must be 32-byte SHA-256 digests of PCRs 0..23")
        sha256 = int(HashAlg.SHA256)
        policy = cls.recorded_now(
            {(sha256, p): v for p, v in pcrs.items()},
            first_use=bool(data.get("recorded_on_first_use", False)),
        )
        return replace(policy, recorded=float(data.get("recorded", 0.0)))  # type: ignore[arg-type]


def _dict(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object")
    return value


@dataclass
class Golden:
    """What a verifier keeps of one peer: its own policy (if it has one:
    else a class policy judges it) and, per AK name, the TPM counters last
    seen under that AK."""

    host: str
    policy: Policy | None = None
    clocks: dict[bytes, ClockState] = field(default_factory=dict)

    @property
    def pcrs(self) -> dict[int, bytes]:
        """The SHA-256 values its own policy accepts (one per PCR)."""
        if self.policy is None:
            return {}
        sha256 = int(HashAlg.SHA256)
        return {p: min(v) for (a, p), v in self.policy.values.items() if a == sha256}

    @property
    def recorded(self) -> float:
        """When its own policy was recorded."""
        return self.policy.recorded if self.policy else 0.0

    @property
    def first_use(self) -> bool:
        """True when its own policy was recorded on first use, unverified."""
        return bool(self.policy and self.policy.first_use)

    def to_json(self) -> bytes:
        """The stored form."""
        data: dict[str, object] = {"format": FORMAT, "host": self.host}
        if self.policy is not None:
            data["policy"] = self.policy.to_dict()
        data["aks"] = {
            name.hex(): {"reset_count": c.reset_count, "restart_count": c.restart_count}
            for name, c in sorted(self.clocks.items())
        }
        return (json.dumps(data, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Golden:
        """Parse the stored form (format 3, or 2 and 1 converted)."""
        data = json.loads(raw)
        version = data.get("format", 1)
        if version not in (1, 2, FORMAT):
            raise ValueError(f"unknown policy file format {version!r}")
        if version == FORMAT:
            policy = Policy.from_dict(data["policy"]) if data.get("policy") else None
        else:
            policy = Policy.from_legacy(data)
        # Format 1 kept one "clock" per host: seen through an unknown AK's
        # offset, it means nothing for any AK, so it is not carried over.
        clocks = {
            bytes.fromhex(name): ClockState(int(c["reset_count"]), int(c["restart_count"]))
            for name, c in (data.get("aks") or {}).items()
        }
        return cls(data["host"], policy, clocks)


def _class_name(name: str) -> str:
    check_host_name(name)  # the same safe form: it is a file name
    return name


class PolicyStore:
    """A verifier's policy directory: peers, classes, labels."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, host: str) -> Path:
        check_host_name(host)
        return self.directory / f"{host}.json"

    def get(self, host: str) -> Golden | None:
        """What is kept of ``host``, if anything."""
        try:
            return Golden.from_json(self._path(host).read_bytes())
        except FileNotFoundError:
            return None

    def hosts(self) -> list[str]:
        """Every host with a file."""
        return sorted(p.stem for p in self.directory.glob("*.json") if p.stem != "labels")

    # -- classes and labels

    @property
    def classes_dir(self) -> Path:
        """Where class policies live."""
        return self.directory / "classes"

    def classes(self) -> dict[str, Policy]:
        """Every class policy, by name."""
        out = {}
        for path in sorted(self.classes_dir.glob("*.json")):
            try:
                out[path.stem] = replace(
                    Policy.from_dict(json.loads(path.read_bytes())), name=path.stem
                )
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"class policy {path}: {e}") from None
        return out

    def add_class(self, policy: Policy) -> Path:
        """Install (or replace) a class policy under its name."""
        if not policy.name:
            raise ValueError("a class policy needs a name")
        if not policy.hosts and not policy.labels:
            raise ValueError(f"class policy {policy.name!r} applies to no hosts and no labels")
        self.classes_dir.mkdir(parents=True, exist_ok=True)
        path = self.classes_dir / f"{_class_name(policy.name)}.json"
        files.write_durably(path, (json.dumps(policy.to_dict(), indent=2) + "\n").encode())
        return path

    def forget_class(self, name: str) -> bool:
        """Remove a class policy; False if there was none."""
        return files.remove_durably(self.classes_dir / f"{_class_name(name)}.json")

    def labels(self, host: str) -> tuple[str, ...]:
        """The labels ``labels.json`` gives ``host``."""
        try:
            data = json.loads((self.directory / "labels.json").read_bytes())
        except FileNotFoundError:
            return ()
        return tuple(str(label) for label in _dict(data, "labels.json").get(host, []) or [])

    def policy_for(self, host: str) -> Policy | None:
        """The policy that judges ``host`` (see the module's precedence), or
        None when none applies.  Two that apply equally: refused."""
        try:
            golden = self.get(host)
            if golden is not None and golden.policy is not None:
                return golden.policy
            labels, classes = self.labels(host), self.classes()
        except (ValueError, KeyError, TypeError) as e:
            # A policy file an operator broke: refuse (fail closed), saying which.
            raise AttestationError(
                Check.GOLDEN_VALUES, f"unreadable policy for {host}: {e}"
            ) from None
        ranked = [
            (rank, policy)
            for policy in classes.values()
            if (rank := policy.applies(host, labels)) is not None
        ]
        if not ranked:
            return None
        ranked.sort(key=lambda r: r[0], reverse=True)
        if len(ranked) > 1 and ranked[0][0] == ranked[1][0]:
            raise AttestationError(
                Check.GOLDEN_VALUES,
                f"class policies {ranked[0][1].name!r} and {ranked[1][1].name!r} apply to "
                f"{host} equally: make one more specific",
            )
        return ranked[0][1]

    # -- a peer's own values and counters

    def record(
        self, host: str, policy: Policy | Values | Mapping[int, bytes], *, first_use: bool = False
    ) -> Golden:
        """Give ``host`` its own policy (or one accepting exactly these
        values); ``first_use`` marks it as trusted on first use.  The counters
        seen from its AKs stay: they describe its TPM, not its software."""
        if not isinstance(policy, Policy):
            policy = Policy.recorded_now(_keyed(policy), first_use=first_use)
        old = self.get(host)
        golden = Golden(host, policy, old.clocks if old else {})
        self._write(golden)
        return golden

    def _write(self, golden: Golden) -> None:
        # The directory may have gone since __init__ (an identity replaced
        # under a running daemon, whose IDENTITY/policy went aside with it).
        self.directory.mkdir(parents=True, exist_ok=True)
        files.write_durably(self._path(golden.host), golden.to_json())

    def forget(self, host: str) -> bool:
        """Remove ``host``'s values; False if there were none."""
        return files.remove_durably(self._path(host))

    def expected(self, host: str, tofu: bool) -> Policy | None:
        """The policy ``host`` must satisfy, or None when none applies and
        ``tofu`` allows recording its values after this attestation.  None
        without ``tofu`` is a refusal."""
        policy = self.policy_for(host)
        if policy is None and not tofu:
            raise AttestationError(
                Check.GOLDEN_VALUES,
                f"no golden values for {host} (no policy applies: record them, or use --tofu)",
            )
        return policy

    def previous(self, host: str, ak_name: bytes) -> ClockState | None:
        """The counters last seen from ``host`` under the AK named
        ``ak_name``; None for an AK not seen before (a new history)."""
        golden = self.get(host)
        return golden.clocks.get(ak_name) if golden else None

    def seen(
        self,
        host: str,
        ak_name: bytes,
        values: Values | dict[int, bytes],
        clock: ClockState,
        *,
        record: bool | None = None,
    ) -> bool:
        """After a successful attestation by the AK named ``ak_name``:
        remember its counters, and record ``values`` as ``host``'s own policy
        when ``record`` (by default: when no policy applied to it: trust on
        first use).  Returns True when it recorded, for the caller to say so."""
        golden = self.get(host) or Golden(host)
        if record is None:
            record = golden.policy is None and self.policy_for(host) is None
        if record:
            golden.policy = Policy.recorded_now(_keyed(values), first_use=True)
        golden.clocks[ak_name] = clock
        self._write(golden)
        return record


def _keyed(values: Values | Mapping[int, bytes]) -> dict[tuple[int, int], bytes]:
    """Values by (bank, PCR); bare PCR indices are SHA-256's."""
    sha256 = int(HashAlg.SHA256)
    return {(k if isinstance(k, tuple) else (sha256, k)): v for k, v in values.items()}

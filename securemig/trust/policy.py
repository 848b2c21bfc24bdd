"""
Golden values: what each peer's PCRs must hold, one JSON file per peer, and
the TPM counters last seen from each of the peer's attestation keys.

``POLICY_DIR/HOST.json``::

    {"format": 2, "host": "host-a", "bank": "sha256", "pcrs": {"0": "<hex>", ...},
     "recorded": 1790000000.0, "recorded_on_first_use": false,
     "aks": {"000b<hex of the AK's name>": {"reset_count": 3, "restart_count": 0}}}

An operator records golden values from a host known to be good
(``securemig policy record``).  With ``--tofu`` (trust on first use, what
the source thesis did) the first successful attestation of an unknown peer
records them, marked ``recorded_on_first_use`` (with a ``warning``); from
then on any difference is refused.

The verifier also remembers the reset and restart counters of the peer's TPM,
so that a TPM rolled back to an older state is refused.  They are kept per
attestation key (by its TPM name), not per host: a TPM shows an AK of the
owner hierarchy those counters through an offset of that AK's own, so the
counters of two AKs of one TPM cannot be compared.  A renewed AK starts a
history of its own; the golden values, which belong to the host, stay.

Files of format 1 (no ``format``, one ``clock`` for the host) are read and
converted; their host-wide counters are dropped, since no AK can be named
for them.  The next attestation starts that AK's history.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from securemig import files
from securemig.trust.attest import AttestationError, Check, ClockState
from securemig.trust.pki import check_host_name

#: The format written; 1 is still read.
FORMAT = 2

#: What ``policy show`` says of values recorded on first use.
FIRST_USE_WARNING = (
    "recorded on first use (--tofu), not verified: compare them with the host's "
    "known-good values, or record those with `securemig policy record`"
)


@dataclass
class Golden:
    """A peer's golden PCR values (SHA-256 bank) and, per AK name, the TPM
    counters last seen under that AK."""

    host: str
    pcrs: dict[int, bytes]
    recorded: float = 0.0
    #: True when trust on first use recorded ``pcrs`` (nobody checked them).
    first_use: bool = False
    clocks: dict[bytes, ClockState] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """The stored form."""
        data: dict[str, object] = {
            "format": FORMAT,
            "host": self.host,
            "bank": "sha256",
            "pcrs": {str(p): v.hex() for p, v in sorted(self.pcrs.items())},
            "recorded": self.recorded,
            "recorded_on_first_use": self.first_use,
        }
        if self.first_use:
            data["warning"] = FIRST_USE_WARNING
        data["aks"] = {
            name.hex(): {"reset_count": c.reset_count, "restart_count": c.restart_count}
            for name, c in sorted(self.clocks.items())
        }
        return (json.dumps(data, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Golden:
        """Parse the stored form (format 2, or 1 converted), refusing anything
        but SHA-256 values."""
        data = json.loads(raw)
        version = data.get("format", 1)
        if version not in (1, FORMAT):
            raise ValueError(f"unknown policy file format {version!r}")
        if data.get("bank") != "sha256":
            raise ValueError("only the sha256 PCR bank is supported")
        pcrs = {int(p): bytes.fromhex(v) for p, v in data["pcrs"].items()}
        if any(len(v) != 32 or not 0 <= p <= 23 for p, v in pcrs.items()):
            raise ValueError("PCR values must be 32-byte SHA-256 digests of PCRs 0..23")
        # Format 1 kept one "clock" per host: seen through an unknown AK's
        # offset, it means nothing for any AK, so it is not carried over.
        clocks = {
            bytes.fromhex(name): ClockState(int(c["reset_count"]), int(c["restart_count"]))
            for name, c in (data.get("aks") or {}).items()
        }
        return cls(
            data["host"],
            pcrs,
            float(data.get("recorded", 0.0)),
            bool(data.get("recorded_on_first_use", False)),
            clocks,
        )


class PolicyStore:
    """The directory of golden values of every peer."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, host: str) -> Path:
        check_host_name(host)
        return self.directory / f"{host}.json"

    def get(self, host: str) -> Golden | None:
        """The golden values of ``host``, if recorded."""
        try:
            return Golden.from_json(self._path(host).read_bytes())
        except FileNotFoundError:
            return None

    def hosts(self) -> list[str]:
        """Every host with recorded values."""
        return sorted(p.stem for p in self.directory.glob("*.json"))

    def record(self, host: str, pcrs: dict[int, bytes], *, first_use: bool = False) -> Golden:
        """Record (or replace) ``host``'s golden values; ``first_use`` marks
        them as trusted on first use.  The counters seen from its AKs stay:
        they describe its TPM, not its software."""
        old = self.get(host)
        golden = Golden(host, dict(pcrs), time.time(), first_use, old.clocks if old else {})
        self._write(golden)
        return golden

    def _write(self, golden: Golden) -> None:
        # The directory may have gone since __init__ (an identity replaced
        # under a running daemon, whose IDENTITY/policy went aside with it).
        self.directory.mkdir(parents=True, exist_ok=True)
        files.write_durably(self._path(golden.host), golden.to_json())

    def forget(self, host: str) -> bool:
        """Remove ``host``'s values; False if there were none."""
        path = self._path(host)
        if not path.exists():
            return False
        path.unlink()
        files.fsync_dir(self.directory)
        return True

    def expected(self, host: str, tofu: bool) -> Golden | None:
        """What ``host`` must show: its golden values, or None when it is
        unknown and ``tofu`` allows recording them after this attestation.
        Unknown without ``tofu`` is a refusal."""
        golden = self.get(host)
        if golden is None and not tofu:
            raise AttestationError(
                Check.GOLDEN_VALUES, f"no golden values for {host} (record them, or use --tofu)"
            )
        return golden

    def previous(self, host: str, ak_name: bytes) -> ClockState | None:
        """The counters last seen from ``host`` under the AK named
        ``ak_name``; None for an AK not seen before (a new history)."""
        golden = self.get(host)
        return golden.clocks.get(ak_name) if golden else None

    def seen(self, host: str, ak_name: bytes, pcrs: dict[int, bytes], clock: ClockState) -> bool:
        """After a successful attestation by the AK named ``ak_name``:
        remember its counters, and record ``pcrs`` if ``host`` had no golden
        values yet (trust on first use).  Returns True when it did, for the
        caller to say so."""
        golden = self.get(host)
        first_use = golden is None
        if golden is None:
            golden = Golden(host, dict(pcrs), time.time(), first_use=True)
        golden.clocks[ak_name] = clock
        self._write(golden)
        return first_use

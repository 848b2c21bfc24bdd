"""
Golden values: what each peer's PCRs must hold, one JSON file per peer.

``POLICY_DIR/HOST.json``::

    {"host": "host-a", "bank": "sha256", "pcrs": {"0": "<hex>", ...},
     "clock": {"reset_count": 3, "restart_count": 0}, "recorded": 1790000000.0}

An operator records golden values from a host known to be good
(``securemig policy record``).  With ``--tofu`` (trust on first use, what
the source thesis did) the first successful attestation of an unknown peer
records them; from then on any difference is refused.  The verifier also
remembers the peer TPM's reset and restart counters here, so an older quote
cannot be replayed after a newer one was seen.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from securemig import files
from securemig.trust.attest import AttestationError, Check, ClockState
from securemig.trust.pki import check_host_name


@dataclass
class Golden:
    """A peer's golden PCR values (SHA-256 bank)."""

    host: str
    pcrs: dict[int, bytes]
    clock: ClockState | None = None
    recorded: float = 0.0

    def to_json(self) -> bytes:
        """The stored form."""
        data: dict[str, object] = {
            "host": self.host,
            "bank": "sha256",
            "pcrs": {str(p): v.hex() for p, v in sorted(self.pcrs.items())},
            "recorded": self.recorded,
        }
        if self.clock is not None:
            data["clock"] = {
                "reset_count": self.clock.reset_count,
                "restart_count": self.clock.restart_count,
            }
        return (json.dumps(data, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Golden:
        """Parse the stored form, refusing anything but SHA-256 values."""
        data = json.loads(raw)
        if data.get("bank") != "sha256":
            raise ValueError("only the sha256 PCR bank is supported")
        pcrs = {int(p): bytes.fromhex(v) for p, v in data["pcrs"].items()}
        if any(len(v) != 32 or not 0 <= p <= 23 for p, v in pcrs.items()):
            raise ValueError("PCR values must be 32-byte SHA-256 digests of PCRs 0..23")
        clock = data.get("clock")
        return cls(
            data["host"],
            pcrs,
            ClockState(clock["reset_count"], clock["restart_count"]) if clock else None,
            float(data.get("recorded", 0.0)),
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

    def record(self, host: str, pcrs: dict[int, bytes], clock: ClockState | None = None) -> Golden:
        """Record (or replace) ``host``'s golden values."""
        golden = Golden(host, dict(pcrs), clock, time.time())
        files.write_durably(self._path(host), golden.to_json())
        return golden

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

    def seen(self, host: str, pcrs: dict[int, bytes], clock: ClockState) -> None:
        """After a successful attestation: record values on first use and
        remember the clock counters."""
        golden = self.get(host)
        self.record(host, golden.pcrs if golden else pcrs, clock)

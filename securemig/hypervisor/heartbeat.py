"""
The Linux guest's heartbeat, as the host sees it.

The guest prints ``hb SEQ PCR16`` on its second serial port every few tens
of milliseconds; each QEMU appends them to the heartbeat file of its bundle
(:func:`securemig.hypervisor.qemu.heartbeat_path`).  A :class:`Watch`
follows one or more such files (the source's, then the destination's, in
the order the guest runs on them), stamps each line with the host's
monotonic clock when it is first seen, and answers what an operator asks
of a migrated guest: did its sequence continue without a restart (a
rebooted guest starts again at 1), what is its PCR 16 now, and how long
was the largest gap between two heartbeats (the downtime the guest
observed, within the polling interval).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from pathlib import Path

#: How often the files are polled: the resolution of the observed gap.
POLL_INTERVAL = 0.005
#: A heartbeat line is short; longer ones are not the guest's and are skipped.
MAX_LINE = 256


@dataclass(frozen=True)
class Beat:
    """One heartbeat: when the host saw it, the guest's sequence number and
    PCR 16 value, and which file (host) it came from."""

    at: float
    seq: int
    pcr16: str
    source: int


class Watch:
    """Follows heartbeat files from a thread, stamping each new line."""

    def __init__(self, *paths: Path) -> None:
        self._paths = list(paths)
        self._offsets = [0] * len(paths)
        self._partial = [b""] * len(paths)
        self._beats: list[Beat] = []
        #: Files followed but not yet written to: the guest's first bytes
        #: there may end a line it began on the previous host.
        self._fresh: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="heartbeat")
        # Lines already in the files are history, not news: skip them.
        for i, path in enumerate(self._paths):
            self._offsets[i] = path.stat().st_size if path.exists() else 0
        self._thread.start()

    def follow(self, path: Path) -> None:
        """Also follow ``path`` (a destination's heartbeat file), from its start."""
        with self._lock:
            self._paths.append(path)
            self._offsets.append(0)
            self._partial.append(b"")
            self._fresh.add(len(self._paths) - 1)

    def stop(self) -> None:
        """Stop polling (after one last look)."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(POLL_INTERVAL)
        self._poll()

    def _poll(self) -> None:
        now = time.monotonic()
        with self._lock:
            for i, path in enumerate(self._paths):
                try:
                    with open(path, "rb") as f:
                        f.seek(self._offsets[i])
                        chunk = f.read(1 << 20)
                except FileNotFoundError:
                    continue
                if not chunk:
                    continue
                self._offsets[i] += len(chunk)
                if i in self._fresh:
                    self._fresh.discard(i)
                    chunk, self._partial[i - 1] = self._partial[i - 1] + chunk, b""
                lines = (self._partial[i] + chunk).split(b"\n")
                self._partial[i] = lines.pop()[-MAX_LINE:]
                for line in lines:
                    beat = _parse(line, now, i)
                    if beat is not None:
                        self._beats.append(beat)

    @property
    def beats(self) -> list[Beat]:
        """Every heartbeat seen so far, in the order seen."""
        with self._lock:
            return list(self._beats)

    def wait(self, count: int = 1, timeout: float = 60.0, source: int | None = None) -> Beat:
        """Block until ``count`` more heartbeats (from file ``source``, if
        given) arrived after this call; the last of them.  TimeoutError if
        they do not come in time."""
        start = len(self._matching(source))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = self._matching(source)
            if len(seen) >= start + count:
                return seen[-1]
            time.sleep(POLL_INTERVAL)
        raise TimeoutError(f"no heartbeat from the guest in {timeout:.0f} s")

    def _matching(self, source: int | None) -> list[Beat]:
        return [b for b in self.beats if source is None or b.source == source]

    def continuous(self) -> bool:
        """Whether the sequence only ever went up by one (no beat lost, none
        repeated, no restart) across all the files followed."""
        seqs = [b.seq for b in self.beats]
        return all(b == a + 1 for a, b in itertools.pairwise(seqs))

    def largest_gap_ms(self) -> float:
        """The longest time between two consecutive heartbeats the host saw,
        in milliseconds (0 with fewer than two)."""
        beats = self.beats
        gaps = [b.at - a.at for a, b in itertools.pairwise(beats)]
        return round(max(gaps, default=0.0) * 1000, 1)


def _parse(line: bytes, now: float, source: int) -> Beat | None:
    parts = line.strip().split()
    if len(parts) != 3 or parts[0] != b"hb" or not parts[1].isdigit():
        return None
    return Beat(now, int(parts[1]), parts[2].decode("ascii", "replace").lower(), source)

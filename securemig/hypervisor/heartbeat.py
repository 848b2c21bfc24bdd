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
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

#: How often the files are polled: the resolution of the observed gap.
POLL_INTERVAL = 0.005
#: A heartbeat line is short; longer ones are not the guest's and are skipped.
MAX_LINE = 256
#: How much of each console the watch keeps (its end).
CONSOLE_KEPT = 64 * 1024
#: What the guest's kernel prints on its console when it panics.
PANIC = b"Kernel panic"


class GuestPanic(TimeoutError):
    """The guest's kernel panicked (its console says so): no heartbeat will
    come, and a restart would not be the migration's doing."""


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
        #: The end of the console next to each heartbeat file (:func:`console_beside`),
        #: kept here: a bundle given up after a migration takes its files along.
        self._consoles: dict[Path, bytes] = {}
        self._console_offsets: dict[Path, int] = {}
        #: Each file's descriptor, held once it was opened (:meth:`_read`).
        self._files: dict[int, BinaryIO] = {}
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
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(POLL_INTERVAL)
        self._poll()

    def _poll_consoles(self) -> None:
        for path in self._paths:
            console = console_beside(path)
            offset = self._console_offsets.get(console, 0)
            try:
                with open(console, "rb") as f:
                    f.seek(offset)
                    chunk = f.read(1 << 20)
            except FileNotFoundError:
                continue
            if chunk:
                self._console_offsets[console] = offset + len(chunk)
                kept = self._consoles.get(console, b"") + chunk
                self._consoles[console] = kept[-CONSOLE_KEPT:]

    def panic(self) -> str | None:
        """The console line where the guest's kernel panicked, if it did."""
        with self._lock:
            self._poll_consoles()
            for text in self._consoles.values():
                at = text.find(PANIC)
                if at >= 0:
                    return text[at : text.find(b"\n", at)].decode(errors="replace").strip()
        return None

    def consoles(self) -> dict[Path, bytes]:
        """The end of each console seen, by its path."""
        with self._lock:
            self._poll_consoles()
            return dict(self._consoles)

    def save(self, directory: Path) -> None:
        """Keep the consoles seen in ``directory`` (for a test that failed:
        the bundles they came from may be gone)."""
        directory.mkdir(parents=True, exist_ok=True)
        for i, (path, text) in enumerate(self.consoles().items()):
            (directory / f"console-{i}-{path.parent.name}.log").write_bytes(text)

    def _poll(self) -> None:
        now = time.monotonic()
        with self._lock:
            if int(now / POLL_INTERVAL) % 100 == 0:
                self._poll_consoles()
            for i, path in enumerate(self._paths):
                chunk = self._read(i, path)
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

    def _read(self, i: int, path: Path) -> bytes:
        """What file ``i`` gained.  Read through a descriptor held once the
        file is there: a migrated-away bundle is renamed aside and removed
        right after the commit, and a watch that looked again only after
        that (a loaded machine) would lose the beats written just before --
        a sequence that seems to skip.  A path that now names another file
        (a QEMU started again) is followed into it, from its start, once
        the old one is read to its end."""
        f = self._files.get(i)
        if f is not None:
            chunk = f.read(1 << 20)
            if chunk:
                return chunk
            try:
                now = os.stat(path)
            except OSError:
                return b""
            held = os.fstat(f.fileno())
            if (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev):
                return b""
            f.close()
            del self._files[i]
            self._offsets[i] = 0
        try:
            f = open(path, "rb")  # noqa: SIM115 -- held across polls, closed in stop()
        except OSError:
            return b""
        f.seek(self._offsets[i])
        self._files[i] = f
        return f.read(1 << 20)

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
        panic = self.panic()
        if panic is not None:
            raise GuestPanic(
                f"no heartbeat from the guest in {timeout:.0f} s: it panicked: {panic}"
            )
        raise TimeoutError(f"no heartbeat from the guest in {timeout:.0f} s")

    def _matching(self, source: int | None) -> list[Beat]:
        return [b for b in self.beats if source is None or b.source == source]

    def continuous(self) -> bool:
        """Whether the sequence only ever went up by one (no beat lost, none
        repeated, no restart) across all the files followed."""
        return not self.breaks()

    def breaks(self) -> list[tuple[int, int]]:
        """Where the sequence did not go up by one: (a beat, the next one
        seen) pairs, in order -- a lost beat, a repeated one, a restart."""
        seqs = [b.seq for b in self.beats]
        return [(a, b) for a, b in itertools.pairwise(seqs) if b != a + 1]

    def largest_gap_ms(self) -> float:
        """The longest time between two consecutive heartbeats the host saw,
        in milliseconds (0 with fewer than two)."""
        beats = self.beats
        gaps = [b.at - a.at for a, b in itertools.pairwise(beats)]
        return round(max(gaps, default=0.0) * 1000, 1)


def console_beside(heartbeat: Path) -> Path:
    """The guest's console file beside its heartbeat file: ``console.log``
    beside a QEMU bundle's ``heartbeat.log``, ``NAME-console.log`` beside a
    lab libvirt domain's ``NAME-heartbeat.log``."""
    return heartbeat.with_name(heartbeat.name.removesuffix("heartbeat.log") + "console.log")


def _parse(line: bytes, now: float, source: int) -> Beat | None:
    parts = line.strip().split()
    if len(parts) != 3 or parts[0] != b"hb" or not parts[1].isdigit():
        return None
    return Beat(now, int(parts[1]), parts[2].decode("ascii", "replace").lower(), source)

"""
``securemig bench --qemu``: what suspending and resuming a real QEMU guest
costs, and how large a RAM image QEMU writes.

For each guest memory size: create a QEMU VM (firmware only, a random
marker in RAM), start it, then time ``suspend`` (stop + migrate into the RAM
image + quit) and ``resume`` (start with ``-incoming defer``, load the
image, continue), medians over ``repeat`` cycles.  The image is small for an
idle guest: QEMU does not write zero pages.  With ``--json`` the rows, with
the run's provenance, go to a file too.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from securemig.hypervisor.bundle import create_image_vm
from securemig.hypervisor.qemu import QemuBackend, accelerator
from securemig.lab.bench.provenance import one_line, provenance
from securemig.transport.reactor import run_reactor


def run(sizes: list[int], repeat: int, json_path: Path | None = None) -> int:
    """Print the table (with ``json_path``, write it there as JSON too);
    returns an exit status."""
    from twisted.internet.defer import Deferred

    info = provenance()
    work = Path(tempfile.mkdtemp(prefix="securemig-bench-qemu-"))
    rows: list[tuple[int, float, float, int]] = []

    async def measure(reactor: Any) -> None:
        qemu = QemuBackend(reactor)
        for size in sizes:
            bundle = create_image_vm(work, f"q{size}", size, backend="qemu")
            suspend, resume = [], []
            try:
                await qemu.start(bundle)
                for _ in range(repeat):
                    t = time.perf_counter()
                    await Deferred.fromCoroutine(qemu._suspend(bundle))
                    suspend.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    await Deferred.fromCoroutine(qemu._resume(bundle))
                    resume.append(time.perf_counter() - t)
            finally:
                await qemu.end(bundle)
            image = bundle.image_path("ram").stat().st_size
            rows.append((size, statistics.median(suspend), statistics.median(resume), image))

    try:
        run_reactor(measure)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(one_line(info))
    print(f"QEMU, accelerator {accelerator()}, medians of {repeat}")
    print(f"{'guest MiB':>9} {'suspend s':>10} {'resume s':>9} {'RAM image':>12}")
    for size, suspend_s, resume_s, image in rows:
        print(f"{size:>9} {suspend_s:>10.3f} {resume_s:>9.3f} {image / (1 << 20):>10.2f} MiB")
    if json_path is not None:
        document = {
            "mode": "qemu",
            "accelerator": accelerator(),
            "repeat": repeat,
            "provenance": info,
            "records": [
                {
                    "guest_mib": size,
                    "suspend_s": round(suspend_s, 4),
                    "resume_s": round(resume_s, 4),
                    "ram_image_bytes": image,
                    "provenance": info,
                }
                for size, suspend_s, resume_s, image in rows
            ],
        }
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {json_path}", file=sys.stderr)
    return 0

"""The start-up cost of two securemig trees, alternating: CPU of a fresh
interpreter running CODE with OLD_ROOT's package first on ``PYTHONPATH``,
then this checkout's (their order swapped every round), and the median of
the differences within a round (new minus old).

  .venv/bin/python scripts/import-ab.py OLD_ROOT [ROUNDS [CODE]]

CODE defaults to what every ``securemig migrate`` runs before its first
byte besides the command itself: importing the command and tuning malloc.
The CPU counted is the child's and its children's (a process started at
import counts).  OLD_ROOT as for ``scripts/bench-ab.py``; both trees are
byte-compiled first.
"""

from __future__ import annotations

import compileall
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_CODE = (
    "import securemig.app.cli.main; from securemig.host.glibc import tune_malloc; tune_malloc()"
)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    """Run the rounds; print the medians and the load average."""
    old = Path(sys.argv[1]).absolute()
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    code = sys.argv[3] if len(sys.argv) > 3 else DEFAULT_CODE
    new = Path(__file__).absolute().parents[1]
    for tree in (old, new):
        compileall.compile_dir(tree / "securemig", quiet=2)
    cpu: dict[str, list[float]] = {"old": [], "new": []}
    wall: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(rounds):
        for label in ("old", "new") if r % 2 == 0 else ("new", "old"):
            env = {**os.environ, "PYTHONPATH": str(old if label == "old" else new)}
            before, started = _cpu(), time.monotonic()
            # From / so the working directory does not shadow PYTHONPATH.
            subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd="/")
            wall[label].append(time.monotonic() - started)
            cpu[label].append(_cpu() - before)
    for label in ("old", "new"):
        print(
            f"{label}: CPU-s median {statistics.median(cpu[label]):.3f} "
            f"min {min(cpu[label]):.3f}; wall median {statistics.median(wall[label]):.3f}"
        )
    diffs = [n - o for o, n in zip(cpu["old"], cpu["new"], strict=True)]
    print(f"CPU: median of new - old {statistics.median(diffs):+.3f}")
    print("load", os.getloadavg())


if __name__ == "__main__":
    main()

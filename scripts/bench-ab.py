"""Secure 1 GiB migrations of two securemig trees, alternating, in one lab.

``securemig bench`` compares protocols within one run; on a shared machine
its medians of three move by more than a change of a few percent.  This
script compares two versions of securemig instead: per round a plain copy,
then one secure migration with OLD_ROOT's ``securemig`` package first on
``PYTHONPATH`` (the command and the destination daemon alike) and one with
this checkout's, their order swapped every round, and prints the medians
of the differences within a round (new minus old), so a round's load
affects both sides of each difference alike.

  .venv/bin/python scripts/bench-ab.py OLD_ROOT [SIZE_MIB [ROUNDS]]

OLD_ROOT holds the old ``securemig`` package, e.g.
``mkdir /tmp/old && git archive main securemig | tar -x -C /tmp/old``.
Both trees are byte-compiled first (as ``pip install`` leaves them): with
``PYTHONDONTWRITEBYTECODE`` a changed module without byte code is compiled
from source in every process, which once made a change look 0.1-0.3 CPU-s
dearer than it was.
"""

from __future__ import annotations

import compileall
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from securemig.hypervisor.bundle import create_image_vm
from securemig.lab.bench import _lab_migration, _plain_copy
from securemig.lab.lab import Lab


def main() -> None:
    """Run the rounds and print each record and the medians."""
    old = Path(sys.argv[1]).absolute()
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    for tree in (old / "securemig", Path(__file__).parents[1] / "securemig"):
        compileall.compile_dir(tree, quiet=2)
    work = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    lab = Lab(work / "lab")
    runs: list[dict[str, dict[str, Any]]] = []
    try:
        lab.start()
        lab.create_vm("ab", size, None, secure=True)
        plain = create_image_vm(work / "plain", "plain", size)
        for r in range(rounds):
            run: dict[str, dict[str, Any]] = {}
            for label in ("plain", "old", "new") if r % 2 == 0 else ("plain", "new", "old"):
                if label == "plain":
                    record = _plain_copy(work, plain.image_path("ram"), lab)
                else:
                    if label == "old":
                        os.environ["PYTHONPATH"] = str(old)
                    try:
                        record = _lab_migration(lab, "ab", size << 20, "secure", None, "full")
                    finally:
                        os.environ.pop("PYTHONPATH", None)
                run[label] = {
                    "total": record["total_s"],
                    "in_process": record["in_process_s"],
                    "cpu_source": record["cpu_s"]["source"],
                    "cpu_destination": record["cpu_s"]["destination"],
                    "streams": record.get("phases", {}).get("streams"),
                }
                print(json.dumps({"round": r, "label": label, **run[label]}), flush=True)
            runs.append(run)
    finally:
        lab.stop()
        shutil.rmtree(work, ignore_errors=True)
    for key in ("total", "cpu_source", "cpu_destination", "streams"):
        diffs = [run["new"][key] - run["old"][key] for run in runs]
        print(f"{key}: median of new - old {statistics.median(diffs):+.3f}")
    for label in ("plain", "old", "new"):
        print(label, "median total", statistics.median(run[label]["total"] for run in runs))
    print("load", os.getloadavg())


if __name__ == "__main__":
    main()

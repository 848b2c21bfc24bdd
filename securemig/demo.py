"""
``securemig demo``: the whole system in one command, on loopback.

It starts a destination (``twistd securemig``) in a temporary directory,
creates a VM there, migrates it with ``securemig migrate`` (two real
processes talking TCP on 127.0.0.1), checks the images arrived intact, and
prints what happened phase by phase.  It ends every process it started.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from securemig import processes
from securemig.bundle import Bundle, create_image_vm


def _digests(bundle: Bundle) -> dict[str, str]:
    result = {}
    for image in bundle.manifest.images:
        h = hashlib.sha256()
        with open(bundle.image_path(image), "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        result[image.name] = h.hexdigest()
    return result


def run(size_mib: int = 256, as_json: bool = False, keep: bool = False) -> int:
    """Run the demo; returns the process exit status."""
    work = Path(tempfile.mkdtemp(prefix="securemig-demo-"))
    say = (lambda *a: print(*a, file=sys.stderr)) if as_json else print
    destination = None
    try:
        say(f"securemig demo in {work}")
        destination = processes.start_destination(work / "destination")
        say(
            f"1. destination `twistd securemig` listening on {destination.address} "
            "(insecure variant; the secure variant is not in this version yet)"
        )
        bundle = create_image_vm(work / "source", "demo-vm", size_mib, disk_mib=32)
        before = _digests(bundle)
        say(f"2. created VM demo-vm: RAM {size_mib} MiB, disk 32 MiB (random bytes)")
        say("3. migrating: securemig migrate demo-vm --insecure ...")
        result = processes.securemig(
            "migrate",
            "demo-vm",
            "--vm-dir",
            str(work / "source"),
            "--to",
            destination.address,
            "--insecure",
            "--json",
            "--no-progress",
        )
        if result.returncode != 0:
            say(result.stderr.strip())
            say(f"demo failed: securemig migrate exited with {result.returncode}")
            return 1
        summary: dict[str, Any] = json.loads(result.stdout)
        arrived = Bundle.load(work / "destination" / "vms" / "demo-vm")
        after = _digests(arrived)
        summary["images_identical"] = before == after
        summary["source_bundle_removed"] = not (work / "source" / "demo-vm").exists()
        if as_json:
            print(json.dumps(summary, indent=2))
        else:
            say("4. phases (seconds, source journal):")
            for phase, seconds in summary["phases"].items():
                say(f"     {phase:<12} {seconds:9.4f}")
            say(
                f"   total {summary['seconds']:.3f} s, {summary['throughput_mibps']} MiB/s, "
                f"outcome {summary['outcome']}"
            )
            say(
                f"5. images identical at the destination: {summary['images_identical']}; "
                f"source copy removed: {summary['source_bundle_removed']}"
            )
        ok = summary["outcome"] == "done" and summary["images_identical"]
        return 0 if ok and summary["source_bundle_removed"] else 1
    finally:
        if destination is not None:
            destination.stop()
        if keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

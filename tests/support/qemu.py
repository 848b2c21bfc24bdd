"""QEMU fixtures: TCG for a test, PCR 16 values, Linux-guest bundles."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from twisted.trial.unittest import TestCase

from securemig.hypervisor import guest as linux_guest
from securemig.hypervisor.bundle import Bundle, Image, Manifest
from securemig.trust import vtpm


def under_tcg(case: TestCase) -> None:
    """Run QEMU under TCG in this test (and the processes it starts), as the
    issue asks, even where KVM would be available."""
    previous = os.environ.get("SECUREMIG_QEMU_ACCEL")
    os.environ["SECUREMIG_QEMU_ACCEL"] = "tcg"

    def restore() -> None:
        if previous is None:
            os.environ.pop("SECUREMIG_QEMU_ACCEL", None)
        else:
            os.environ["SECUREMIG_QEMU_ACCEL"] = previous

    case.addCleanup(restore)


def extended(value: str) -> str:
    """PCR 16 after one extend of a reset PCR with ``value``."""
    return hashlib.sha256(bytes(32) + bytes.fromhex(value)).hexdigest()


def linux_bundle(path: Path, key: bytes, pcr16: str, dirty: int = 0, memory: int = 128) -> Bundle:
    """A stopped Linux-guest VM with a vTPM whose state key is ``key``."""
    path.mkdir(parents=True)
    identity = vtpm.create(path, key, path.parent / "vtpm-ca")
    state = path / vtpm.STATE_DIR / vtpm.STATE_FILE
    manifest = Manifest(
        path.name,
        "qemu",
        [Image("ram", 0), Image("vtpm", state.stat().st_size)],
        vtpm=identity,
        memory_mib=memory,
        state="stopped",
        guest="linux",
        guest_cmdline=linux_guest.cmdline(pcr16, dirty, 16),
    )
    bundle = Bundle(path, manifest)
    bundle.save()
    return bundle

"""Digests of files and of a bundle's images, to compare a VM before and after."""

from __future__ import annotations

import hashlib
from pathlib import Path

from securemig.hypervisor.bundle import Bundle


def digests(paths: list[Path]) -> dict[str, str]:
    """SHA-256 of each file, by file name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def bundle_digests(bundle: Bundle) -> dict[str, str]:
    """SHA-256 of each image of a bundle."""
    return digests([bundle.image_path(i) for i in bundle.manifest.images])

"""``securemig bench``: placeholder replaced below."""

from __future__ import annotations

from pathlib import Path


def run(sizes: list[int], repeat: int, work_dir: Path | None, json_path: Path | None) -> int:
    """Run the benchmark."""
    raise NotImplementedError

"""
Who may run a VM on a shared disk: the one ownership rule both ends apply.

In the shared-storage variant the disk stays on storage both hosts mount,
and a record beside it (:func:`~securemig.hypervisor.bundle.disk_owner`)
names the host that may run the VM on it.  The rule: a disk is *ours* if its
record names us, or names no one (a disk created before records, or without
an identity).  The source checks it before anything moves (it may only hand
over a disk it owns), hands the disk to the destination at its commit point
(:meth:`~securemig.host.departure.Departure.commit`), and the destination
checks it again before it resumes the VM
(:meth:`~securemig.host.arrival.Arrival.check_shared_disk`): a disk another
host took meanwhile is never written by two guests.
"""

from __future__ import annotations

from pathlib import Path

from securemig.hypervisor.bundle import disk_owner


def foreign_owner(disk: Path, me: str) -> str | None:
    """The host that owns ``disk`` if that is not ``me``; None if the disk
    is ours to run a VM on (its record names us, or no one)."""
    owner = disk_owner(disk)
    return None if owner is None or owner == me else owner

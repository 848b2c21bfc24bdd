"""The shared-disk ownership rule (securemig.host.shareddisk), as the source
(Departure.hand_shared_disk) and the destination (Arrival.check_shared_disk)
apply it: one rule, both ends."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from securemig.host.arrival import DestinationHost
from securemig.host.departure import Departure
from securemig.host.journal import Journal
from securemig.host.shareddisk import foreign_owner
from securemig.hypervisor.bundle import BundleError, create_image_vm, set_disk_owner
from securemig.protocol import wire
from securemig.protocol.errors import ErrorCode, ProtocolError


class ForeignOwnerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.disk = Path(self.mktemp())
        self.disk.write_bytes(b"d" * 4096)

    def test_no_record_is_ours(self) -> None:
        """A disk without an owner record is the holder's (older disks)."""
        self.assertIsNone(foreign_owner(self.disk, "host-a"))

    def test_recorded_owner(self) -> None:
        """Ours when the record names us; another host's name otherwise."""
        set_disk_owner(self.disk, "host-a")
        self.assertIsNone(foreign_owner(self.disk, "host-a"))
        self.assertEqual(foreign_owner(self.disk, "host-b"), "host-a")


class BothEndsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir()
        self.disk = self.base / "vm1.disk"
        self.bundle = create_image_vm(
            self.base / "vms", "vm1", 1, shared_disk=self.disk, owner="source-a"
        )

    def departure(self, variant: wire.Variant) -> Departure:
        journal = Journal(self.base / "source.sqlite")
        return Departure(self.bundle, variant, "dest:1", "secure", journal)

    def test_source_hands_over_only_its_own_disk(self) -> None:
        """The source names the successor for a disk it owns, and refuses,
        naming the owner, a disk another host took."""
        departure = self.departure(wire.Variant.SHARED_STORAGE)
        departure.hand_shared_disk("source-a", "dest-b")
        self.assertEqual(departure.disk_successor, "dest-b")
        set_disk_owner(self.disk, "host-c")
        departure = self.departure(wire.Variant.SHARED_STORAGE)
        with self.assertRaises(BundleError) as cm:
            departure.hand_shared_disk("source-a", "dest-b")
        self.assertIn("belongs to host-c", str(cm.exception))
        self.assertIsNone(departure.disk_successor)

    def test_no_shared_disk_hands_nothing(self) -> None:
        """A VM without a shared disk changes no ownership."""
        bundle = create_image_vm(self.base / "vms", "vm2", 1)
        journal = Journal(self.base / "source.sqlite")
        departure = Departure(bundle, wire.Variant.SHARED_STORAGE, "dest:1", "secure", journal)
        departure.hand_shared_disk("source-a", "dest-b")
        self.assertIsNone(departure.disk_successor)

    def test_destination_resumes_only_its_own_disk(self) -> None:
        """Before it resumes, the destination checks the source handed the
        disk to it: RESUME_FAILED naming the owner otherwise."""
        host = DestinationHost(self.base / "dest")
        hello = wire.Hello(
            1,
            wire.Variant.SHARED_STORAGE,
            "vm1",
            4096,
            (wire.ImageInfo("ram", 1),),
            str(self.disk),
        )
        arrival = host.admit(hello, "p", "secure", "source-a")
        self.addCleanup(arrival.lock.release)
        with self.assertRaises(ProtocolError) as cm:
            arrival.check_shared_disk("dest-b")
        self.assertEqual(cm.exception.code, ErrorCode.RESUME_FAILED)
        self.assertIn("belongs to source-a", cm.exception.reason)
        set_disk_owner(self.disk, "dest-b")
        arrival.check_shared_disk("dest-b")

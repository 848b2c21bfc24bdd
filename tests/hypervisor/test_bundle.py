"""Bundles (:mod:`securemig.hypervisor.bundle`): a VM as a manifest and its
image files, and the manifests and bundles refused."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from securemig.hypervisor.bundle import Bundle, BundleError, Manifest, create_image_vm
from securemig.protocol import wire


class BundleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())

    def test_create_and_find(self) -> None:
        bundle = create_image_vm(self.dir, "vm1", 1, disk_mib=2)
        found = Bundle.find(self.dir, "vm1")
        self.assertEqual(found.manifest, bundle.manifest)
        self.assertEqual(bundle.image_path("disk").stat().st_size, 2 << 20)
        self.assertNotEqual(bundle.image_path("ram").read_bytes()[:64], b"\0" * 64)

    def test_variant_rules(self) -> None:
        """Full needs the disk in the bundle; shared storage needs it outside."""
        local = create_image_vm(self.dir, "local", 1, disk_mib=1)
        self.assertRaises(BundleError, local.streamed_images, wire.Variant.SHARED_STORAGE)
        shared = create_image_vm(self.dir, "shared", 1, shared_disk=self.dir / "s.img")
        self.assertRaises(BundleError, shared.streamed_images, wire.Variant.FULL)
        self.assertEqual(
            [i.name for i in shared.streamed_images(wire.Variant.SHARED_STORAGE)], ["ram"]
        )

    def test_size_mismatch_detected(self) -> None:
        bundle = create_image_vm(self.dir, "vm1", 1)
        with open(bundle.image_path("ram"), "ab") as f:
            f.write(b"x")
        self.assertRaises(BundleError, bundle.check_images)

    def test_bad_manifests(self) -> None:
        """Unknown formats and unsafe names in a manifest are refused."""
        self.assertRaises(BundleError, Manifest.from_json, b'{"format": 99}')
        bad = Manifest("vm1").to_json().replace(b'"vm1"', b'"../x"')
        self.assertRaises(BundleError, Manifest.from_json, bad)
        self.assertRaises(BundleError, Manifest.from_json, b"not json")

    def test_wrong_name_in_directory(self) -> None:
        create_image_vm(self.dir, "vm1", 1)
        os.rename(self.dir / "vm1", self.dir / "vm2")
        self.assertRaises(BundleError, Bundle.find, self.dir, "vm2")

"""The source's rules before anything is touched (securemig.host.departure):
what a migration needs of the VM's vTPM key, as each variant hands it over;
and how it gives a committed VM up."""

from __future__ import annotations

import time
from pathlib import Path

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.trial.unittest import SynchronousTestCase

from securemig import files
from securemig.host.departure import check_keys, release
from securemig.host.journal import Journal
from securemig.hypervisor import image
from securemig.hypervisor.bundle import Bundle, BundleError, create_image_vm
from securemig.protocol.phases import Phase


class CheckKeysTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.bundle = create_image_vm(Path(self.mktemp()), "vm1", 1)

    def refusal(self, bundle: Bundle, secure: bool, live: bool, unseal_with: Path | None) -> str:
        with self.assertRaises(BundleError) as cm:
            check_keys(bundle, secure=secure, live=live, unseal_with=unseal_with)
        return str(cm.exception)

    def test_live_is_secure_only(self) -> None:
        """Live migration releases the key to an attested destination only."""
        self.bundle.vtpm_key_path.write_bytes(b"sealed")
        why = self.refusal(self.bundle, secure=False, live=True, unseal_with=Path("id"))
        self.assertIn("live migration is secure only", why)
        check_keys(self.bundle, secure=True, live=True, unseal_with=None)

    def test_secure_needs_the_sealed_key(self) -> None:
        """Secure: the VM's key sealed to this host's TPM must exist; the
        refusal names the file and the two ways out."""
        why = self.refusal(self.bundle, secure=True, live=False, unseal_with=None)
        self.assertIn(str(self.bundle.vtpm_key_path), why)
        self.assertIn("--insecure", why)
        self.bundle.vtpm_key_path.write_bytes(b"sealed")
        check_keys(self.bundle, secure=True, live=False, unseal_with=None)

    def test_insecure_vtpm_needs_the_identity(self) -> None:
        """Insecure: a VM with a vTPM needs the identity that unseals its
        key; one without a vTPM needs none."""
        check_keys(self.bundle, secure=False, live=False, unseal_with=None)
        self.bundle.manifest.vtpm = "ab" * 32
        why = self.refusal(self.bundle, secure=False, live=False, unseal_with=None)
        self.assertIn("give --identity to unseal its key", why)
        check_keys(self.bundle, secure=False, live=False, unseal_with=Path("id"))


class ReleaseTests(SynchronousTestCase):
    """After COMMITTED (:func:`release`): the source's copy is given up at
    once (its name free, the vTPM key gone, ``released`` journaled) and its
    files are unlinked by a detached remover; redone after a crash between
    the bundle's rename and ``released``, it removes what was left."""

    def setUp(self) -> None:
        self.patch(image, "run_blocking", maybeDeferred)
        self.vms = Path(self.mktemp())
        self.bundle = create_image_vm(self.vms, "vm1", 1)
        self.bundle.vtpm_key_path.write_bytes(b"sealed")
        self.journal = Journal(Path(self.mktemp()))
        self.addCleanup(self.journal.close)
        self.local_id = self.journal.begin(
            role="source", vm="vm1", peer="h:1", variant="full", protocol="secure"
        )
        self.journal.phase(self.local_id, Phase.COMMITTED)

    def released(self) -> None:
        self.successResultOf(
            Deferred.fromCoroutine(release(self.journal, self.local_id, self.bundle))
        )
        self.assertFalse(self.bundle.path.exists())
        record = self.journal.get(self.local_id)
        assert record is not None
        self.assertTrue(record.reached(Phase.RELEASED))
        deadline = time.monotonic() + 30
        while files.discarding(self.vms) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(list((self.vms / files.DISCARDED).iterdir()), [])

    def test_released_and_removed(self) -> None:
        self.released()

    def test_redone_after_the_rename(self) -> None:
        """Killed after the rename (the remover never ran): the bundle is
        gone from its place, its files are not; recovery's release removes
        them."""
        trash = self.vms / files.DISCARDED
        trash.mkdir()
        moved = trash / "vm1.0123456789abcdef"
        self.bundle.path.rename(moved)
        self.released()
        self.assertFalse(moved.exists())

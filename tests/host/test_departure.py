"""The source's rules before anything is touched (securemig.host.departure):
what a migration needs of the VM's vTPM key, as each variant hands it over."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from securemig.host.departure import check_keys
from securemig.hypervisor.bundle import Bundle, BundleError, create_image_vm


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

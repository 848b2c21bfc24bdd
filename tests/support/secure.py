"""Two enrolled hosts (once per test process) and the base of the tests that
run the secure variant with real processes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.trial.unittest import TestCase

from securemig.host import storage
from securemig.hypervisor.bundle import Bundle
from securemig.lab import processes
from securemig.trust.attestor import open_attestor
from securemig.trust.identity import issue_tls, write_identity
from securemig.trust.pca.core import Authorization, PrivacyCA
from securemig.trust.pki import Authority
from securemig.trust.tpm import swtpm
from securemig.trust.tpm.tpm import TPM

from .bundles import bundle_digests
from .commands import migrate_vm
from .tpm import shared_tpm

_world: Any = None


def world() -> Any:
    """Two enrolled hosts, once per test process: source-a (the shared TPM)
    and dest-b (a second swtpm), one site CA, one privacy CA; and a relay:
    dest-b's TLS identity with the TPM and AK of a third enrolled host."""
    global _world
    if _world is None:
        import atexit
        import shutil
        import tempfile

        _, tpm_a, tpm_base = shared_tpm()
        base = Path(tempfile.mkdtemp(prefix="securemig-test-secure-"))
        atexit.register(shutil.rmtree, base, True)
        swtpm.provision(base / "tpm-b", tpm_base / "ca")
        tpm_b = swtpm.start(base / "tpm-b")
        atexit.register(tpm_b.stop)
        site = Authority.create("site")
        pca = PrivacyCA.init(base / "pca", swtpm.ca_certificates(tpm_base / "ca"))
        pca_pem = pca.authority.cert.public_bytes(serialization.Encoding.PEM)

        def enroll_as(name: str) -> Any:
            def certify(tpm: TPM, ak: Any, tls_dir: Path) -> bytes:
                c = pca.begin(
                    name, tpm.ek_certificate(), tpm.ek_public(), ak.public, Authorization((name,))
                )
                secret = tpm.activate_credential(ak, c.credential_blob, c.encrypted_secret)
                return pca.finish(c.enrollment_id, secret)

            return certify

        write_identity(
            base / "source-a", "source-a", tpm_a.tcti, site, pca_pem, enroll_as("source-a")
        )
        write_identity(base / "dest-b", "dest-b", tpm_b.tcti, site, pca_pem, enroll_as("dest-b"))
        swtpm.provision(base / "tpm-c", tpm_base / "ca")
        tpm_c = swtpm.start(base / "tpm-c")
        atexit.register(tpm_c.stop)
        write_identity(base / "host-c", "host-c", tpm_c.tcti, site, pca_pem, enroll_as("host-c"))
        relay = base / "relay"
        shutil.copytree(base / "host-c", relay)
        issue_tls(site, "dest-b", relay)
        (relay / "host.json").write_text(json.dumps({"name": "dest-b", "tpm": tpm_c.tcti}))
        _world = (base, tpm_a, TPM(tpm_b.tcti))
    return _world


class SecureBase(TestCase):
    """Shared set-up: the two hosts, a destination per test, VM helpers."""

    def setUp(self) -> None:
        self.world, self.tpm_a, self.tpm_b = world()
        self.base = Path(self.mktemp()).absolute()
        self.vm_dir = self.base / "src"
        self.src_id = self.world / "source-a"
        self.dst_id = self.world / "dest-b"
        self.src_policy = self.base / "src-policy"
        self.dst_policy = self.base / "dst-policy"

    def start_destination(self, *extra: str) -> processes.Destination:
        state = self.base / "dst"
        state.mkdir(parents=True, exist_ok=True)
        process, port = processes.start_twistd(
            "securemig",
            "--state-dir",
            str(state),
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--identity",
            str(self.dst_id),
            "--policy-dir",
            str(self.dst_policy),
            *extra,
            port_file=self.base / "port",
            log_file=self.base / "dst.log",
        )
        destination = processes.Destination(process, port, state, self.base / "dst.log")
        self.addCleanup(destination.stop)
        return destination

    def create_vm(self, *extra: str) -> Bundle:
        result = processes.securemig(
            "vm",
            "create",
            "vm1",
            "--dir",
            str(self.vm_dir),
            "--ram-mib",
            "4",
            "--identity",
            str(self.src_id),
            *extra,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return Bundle.find(self.vm_dir, "vm1")

    def migrate(
        self,
        destination: processes.Destination,
        *extra: str,
        name: str = "dest-b",
        vm: str = "vm1",
        **run: Any,
    ) -> Any:
        """``securemig migrate VM`` securely to ``destination`` (as dest-b)."""
        return migrate_vm(
            self.vm_dir,
            destination.address,
            "--identity",
            str(self.src_id),
            "--policy-dir",
            str(self.src_policy),
            "--destination-name",
            name,
            "--json",
            "--no-progress",
            *extra,
            name=vm,
            **run,
        )

    def vtpm_key_at_source(self, bundle: Bundle) -> bytes:
        return open_attestor(self.src_id, None, False).unseal(bundle.vtpm_key_path.read_bytes())

    def assertNoUnhandledError(self, destination: processes.Destination) -> None:
        """Twisted logs an exception that escaped a protocol or a Deferred
        as "Unhandled Error"; a refusal is an expected outcome, never that."""
        log = destination.log()
        self.assertNotIn("Unhandled Error", log, log[-3000:])
        self.assertNotIn("Traceback", log, log[-3000:])

    def assertStaysAtSource(
        self, bundle: Bundle, before: dict[str, str], result: Any, expected: str
    ) -> None:
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn(expected, result.stderr)
        self.assertEqual(bundle_digests(Bundle.load(bundle.path)), before)
        self.assertTrue(bundle.vtpm_key_path.exists())
        self.assertFalse(storage.is_locked(bundle.lock_path))


def staging_left(destination: Any, timeout: float = 30.0) -> list[Path]:
    """What the destination's staging still holds once it ended its side:
    ``migrate`` exits as soon as it refuses, and the destination removes
    staging on the ABORT that follows, so wait (up to ``timeout``) for it to
    empty rather than read it at once."""
    staging = destination.state_dir / "staging"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(staging.iterdir()):
        time.sleep(0.05)
    return list(staging.iterdir())

"""Identity directories: made and renewed atomically, never replaced by
accident, the old one kept aside."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.trial.unittest import SynchronousTestCase

from securemig.lab import processes
from securemig.trust import attest, identity
from securemig.trust.identity import (
    Identity,
    IdentityExists,
    kept_aside,
    renew_identity,
    write_identity,
)
from securemig.trust.pca.core import Authorization, PrivacyCA
from securemig.trust.pki import Authority
from securemig.trust.tpm import swtpm
from securemig.trust.tpm.tpm import TPM, KeyBlob
from tests.support.tpm import shared_tpm


class Refused(Exception):
    """A privacy CA that refuses, in these tests."""


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` and its digest."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


class IdentityTests(SynchronousTestCase):
    """write_identity (``host init``) and renew_identity (``host renew``)
    with the swtpm and an in-process privacy CA."""

    def setUp(self) -> None:
        _, self.tpm, tpm_base = shared_tpm()
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir()
        self.site = Authority.create("site")
        self.pca = PrivacyCA.init(self.base / "pca", swtpm.ca_certificates(tpm_base / "ca"))
        self.pca_pem = self.pca.authority.cert.public_bytes(serialization.Encoding.PEM)
        self.dir = self.base / "identity"

    def certify(self, tpm: TPM, ak: KeyBlob, tls_dir: Path) -> bytes:
        c = self.pca.begin(
            "host-a", tpm.ek_certificate(), tpm.ek_public(), ak.public, Authorization(("host-a",))
        )
        secret = tpm.activate_credential(ak, c.credential_blob, c.encrypted_secret)
        return self.pca.finish(c.enrollment_id, secret)

    def refuse(self, tpm: TPM, ak: KeyBlob, tls_dir: Path) -> bytes:
        raise Refused("no")

    def init(self, **kw: Any) -> Identity:
        return write_identity(
            self.dir,
            "host-a",
            self.tpm.tcti,
            self.site,
            self.pca_pem,
            kw.pop("certify", self.certify),
            **kw,
        )

    def renew(self, certify: Any = None) -> Identity:
        return renew_identity(self.dir, self.site, self.pca_pem, certify or self.certify)

    def assertNoLeftovers(self) -> None:
        """No temporary directory is left next to the identity."""
        self.assertEqual([p.name for p in self.base.glob(".identity.new-*")], [])

    def ak_name(self) -> bytes:
        ak, cert = Identity.load(self.dir).attestation_key()
        attest.verify_ak_certificate(cert, self.pca.authority.cert, ak.public, "host-a")
        return attest.ak_name(ak.public)

    def test_init(self) -> None:
        made = self.init()
        self.assertEqual((made.name, made.tpm), ("host-a", self.tpm.tcti))
        # All but the optional EK chain (an RSA EK straight from the vendor CA).
        wanted = set(identity.IDENTITY_FILES) - {identity.EK_CHAIN}
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(wanted))
        self.assertEqual(self.dir.stat().st_mode & 0o7777, 0o777 & ~_umask())
        self.assertEqual((self.dir / "tls.key").stat().st_mode & 0o777, 0o600)
        self.ak_name()
        self.assertNoLeftovers()

    def test_init_into_empty_directory(self) -> None:
        self.dir.mkdir()
        self.init()
        self.ak_name()

    def test_init_refuses_an_existing_identity(self) -> None:
        """A second init without force: refused, nothing changed."""
        self.init()
        before = snapshot(self.dir)
        with self.assertRaises(IdentityExists) as cm:
            self.init()
        self.assertIn("already holds an identity", str(cm.exception))
        self.assertIn("host renew", str(cm.exception))
        self.assertEqual(snapshot(self.dir), before)
        self.assertEqual(kept_aside(self.dir), [])
        self.assertNoLeftovers()

    def test_init_refuses_a_directory_with_other_files(self) -> None:
        self.dir.mkdir()
        (self.dir / "notes").write_text("mine")
        with self.assertRaises(IdentityExists) as cm:
            self.init()
        self.assertIn("already holds files", str(cm.exception))
        self.assertEqual(snapshot(self.dir), {"notes": hashlib.sha256(b"mine").hexdigest()})

    def test_init_refuses_a_file(self) -> None:
        """Not a directory: refused even with force."""
        self.dir.write_text("x")
        self.assertRaises(IdentityExists, self.init, force=True)
        self.assertEqual(self.dir.read_text(), "x")

    def test_init_force_keeps_the_old_one_aside(self) -> None:
        self.init()
        (self.dir / "policy").mkdir()
        (self.dir / "policy" / "host-b.json").write_text("{}")
        before, old_ak = snapshot(self.dir), self.ak_name()
        self.init(force=True)
        (aside,) = kept_aside(self.dir)
        self.assertTrue(aside.name.startswith("identity.old-"))
        self.assertEqual(snapshot(aside), before)
        self.assertNotEqual(self.ak_name(), old_ak)
        # A replaced identity is replaced whole: policy/ stays with the old one.
        self.assertFalse((self.dir / "policy").exists())
        self.assertNoLeftovers()

    def test_failed_init_leaves_nothing(self) -> None:
        self.assertRaises(Refused, self.init, certify=self.refuse)
        self.assertFalse(self.dir.exists())
        self.assertNoLeftovers()

    def test_failed_forced_init_leaves_the_old_one(self) -> None:
        self.init()
        before = snapshot(self.dir)
        self.assertRaises(Refused, self.init, certify=self.refuse, force=True)
        self.assertEqual(snapshot(self.dir), before)
        self.assertEqual(kept_aside(self.dir), [])
        self.assertNoLeftovers()

    def test_renew(self) -> None:
        """New AK (certified for the host), new TLS key; same name and TPM;
        policy/ moved into the new identity; the old one kept aside."""
        self.init()
        (self.dir / "policy").mkdir()
        (self.dir / "policy" / "host-b.json").write_text('{"kept": true}')
        before, old_ak = snapshot(self.dir), self.ak_name()
        renewed = self.renew()
        self.assertEqual((renewed.name, renewed.tpm), ("host-a", self.tpm.tcti))
        self.assertNotEqual(self.ak_name(), old_ak)
        self.assertNotEqual(
            (self.dir / "tls.key").read_bytes(),
            (kept_aside(self.dir)[0] / "tls.key").read_bytes(),
        )
        self.assertEqual((self.dir / "policy" / "host-b.json").read_text(), '{"kept": true}')
        (aside,) = kept_aside(self.dir)
        self.assertEqual(
            snapshot(aside), {k: v for k, v in before.items() if not k.startswith("policy")}
        )
        self.assertNoLeftovers()

    def test_renew_twice_within_a_second(self) -> None:
        self.init()
        names = {self.ak_name()}
        for _ in range(3):
            self.renew()
            names.add(self.ak_name())
        self.assertEqual(len(names), 4)
        self.assertEqual(len(kept_aside(self.dir)), 3)

    def test_failed_renew_changes_nothing(self) -> None:
        self.init()
        (self.dir / "policy").mkdir()
        (self.dir / "policy" / "host-b.json").write_text("{}")
        before = snapshot(self.dir)
        self.assertRaises(Refused, self.renew, certify=self.refuse)
        self.assertEqual(snapshot(self.dir), before)
        self.assertEqual(kept_aside(self.dir), [])
        self.assertNoLeftovers()

    def test_renew_without_rename_exchange(self) -> None:
        """Where the file system cannot exchange two names: two renames."""
        self.patch(identity, "_exchange", lambda a, b: False)
        self.init()
        (self.dir / "policy").mkdir()
        old_ak = self.ak_name()
        self.renew()
        self.assertNotEqual(self.ak_name(), old_ak)
        self.assertTrue((self.dir / "policy").is_dir())
        self.assertEqual(len(kept_aside(self.dir)), 1)
        self.assertNoLeftovers()

    def test_attestation_key_reads_one_version(self) -> None:
        """AK and certificate come from the directory that was opened, even
        if it is swapped between the two reads."""
        self.init()
        loaded = Identity.load(self.dir)
        first = loaded.attestation_key()
        real_read = identity._read_at
        calls: list[str] = []

        def read_then_renew(fd: int, name: str) -> bytes:
            data = real_read(fd, name)
            if not calls:
                self.renew()
            calls.append(name)
            return data

        self.patch(identity, "_read_at", read_then_renew)
        self.assertEqual(loaded.attestation_key(), first)
        self.assertNotEqual(Identity.load(self.dir).ak, first[0])


class HostCommandTests(SynchronousTestCase):
    """`securemig host init` and `renew` refusals that need no privacy CA."""

    def host_init(self, directory: Path, *extra: str) -> Any:
        return processes.securemig(
            "host",
            "init",
            "--dir",
            str(directory),
            "--name",
            "host-a",
            "--tpm",
            "swtpm:host=127.0.0.1,port=1",
            "--site-ca",
            str(directory.parent / "no-site-ca"),
            "--pca",
            "https://127.0.0.1:1",
            "--pca-ca",
            str(directory.parent / "no-pca.pem"),
            *extra,
        )

    def test_init_refuses_an_existing_identity(self) -> None:
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        (directory / "host.json").write_text('{"name": "host-a", "tpm": "x"}')
        result = self.host_init(directory)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("already holds an identity", result.stderr)
        self.assertIn("--force", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(os.listdir(directory), ["host.json"])
        self.assertEqual(sorted(os.listdir(directory.parent)), [directory.name])

    def test_failed_forced_init_changes_nothing(self) -> None:
        """--force with an unusable site CA: one error line, the old identity
        still in place, nothing aside."""
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        (directory / "host.json").write_text('{"name": "host-a", "tpm": "x"}')
        result = self.host_init(directory, "--force")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(os.listdir(directory), ["host.json"])
        self.assertEqual(sorted(os.listdir(directory.parent)), [directory.name])

    def test_renew_needs_an_identity(self) -> None:
        directory = Path(self.mktemp()).absolute()
        result = processes.securemig(
            "host",
            "renew",
            "--identity",
            str(directory),
            "--site-ca",
            str(directory),
            "--pca",
            "https://127.0.0.1:1",
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("is not an identity directory", result.stderr)
        self.assertFalse(directory.exists())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

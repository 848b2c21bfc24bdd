"""Enrollment with the privacy CA: the happy path and every refusal, with
real swtpm TPMs; then the whole over HTTPS with real processes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.trial.unittest import SynchronousTestCase, TestCase

from securemig.lab import processes
from securemig.trust import attest
from securemig.trust.pca.core import EnrollmentError, PrivacyCA, VendorCAError
from securemig.trust.pki import Authority
from securemig.trust.tpm import swtpm
from securemig.trust.tpm.tpm import TPM

from ..helpers import shared_tpm
from .test_attest import Forger


def new_pca(base: Path, vendors: list[Path]) -> PrivacyCA:
    return PrivacyCA.init(base / "pca", vendors)


class VendorCATests(SynchronousTestCase):
    """``PrivacyCA.init`` trusts only CA certificates, and creates nothing
    when one given is not."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.base.mkdir()
        self.ca = Authority.create("vendor")

    def write(self, name: str, data: bytes) -> Path:
        path = self.base / name
        path.write_bytes(data)
        return path

    def assertNotVendorCA(self, path: Path, words: str) -> None:
        with self.assertRaises(VendorCAError) as cm:
            new_pca(self.base, [path])
        self.assertIn(words, str(cm.exception))
        self.assertFalse((self.base / "pca").exists())

    def test_ca_accepted(self) -> None:
        pem = self.ca.cert.public_bytes(serialization.Encoding.PEM)
        pca = new_pca(self.base, [self.write("vendor.pem", pem)])
        self.assertEqual(pca.vendors, [self.ca.cert])

    def test_not_a_certificate(self) -> None:
        self.assertNotVendorCA(self.write("hostname", b"myhost\n"), "holds no PEM certificate")

    def test_der(self) -> None:
        der = self.ca.cert.public_bytes(serialization.Encoding.DER)
        self.assertNotVendorCA(self.write("vendor.der", der), "convert it to PEM")

    def test_leaf_certificate(self) -> None:
        leaf = self.ca.issue(Authority.create("x").key.public_key(), "host-a")
        pem = leaf.public_bytes(serialization.Encoding.PEM)
        self.assertNotVendorCA(self.write("leaf.pem", pem), "is not a CA certificate")


class EnrollmentTests(SynchronousTestCase):
    """PrivacyCA.begin / finish against a real TPM."""

    def setUp(self) -> None:
        self.sw, self.tpm, self.tpm_base = shared_tpm()
        self.base = Path(self.mktemp())
        self.vendors = swtpm.ca_certificates(self.tpm_base / "ca")
        self.pca = new_pca(self.base, self.vendors)
        self.ak = self.tpm.create_ak()

    def begin(self, pca: PrivacyCA | None = None, host: str = "host-a", **kw: bytes) -> object:
        args = dict(
            ek_cert=self.tpm.ek_certificate(),
            ek_public=self.tpm.ek_public(),
            ak_public=self.ak.public,
        )
        args.update(kw)
        return (pca or self.pca).begin(host, **args)

    def assertRefused(self, reason: str, call: object, *args: object, **kw: object) -> None:
        with self.assertRaises(EnrollmentError) as cm:
            call(*args, **kw)  # type: ignore[operator]
        self.assertEqual(cm.exception.reason, reason, str(cm.exception))

    def enroll(self, tpm: TPM | None = None, host: str = "host-a") -> bytes:
        tpm = tpm or self.tpm
        ak = self.ak if tpm is self.tpm else tpm.create_ak()
        challenge = self.pca.begin(host, tpm.ek_certificate(), tpm.ek_public(), ak.public)
        secret = tpm.activate_credential(ak, challenge.credential_blob, challenge.encrypted_secret)
        return self.pca.finish(challenge.enrollment_id, secret)

    def test_enroll(self) -> None:
        """A genuine TPM gets an AK certificate naming the host, for its AK."""
        cert = self.enroll()
        attest.verify_ak_certificate(cert, self.pca.authority.cert, self.ak.public, "host-a")

    def test_untrusted_vendor(self) -> None:
        """An EK certificate from a CA the PCA does not trust is refused."""
        rogue = self.base / "rogue.pem"
        rogue.write_bytes(
            Authority.create("rogue vendor").cert.public_bytes(serialization.Encoding.PEM)
        )
        pca = PrivacyCA.init(self.base / "other-pca", [rogue])
        self.assertRefused("ek-certificate", self.begin, pca)

    def test_not_an_ek_certificate(self) -> None:
        """A certificate without the EK usage is refused."""
        tls = (
            Authority.create("x")
            .issue(Authority.create("y").key.public_key(), "host-a")
            .public_bytes(serialization.Encoding.DER)
        )
        self.assertRefused("ek-certificate", self.begin, ek_cert=tls)

    def test_ek_public_not_the_certificates(self) -> None:
        """An EK public key that is not the one in the EK certificate."""
        self.assertRefused("ek-mismatch", self.begin, ek_public=self.tpm.create_ak().public)

    def test_ak_attributes(self) -> None:
        """An AK that is not a restricted signing key is refused."""
        loose = Forger.create(attributes=0x00040072)  # sign|fixedTPM|fixedParent|sdo|uwa
        self.assertRefused("ak-attributes", self.begin, ak_public=loose.public)

    def test_wrong_answer(self) -> None:
        """A wrong activation answer ends the enrollment for good."""
        challenge = self.begin()
        self.assertRefused(
            "activation-failed", self.pca.finish, challenge.enrollment_id, os.urandom(32)
        )  # type: ignore[attr-defined]
        secret = self.tpm.activate_credential(
            self.ak,
            challenge.credential_blob,
            challenge.encrypted_secret,  # type: ignore
        )
        self.assertRefused("unknown-enrollment", self.pca.finish, challenge.enrollment_id, secret)  # type: ignore[attr-defined]

    def test_credential_only_for_the_named_ak(self) -> None:
        """A host claiming an AK it does not hold cannot activate the
        credential with another key: the TPM checks the name."""
        other = self.tpm.create_ak()
        challenge = self.begin()
        with self.assertRaises(Exception) as cm:
            self.tpm.activate_credential(
                other,
                challenge.credential_blob,  # type: ignore
                challenge.encrypted_secret,
            )  # type: ignore
        self.assertIn("integrity", str(cm.exception))

    def test_host_reenrolled_with_another_tpm(self) -> None:
        """Once host-a is enrolled, another TPM cannot enroll as host-a."""
        self.enroll()
        second = swtpm.start(self._second_tpm())
        self.addCleanup(second.stop)
        with TPM(second.tcti) as other:
            self.assertRefused("host-has-other-tpm", self.enroll, other)
            self.enroll(other, host="host-b")  # under its own name it may

    def _second_tpm(self) -> Path:
        state = self.base / "second-tpm"
        swtpm.provision(state, self.tpm_base / "ca")
        return state

    def test_bad_host_name(self) -> None:
        self.assertRefused("host-name", self.begin, host="../etc")


class EnrollmentOverHTTPSTests(TestCase):
    """``twistd securemig-pca`` and ``securemig host init``, real processes."""

    def test_host_init(self) -> None:
        _, tpm, tpm_base = shared_tpm()
        base = Path(self.mktemp()).absolute()
        run = processes.securemig
        self.assertEqual(run("ca", "init", str(base / "site")).returncode, 0)
        self.assertEqual(
            run(
                "ca",
                "issue",
                str(base / "site"),
                "--name",
                "localhost",
                "--out",
                str(base / "pca-tls"),
            ).returncode,
            0,
        )
        vendor_args = []
        for cert in swtpm.ca_certificates(tpm_base / "ca"):
            vendor_args += ["--vendor-ca", str(cert)]
        self.assertEqual(run("pca", "init", str(base / "pca"), *vendor_args).returncode, 0)
        tls = base / "pca-tls"
        process, port = processes.start_pca(base / "pca", tls, base)
        self.addCleanup(processes.end_process, process)

        def host_init(directory: str, tcti: str) -> Any:
            return run(
                "host",
                "init",
                "--dir",
                str(base / directory),
                "--name",
                "host-a",
                "--tpm",
                tcti,
                "--site-ca",
                str(base / "site"),
                "--pca",
                f"https://localhost:{port}",
                "--pca-ca",
                str(base / "pca/ca.pem"),
            )

        host = host_init("host-a", tpm.tcti)
        self.assertEqual(host.returncode, 0, host.stderr)
        ak_cert = (base / "host-a" / "ak.der").read_bytes()
        ak = (base / "host-a" / "ak.blob").read_bytes()
        from securemig.trust.tpm.tpm import KeyBlob

        pca_cert = x509.load_pem_x509_certificate((base / "pca" / "ca.pem").read_bytes())
        attest.verify_ak_certificate(ak_cert, pca_cert, KeyBlob.from_bytes(ak).public, "host-a")
        self.assertEqual(oct((base / "host-a" / "tls.key").stat().st_mode & 0o777), "0o600")
        # The same host name from a different TPM: refused, with the PCA's reason.
        second = base / "tpm2"
        swtpm.provision(second, tpm_base / "ca")
        sw2 = swtpm.start(second)
        self.addCleanup(sw2.stop)
        again = host_init("host-a2", sw2.tcti)
        self.assertEqual(again.returncode, 1)
        self.assertIn("host-has-other-tpm", again.stderr)

    def test_pca_refuses_plain_http(self) -> None:
        result = subprocess.run(
            [
                processes.script("twistd"),
                "-n",
                "--pidfile=",
                "securemig-pca",
                "--dir",
                self.mktemp(),
                "--listen",
                "tcp:0",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("not a privacy CA", result.stdout + result.stderr)

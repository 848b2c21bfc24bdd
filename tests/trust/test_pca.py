"""Enrollment with the privacy CA: the happy path and every refusal, with
real swtpm TPMs; then the whole over HTTPS with real processes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.trial.unittest import SynchronousTestCase, TestCase

from securemig.lab import processes
from securemig.protocol import wire
from securemig.trust import attest
from securemig.trust.pca.client import EnrollmentRefused, enroll
from securemig.trust.pca.core import Authorization, EnrollmentError, PrivacyCA, VendorCAError
from securemig.trust.pki import Authority
from securemig.trust.tpm import swtpm
from securemig.trust.tpm.tpm import TPM, KeyBlob, TPMError
from tests.support.tpm import shared_tpm
from tests.support.trust import FakeTime, Forger


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

    def begin(
        self,
        pca: PrivacyCA | None = None,
        host: str = "host-a",
        authorization: Authorization | None = None,
        **kw: bytes,
    ) -> Any:
        """``begin`` for this TPM's EK and AK, authorized by ``host``'s
        site-CA certificate unless told otherwise."""
        args = dict(
            ek_cert=self.tpm.ek_certificate(),
            ek_public=self.tpm.ek_public(),
            ak_public=self.ak.public,
        )
        args.update(kw)
        given = Authorization((host,)) if authorization is None else authorization
        return (pca or self.pca).begin(host, authorization=given, **args)

    def assertRefused(self, reason: str, call: object, *args: object, **kw: object) -> None:
        with self.assertRaises(EnrollmentError) as cm:
            call(*args, **kw)  # type: ignore[operator]
        self.assertEqual(cm.exception.reason, reason, str(cm.exception))

    def enroll(
        self,
        tpm: TPM | None = None,
        host: str = "host-a",
        authorization: Authorization | None = None,
        ak: KeyBlob | None = None,
    ) -> bytes:
        """Both steps, authorized by ``host``'s certificate unless told otherwise."""
        tpm = tpm or self.tpm
        ak = ak or (self.ak if tpm is self.tpm else tpm.create_ak())
        given = Authorization((host,)) if authorization is None else authorization
        challenge = self.pca.begin(host, tpm.ek_certificate(), tpm.ek_public(), ak.public, given)
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
        """Once host-a is enrolled, another TPM cannot enroll as host-a, even
        authorized, until `pca replace host-a`; which revokes the old AK."""
        old = x509.load_der_x509_certificate(self.enroll())
        second = swtpm.start(self._second_tpm())
        self.addCleanup(second.stop)
        with TPM(second.tcti) as other:
            self.assertRefused("host-has-other-tpm", self.enroll, other)
            token = self.pca.authorize("host-a")
            self.assertRefused(
                "host-has-other-tpm", self.enroll, other, authorization=Authorization(token=token)
            )
            self.enroll(other, host="host-b")  # under its own name it may
            self.assertEqual(self.pca.replace("host-a"), 1)
            # Replacing is not authorizing: the new TPM still needs proof.
            self.assertRefused("not-authorized", self.enroll, other, authorization=Authorization())
            new = x509.load_der_x509_certificate(self.enroll(other))
        crl = x509.load_der_x509_crl(self.pca.crl())
        self.assertIsNotNone(crl.get_revoked_certificate_by_serial_number(old.serial_number))
        self.assertIsNone(crl.get_revoked_certificate_by_serial_number(new.serial_number))
        # And the old TPM, whose name was given to another, is refused now.
        self.assertRefused("host-has-other-tpm", self.enroll)

    def test_replace_unknown_host(self) -> None:
        self.assertRaises(KeyError, self.pca.replace, "host-z")

    def _second_tpm(self) -> Path:
        state = self.base / "second-tpm"
        swtpm.provision(state, self.tpm_base / "ca")
        return state

    def test_bad_host_name(self) -> None:
        self.assertRefused("host-name", self.begin, host="../etc")

    # -- authorization (issue 13, item 5)

    def test_no_authorization_refused(self) -> None:
        """A genuine TPM without the operator's authorization gets nothing."""
        self.assertRefused("not-authorized", self.begin, authorization=Authorization())

    def test_other_names_certificate_refused(self) -> None:
        """A site-CA certificate authorizes its own name only."""
        with self.assertRaises(EnrollmentError) as cm:
            self.begin(authorization=Authorization(("host-b",)))
        self.assertEqual(cm.exception.reason, "not-authorized")
        self.assertIn("names host-b, not host-a", cm.exception.detail)

    def test_token_once(self) -> None:
        """A token enrolls its host once; used again it is refused, and the
        PCA stores only its hash."""
        token = self.pca.authorize("host-a")
        self.enroll(authorization=Authorization(token=token))
        # The same TPM again with the spent token (a token given is checked).
        self.assertRefused("token", self.enroll, authorization=Authorization(token=token))
        stored = (self.base / "pca" / "pca.sqlite").read_bytes()
        self.assertNotIn(token.encode(), stored)

    def test_token_spent_between_begin_and_finish(self) -> None:
        """Two enrollments begun with one token: only the first to finish
        gets a certificate."""
        token = self.pca.authorize("host-a")
        given = Authorization(token=token)
        first, second = self.begin(authorization=given), self.begin(authorization=given)
        for challenge in (first, second):
            challenge.secret = self.tpm.activate_credential(
                self.ak, challenge.credential_blob, challenge.encrypted_secret
            )
        self.pca.finish(first.enrollment_id, first.secret)
        self.assertRefused("token", self.pca.finish, second.enrollment_id, second.secret)

    def test_token_expired(self) -> None:
        clock = FakeTime(1_000_000.0)
        pca = PrivacyCA(self.base / "pca", clock=clock)
        token = pca.authorize("host-a", ttl=60)
        clock.now += 61
        self.assertRefused("token", self.begin, pca, authorization=Authorization(token=token))

    def test_token_for_another_host_or_unknown(self) -> None:
        token = self.pca.authorize("host-b")
        self.assertRefused("token", self.begin, authorization=Authorization(token=token))
        self.assertRefused("token", self.begin, authorization=Authorization(token="x" * 43))

    def test_renewal_by_the_same_tpm(self) -> None:
        """An enrolled host renews its AK with its TPM alone; once revoked,
        it needs authorization again."""
        self.enroll()
        self.enroll(authorization=Authorization(), ak=self.tpm.create_ak())
        self.pca.revoke("host-a")
        self.assertRefused("not-authorized", self.begin, authorization=Authorization())
        self.enroll(ak=self.tpm.create_ak())  # with its certificate: enrolled again

    # -- revocation (item 6)

    def test_revoke_and_list(self) -> None:
        """`pca revoke --ak` revokes that AK only, `pca revoke` all; the CRL
        is signed by the PCA and lists exactly the revoked serials."""
        first = x509.load_der_x509_certificate(self.enroll())
        ak2 = self.tpm.create_ak()
        second = x509.load_der_x509_certificate(self.enroll(ak=ak2))
        name2 = attest.ak_name(ak2.public).hex()
        (listed,) = self.pca.hosts()
        self.assertEqual([a.ak_name for a in listed.aks][1], name2)
        self.assertEqual(self.pca.revoke("host-a", ak=name2[:16]), 1)
        crl = x509.load_der_x509_crl(self.pca.crl())
        self.assertTrue(crl.is_signature_valid(self.pca.authority.key.public_key()))
        self.assertEqual([r.serial_number for r in crl], [second.serial_number])
        self.assertEqual(self.pca.revoke("host-a"), 1)  # the other one
        serials = {r.serial_number for r in x509.load_der_x509_crl(self.pca.crl())}
        self.assertEqual(serials, {first.serial_number, second.serial_number})
        (listed,) = self.pca.hosts()
        self.assertTrue(listed.revoked and all(a.revoked for a in listed.aks))
        self.assertRaises(KeyError, self.pca.revoke, "host-z")
        self.assertRaises(KeyError, self.pca.revoke, "host-a", "ffff")

    # -- algorithms (item 7)

    def test_ecc_ek_through_an_intermediate(self) -> None:
        """An ECC P-256 EK whose certificate a vendor intermediate issued:
        a PCA trusting the vendor's root only enrolls it when the host sends
        the intermediate; not without it, nor with a non-CA certificate in
        its place; the EK must then activate the credential."""
        vendor = self.base / "ecc-vendor"
        chain = swtpm.certify_ecc_ek(self.tpm.tcti, vendor)
        pca = PrivacyCA.init(self.base / "ecc-pca", [vendor / "ecc-root" / "ca.pem"])
        intermediate = x509.load_pem_x509_certificate(chain.read_bytes())
        der = intermediate.public_bytes(serialization.Encoding.DER)
        ek = self.tpm.ek_certificate("ecc")
        self.assertEqual(x509.load_der_x509_certificate(ek).issuer, intermediate.subject)
        begin = dict(ek_cert=ek, ek_public=self.tpm.ek_public("ecc"), ak_public=self.ak.public)
        self.assertRefused("ek-certificate", pca.begin, "host-a", **begin)
        leaf = Authority.create("x").issue(Authority.create("y").key.public_key(), "host-a")
        self.assertRefused(
            "ek-certificate",
            pca.begin,
            "host-a",
            ek_intermediates=[leaf.public_bytes(serialization.Encoding.DER)],
            **begin,
        )
        challenge = pca.begin(
            "host-a", **begin, authorization=Authorization(("host-a",)), ek_intermediates=[der]
        )
        # The RSA EK cannot answer a challenge made for the ECC EK.
        self.assertRaises(
            TPMError,
            self.tpm.activate_credential,
            self.ak,
            challenge.credential_blob,
            challenge.encrypted_secret,
        )
        challenge = pca.begin(
            "host-a", **begin, authorization=Authorization(("host-a",)), ek_intermediates=[der]
        )
        secret = self.tpm.activate_credential(
            self.ak, challenge.credential_blob, challenge.encrypted_secret, "ecc"
        )
        cert = pca.finish(challenge.enrollment_id, secret)
        attest.verify_ak_certificate(cert, pca.authority.cert, self.ak.public, "host-a")
        # The RSA EK's certificate (another vendor) is not trusted by this PCA.
        self.assertRefused("ek-certificate", self.begin, pca)

    def test_sha1_ak_refused(self) -> None:
        """The PCA certifies no AK whose quotes the verifier would refuse: a
        SHA-1 signing scheme, or a SHA-1 name algorithm (real swtpm keys)."""
        sha1_scheme = self.tpm.create_ak(template="ecc256:ecdsa-sha1:null")
        with self.assertRaises(EnrollmentError) as cm:
            self.begin(ak_public=sha1_scheme.public)
        self.assertEqual(cm.exception.reason, "hash-algorithm")
        self.assertIn("ECDSA-SHA1", cm.exception.detail)
        sha1_name = self.tpm.create_ak(name_alg="sha1")
        with self.assertRaises(EnrollmentError) as cm:
            self.begin(ak_public=sha1_name.public)
        self.assertIn("name algorithm is SHA1", cm.exception.detail)
        rsa_sha1 = self.tpm.create_ak(template="rsa2048:rsassa-sha1:null")
        self.assertRefused("hash-algorithm", self.begin, ak_public=rsa_sha1.public)

    def test_pss_ak_enrolled_and_its_quotes_verified(self) -> None:
        """An RSASSA-PSS AK: certified by the PCA, and a real swtpm quote by
        it passes every check of the verifier; a PSS signature claimed to be
        RSASSA (or the reverse) does not."""
        pss = self.tpm.create_ak("rsa-pss")
        cert = self.enroll(ak=pss)
        attest.verify_ak_certificate(cert, self.pca.authority.cert, pss.public, "host-a")
        bank = wire.DEFAULT_QUOTE_REQUEST.banks
        nonce = os.urandom(32)
        quote = self.tpm.quote(pss, bank, nonce)
        values = self.tpm.pcr_values(bank)
        attest.check_quote(
            pss.public, quote.attest, quote.signature, qualifying=nonce, banks=bank, values=values
        )
        rsassa = self.tpm.create_ak("rsa")
        other = self.tpm.quote(rsassa, bank, nonce)
        with self.assertRaises(attest.AttestationError) as cm:
            attest.check_quote(
                pss.public,
                quote.attest,
                other.signature,
                qualifying=nonce,
                banks=bank,
                values=values,
            )
        self.assertEqual(cm.exception.check, attest.Check.HASH_ALGORITHM)


class EnrollmentOverHTTPSTests(TestCase):
    """``twistd securemig-pca`` and ``securemig host init``, real processes:
    a PCA that trusts the site CA's TLS certificates (mutual TLS) and
    issues tokens."""

    def setUp(self) -> None:
        _, self.tpm, self.tpm_base = shared_tpm()
        base = self.base = Path(self.mktemp()).absolute()
        run = processes.securemig
        self.assertEqual(run("ca", "init", str(base / "site")).returncode, 0)
        issued = run(
            "ca", "issue", str(base / "site"), "--name", "localhost", "--out", str(base / "pca-tls")
        )
        self.assertEqual(issued.returncode, 0, issued.stderr)
        vendor_args = []
        # The swtpm vendor's CAs, and the root of an ECC EK vendor.
        self.ecc_vendor = base / "ecc-vendor"
        swtpm.ecc_vendor_chain(self.ecc_vendor)
        for cert in [
            *swtpm.ca_certificates(self.tpm_base / "ca"),
            self.ecc_vendor / "ecc-root/ca.pem",
        ]:
            vendor_args += ["--vendor-ca", str(cert)]
        made = run(
            "pca",
            "init",
            str(base / "pca"),
            *vendor_args,
            "--site-ca",
            str(base / "site" / "ca.pem"),
        )
        self.assertEqual(made.returncode, 0, made.stderr)
        self.assertIn("TLS certificates of", made.stdout)
        process, self.port = processes.start_pca(base / "pca", base / "pca-tls", base)
        self.addCleanup(processes.end_process, process)
        self.url = f"https://localhost:{self.port}"

    def host_init(self, directory: str, tcti: str, *extra: str, name: str = "host-a") -> Any:
        return processes.securemig(
            "host",
            "init",
            "--dir",
            str(self.base / directory),
            "--name",
            name,
            "--tpm",
            tcti,
            "--site-ca",
            str(self.base / "site"),
            "--pca",
            self.url,
            "--pca-ca",
            str(self.base / "pca/ca.pem"),
            *extra,
        )

    def pca(self, *args: str) -> Any:
        command, *rest = args
        return processes.securemig("pca", command, "--dir", str(self.base / "pca"), *rest)

    def second_tpm(self) -> str:
        second = self.base / "tpm2"
        swtpm.provision(second, self.tpm_base / "ca")
        sw2 = swtpm.start(second)
        self.addCleanup(sw2.stop)
        return sw2.tcti

    def test_host_init(self) -> None:
        """Authorized by its site-CA TLS certificate (mutual TLS), host-a
        enrolls; another TPM under its name is refused until `pca replace`;
        `pca list` shows both AKs, the first revoked."""
        host = self.host_init("host-a", self.tpm.tcti)
        self.assertEqual(host.returncode, 0, host.stderr)
        base = self.base
        ak_cert = (base / "host-a" / "ak.der").read_bytes()
        ak = KeyBlob.from_bytes((base / "host-a" / "ak.blob").read_bytes())
        pca_cert = x509.load_pem_x509_certificate((base / "pca" / "ca.pem").read_bytes())
        attest.verify_ak_certificate(ak_cert, pca_cert, ak.public, "host-a")
        self.assertEqual(oct((base / "host-a" / "tls.key").stat().st_mode & 0o777), "0o600")
        self.assertEqual(json.loads((base / "host-a" / "host.json").read_text())["pca"], self.url)
        # The same host name from a different TPM: refused, with the PCA's reason.
        tcti2 = self.second_tpm()
        again = self.host_init("host-a2", tcti2)
        self.assertEqual(again.returncode, 1)
        self.assertIn("host-has-other-tpm", again.stderr)
        self.assertIn("securemig pca replace host-a", again.stderr)
        replaced = self.pca("replace", "host-a")
        self.assertEqual(replaced.returncode, 0, replaced.stderr)
        self.assertIn("1 AK certificate(s) revoked", replaced.stdout)
        again = self.host_init("host-a2", tcti2)
        self.assertEqual(again.returncode, 0, again.stderr)
        listed = json.loads(self.pca("list", "--json").stdout)
        self.assertEqual([h["host"] for h in listed], ["host-a"])
        first, second = listed[0]["aks"]
        self.assertEqual(first["ak_name"], attest.ak_name(ak.public).hex())
        self.assertTrue(first["revoked"])
        self.assertIsNone(second["revoked"])
        text = self.pca("list").stdout
        self.assertIn("REVOKED", text)
        self.assertIn(f"AK {first['ak_name'][:16]}", text)

    def test_without_authorization_or_with_another_names_certificate(self) -> None:
        """No client certificate and no token: refused; host-a's site-CA
        certificate for host-c: refused."""
        self.assertEqual(self.host_init("host-a", self.tpm.tcti).returncode, 0)
        ak = self.tpm.create_ak()
        trust = self.base / "site" / "ca.pem"
        for client, words in (
            (None, "no site-CA TLS certificate"),
            (self.base / "host-a", "names host-a"),
        ):
            with self.assertRaises(EnrollmentRefused) as cm:
                enroll(self.url, trust, self.tpm, ak, "host-c", client=client)
            self.assertIn("not-authorized", str(cm.exception))
            self.assertIn(words, str(cm.exception))

    def test_ecc_ek_through_an_intermediate(self) -> None:
        """`host init --ek ecc --ek-chain` over HTTPS: the ECC EK's
        certificate comes from a vendor intermediate the PCA does not trust
        (only the vendor's root); sent along, it enrolls; without it, the
        PCA refuses."""
        chain = swtpm.certify_ecc_ek(self.tpm.tcti, self.ecc_vendor)
        refused = self.host_init("host-e", self.tpm.tcti, "--ek", "ecc", name="host-e")
        self.assertEqual(refused.returncode, 1)
        self.assertIn("ek-certificate", refused.stderr)
        enrolled = self.host_init(
            "host-e", self.tpm.tcti, "--ek", "ecc", "--ek-chain", str(chain), name="host-e"
        )
        self.assertEqual(enrolled.returncode, 0, enrolled.stderr)
        identity = json.loads((self.base / "host-e" / "host.json").read_text())
        self.assertEqual(identity["ek"], "ecc")
        self.assertEqual((self.base / "host-e" / "ek-chain.pem").read_bytes(), chain.read_bytes())
        renewed = processes.securemig(
            "host",
            "renew",
            "--identity",
            str(self.base / "host-e"),
            "--site-ca",
            str(self.base / "site"),
            "--pca",
            self.url,
        )
        self.assertEqual(renewed.returncode, 0, renewed.stderr)
        (listed,) = [h for h in json.loads(self.pca("list", "--json").stdout)]
        self.assertEqual(len(listed["aks"]), 2)
        bad = self.base / "not-a-ca.pem"
        bad.write_text("hello\n")
        wrong = self.host_init("host-f", self.tpm.tcti, "--ek-chain", str(bad), name="host-f")
        self.assertEqual(wrong.returncode, 1)
        self.assertIn("--ek-chain:", wrong.stderr)

    def test_token(self) -> None:
        """`pca authorize` prints a token once; `host init --enroll-token`
        enrolls with it (no certificate shown); the same token again is
        refused; an unknown one too."""
        authorized = self.pca("authorize", "host-t", "--expires", "1h")
        self.assertEqual(authorized.returncode, 0, authorized.stderr)
        token = authorized.stdout.strip()
        self.assertIn("not shown again", authorized.stderr)
        enrolled = self.host_init("host-t", self.tpm.tcti, "--enroll-token", token, name="host-t")
        self.assertEqual(enrolled.returncode, 0, enrolled.stderr)
        self.assertIn("authorized by a token", (self.base / "pca.log").read_text())
        reused = self.host_init(
            "host-t", self.tpm.tcti, "--enroll-token", token, "--force", name="host-t"
        )
        self.assertEqual(reused.returncode, 1)
        self.assertIn("the enrollment token was already used", reused.stderr)
        self.assertEqual(self.pca("authorize", "host-t", "--expires", "soon").returncode, 2)
        self.assertEqual(self.pca("authorize", "host-t", "--expires", "90d").returncode, 2)
        missing = processes.securemig("pca", "list", "--dir", str(self.base / "nowhere"))
        self.assertEqual(missing.returncode, 1)
        self.assertIn("is not a privacy CA", missing.stderr)

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

"""Revocation: the privacy CA's signed CRL as a verifier holds it (real
swtpm enrollments, in process), then end to end on a lab: a revoked host is
refused by its peer within one CRL refresh, a stale list fails closed."""

from __future__ import annotations

import json
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from securemig.lab import processes
from securemig.lab.lab import DESTINATION, SOURCE
from securemig.trust.attest import AttestationError, Check
from securemig.trust.pca.core import CRL_RESIGN, Authorization, PrivacyCA
from securemig.trust.revocation import CRLError, RevocationList
from securemig.trust.tpm import swtpm
from tests.support.lab import LabBase
from tests.support.tpm import shared_tpm
from tests.support.trust import FakeTime


class RevocationListTests(SynchronousTestCase):
    """RevocationList.accept / check against a real PCA's CRLs."""

    def setUp(self) -> None:
        _, self.tpm, tpm_base = shared_tpm()
        self.base = Path(self.mktemp())
        self.clock = FakeTime(time.time())
        PrivacyCA.init(self.base / "pca", swtpm.ca_certificates(tpm_base / "ca"))
        self.pca = PrivacyCA(self.base / "pca", clock=self.clock)
        self.cert = self.enroll()

    def enroll(self) -> bytes:
        ak = self.tpm.create_ak()
        c = self.pca.begin(
            "host-a",
            self.tpm.ek_certificate(),
            self.tpm.ek_public(),
            ak.public,
            Authorization(("host-a",)),
        )
        secret = self.tpm.activate_credential(ak, c.credential_blob, c.encrypted_secret)
        return self.pca.finish(c.enrollment_id, secret)

    def holder(self, max_age: float = 3600.0) -> RevocationList:
        return RevocationList(
            self.pca.authority.cert,
            "https://localhost:1",
            self.base / "unused.pem",
            self.base / "crl.der",
            max_age=max_age,
            clock=lambda: self.clock.now,
        )

    def assertRefused(self, holder: RevocationList, words: str, cert: bytes | None = None) -> None:
        with self.assertRaises(AttestationError) as cm:
            holder.check(cert or self.cert, "host-a")
        self.assertEqual(cm.exception.check, Check.REVOKED)
        self.assertIn(words, cm.exception.detail)

    def test_host_revoked(self) -> None:
        """`pca revoke HOST`: every AK certificate it has is refused; one
        issued before the revocation but listed as good is accepted."""
        other = self.enroll()
        holder = self.holder()
        holder.accept(self.pca.crl())
        holder.check(other, "host-a")
        self.pca.revoke("host-a")
        holder.accept(self.pca.crl())
        self.assertRefused(holder, "was revoked by the privacy CA")
        self.assertRefused(holder, "was revoked by the privacy CA", other)

    def test_one_ak_revoked(self) -> None:
        """Only the revoked AK's certificate is refused; the list is kept in
        the cache for the next process."""
        other = self.enroll()
        (host,) = self.pca.hosts()
        self.pca.revoke("host-a", host.aks[0].ak_name)
        holder = self.holder()
        holder.accept(self.pca.crl())
        self.assertRefused(holder, "of host-a (serial")
        holder.check(other, "host-a")
        self.assertRefused(self.holder(), "was revoked")  # from crl.der

    def test_no_list_fails_closed(self) -> None:
        self.assertRefused(self.holder(), "no revocation list from the privacy CA yet")

    def test_forged_list_refused(self) -> None:
        """A CRL signed by another key under the PCA's very name is refused,
        and the list held stays in force (here: none, so fail closed)."""
        rogue = PrivacyCA.init(self.base / "rogue", [])  # same default name
        self.assertEqual(rogue.authority.cert.subject, self.pca.authority.cert.subject)
        holder = self.holder()
        with self.assertRaises(CRLError) as cm:
            holder.accept(rogue.crl())
        self.assertIn("not signed by the privacy CA", str(cm.exception))
        self.assertRefused(holder, "no revocation list")
        holder.accept(self.pca.crl())
        holder.check(self.cert, "host-a")
        self.assertRaises(CRLError, holder.accept, rogue.crl())
        holder.check(self.cert, "host-a")
        self.assertRaises(CRLError, holder.accept, b"\x30\x03garbage")

    def test_stale_list_fails_closed(self) -> None:
        holder = self.holder(max_age=30)
        holder.accept(self.pca.crl())
        holder.check(self.cert, "host-a")
        self.clock.now += 31
        self.assertRefused(holder, "the revocation list is stale")

    def test_older_list_refused(self) -> None:
        """A replayed older CRL (from before a revocation) cannot replace a
        newer one."""
        old = self.pca.crl()
        self.clock.now += CRL_RESIGN + 1
        self.pca.revoke("host-a")
        holder = self.holder()
        holder.accept(self.pca.crl())
        with self.assertRaises(CRLError) as cm:
            holder.accept(old)
        self.assertIn("older than the one held", str(cm.exception))
        self.assertRefused(holder, "was revoked")


class RevocationEndToEndTests(LabBase):
    """Real daemons refreshing the CRL every second, real sources."""

    daemon_options = ("--crl-refresh", "1")

    def pca(self, *args: str) -> None:
        command, *rest = args
        result = processes.securemig("pca", command, "--dir", str(self.work / "pca"), *rest)
        self.assertEqual(result.returncode, 0, result.stderr)

    def assertMigrationRefused(self, source: str, to: str, words: str, *extra: str) -> str:
        result = self.try_migrate(source, to, *extra)
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn(words, result.stderr)
        # The VM stays at the source, intact.
        self.assertTrue((self.vm_dir[source] / "vm1").is_dir())
        return result.stderr

    def test_revoked_source_refused_within_one_refresh(self) -> None:
        """dest-b accepts source-a; `pca revoke source-a`; one refresh later
        dest-b refuses it, saying so in its log and to the source."""
        self.migrate(SOURCE, DESTINATION)
        self.migrate(DESTINATION, SOURCE)
        self.pca("revoke", SOURCE)
        time.sleep(2.0)  # one --crl-refresh (1 s) and a margin
        stderr = self.assertMigrationRefused(SOURCE, DESTINATION, "revoked")
        self.assertIn(f"AK certificate of {SOURCE}", stderr)
        self.assertIn(f"the AK certificate of {SOURCE}", self.at[DESTINATION].log())

    def test_revoked_destination_refused_by_source(self) -> None:
        """The source fetches the CRL before it migrates: a revoked
        destination is refused on the source's terminal."""
        self.migrate(SOURCE, DESTINATION)
        self.migrate(DESTINATION, SOURCE)
        (host,) = [h for h in json.loads(self.list_hosts()) if h["host"] == DESTINATION]
        self.pca("revoke", DESTINATION, "--ak", host["aks"][-1]["ak_name"][:16])
        stderr = self.assertMigrationRefused(SOURCE, DESTINATION, "revoked")
        self.assertIn(f"the AK certificate of {DESTINATION}", stderr)

    def test_stale_list_fails_closed(self) -> None:
        """A source that cannot reach the PCA uses the list it holds until it
        is older than --crl-max-age, then refuses every destination."""
        self.migrate(SOURCE, DESTINATION)
        self.migrate(DESTINATION, SOURCE)  # source-a now holds a CRL in its identity
        self.assertTrue((self.work / SOURCE / "crl.der").is_file())
        unreachable = ("--crl", "https://localhost:1")
        time.sleep(1.5)
        stderr = self.assertMigrationRefused(
            SOURCE, DESTINATION, "the revocation list is stale", *unreachable, "--crl-max-age", "1"
        )
        self.assertIn("WARNING: revocation list: cannot fetch", stderr)
        # While it is young enough it still serves.
        self.migrate_with(SOURCE, DESTINATION, *unreachable)

    def list_hosts(self) -> str:
        result = processes.securemig("pca", "list", "--dir", str(self.work / "pca"), "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def migrate_with(self, source: str, to: str, *extra: str) -> None:
        result = self.try_migrate(source, to, *extra)
        self.assertEqual(result.returncode, 0, result.stderr)

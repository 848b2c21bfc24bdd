"""
The suspended migration of a libvirt domain through ``securemig migrate``
(issue 23 item 4): two real ``libvirtd``s (lab hosts in their own mount
namespaces), two enrolled hosts whose ``twistd securemig`` run ``--backend
libvirt``, the project's Linux guest with its encrypted vTPM, a NIC and a
disk.

The domain is saved at the source, its save file and disk streamed on the
attested data channel, restored **paused** at the destination before
PREPARED, resumed at the commit and only then defined there; the source's
definition and vTPM state go only after COMMITTED.  Then it moves back, and
a destination whose PCR 7 was extended is refused: it never receives the
secret and the domain runs on at the source.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from securemig.hypervisor.bundle import Bundle
from securemig.hypervisor.heartbeat import Watch
from securemig.hypervisor.libvirt import LibvirtBackend, LibvirtError, require_libvirt
from securemig.lab.lab import DESTINATION, SOURCE
from securemig.lab.libvirt import define_guest
from securemig.protocol.phases import Phase
from securemig.trust.attestor import open_attestor
from tests.support.cable import CableProcess, free_ports
from tests.support.commands import crash_env
from tests.support.libvirt import SecretWatch, remove_domain, seal, unseal
from tests.support.libvirt_suspended import (
    SETTLE_TIMEOUT,
    LabCase,
    shared_hosts,
)
from tests.support.qemu import extended


class SuspendedMigrationTests(LabCase):
    """``securemig migrate DOMAIN --to HOST`` (not live) of an adopted domain."""

    def test_suspended_there_back_and_refused(self) -> None:
        """The domain moves A -> B suspended: at B it runs with its memory
        (heartbeat in sequence, never restarted; PCR 16 kept), is defined
        (persistent) with its disk, its secret sealed to B's TPM; A has no
        definition, no vTPM state and no bundle left.  No secret is readable
        through libvirt on either host at any time of the migration.  It
        moves back B -> A the same way.  Then B's PCR 7 is extended and a
        migration A -> B is refused: B never had the secret defined, the
        domain runs on at A with its memory."""
        # The disk outside the hosts' bind-mounted trees: the same path in
        # both namespaces, each migration copies it into the arrival's bundle.
        domain = self.adopt("susp")
        name, pcr16, guest, watch, first = (
            domain.name, domain.pcr16, domain.guest, domain.watch, domain.first,
        )  # fmt: skip
        disk, vms, domain_uuid = domain.disk, domain.vms, domain.uuid
        self.assert_no_secret(guest.secret_uuid)
        conn_a, conn_b = self.on_host(self.a), self.on_host(self.b)
        with open_attestor(self.work / SOURCE, None, False) as a_tpm:
            value = a_tpm.unseal((vms / name / "vtpm-key.sealed").read_bytes())

        at_b, at_a = self.daemon_at(self.b), self.daemon_at(self.a)

        # A -> B, while every host is asked for the secret's value over and over.
        secrets = SecretWatch([self.a, self.b], guest.secret_uuid)
        try:
            summary, _ = self.lab.migrate(at_b, name, True, vm_dir=vms)
        finally:
            secrets.stop()
        self.assertEqual(summary["outcome"], "done", summary)
        self.assertGreater(secrets.asked, 0)
        self.assertEqual(secrets.leaks, [])
        watch.follow(self.b.path(guest.heartbeat))
        there = watch.wait(3, 180, source=1)
        self.assertEqual(there.pcr16, extended(pcr16))
        self.assertTrue(watch.continuous(), [b.seq for b in watch.beats])
        self.assertGreater(there.seq, first.seq)
        arrived = conn_b.lookupByUUIDString(domain_uuid)
        self.assertEqual(arrived.state()[0], self.libvirt.VIR_DOMAIN_RUNNING)
        self.assertTrue(arrived.isPersistent())
        bundle_b = Bundle.load(at_b.state_dir / "vms" / name)
        # Its disk (copied with the save file) is in securemig's disk
        # directory beside the bundle, holding what the source's disk held.
        disks = list((at_b.state_dir / "disks").glob("*/disk.img"))
        self.assertEqual(len(disks), 1, disks)
        self.assertIn(str(disks[0]), arrived.XMLDesc(self.libvirt.VIR_DOMAIN_XML_INACTIVE))
        self.assertEqual(disks[0].read_bytes(), disk.read_bytes())
        with self.assertRaises(self.libvirt.libvirtError):
            conn_a.lookupByUUIDString(domain_uuid)
        self.assertFalse(self.a.path(f"/var/lib/libvirt/swtpm/{domain_uuid}").exists())
        self.assertTrue(self.b.path(f"/var/lib/libvirt/swtpm/{domain_uuid}").exists())
        self.assertFalse((vms / name).exists())
        self.assertFalse(bundle_b.image_path("ram").exists())
        self.assert_no_secret(guest.secret_uuid)
        # The same value, now sealed to B's TPM (B's TPM is needed to read it).
        with open_attestor(self.work / DESTINATION, None, False) as b_tpm:
            self.assertEqual(b_tpm.unseal(bundle_b.vtpm_key_path.read_bytes()), value)
        self.assertNotIn(value, bundle_b.vtpm_key_path.read_bytes())

        # B -> A: the way back (B's copy goes only after A's commit).
        back, _ = self.lab.migrate(
            at_a, name, True, vm_dir=bundle_b.path.parent, source=DESTINATION, to=SOURCE
        )
        self.assertEqual(back["outcome"], "done", back)
        # A's heartbeat file, followed all along: the restored guest appends to it.
        home = watch.wait(3, 180, source=0)
        self.assertEqual(home.pcr16, extended(pcr16))
        self.assertTrue(watch.continuous(), [b.seq for b in watch.beats])
        with self.assertRaises(self.libvirt.libvirtError):
            conn_b.lookupByUUIDString(domain_uuid)
        self.assertFalse(self.b.path(f"/var/lib/libvirt/swtpm/{domain_uuid}").exists())
        self.assertFalse(bundle_b.path.exists())
        self.assertEqual(list((at_b.state_dir / "disks").iterdir()), [])
        self.assert_no_secret(guest.secret_uuid)

        # B's PCR 7 extended: refused; the secret never defined at B.
        with open_attestor(self.work / DESTINATION, None, False) as b_tpm:
            b_tpm.tpm.pcr_extend(7, b"test: a changed boot policy")
        home_vms = at_a.state_dir / "vms"
        secrets = SecretWatch([self.a, self.b], guest.secret_uuid)
        try:
            with self.assertRaises(RuntimeError) as refused:
                self.lab.migrate(at_b, name, True, vm_dir=home_vms)
        finally:
            secrets.stop()
        self.assertIn("7", str(refused.exception))
        self.assertEqual(secrets.leaks, [])
        self.assertEqual(conn_b.listSecrets(), [])
        with self.assertRaises(self.libvirt.libvirtError):
            conn_b.lookupByUUIDString(domain_uuid)
        self.assertEqual(
            conn_a.lookupByUUIDString(domain_uuid).state()[0], self.libvirt.VIR_DOMAIN_RUNNING
        )
        again = watch.wait(3, 180, source=0)
        self.assertEqual(again.pcr16, extended(pcr16))
        self.assertTrue(watch.continuous(), [b.seq for b in watch.beats])
        self.assertTrue(Bundle.load(home_vms / name).vtpm_key_path.exists())
        self.assert_no_secret(guest.secret_uuid)


class Qcow2Tests(LabCase):
    """The same with what else a site's domain has."""

    def test_qcow2_disk_two_vcpus_and_a_nic(self) -> None:
        """A domain with a qcow2 disk, 2 vCPUs and a NIC
        moves A -> B suspended: it runs there with its memory, its disk
        arrives as the same qcow2 image (format kept in its definition),
        its vCPUs and NIC kept."""
        # Two vCPUs: as the operator would set them, in the definition.
        domain = self.adopt("qcow", disk_format="qcow2", vcpus=2)
        name, pcr16, guest, watch, first = (
            domain.name, domain.pcr16, domain.guest, domain.watch, domain.first,
        )  # fmt: skip
        disk, vms = domain.disk, domain.vms
        conn_b = self.on_host(self.b)
        before = disk.read_bytes()
        at_b = self.daemon_at(self.b)
        summary, _ = self.lab.migrate(at_b, name, True, vm_dir=vms)
        self.assertEqual(summary["outcome"], "done", summary)
        watch.follow(self.b.path(guest.heartbeat))
        there = watch.wait(3, 180, source=1)
        self.assertEqual(there.pcr16, extended(pcr16))
        self.assertGreater(there.seq, first.seq)
        self.assertTrue(watch.continuous(), [b.seq for b in watch.beats])
        arrived = conn_b.lookupByName(name)
        self.assertEqual(arrived.info()[3], 2)  # vCPUs
        defined = arrived.XMLDesc(self.libvirt.VIR_DOMAIN_XML_INACTIVE)
        self.assertIn("type='qcow2'", defined)
        self.assertIn("<interface type='user'>", defined)
        copied = list((at_b.state_dir / "disks").glob("*/disk.img"))
        self.assertEqual(len(copied), 1, copied)
        self.assertEqual(copied[0].read_bytes()[:4], b"QFI\xfb")  # qcow2's magic
        self.assertEqual(copied[0].read_bytes(), before)
        self.assert_no_secret(guest.secret_uuid)

    def test_secret_longer_than_a_vtpm_key(self) -> None:
        """libvirt takes a vTPM secret of any length (adoption seals 1 to
        128 bytes): one of 48 bytes moves suspended whole -- the
        destination keeps all of it, not the first 32 as a vTPM key and
        the rest as an identity -- and the guest runs there with its
        vTPM (PCR 16 kept), the secret defined on neither host."""
        domain = self.adopt("long", secret_bytes=48)
        with open_attestor(self.work / SOURCE, None, False) as a_tpm:
            value = a_tpm.unseal((domain.vms / "long" / "vtpm-key.sealed").read_bytes())
        self.assertEqual(len(value), 48)
        at_b = self.daemon_at(self.b)
        summary, _ = self.lab.migrate(at_b, domain.name, True, vm_dir=domain.vms)
        self.assertEqual(summary["outcome"], "done", summary)
        domain.watch.follow(self.b.path(domain.guest.heartbeat))
        there = domain.watch.wait(3, 180, source=1)
        self.assertEqual(there.pcr16, extended(domain.pcr16))
        self.assertGreater(there.seq, domain.first.seq)
        self.assertTrue(domain.watch.continuous(), [b.seq for b in domain.watch.beats])
        sealed = (at_b.state_dir / "vms" / domain.name / "vtpm-key.sealed").read_bytes()
        with open_attestor(self.work / DESTINATION, None, False) as b_tpm:
            self.assertEqual(b_tpm.unseal(sealed), value)
        self.assert_no_secret(domain.guest.secret_uuid)


class ArrivalReadyTests(TestCase):
    """The destination's restore before PREPARED (``ready_blocking``), at
    the backend's level: what a save file the destination cannot load
    leaves, on either host."""

    timeout = 600

    async def test_wrong_secret_fails_before_the_commit(self) -> None:
        """An arrival whose secret is wrong (a tampered bundle, a bug: key
        release gives the right one) fails in ``ready_blocking``, before any
        commit: nothing defined or running at the destination, no secret
        left there, and staging's removal takes its disk directory.  The
        source then restores the domain from its save file: it runs with
        its memory (heartbeat in sequence, PCR 16 kept)."""
        a, b = shared_hosts()
        libvirt = require_libvirt()
        name = "ready"
        pcr16 = os.urandom(32).hex()
        disk = a.directory / "disks" / f"{name}.img"
        guest = define_guest(a, name, pcr16=pcr16, persistent_secret=True, disk=str(disk))
        for host in (a, b):
            self.addCleanup(remove_domain, host, name)
        source = LibvirtBackend(reactor, vtpm_key=unseal)
        destination = LibvirtBackend(reactor, connect=b.uri, vtpm_key=lambda _: os.urandom(32))
        for backend in (source, destination):
            self.addCleanup(backend.close)
        vms = Path(self.mktemp()).absolute()
        bundle = await source.adopt(vms, name, a.uri, seal)
        await source.start(bundle)
        watch = Watch(a.path(guest.heartbeat))
        self.addCleanup(watch.stop)
        first = watch.wait(3, 180)
        await source.suspend(bundle)
        self.assertEqual([i.name for i in bundle.manifest.images], ["ram", "disk"])
        # What a suspended arrival's staging holds once its streams are in.
        state = Path(self.mktemp()).absolute()
        staging = state / "staging" / "0123abcd"
        staging.mkdir(parents=True)
        for image in bundle.manifest.images:
            shutil.copyfile(bundle.image_path(image), staging / image.file)
        arrived = Bundle(staging, bundle.manifest)
        arrived.save()
        with self.assertRaises(LibvirtError) as failed:
            destination.ready_blocking(arrived)
        self.assertIn("did not restore domain ready here", str(failed.exception))
        conn_b = libvirt.open(b.uri)
        self.addCleanup(conn_b.close)
        self.assertEqual(conn_b.listSecrets(), [])
        with self.assertRaises(libvirt.libvirtError):
            conn_b.lookupByName(name)
        self.assertTrue((state / "disks" / "0123abcd" / "disk.img").exists())
        destination.end_blocking(arrived)  # what staging's removal asks of it
        self.assertFalse((state / "disks" / "0123abcd").exists())

        # Control: the same arrival with the right secret is restored paused,
        # transient (defined only at the commit); ended, it leaves nothing.
        (staging / "libvirt.json").unlink()
        shutil.copyfile(bundle.image_path("disk"), staging / "disk.img")
        value = unseal(bundle)
        right = LibvirtBackend(reactor, connect=b.uri, vtpm_key=lambda _: value)
        self.addCleanup(right.close)
        right.ready_blocking(arrived)
        domain = conn_b.lookupByName(name)
        self.assertEqual(domain.state()[0], libvirt.VIR_DOMAIN_PAUSED)
        self.assertFalse(domain.isPersistent())
        self.assertEqual(conn_b.listSecrets(), [])
        right.end_blocking(arrived)
        with self.assertRaises(libvirt.libvirtError):
            conn_b.lookupByName(name)
        self.assertFalse((state / "disks" / "0123abcd").exists())

        await source.resume(bundle)
        again = watch.wait(3, 180)
        self.assertEqual(again.pcr16, extended(pcr16))
        self.assertTrue(watch.continuous(), [b.seq for b in watch.beats])
        self.assertGreater(again.seq, first.seq)
        self.assertEqual(sorted(p.name for p in bundle.path.iterdir() if p.suffix == ".img"), [])


class SuspendedCrashTests(LabCase):
    """Crash cells of the suspended migration of a libvirt domain: a real
    process killed (SIGKILL) at a named step -- the destination's ``twistd
    securemig`` (restarted on its port as an operator would), ``securemig
    migrate``, the source host's daemon while it settles (it shares
    ``securemig migrate``'s state directory; restarted too), either
    ``libvirtd`` or the destination's QEMU -- or the connection cut.  After
    each: the domain runs on exactly one host -- the one the source's
    journal names -- with its memory (heartbeat in sequence, PCR 16 kept),
    is defined there only with its vTPM state, no secret is defined in
    either libvirt, nothing is left in the destination's staging or disk
    directory."""

    def cell(self, point: str, *, settling: str | None = None) -> str:
        """Kill the process ``point`` names (``destination-*``: the
        destination's daemon, restarted on its port; ``source-*``: ``securemig
        migrate``) there -- and, with ``settling``, the source's daemon at
        that point of its recovery, restarted too; returns where the domain
        settled (``source`` or ``destination``)."""
        # One name per cell: the hosts are shared by the module's tests, and
        # a heartbeat file of an earlier cell's domain stays there.
        name = "crash" + "".join(word[:3] for word in point.split("-"))[:12]
        name += "".join(word[0] for word in settling.split("-")) if settling else ""
        domain = self.adopt(name)
        source_daemon = self.daemon_at(self.a, crash_env(settling) if settling else None)
        daemon_dies = point.startswith("destination-")
        dying = self.daemon_at(self.b, crash_env(point) if daemon_dies else None)
        with self.assertRaises(RuntimeError) as failed:
            self.send(domain, dying, source_daemon, env=None if daemon_dies else crash_env(point))
        if not daemon_dies:
            self.assertIn("exited with -9", str(failed.exception))
            again = dying
        else:
            self.wait_killed(dying, point)
            again = self.daemon_at(self.b, port=dying.port)
        if settling is not None:
            self.wait_killed(source_daemon, settling)
            source_daemon = self.daemon_at(self.a, port=source_daemon.port)
        where = self.wait_settled(domain, source_daemon, again)
        self.assert_settled_at(domain, where, again)
        return where

    def test_destination_libvirtd_killed_while_streaming(self) -> None:
        """The destination's libvirtd killed (SIGKILL) while the save file
        streams, started again after: the destination cannot restore the
        domain before PREPARED, the source never commits and restores it
        here with its memory; nothing is left at the destination and no
        secret in either libvirt."""
        domain = self.adopt("crashlvd")
        source_daemon = self.daemon_at(self.a)
        destination = self.daemon_at(self.b)
        mover = self.migrate_behind(domain, destination, source_daemon)
        staging = destination.state_dir / "staging"
        deadline = time.monotonic() + 120
        while not any(p.is_file() for p in staging.rglob("ram.img")):
            self.assertLess(time.monotonic(), deadline, "nothing streamed")
            self.assertTrue(mover.is_alive(), mover.outcome)
            time.sleep(0.02)
        self.b.kill_daemon()
        mover.join(300)
        self.assertEqual(len(mover.outcome), 1)
        self.assertIsInstance(mover.outcome[0], RuntimeError)
        # The destination said why, before any commit; the VM stayed here.
        self.assertIn("cannot connect to libvirt", str(mover.outcome[0]))
        self.assertIn("still at the source", str(mover.outcome[0]))
        self.b.start()
        self.assertEqual(self.wait_settled(domain, source_daemon, destination), "source")
        self.assert_settled_at(domain, "source", destination)

    # -- the destination's daemon dies

    def test_destination_dies_admitted(self) -> None:
        """HELLO admitted and journaled at the destination, nothing sent
        yet: the source fails before any key release and resumes the
        domain; the restarted destination has nothing to keep."""
        self.assertEqual(self.cell("destination-admitted"), "source")

    def test_destination_dies_streaming(self) -> None:
        """Past half of the save file: the source resumes the domain from
        it; the restarted destination removes its staging."""
        self.assertEqual(self.cell("destination-streaming"), "source")

    def test_destination_dies_prepared(self) -> None:
        """PREPARED journaled at the destination (the domain restored
        paused there, transient), not sent: the source never commits and
        restores the domain; the restarted destination learns it was
        aborted and ends its paused copy and disks."""
        self.assertEqual(self.cell("destination-prepared"), "source")

    def test_destination_dies_commit_journaled(self) -> None:
        """COMMIT journaled at the destination, staging not yet in place:
        the restart rolls it forward (the paused domain resumed and defined
        there); the source undefined its copy after COMMITTED."""
        self.assertEqual(self.cell("destination-commit-journaled"), "destination")

    def test_destination_dies_in_place(self) -> None:
        """Moved into place, not resumed: the restart resumes the paused
        domain there (defined there only now) and says DONE to RESOLVE."""
        self.assertEqual(self.cell("destination-in-place"), "destination")

    def test_destination_dies_resumed(self) -> None:
        """Resumed, DONE not sent: the restart finds it done; the source,
        in doubt, learns DONE from RESOLVE."""
        self.assertEqual(self.cell("destination-resumed"), "destination")

    # -- securemig migrate dies

    def test_source_dies_attesting(self) -> None:
        """The destination's evidence arrived, not verified: nothing was
        released; the source's daemon restores the domain here."""
        self.assertEqual(self.cell("source-attesting"), "source")

    def test_source_dies_key_wrapped(self) -> None:
        """The vTPM key wrapped, not sent: the source's daemon restores the
        domain here; the destination, told it was aborted, keeps nothing."""
        self.assertEqual(self.cell("source-key-wrapped"), "source")

    def test_source_dies_streaming(self) -> None:
        """The first bytes of the save file on the wire: aborted, restored here."""
        self.assertEqual(self.cell("source-streaming"), "source")

    def test_source_dies_prepared_received(self) -> None:
        """``securemig migrate`` killed once PREPARED arrived, COMMITTED not
        journaled: the source's daemon restores the domain here from its
        save file (the secret unsealed by this host's TPM, defined only for
        the restore); the destination, told it was aborted, ends its paused
        copy."""
        self.assertEqual(self.cell("source-prepared-received"), "source")

    def test_source_dies_committed(self) -> None:
        """``securemig migrate`` killed right after journaling COMMITTED:
        the source's daemon undefines its copy and tells the destination,
        which resumes the paused domain and defines it there."""
        self.assertEqual(self.cell("source-committed"), "destination")

    def test_source_dies_released(self) -> None:
        """The copy here removed, COMMIT not sent: RESOLVE(committed) from
        the source's daemon resumes the domain at the destination."""
        self.assertEqual(self.cell("source-released"), "destination")

    # -- the source's daemon dies while it settles

    def test_source_daemon_dies_settling_aborted(self) -> None:
        """``securemig migrate`` dies once PREPARED arrived; the source's
        daemon journals the migration aborted and dies before restoring the
        domain: restarted, it restores it from its save file (an aborted
        migration never leaves its guest stopped)."""
        self.assertEqual(
            self.cell("source-prepared-received", settling="source-settle-aborted"), "source"
        )

    def test_source_daemon_dies_settling_released(self) -> None:
        """``securemig migrate`` dies once COMMITTED is journaled; the
        source's daemon removes the copy here and dies before journaling
        it: restarted, it finishes (idempotently) and RESOLVE resumes the
        domain at the destination."""
        self.assertEqual(
            self.cell("source-committed", settling="source-settle-released"), "destination"
        )

    # -- a libvirtd or the destination's QEMU killed at a step

    def test_source_libvirtd_down_at_release(self) -> None:
        """The source's libvirtd killed right after COMMITTED is journaled
        (before the commit releases the domain here): the domain runs at
        the destination, but the source still has its shut-off definition
        and encrypted vTPM state, and its journal says so (committed, not
        ``released``).  Started again, libvirtd is found by the source's
        daemon, which removes the definition, the vTPM state and the bundle
        and journals ``released``."""
        domain = self.adopt("crashrel")
        self.addCleanup(self.revive, self.a)
        source_daemon = self.daemon_at(self.a)
        destination = self.daemon_at(self.b)
        other = {"SECUREMIG_CRASH_PIDFILE": str(self.a.run_dir / "libvirtd.pid")}
        summary, _ = self.send(
            domain, destination, source_daemon, env={**crash_env("source-committed:other"), **other}
        )
        self.assertEqual(summary["outcome"], "done", summary)
        self.assertIsNotNone(self.a.process)
        assert self.a.process is not None
        self.assertIsNotNone(self.a.process.poll(), "the source's libvirtd was not killed")
        bundle = domain.vms / domain.name
        # libvirtd down: nothing could be removed, and the journal says so;
        # its key went first (this copy can never run again).
        self.assertTrue(bundle.exists())
        self.assertFalse((bundle / "vtpm-key.sealed").exists())
        self.assertTrue(self.journal_reached(source_daemon, "source", Phase.COMMITTED))
        time.sleep(2)  # rounds of the source's daemon, its libvirtd still down
        self.assertFalse(self.journal_reached(source_daemon, "source", Phase.RELEASED))
        self.assertTrue(bundle.exists())
        self.assertTrue(self.a.path(f"/var/lib/libvirt/swtpm/{domain.uuid}").exists())
        self.a.start()
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while not self.journal_reached(source_daemon, "source", Phase.RELEASED):
            self.assertLess(time.monotonic(), deadline, source_daemon.log()[-3000:])
            time.sleep(0.3)
        self.assertFalse(bundle.exists())
        self.assertEqual(self.wait_settled(domain, source_daemon, destination), "destination")
        self.assert_settled_at(domain, "destination", destination)

    def test_destination_libvirtd_killed_prepared(self) -> None:
        """The destination's libvirtd killed once PREPARED is journaled
        there (the domain restored paused, its QEMU runs on), started again
        once ``securemig migrate`` returned: the commit's resume could not
        reach libvirt; the domain ends on exactly one host, where the
        source's journal says, with its memory."""
        domain = self.adopt("crashlvp")
        self.addCleanup(self.revive, self.b)
        source_daemon = self.daemon_at(self.a)
        other = {"SECUREMIG_CRASH_PIDFILE": str(self.b.run_dir / "libvirtd.pid")}
        destination = self.daemon_at(self.b, {**crash_env("destination-prepared:other"), **other})
        # The commit's resume may fail (in doubt): settled below either way.
        with contextlib.suppress(RuntimeError):
            self.send(domain, destination, source_daemon)
        assert self.b.process is not None
        self.assertIsNotNone(self.b.process.poll(), "the destination's libvirtd was not killed")
        self.b.start()
        where = self.wait_settled(domain, source_daemon, destination)
        self.assert_settled_at(domain, where, destination)

    def test_destination_qemu_killed_prepared(self) -> None:
        """The destination's QEMU (the domain restored paused) killed once
        PREPARED is journaled there: the commit's resume finds no domain
        and restores it again from the save file still in the arrival, so
        the domain runs there with its memory."""
        domain = self.adopt("crashqem")
        source_daemon = self.daemon_at(self.a)
        qemu = self.b.run_dir / "qemu" / f"{domain.name}.pid"
        destination = self.daemon_at(
            self.b,
            {**crash_env("destination-prepared:other"), "SECUREMIG_CRASH_PIDFILE": str(qemu)},
        )
        summary, _ = self.send(domain, destination, source_daemon)
        self.assertEqual(summary["outcome"], "done", summary)
        self.assertIn("killing QEMU", destination.log())
        self.assertEqual(self.wait_settled(domain, source_daemon, destination), "destination")
        self.assert_settled_at(domain, "destination", destination)

    # -- the connection cut

    def cut_cell(self, when: str) -> str:
        """Migrate through a :class:`CableProcess` (control connection,
        data channel and later RESOLVEs all cross it) and cut it while the
        save file streams (``streaming``: by the test), or exactly as the
        destination journaled PREPARED (``prepared``) or the source
        COMMITTED (``committed``), before the message crossed (by that
        process, at its crash point); the network heals once ``migrate``
        returned.  Returns where the domain settled."""
        domain = self.adopt("cut" + when[:6])
        source_daemon = self.daemon_at(self.a)
        ports = free_ports(4)
        cable = CableProcess(ports, self.work)
        self.addCleanup(cable.close)
        destination = self.daemon_at(
            self.b,
            cable.cut_at("destination-prepared") if when == "prepared" else None,
            port=ports[0],
            extra=("--data-ports", f"{ports[1]}-{ports[-1]}"),
        )
        self.assertEqual(destination.port, ports[0])
        mover = self.migrate_behind(
            domain,
            destination,
            source_daemon,
            "--to",
            cable.address(destination.port),
            env=cable.cut_at("source-committed") if when == "committed" else None,
        )
        if when == "streaming":
            staging = destination.state_dir / "staging"
            deadline = time.monotonic() + 180
            while not any(p.is_file() for p in staging.rglob("ram.img")):
                self.assertLess(time.monotonic(), deadline, "nothing streamed")
                self.assertTrue(mover.is_alive(), mover.outcome)
                time.sleep(0.02)
            cable.cut_now()
        mover.join(300)
        self.assertEqual(len(mover.outcome), 1)
        self.assertTrue(cable.cut, f"the cable was not cut {when}: {mover.outcome}")
        cable.heal()
        where = self.wait_settled(domain, source_daemon, destination)
        self.assert_settled_at(domain, where, destination)
        return where

    def test_cut_while_streaming(self) -> None:
        """Cut while the save file streams: the source restores the domain
        here; the destination removes its staging."""
        self.assertEqual(self.cut_cell("streaming"), "source")

    def test_cut_after_destination_prepared(self) -> None:
        """Cut as the destination journaled PREPARED (the domain restored
        paused there), before it was sent: one copy runs, where the source's journal says (its
        COMMITTED decides; RESOLVE through the healed network tells the
        destination)."""
        self.cut_cell("prepared")

    def test_cut_after_source_committed(self) -> None:
        """Cut as the source journaled COMMITTED, before COMMIT was sent:
        the domain is the destination's; RESOLVE(committed) through the healed network rolls
        it forward there, and the source's copy is gone."""
        self.assertEqual(self.cut_cell("committed"), "destination")


class InsecureTests(LabCase):
    """The insecure variant (no TLS, no attestation: the measurement twin)
    moves a libvirt domain too."""

    def test_insecure_variant_moves_a_domain(self) -> None:
        """``securemig migrate --insecure`` of an adopted domain to B's
        insecure listener: it runs at B with its memory (heartbeat in
        sequence, never restarted, PCR 16 kept: the whole secret crossed,
        in the clear as the variant says), is gone from A with its vTPM
        state, and neither libvirt holds the secret afterwards."""
        domain = self.adopt("insec")
        at_b = self.daemon_at(self.b)
        summary, _ = self.lab.migrate(at_b, domain.name, False, vm_dir=domain.vms)
        self.assertEqual((summary["outcome"], summary["protocol"]), ("done", "insecure"), summary)
        domain.watch.follow(self.b.path(domain.guest.heartbeat))
        there = domain.watch.wait(3, 180, source=1)
        self.assertEqual(there.pcr16, extended(domain.pcr16))
        self.assertGreater(there.seq, domain.first.seq)
        self.assertTrue(domain.watch.continuous(), [b.seq for b in domain.watch.beats])
        conn_a, conn_b = self.on_host(self.a), self.on_host(self.b)
        arrived = conn_b.lookupByUUIDString(domain.uuid)
        self.assertEqual(arrived.state()[0], self.libvirt.VIR_DOMAIN_RUNNING)
        self.assertTrue(arrived.isPersistent())
        with self.assertRaises(self.libvirt.libvirtError):
            conn_a.lookupByUUIDString(domain.uuid)
        self.assertFalse(self.a.path(f"/var/lib/libvirt/swtpm/{domain.uuid}").exists())
        self.assertFalse((domain.vms / domain.name).exists())
        self.assert_no_secret(domain.guest.secret_uuid)

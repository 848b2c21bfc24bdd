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

import atexit
import os
import shutil
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from securemig.hypervisor.bundle import Bundle
from securemig.hypervisor.heartbeat import Watch
from securemig.hypervisor.libvirt import LibvirtBackend, LibvirtError, require_libvirt
from securemig.lab import processes
from securemig.lab.lab import DESTINATION, SOURCE, Lab
from securemig.lab.libvirt import LibvirtHost, define_guest
from securemig.trust.attestor import open_attestor
from tests.support.libvirt import SecretWatch, seal, unseal, virsh_secret_value
from tests.support.qemu import extended

_hosts: list[LibvirtHost] = []


def shared_hosts() -> list[LibvirtHost]:
    """Two lab libvirtds for this module (started once per test process),
    stopped with what they started at exit."""
    if not _hosts:
        for name, index in (("sa", 5), ("sb", 6)):
            host = LibvirtHost(name, index)
            atexit.register(host.remove)
            host.start()
            _hosts.append(host)
    return _hosts


class SuspendedMigrationTests(TestCase):
    """``securemig migrate DOMAIN --to HOST`` (not live) of an adopted domain."""

    timeout = 1200

    def setUp(self) -> None:
        self.a, self.b = shared_hosts()
        self.libvirt = require_libvirt()
        self.work = Path(self.mktemp()).absolute()
        self.work.mkdir(parents=True)
        self.lab = Lab(self.work)
        self.addCleanup(self.lab.stop)
        self.lab.start()

    def on_host(self, host: LibvirtHost) -> Any:
        conn = self.libvirt.open(host.uri)
        self.addCleanup(conn.close)
        return conn

    def assert_no_secret(self, secret_uuid: str) -> None:
        """Neither libvirt holds the secret: not defined, no file, and
        ``virsh secret-get-value`` finds nothing."""
        for host in (self.a, self.b):
            conn = self.on_host(host)
            with self.assertRaises(self.libvirt.libvirtError, msg=host.name):
                conn.secretLookupByUUIDString(secret_uuid)
            self.assertEqual(list((host.directory / "etc" / "secrets").glob("*")), [])
            self.assertNotEqual(virsh_secret_value(host, secret_uuid).returncode, 0)

    def test_suspended_there_back_and_refused(self) -> None:
        """The domain moves A -> B suspended: at B it runs with its memory
        (heartbeat in sequence, never restarted; PCR 16 kept), is defined
        (persistent) with its disk, its secret sealed to B's TPM; A has no
        definition, no vTPM state and no bundle left.  No secret is readable
        through libvirt on either host at any time of the migration.  It
        moves back B -> A the same way.  Then B's PCR 7 is extended and a
        migration A -> B is refused: B never had the secret defined, the
        domain runs on at A with its memory."""
        name = "susp"
        pcr16 = os.urandom(32).hex()
        # The disk outside the hosts' bind-mounted trees: the same path in
        # both namespaces, each migration copies it into the arrival's bundle.
        disk = self.a.directory / "disks" / f"{name}.img"
        guest = define_guest(self.a, name, pcr16=pcr16, persistent_secret=True, disk=str(disk))
        for host in (self.a, self.b):
            self.addCleanup(_remove_domain, host, name)
        vms = self.work / "vms"
        adopted = processes.securemig(
            "vm", "adopt", name, "--dir", str(vms), "--connect", self.a.uri,
            "--identity", str(self.work / SOURCE),
        )  # fmt: skip
        self.assertEqual(adopted.returncode, 0, adopted.stderr)
        started = processes.securemig(
            "vm", "start", name, "--dir", str(vms), "--identity", str(self.work / SOURCE)
        )
        self.assertEqual(started.returncode, 0, started.stderr)
        watch = Watch(self.a.path(guest.heartbeat))
        self.addCleanup(watch.stop)
        first = watch.wait(3, 180)
        self.assertEqual(first.pcr16, extended(pcr16))
        self.assert_no_secret(guest.secret_uuid)
        conn_a, conn_b = self.on_host(self.a), self.on_host(self.b)
        domain_uuid = conn_a.lookupByName(name).UUIDString()

        at_b = self.lab.start_destination(
            backend="libvirt", env={"LIBVIRT_DEFAULT_URI": self.b.uri}
        )
        at_a = self.lab.start_destination(
            host=SOURCE, backend="libvirt", env={"LIBVIRT_DEFAULT_URI": self.a.uri}
        )

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
        with open_attestor(self.work / DESTINATION, None, False) as b_tpm:
            self.assertEqual(len(b_tpm.unseal(bundle_b.vtpm_key_path.read_bytes())), 32)

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
            self.addCleanup(_remove_domain, host, name)
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


def _remove_domain(host: LibvirtHost, name: str) -> None:
    """Destroy and undefine a test's domain (with its vTPM state) if left."""
    libvirt = require_libvirt()
    conn = libvirt.open(host.uri)
    try:
        domain = conn.lookupByName(name)
        if domain.isActive():
            domain.destroy()
        if domain.isPersistent():
            domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_TPM)
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()

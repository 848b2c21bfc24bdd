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
import signal
import threading
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from securemig.host.journal import Journal
from securemig.hypervisor.bundle import Bundle
from securemig.hypervisor.heartbeat import Watch
from securemig.hypervisor.libvirt import LibvirtBackend, LibvirtError, require_libvirt
from securemig.lab import processes
from securemig.lab.lab import DESTINATION, SOURCE, Lab
from securemig.lab.libvirt import LibvirtHost, define_guest
from securemig.protocol.phases import Phase
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


class LabCase(TestCase):
    """Two lab libvirtds, two enrolled hosts, and the checks of the secret."""

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
        with open_attestor(self.work / SOURCE, None, False) as a_tpm:
            value = a_tpm.unseal((vms / name / "vtpm-key.sealed").read_bytes())

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
        name = "qcow"
        pcr16 = os.urandom(32).hex()
        disk = self.a.directory / "disks" / f"{name}.qcow2"
        guest = define_guest(
            self.a, name, pcr16=pcr16, persistent_secret=True, disk=str(disk), disk_format="qcow2"
        )
        for host in (self.a, self.b):
            self.addCleanup(_remove_domain, host, name)
        conn_a, conn_b = self.on_host(self.a), self.on_host(self.b)
        # Two vCPUs: as the operator would set them, in the definition.
        xml = (
            conn_a.lookupByName(name)
            .XMLDesc(0)
            .replace("<vcpu placement='static'>1</vcpu>", "<vcpu placement='static'>2</vcpu>")
        )
        conn_a.defineXML(xml)
        vms = self.work / "vms"
        identity = ("--identity", str(self.work / SOURCE))
        for args in (("adopt", name, "--dir", str(vms), "--connect", self.a.uri, *identity),
                     ("start", name, "--dir", str(vms), *identity)):  # fmt: skip
            done = processes.securemig("vm", *args)
            self.assertEqual(done.returncode, 0, done.stderr)
        watch = Watch(self.a.path(guest.heartbeat))
        self.addCleanup(watch.stop)
        first = watch.wait(3, 180)
        before = disk.read_bytes()
        at_b = self.lab.start_destination(
            backend="libvirt", env={"LIBVIRT_DEFAULT_URI": self.b.uri}
        )
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


#: How long a crash cell may take to settle once every process runs again.
SETTLE_TIMEOUT = 120.0


class SuspendedCrashTests(TestCase):
    """Crash cells of the suspended migration of a libvirt domain: the
    destination's ``twistd securemig`` killed (SIGKILL) at a step of the
    commit, restarted on its port as an operator would; the source host's
    daemon shares ``securemig migrate``'s state directory and settles its
    departures.  After each: the domain runs on exactly one host -- the one
    the source's journal names -- with its memory (heartbeat in sequence,
    PCR 16 kept), is defined there only, no secret is defined in either
    libvirt, nothing is left in the destination's staging or disk
    directory."""

    timeout = 1200

    def setUp(self) -> None:
        self.a, self.b = shared_hosts()
        self.libvirt = require_libvirt()
        self.work = Path(self.mktemp()).absolute()
        self.work.mkdir(parents=True)
        self.lab = Lab(self.work)
        self.addCleanup(self.lab.stop)
        self.lab.start()

    def cell(self, point: str) -> str:
        """Kill the process ``point`` names (``destination-*``: the
        destination's daemon, restarted on its port; ``source-*``: ``securemig
        migrate``) there; returns where the domain settled (``source`` or
        ``destination``)."""
        name = "crash" + "".join(word[:3] for word in point.split("-"))[:12]
        pcr16 = os.urandom(32).hex()
        disk = self.a.directory / "disks" / f"{name}.img"
        guest = define_guest(self.a, name, pcr16=pcr16, persistent_secret=True, disk=str(disk))
        for host in (self.a, self.b):
            self.addCleanup(_remove_domain, host, name)
        vms = self.work / "vms"
        identity = ("--identity", str(self.work / SOURCE))
        for args in (("adopt", name, "--dir", str(vms), "--connect", self.a.uri, *identity),
                     ("start", name, "--dir", str(vms), *identity)):  # fmt: skip
            done = processes.securemig("vm", *args)
            self.assertEqual(done.returncode, 0, done.stderr)
        watch = Watch(self.a.path(guest.heartbeat))
        self.addCleanup(watch.stop)
        first = watch.wait(3, 180)
        uuid_ = self.libvirt.open(self.a.uri).lookupByName(name).UUIDString()

        resolve = ("--resolve-interval", "0.3")
        source_daemon = self.lab.start_destination(
            host=SOURCE, backend="libvirt", env={"LIBVIRT_DEFAULT_URI": self.a.uri}, extra=resolve
        )
        env_b = {"LIBVIRT_DEFAULT_URI": self.b.uri}
        crash = {"SECUREMIG_CRASH_POINTS": "1", "SECUREMIG_CRASH_AT": point}
        daemon_dies = point.startswith("destination-")
        dying = self.lab.start_destination(
            backend="libvirt", env={**env_b, **crash} if daemon_dies else env_b, extra=resolve
        )
        with self.assertRaises(RuntimeError) as failed:
            self.lab.migrate(
                dying,
                name,
                True,
                vm_dir=vms,
                extra=("--state-dir", str(source_daemon.state_dir)),
                env=None if daemon_dies else crash,
            )
        if not daemon_dies:
            self.assertIn("exited with -9", str(failed.exception))
            again = dying
        else:
            deadline = time.monotonic() + 60
            while dying.process.poll() is None:
                self.assertLess(time.monotonic(), deadline, "the daemon did not reach " + point)
                time.sleep(0.1)
            self.assertEqual(dying.process.returncode, -signal.SIGKILL, dying.log()[-2000:])
            again = self.lab.start_destination(
                backend="libvirt", env=env_b, extra=resolve, port=dying.port
            )

        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (where := self.settled(name, uuid_, source_daemon, again)) is None:
            if time.monotonic() > deadline:
                self.fail(f"did not settle:\n{again.log()[-3000:]}\n{source_daemon.log()[-3000:]}")
            time.sleep(0.5)
        host = self.a if where == "source" else self.b
        if where == "destination":
            watch.follow(self.b.path(guest.heartbeat))
        beat = watch.wait(3, 180, source=0 if where == "source" else 1)
        self.assertEqual(beat.pcr16, extended(pcr16))
        self.assertGreater(beat.seq, first.seq)
        self.assertTrue(watch.continuous(), [b.seq for b in watch.beats])
        for each in (self.a, self.b):
            conn = self.libvirt.open(each.uri)
            try:
                self.assertEqual(conn.listSecrets(), [], each.name)
                defined = [d.UUIDString() for d in conn.listAllDomains()]
                self.assertEqual(uuid_ in defined, each is host, each.name)
            finally:
                conn.close()
        self.assertEqual(list((again.state_dir / "staging").iterdir()), [])
        disks = again.state_dir / "disks"
        held = [d for d in disks.iterdir() if any(d.iterdir())] if disks.exists() else []
        self.assertEqual(len(held), 1 if where == "destination" else 0, held)
        return where

    def settled(self, name: str, uuid_: str, source: Any, destination: Any) -> str | None:
        """Where the domain is once both journals have an outcome and it
        runs on one host, else None."""
        source_journal = Journal(source.state_dir / "journal.sqlite")
        dest_journal = Journal(destination.state_dir / "journal.sqlite")
        try:
            mine = [r for r in source_journal.records() if r.role == "source" and r.vm == name]
            theirs = [r for r in dest_journal.records() if r.role == "destination"]
            if not mine or any(r.outcome in (None, "in-doubt") for r in mine + theirs):
                return None
            committed = mine[-1].reached(Phase.COMMITTED)
        finally:
            source_journal.close()
            dest_journal.close()
        running = []
        for where, host in (("source", self.a), ("destination", self.b)):
            conn = self.libvirt.open(host.uri)
            try:
                domain = conn.lookupByUUIDString(uuid_)
                if domain.state()[0] == self.libvirt.VIR_DOMAIN_RUNNING:
                    running.append(where)
            except self.libvirt.libvirtError:
                pass
            finally:
                conn.close()
        if len(running) != 1:
            self.assertLess(len(running), 2, "the domain runs on both hosts")
            return None
        self.assertEqual(running[0], "destination" if committed else "source")
        return running[0]

    def test_destination_libvirtd_killed_while_streaming(self) -> None:
        """The destination's libvirtd killed (SIGKILL) while the save file
        streams, started again after: the destination cannot restore the
        domain before PREPARED, the source never commits and restores it
        here with its memory; nothing is left at the destination and no
        secret in either libvirt."""
        name = "crashlvd"
        pcr16 = os.urandom(32).hex()
        disk = self.a.directory / "disks" / f"{name}.img"
        guest = define_guest(self.a, name, pcr16=pcr16, persistent_secret=True, disk=str(disk))
        for host in (self.a, self.b):
            self.addCleanup(_remove_domain, host, name)
        vms = self.work / "vms"
        identity = ("--identity", str(self.work / SOURCE))
        for args in (("adopt", name, "--dir", str(vms), "--connect", self.a.uri, *identity),
                     ("start", name, "--dir", str(vms), *identity)):  # fmt: skip
            done = processes.securemig("vm", *args)
            self.assertEqual(done.returncode, 0, done.stderr)
        watch = Watch(self.a.path(guest.heartbeat))
        self.addCleanup(watch.stop)
        first = watch.wait(3, 180)
        uuid_ = self.libvirt.open(self.a.uri).lookupByName(name).UUIDString()
        resolve = ("--resolve-interval", "0.3")
        source_daemon = self.lab.start_destination(
            host=SOURCE, backend="libvirt", env={"LIBVIRT_DEFAULT_URI": self.a.uri}, extra=resolve
        )
        destination = self.lab.start_destination(
            backend="libvirt", env={"LIBVIRT_DEFAULT_URI": self.b.uri}, extra=resolve
        )
        outcome: list[BaseException | None] = []

        def migrate() -> None:
            try:
                self.lab.migrate(
                    destination,
                    name,
                    True,
                    vm_dir=vms,
                    extra=("--state-dir", str(source_daemon.state_dir)),
                )
                outcome.append(None)
            except BaseException as e:
                outcome.append(e)

        mover = threading.Thread(target=migrate, daemon=True)
        mover.start()
        staging = destination.state_dir / "staging"
        deadline = time.monotonic() + 120
        while not any(p.is_file() for p in staging.rglob("ram.img")):
            self.assertLess(time.monotonic(), deadline, "nothing streamed")
            self.assertTrue(mover.is_alive(), outcome)
            time.sleep(0.02)
        self.b.kill_daemon()
        mover.join(300)
        self.assertEqual(len(outcome), 1)
        self.assertIsInstance(outcome[0], RuntimeError)
        # The destination said why, before any commit; the VM stayed here.
        self.assertIn("cannot connect to libvirt", str(outcome[0]))
        self.assertIn("still at the source", str(outcome[0]))
        self.b.start()
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (where := self.settled(name, uuid_, source_daemon, destination)) is None:
            if time.monotonic() > deadline:
                self.fail(f"did not settle:\n{destination.log()[-3000:]}")
            time.sleep(0.5)
        self.assertEqual(where, "source")
        beat = watch.wait(3, 180, source=0)
        self.assertEqual(beat.pcr16, extended(pcr16))
        self.assertGreater(beat.seq, first.seq)
        self.assertTrue(watch.continuous(), [b.seq for b in watch.beats])
        for each in (self.a, self.b):
            conn = self.libvirt.open(each.uri)
            try:
                self.assertEqual(conn.listSecrets(), [], each.name)
                defined = [d.UUIDString() for d in conn.listAllDomains()]
                self.assertEqual(uuid_ in defined, each is self.a, each.name)
            finally:
                conn.close()
        self.assertEqual(list(staging.iterdir()), [])

    def test_destination_dies_prepared(self) -> None:
        """PREPARED journaled at the destination (the domain restored
        paused there, transient), not sent: the source never commits and
        restores the domain; the restarted destination learns it was
        aborted and ends its paused copy and disks."""
        self.assertEqual(self.cell("destination-prepared"), "source")

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

    def test_destination_dies_commit_journaled(self) -> None:
        """COMMIT journaled at the destination, staging not yet in place:
        the restart rolls it forward (the paused domain resumed and defined
        there); the source undefined its copy after COMMITTED."""
        self.assertEqual(self.cell("destination-commit-journaled"), "destination")


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

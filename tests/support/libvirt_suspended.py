"""The fixture of libvirt domains migrated suspended by the real securemig
commands: two lab libvirt hosts (their own pair), an enrolled lab, an
adopted and started domain, the hosts' ``twistd securemig --backend
libvirt``, and the checks every such test makes -- where the domain
settled, with its memory, and that no secret is left in either libvirt."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from securemig.host.journal import Journal
from securemig.hypervisor.heartbeat import Beat, Watch
from securemig.hypervisor.libvirt import require_libvirt
from securemig.lab import processes
from securemig.lab.lab import SOURCE, Lab
from securemig.lab.libvirt import GuestDomain, LibvirtHost, define_guest
from securemig.protocol.phases import Phase

from .libvirt import remove_domain, virsh_secret_value
from .libvirt import shared_hosts as libvirt_hosts
from .qemu import extended
from .secure import staging_left

#: How long a crash cell may take to settle once every process runs again.
SETTLE_TIMEOUT = 120.0
#: The source's daemon settles and resolves this often (seconds).
RESOLVE = ("--resolve-interval", "0.3")


def shared_hosts() -> list[LibvirtHost]:
    """Two lab libvirtds for the suspended tests, their own pair (started
    once per test process), stopped with what they started at exit."""
    return libvirt_hosts((("sa", 5), ("sb", 6)))


@dataclass
class Adopted:
    """A domain defined at host A, adopted by securemig and started."""

    name: str
    guest: GuestDomain
    pcr16: str
    disk: Path
    vms: Path  #: the bundles' directory (``--vm-dir``)
    watch: Watch  #: its heartbeat, followed from A
    first: Beat  #: its first beats, before any migration
    uuid: str  #: libvirt's UUID of the domain


class Migrating(threading.Thread):
    """A migration run on its own thread; ``outcome`` holds, once it
    ended, None (it succeeded) or what it raised."""

    def __init__(self, run: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._run = run
        self.outcome: list[BaseException | None] = []

    def run(self) -> None:
        """Migrate; record how it ended."""
        try:
            self._run()
            self.outcome.append(None)
        except BaseException as e:
            self.outcome.append(e)


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

    def adopt(
        self, name: str, disk_format: str = "raw", vcpus: int = 1, secret_bytes: int = 32
    ) -> Adopted:
        """The Linux guest defined at A (its disk outside the hosts' own
        trees: the same path in both namespaces; ``vcpus`` set in its
        definition, as an operator would; its vTPM secret ``secret_bytes``
        long), adopted with A's identity, started; its first beats seen,
        PCR 16 as given."""
        pcr16 = os.urandom(32).hex()
        suffix = "qcow2" if disk_format == "qcow2" else "img"
        disk = self.a.directory / "disks" / f"{name}.{suffix}"
        options: dict[str, Any] = {"disk_format": "qcow2"} if disk_format == "qcow2" else {}
        options["secret_bytes"] = secret_bytes
        guest = define_guest(
            self.a, name, pcr16=pcr16, persistent_secret=True, disk=str(disk), **options
        )
        for host in (self.a, self.b):
            self.addCleanup(remove_domain, host, name)
        conn_a = self.on_host(self.a)
        if vcpus != 1:
            xml = conn_a.lookupByName(name).XMLDesc(0)
            one = "<vcpu placement='static'>1</vcpu>"
            self.assertIn(one, xml)
            conn_a.defineXML(xml.replace(one, f"<vcpu placement='static'>{vcpus}</vcpu>"))
        vms = self.work / "vms"
        identity = ("--identity", str(self.work / SOURCE))
        for args in (("adopt", name, "--dir", str(vms), "--connect", self.a.uri, *identity),
                     ("start", name, "--dir", str(vms), *identity)):  # fmt: skip
            done = processes.securemig("vm", *args)
            self.assertEqual(done.returncode, 0, done.stderr)
        watch = Watch(self.a.path(guest.heartbeat))
        self.addCleanup(watch.stop)
        self.addCleanup(watch.save, self.work / "consoles")
        first = watch.wait(3, 180)
        self.assertEqual(first.pcr16, extended(pcr16))
        uuid_ = str(conn_a.lookupByName(name).UUIDString())
        return Adopted(name, guest, pcr16, disk, vms, watch, first, uuid_)

    def daemon_at(
        self, host: LibvirtHost, env: dict[str, str] | None = None, port: int = 0, **kw: Any
    ) -> processes.Destination:
        """``twistd securemig --backend libvirt`` of lab host A (``self.a``:
        the source's, sharing its state directory with ``securemig
        migrate``) or B, on ``port`` (a restart takes its old one), with
        ``env`` added (a crash point's)."""
        libvirt_env = {"LIBVIRT_DEFAULT_URI": host.uri, **(env or {})}
        extra = (*RESOLVE, *kw.pop("extra", ()))
        if host is self.a:
            kw["host"] = SOURCE
        return self.lab.start_destination(
            backend="libvirt", env=libvirt_env, extra=extra, port=port, **kw
        )

    def send(
        self,
        domain: Adopted,
        destination: Any,
        source: Any,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> Any:
        """``securemig migrate`` of ``domain`` from A to ``destination``
        (``extra`` options, ``env`` added), journaled in ``source``'s state
        directory (the source's daemon settles it); returns (summary,
        usage), raises RuntimeError if it failed."""
        return self.lab.migrate(
            destination,
            domain.name,
            True,
            vm_dir=domain.vms,
            extra=("--state-dir", str(source.state_dir), *extra),
            env=env,
        )

    def migrate_behind(
        self,
        domain: Adopted,
        destination: Any,
        source: Any,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> Migrating:
        """:meth:`send` on a thread of its own, started."""
        mover = Migrating(lambda: self.send(domain, destination, source, *extra, env=env))
        mover.start()
        return mover

    def revive(self, host: LibvirtHost) -> None:
        """Start ``host``'s libvirtd again if a test killed it (the hosts
        are shared by the module's tests)."""
        if host.process is None or host.process.poll() is not None:
            host.start()

    def journal_reached(self, daemon: Any, role: str, phase: Phase) -> bool:
        """Whether ``daemon``'s journal has a ``role`` record at ``phase``."""
        journal = Journal(daemon.state_dir / "journal.sqlite")
        try:
            return any(r.role == role and r.reached(phase) for r in journal.records())
        finally:
            journal.close()

    def wait_killed(self, daemon: processes.Destination, what: str) -> None:
        """Until ``daemon`` died of SIGKILL (at ``what``)."""
        deadline = time.monotonic() + 120
        while daemon.process.poll() is None:
            self.assertLess(time.monotonic(), deadline, "the daemon did not reach " + what)
            time.sleep(0.1)
        self.assertEqual(daemon.process.returncode, -signal.SIGKILL, daemon.log()[-2000:])

    def settled(self, domain: Adopted, source: Any, destination: Any) -> str | None:
        """Where the domain is once both journals have an outcome and it
        runs on one host, else None; never on both, and where the source's
        journal says (committed: the destination)."""
        source_journal = Journal(source.state_dir / "journal.sqlite")
        dest_journal = Journal(destination.state_dir / "journal.sqlite")
        try:
            mine = [
                r for r in source_journal.records() if r.role == "source" and r.vm == domain.name
            ]
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
                found = conn.lookupByUUIDString(domain.uuid)
                if found.state()[0] == self.libvirt.VIR_DOMAIN_RUNNING:
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

    def wait_settled(self, domain: Adopted, source: Any, destination: Any) -> str:
        """:meth:`settled`, waited for (at most :data:`SETTLE_TIMEOUT`)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (where := self.settled(domain, source, destination)) is None:
            if time.monotonic() > deadline:
                self.fail(f"did not settle:\n{destination.log()[-3000:]}\n{source.log()[-3000:]}")
            time.sleep(0.5)
        return where

    def assert_settled_at(self, domain: Adopted, where: str, destination: Any) -> None:
        """The domain runs at ``where`` (``source`` or ``destination``) with
        its memory (heartbeat in sequence, never restarted, PCR 16 kept), is
        defined there only, no secret is defined in either libvirt, and the
        destination holds nothing in staging and disks only of a domain it
        now runs."""
        host = self.a if where == "source" else self.b
        if where == "destination":
            domain.watch.follow(self.b.path(domain.guest.heartbeat))
        beat = domain.watch.wait(3, 180, source=0 if where == "source" else 1)
        self.assertEqual(beat.pcr16, extended(domain.pcr16))
        self.assertGreater(beat.seq, domain.first.seq)
        self.assertTrue(domain.watch.continuous(), [b.seq for b in domain.watch.beats])
        for each in (self.a, self.b):
            conn = self.libvirt.open(each.uri)
            try:
                self.assertEqual(conn.listSecrets(), [], each.name)
                defined = [d.UUIDString() for d in conn.listAllDomains()]
                self.assertEqual(domain.uuid in defined, each is host, each.name)
            finally:
                conn.close()
        self.assertEqual(staging_left(destination), [])
        disks = destination.state_dir / "disks"
        held = [d for d in disks.iterdir() if any(d.iterdir())] if disks.exists() else []
        self.assertEqual(len(held), 1 if where == "destination" else 0, held)
        gone = self.b if where == "source" else self.a
        self.assertFalse(gone.path(f"/var/lib/libvirt/swtpm/{domain.uuid}").exists(), gone.name)
        self.assertTrue(host.path(f"/var/lib/libvirt/swtpm/{domain.uuid}").exists(), host.name)

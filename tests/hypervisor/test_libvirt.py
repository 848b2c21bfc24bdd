"""
The libvirt backend (:mod:`securemig.hypervisor.libvirt`) with a real
``libvirtd`` (a lab host in its own mount namespace), the real Linux guest
under TCG and its real swtpm vTPM, the secret sealed by a real (simulated)
host TPM.
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import LoopingCall, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from securemig.host.arrival import DestinationHost
from securemig.host.departure import Departure
from securemig.host.journal import Journal, MigrationRecord
from securemig.hypervisor import libvirt as libvirt_backend
from securemig.hypervisor.bundle import Bundle, BundleError, Manifest
from securemig.hypervisor.contract import LIVE_MAX_BANDWIDTH
from securemig.hypervisor.heartbeat import Watch
from securemig.hypervisor.libvirt import (
    DOMAIN_FILE,
    LibvirtBackend,
    LibvirtError,
    LibvirtOutgoing,
    LibvirtStats,
    Waker,
    arrived_paused,
    confirmed_out,
    migration_bandwidth,
    require_libvirt,
    secret_held,
)
from securemig.lab import processes
from securemig.lab.lab import SOURCE, Lab
from securemig.lab.libvirt import LibvirtHost, define_guest, guest_domain_xml
from securemig.protocol import wire
from securemig.protocol.phases import Phase
from securemig.protocol.recovery import SourceGuest, carried_decision
from tests.support.libvirt import seal, unseal, virsh_secret_value
from tests.support.qemu import extended

_host: LibvirtHost | None = None


def shared_host() -> LibvirtHost:
    """One lab libvirtd for this module's tests in this test process (started
    once: a few seconds), stopped with what it started at exit."""
    global _host
    if _host is None:
        host = LibvirtHost("bk", 2)
        atexit.register(host.remove)
        host.start()
        _host = host
    return _host


class LibvirtBackendTests(TestCase):
    """Adopt, start, save/restore and discard a real domain."""

    timeout = 600

    def setUp(self) -> None:
        self.host = shared_host()
        self.libvirt = require_libvirt()
        self.conn = self.libvirt.open(self.host.uri)
        self.addCleanup(self.conn.close)
        self.vm_dir = Path(self.mktemp())
        self.backend = LibvirtBackend(reactor, vtpm_key=unseal)
        self.addCleanup(self.backend.close)

    def test_copied_disk_never_overwrites_a_domains_disk(self) -> None:
        """A disk a domain defined here uses (shut off, as an operator's
        other VM waits) is refused as the target of a copied disk with
        POLICY_REFUSED naming that domain; a path no domain uses passes."""
        domain = define_guest(self.host, "diskowner", vtpm=False)
        self.addCleanup(_remove_domain, self.conn, "diskowner")
        used = libvirt_backend.disks_in_use(self.conn)
        self.assertEqual(used.get(domain.disk), "diskowner")
        mine = libvirt_backend.Disk(domain.disk, "raw", 1 << 20)
        with self.assertRaises(BundleError) as cm:
            libvirt_backend.check_disks_unused((mine,), used)
        self.assertEqual(cm.exception.code, wire.ErrorCode.POLICY_REFUSED)
        self.assertIn("used by domain diskowner", str(cm.exception))
        free = libvirt_backend.Disk("/var/lib/libvirt/images/nobody-uses.img", "raw", 1 << 20)
        libvirt_backend.check_disks_unused((free,), used)

    def _secret_files(self, secret_uuid: str) -> list[Path]:
        return [p for p in (self.host.directory / "etc").rglob("*") if secret_uuid in p.name]

    async def test_adopt_start_save_restore_discard(self) -> None:
        """An operator's domain (its secret persistent and readable, as
        libvirt defines them by default) is adopted: the value sealed to the
        host TPM, libvirt's secret gone (no file, virsh cannot read it).
        Started, the guest runs with its vTPM (PCR 16 extended) and the
        secret is undefined again; saved and restored, the same guest runs
        on (heartbeat in sequence, PCR 16 kept).  A wrong value does not
        start it and leaves no secret behind; the right one still does.
        Ended, it is off; started again, it runs.  Discarded, the domain,
        its vTPM state and the bundle are gone."""
        pcr16 = os.urandom(32).hex()
        domain = define_guest(self.host, "adoptee", pcr16=pcr16, persistent_secret=True)
        value = self.conn.secretLookupByUUIDString(domain.secret_uuid).value()
        self.assertTrue(self._secret_files(domain.secret_uuid))

        bundle = await self.backend.adopt(self.vm_dir, "adoptee", self.host.uri, seal)
        self.assertEqual(bundle.manifest.backend, "libvirt")
        self.assertTrue((bundle.path / DOMAIN_FILE).exists())
        sealed = bundle.vtpm_key_path.read_bytes()
        self.assertNotIn(value, sealed)
        self.assertEqual(oct(bundle.vtpm_key_path.stat().st_mode & 0o777), "0o600")
        self.assert_no_secret(domain.secret_uuid)
        self.assertEqual(await self.backend.state(bundle), "shutoff")

        watch = Watch(self.host.path(domain.heartbeat))
        self.addCleanup(watch.stop)
        await self.backend.start(bundle)
        self.assertEqual(await self.backend.state(bundle), "running")
        self.assert_no_secret(domain.secret_uuid)
        beat = await self.beat(watch, 3)
        self.assertEqual(beat.pcr16, extended(pcr16))
        # Paused by request, the domain reads as arrived in libvirt's own
        # status file (what a live arrival looks for after libvirt's Finish,
        # with no question to libvirtd); resumed, it does not.
        status = self.host.run_dir / "qemu" / "adoptee.xml"
        dom = self.conn.lookupByName("adoptee")
        dom.suspend()
        self.assertTrue(arrived_paused(status.read_bytes(), dom.UUIDString()))
        dom.resume()
        self.assertFalse(arrived_paused(status.read_bytes(), dom.UUIDString()))
        # What a live migration's --downtime-ms relies on: libvirt takes the
        # downtime limit of a domain that is not being migrated, and keeps it.
        dom.migrateSetMaxDowntime(123, 0)
        self.assertEqual(dom.migrateGetMaxDowntime(0), 123)

        await self.backend.suspend(bundle)
        self.assertEqual(await self.backend.state(bundle), "shutoff")
        self.assertGreater(bundle.image_path("ram").stat().st_size, 0)
        await self.backend.resume(bundle)
        self.assertEqual(await self.backend.state(bundle), "running")
        self.assert_no_secret(domain.secret_uuid)
        after = await self.beat(watch, 3)
        self.assertEqual(after.pcr16, extended(pcr16))
        self.assertTrue(watch.continuous(), [b.seq for b in watch.beats])
        self.assertGreater(after.seq, beat.seq)

        # A wrong value: swtpm cannot decrypt the state; nothing is left defined.
        dom = self.conn.lookupByName("adoptee")
        dom.destroy()
        wrong = LibvirtBackend(reactor, vtpm_key=lambda b: os.urandom(32))
        self.addCleanup(wrong.close)
        failure = await self.fails(wrong.start(bundle))
        self.assertIsInstance(failure.value, LibvirtError)
        self.assertNotIn(value.hex(), str(failure.value))
        self.assert_no_secret(domain.secret_uuid)
        self.assertEqual(await self.backend.state(bundle), "shutoff")
        await self.backend.start(bundle)
        self.assertEqual(await self.backend.state(bundle), "running")
        # The contract's end (vm stop --force): off the reactor thread, a Deferred.
        await self.backend.end(bundle)
        self.assertEqual(await self.backend.state(bundle), "shutoff")
        await self.backend.start(bundle)
        self.assertEqual(await self.backend.state(bundle), "running")

        swtpm_state = self.host.path(f"/var/lib/libvirt/swtpm/{dom.UUIDString()}")
        self.assertTrue(swtpm_state.exists())
        await self.backend.discard(bundle)
        self.assertFalse(bundle.path.exists())
        self.assertFalse(swtpm_state.exists())
        with self.assertRaises(self.libvirt.libvirtError):
            self.conn.lookupByName("adoptee")

    def assert_no_secret(self, secret_uuid: str) -> None:
        """libvirt holds no copy of the secret: not defined, no file, and
        ``virsh secret-get-value`` gets nothing."""
        with self.assertRaises(self.libvirt.libvirtError):
            self.conn.secretLookupByUUIDString(secret_uuid)
        self.assertEqual(self._secret_files(secret_uuid), [])
        answer = virsh_secret_value(self.host, secret_uuid)
        self.assertNotEqual(answer.returncode, 0)
        self.assertEqual(answer.stdout.strip(), "")

    async def beat(self, watch: Watch, count: int) -> Any:
        from twisted.internet.threads import deferToThread

        return await deferToThread(watch.wait, count, 120.0)

    async def fails(self, d: Any) -> Any:
        try:
            await d
        except Exception:
            from twisted.python.failure import Failure

            return Failure()
        self.fail("expected a failure")

    async def test_refuses_domain_without_encrypted_vtpm(self) -> None:
        """A domain without an encrypted emulator vTPM is refused with a
        sentence saying what securemig needs; no bundle is written."""
        disk = "/var/lib/libvirt/images/plain.img"
        self.conn.defineXML(guest_domain_xml("plain", None, disk))
        self.addCleanup(lambda: self.conn.lookupByName("plain").undefine())
        failure = await self.fails(self.backend.adopt(self.vm_dir, "plain", self.host.uri, seal))
        self.assertIsInstance(failure.value, BundleError)
        self.assertIn("no emulator vTPM encrypted by a libvirt secret", str(failure.value))
        self.assertFalse((self.vm_dir / "plain").exists())

    async def test_refuses_private_secret(self) -> None:
        """A secret libvirt keeps private cannot be sealed: refused, the
        domain and its secret untouched, no bundle."""
        secret_uuid = str(uuid.uuid4())
        secret = self.conn.secretDefineXML(
            f"<secret ephemeral='yes' private='yes'><uuid>{secret_uuid}</uuid>"
            "<usage type='vtpm'><name>priv-vtpm</name></usage></secret>"
        )
        self.addCleanup(secret.undefine)
        secret.setValue(os.urandom(32))
        self.conn.defineXML(guest_domain_xml("priv", secret_uuid, None))
        self.addCleanup(lambda: self.conn.lookupByName("priv").undefine())
        failure = await self.fails(self.backend.adopt(self.vm_dir, "priv", self.host.uri, seal))
        self.assertIn("must be readable once", str(failure.value))
        self.assertFalse((self.vm_dir / "priv").exists())
        self.conn.secretLookupByUUIDString(secret_uuid)

    def test_secret_held_only_for_the_block(self) -> None:
        """While held, the secret is ephemeral and private (virsh cannot
        read it, no file holds it); after the block, even one that raised,
        it is undefined."""
        secret_uuid = str(uuid.uuid4())
        with (
            self.assertRaises(ZeroDivisionError),
            secret_held(self.conn, secret_uuid, "held", os.urandom(32)),
        ):
            secret = self.conn.secretLookupByUUIDString(secret_uuid)
            self.assertIn("ephemeral='yes'", secret.XMLDesc())
            self.assertIn("private='yes'", secret.XMLDesc())
            with self.assertRaises(self.libvirt.libvirtError):
                secret.value()
            self.assertIn("private", virsh_secret_value(self.host, secret_uuid).stderr)
            self.assertEqual(self._secret_files(secret_uuid), [])
            1 / 0  # noqa: B018
        self.assert_no_secret(secret_uuid)


class AdoptCommandTests(TestCase):
    """``securemig vm adopt|start|status`` as an operator runs them, with a
    lab host identity whose swtpm host TPM seals the secret."""

    timeout = 600

    def setUp(self) -> None:
        self.host = shared_host()
        self.work = Path(self.mktemp()).absolute()
        self.work.mkdir(parents=True)
        self.lab = Lab(self.work)
        self.addCleanup(self.lab.stop)
        self.lab.start()

    def securemig(self, *args: str) -> subprocess.CompletedProcess[str]:
        return processes.securemig(*args)

    def test_adopt_start_status(self) -> None:
        """Adopted by the CLI, the domain's secret is sealed by the host's
        TPM and gone from libvirt (an adoption killed between the two is
        finished by adopting again; a complete one is refused); `vm status`
        says libvirt's state; `vm start` runs the guest with its vTPM and
        leaves no secret behind.
        An unknown domain is refused with a sentence."""
        libvirt = require_libvirt()
        pcr16 = os.urandom(32).hex()
        domain = define_guest(self.host, "cli-guest", pcr16=pcr16, persistent_secret=True)
        conn = libvirt.open(self.host.uri)
        self.addCleanup(conn.close)
        self.addCleanup(_remove_domain, conn, "cli-guest")
        identity = str(self.work / SOURCE)
        vms = str(self.work / "vms")
        where = ("--dir", vms, "--connect", self.host.uri)

        unknown = self.securemig("vm", "adopt", "nosuch", *where, "--identity", identity)
        self.assertEqual(unknown.returncode, 1, unknown.stderr)
        self.assertIn("has no domain nosuch", unknown.stderr)

        # Killed between the durable bundle and undefining libvirt's secret:
        # the secret is still there; adopting again finishes the adoption.
        crash = {**os.environ, "SECUREMIG_CRASH_POINTS": "1", "SECUREMIG_CRASH_AT": "adopt-sealed"}
        killed = processes.securemig(
            "vm", "adopt", "cli-guest", *where, "--identity", identity, env=crash
        )
        self.assertEqual(killed.returncode, -9, killed.stderr)
        self.assertTrue((self.work / "vms" / "cli-guest" / "vtpm-key.sealed").exists())
        conn.secretLookupByUUIDString(domain.secret_uuid)
        adopted = self.securemig("vm", "adopt", "cli-guest", *where, "--identity", identity)
        self.assertEqual(adopted.returncode, 0, adopted.stderr)
        self.assertIn("sealed to this host", adopted.stdout)
        again = self.securemig("vm", "adopt", "cli-guest", *where, "--identity", identity)
        self.assertEqual(again.returncode, 1, again.stderr)
        self.assertIn("adopted already", again.stderr)
        with self.assertRaises(libvirt.libvirtError):
            conn.secretLookupByUUIDString(domain.secret_uuid)
        status = self.securemig("vm", "status", "cli-guest", "--dir", vms)
        self.assertEqual(status.stdout.strip(), "cli-guest: shutoff (libvirt)", status.stderr)

        watch = Watch(self.host.path(domain.heartbeat))
        self.addCleanup(watch.stop)
        started = self.securemig("vm", "start", "cli-guest", "--dir", vms, "--identity", identity)
        self.assertEqual(started.returncode, 0, started.stderr)
        self.assertEqual(started.stdout.strip(), "cli-guest: running")
        self.assertEqual(watch.wait(3, 120).pcr16, extended(pcr16))
        self.assertNotEqual(virsh_secret_value(self.host, domain.secret_uuid).returncode, 0)

        # `securemig migrate --live` to a destination whose backend is not
        # libvirt: refused at admission, before anything moves; the guest
        # runs on.  (The suspended migration:
        # tests/hypervisor/test_libvirt_suspended.py; live to a libvirt
        # destination: tests/transport/test_live_libvirt.py.)
        destination = self.lab.start_destination()
        with self.assertRaises(RuntimeError) as caught:
            self.lab.migrate(
                destination,
                "cli-guest",
                True,
                vm_dir=self.work / "vms",
                extra=("--live",),
            )
        self.assertIn("BACKEND_MISMATCH", str(caught.exception))
        status = self.securemig("vm", "status", "cli-guest", "--dir", vms)
        self.assertEqual(status.stdout.strip(), "cli-guest: running (libvirt)", status.stderr)
        self.assertEqual(watch.wait(3, 60).pcr16, extended(pcr16))
        self.assertTrue(watch.continuous())

        # vm delete refuses a running domain; vm stop --force powers it off;
        # vm delete then removes the domain with its vTPM state and the
        # bundle (never the bundle alone: it holds the only copy of the secret).
        refused = self.securemig("vm", "delete", "cli-guest", "--dir", vms)
        self.assertIn("is running: securemig vm stop it first", refused.stderr)
        ended = self.securemig("vm", "stop", "cli-guest", "--dir", vms, "--force")
        self.assertEqual(ended.returncode, 0, ended.stderr)
        status = self.securemig("vm", "status", "cli-guest", "--dir", vms)
        self.assertEqual(status.stdout.strip(), "cli-guest: shutoff (libvirt)", status.stderr)
        uuid_ = conn.lookupByName("cli-guest").UUIDString()
        self.assertTrue(self.host.path(f"/var/lib/libvirt/swtpm/{uuid_}").exists())
        deleted = self.securemig("vm", "delete", "cli-guest", "--dir", vms)
        self.assertEqual(deleted.returncode, 0, deleted.stderr)
        with self.assertRaises(libvirt.libvirtError):
            conn.lookupByName("cli-guest")
        self.assertFalse(self.host.path(f"/var/lib/libvirt/swtpm/{uuid_}").exists())
        self.assertFalse((self.work / "vms" / "cli-guest").exists())


def _status(phase: str | None, job: str = "migration out") -> bytes:
    """A domain's status file as libvirt 9.0 writes it (``/run/libvirt/qemu/
    NAME.xml``), with its async job in ``phase`` (None: no job)."""
    element = (
        ""
        if phase is None
        else f"<job type='none' async='{job}' phase='{phase}' flags='0x6b' "
        "asyncStarted='1796612771607'>\n    <migParams/>\n  </job>\n  "
    )
    return (
        "<domstatus state='paused' reason='migration' pid='7233'>\n  "
        "<monitor path='/var/lib/libvirt/qemu/domain-1-d/monitor.sock' type='unix'/>\n  "
        f"{element}<domain type='qemu' id='1'><name>d</name></domain>\n</domstatus>\n"
    ).encode()


def _write_status(directory: Path, name: str, data: bytes) -> None:
    """As libvirt saves a status: a new file renamed over the old one."""
    new = directory / f"{name}.xml.new"
    new.write_bytes(data)
    os.rename(new, directory / f"{name}.xml")


class ConfirmedPhaseTests(SynchronousTestCase):
    """:func:`confirmed_out`: only libvirt's source in phase ``confirm3`` of
    an outgoing migration is a completed migration."""

    def test_confirm3_is_completed(self) -> None:
        """The phase libvirt saves after the destination's Finish succeeded."""
        self.assertTrue(confirmed_out(_status("confirm3")))

    def test_anything_else_is_not(self) -> None:
        """The Finish's answer lost (``confirm3_cancelled``: libvirt resumes
        the guest here), the copy done but the Finish not answered, an
        incoming job, no job, a file cut short or not libvirt's: no."""
        for data in (
            _status("confirm3_cancelled"),
            _status("perform3_done"),
            _status("perform3"),
            _status("confirm3", job="migration in"),
            _status("finish3", job="migration in"),
            _status(None),
            _status("confirm3")[:120],
            b"",
            b"<domain><job async='migration out' phase='confirm3'/></domain>"[:-3],
        ):
            self.assertFalse(confirmed_out(data), data)


UUID = "7c1d9a4e-2b7f-4f0e-9a55-0d6c1e2f3a4b"


def _arriving(state: str, reason: str, uuid: str = UUID) -> bytes:
    """An arriving domain's status file, in ``state`` for ``reason``."""
    return (
        f"<domstatus state='{state}' reason='{reason}' pid='7233'>\n  "
        "<job type='none' async='migration in' phase='finish3'/>\n  "
        f"<domain type='qemu' id='1'><name>d</name><uuid>{uuid}</uuid></domain>\n"
        "</domstatus>\n"
    ).encode()


class ArrivalStatusTests(SynchronousTestCase):
    """:func:`arrived_paused`: the destination takes the domain for arrived
    from libvirt's status file only where it says the Finish paused it by
    request, for the domain this migration brings."""

    def test_paused_by_request_is_arrived(self) -> None:
        """``VIR_MIGRATE_PAUSED``'s Finish: paused, reason user."""
        self.assertTrue(arrived_paused(_arriving("paused", "user"), UUID))
        self.assertTrue(arrived_paused(_arriving("paused", "user"), UUID.upper()))

    def test_anything_else_does_not_tell(self) -> None:
        """The incoming migration's own pause, running (resumed by someone
        else), shut off, another domain's UUID, no UUID, a file cut short,
        not libvirt's format: libvirt is asked instead."""
        for data in (
            _arriving("paused", "migration"),
            _arriving("running", "migrated"),
            _arriving("shutoff", "failed"),
            _arriving("paused", "ioerror"),
            _arriving("paused", "user", uuid="0" * 8 + UUID[8:]),
            _arriving("paused", "user").replace(f"<uuid>{UUID}</uuid>".encode(), b""),
            _arriving("paused", "user")[:100],
            b"",
            f"<domain state='paused' reason='user'><uuid>{UUID}</uuid></domain>".encode(),
        ):
            self.assertFalse(arrived_paused(data, UUID), data)


class DiskDirsTests(SynchronousTestCase):
    """The directories a destination creates copied disks in: what an
    attested source may name is checked before anything is held."""

    def test_only_copied_disks_are_created_or_removed(self) -> None:
        """A source announces (for the destination to create) and lists
        (for removal here after the commit) only the disks libvirt copies
        (``NON_SHARED_DISK`` skips ``<readonly/>`` and ``<shareable/>``
        ones, which stay in use here and must be there already): a
        read-only image and a shared one are neither created empty there
        nor deleted here; a CD-ROM is no disk."""

        class Domain:
            def XMLDesc(self, flags: int) -> str:
                return (
                    "<domain><devices>"
                    "<disk type='file' device='disk'><driver type='qcow2'/>"
                    "<source file='/images/own.qcow2'/></disk>"
                    "<disk type='file' device='disk'><source file='/images/base.iso'/>"
                    "<readonly/></disk>"
                    "<disk type='file' device='disk'><source file='/images/cluster.img'/>"
                    "<shareable/></disk>"
                    "<disk type='file' device='cdrom'><source file='/images/cd.iso'/></disk>"
                    "</devices></domain>"
                )

            def blockInfo(self, path: str) -> tuple[int, int, int]:
                return (1 << 20, 0, 0)

        copied = libvirt_backend.copied_disks(Domain())
        self.assertEqual(copied, (libvirt_backend.Disk("/images/own.qcow2", "qcow2", 1 << 20),))

    def info(self, *paths: str, copy_storage: bool = True) -> bytes:
        disks = tuple(libvirt_backend.Disk(p, "raw", 1 << 20) for p in paths)
        outgoing = libvirt_backend.Outgoing("vm1", str(uuid.uuid4()), str(uuid.uuid4()), disks)
        return libvirt_backend.Incoming(outgoing, copy_storage, 0).to_json()

    def refusal(self, info: bytes) -> BundleError:
        with self.assertRaises(BundleError) as cm:
            LibvirtBackend(reactor).live_channels(info)
        return cm.exception

    def test_default_is_libvirts_images(self) -> None:
        os.environ.pop(libvirt_backend.DISK_DIRS_ENV, None)
        self.assertEqual(
            LibvirtBackend(reactor).live_channels(self.info("/var/lib/libvirt/images/a.img")), 0
        )
        for outside in (
            "/etc/cron.d/a.img",
            "/var/lib/libvirt/images-x/a.img",  # a prefix, not the directory
            "/var/lib/libvirt/a.img",
        ):
            e = self.refusal(self.info("/var/lib/libvirt/images/ok.img", outside))
            self.assertEqual(e.code, wire.ErrorCode.POLICY_REFUSED)
            self.assertIn(outside, str(e))
        # A path that climbs out is refused as malformed, before any policy.
        e = self.refusal(self.info("/var/lib/libvirt/images/../../../etc/a.img"))
        self.assertNotEqual(e.code, wire.ErrorCode.POLICY_REFUSED)

    def test_configured_directories(self) -> None:
        self.patch(
            os, "environ", {**os.environ, libvirt_backend.DISK_DIRS_ENV: "/srv/vm:relative:/data/"}
        )
        backend = LibvirtBackend(reactor)
        for inside in ("/srv/vm/a.qcow2", "/data/b/c.img"):
            self.assertEqual(backend.live_channels(self.info(inside)), 0)
        for outside in ("/var/lib/libvirt/images/a.img", "relative/a.img", "/srv/vmx/a.img"):
            self.refusal(self.info(outside))
        # Disks on shared storage (nothing created here) are not its business.
        self.assertEqual(
            backend.live_channels(self.info("/elsewhere/a.img", copy_storage=False)), 0
        )


class QuestionThreadsTests(TestCase):
    async def test_questions_share_a_bounded_pool(self) -> None:
        """Recovery makes a backend object per round and record: questions
        through 30 fresh backends are answered, then 12 that block as on a
        stopped libvirtd fail with LibvirtError after the timeout, and all
        of it holds at most QUESTION_THREADS threads (not one per backend);
        once libvirt answers again, so does a new question."""
        self.patch(libvirt_backend, "QUERY_TIMEOUT", 0.5)
        release = threading.Event()
        self.addCleanup(release.set)
        before = {t.ident for t in threading.enumerate()}

        def blocked() -> str:
            release.wait(30)
            return "late"

        def timeout(f: Any) -> str:
            f.trap(libvirt_backend.LibvirtError)
            return "timeout"

        answers = await gatherResults(
            [libvirt_backend.LibvirtBackend().ask(lambda: "here") for _ in range(30)]
        )
        self.assertEqual(answers, ["here"] * 30)
        answers = await gatherResults(
            [libvirt_backend.LibvirtBackend().ask(blocked).addErrback(timeout) for _ in range(12)]
        )
        self.assertEqual(answers, ["timeout"] * 12)
        added = [t for t in threading.enumerate() if t.ident not in before]
        self.assertLessEqual(len(added), libvirt_backend.QUESTION_THREADS, added)
        release.set()
        self.assertEqual(await libvirt_backend.LibvirtBackend().ask(lambda: "again"), "again")


class WakerTests(SynchronousTestCase):
    """:class:`Waker`: a wake wakes the sleeper, or the next one."""

    def test_wake_before_sleep_is_kept(self) -> None:
        """A change told while nobody slept (the waiter was asking libvirt)
        wakes the next sleep at once, not after its timeout."""
        from twisted.internet.task import Clock

        clock = Clock()
        waker = Waker(clock)
        waker.wake()
        self.assertIsNone(self.successResultOf(waker.sleep(3600)))
        later = waker.sleep(3600)
        self.assertNoResult(later)
        waker.wake()
        self.successResultOf(later)
        self.assertEqual(clock.getDelayedCalls(), [])


class OutgoingCompletionTests(TestCase):
    """The source's side of a libvirt migration completes on libvirt's
    confirmed phase, told by inotify as libvirt saves it, while its
    ``migrateToURI3`` still runs (libvirt ending its QEMU); never on any
    earlier phase."""

    timeout = 60

    def setUp(self) -> None:
        self.run_dir = Path(self.mktemp())
        self.status_dir = self.run_dir / libvirt_backend.STATUS_DIR
        self.status_dir.mkdir(parents=True)
        # Only inotify can wake a waiter within this test's timeout.
        self.patch(libvirt_backend, "STATUS_FALLBACK", 3600.0)
        self.backend = LibvirtBackend(reactor, run_dir=self.run_dir)
        bundle = Bundle(
            Path(self.mktemp()), Manifest(name="d", backend="libvirt", images=[], state="running")
        )
        self.call: Deferred[LibvirtStats] = Deferred()
        self.outgoing = LibvirtOutgoing(self.backend, bundle, self.call)
        self.addCleanup(self.outgoing._watch.close)
        self.assertTrue(self.outgoing._watch.active, "inotify watches libvirt's status directory")

    async def test_completes_on_confirm3_before_the_call_returns(self) -> None:
        """perform3_done does not complete it; confirm3 does, at once; the
        numbers returned are filled when the call returns; ``returned``
        waits for that return."""
        _write_status(self.status_dir, "d", _status("perform3_done"))
        # wait() reads the status before it first sleeps.
        waiting = Deferred.fromCoroutine(self.outgoing.wait(timeout=30))
        self.assertNoResult(waiting)
        _write_status(self.status_dir, "d", _status("confirm3"))
        stats = await waiting
        self.assertTrue(self.outgoing.completed)
        self.assertFalse(self.outgoing.ended)
        self.assertEqual(stats.total_ms, 0)
        returned = Deferred.fromCoroutine(self.outgoing.returned())
        self.assertNoResult(returned)
        self.call.callback(LibvirtStats(total_ms=4200, downtime_ms=180))
        await returned
        self.assertEqual((stats.total_ms, stats.downtime_ms), (4200, 180))

    async def test_cancelled_confirm_fails(self) -> None:
        """``confirm3_cancelled`` (the destination's answer lost: libvirt runs
        the guest on here) is no completion: the call's error is."""
        _write_status(self.status_dir, "d", _status("confirm3_cancelled"))
        waiting = Deferred.fromCoroutine(self.outgoing.wait(timeout=30))
        self.assertNoResult(waiting)
        self.call.errback(LibvirtError("job 'migration out' failed"))
        with self.assertRaises(LibvirtError):
            await waiting
        self.assertFalse(self.outgoing.completed)


class _Started:
    """A live departure's libvirt side, started and not returned yet."""

    completed = False


class ReactorFreeTests(TestCase):
    """What the source asks libvirt at the commit and after it
    (``Departure.live_qemu_alive``, ``moved_by_hypervisor``,
    ``guest_here``) is asked off the reactor thread: a stopped libvirtd
    (SIGSTOP: it accepts connections and never answers) does not stop the
    reactor."""

    timeout = 300

    def setUp(self) -> None:
        self.host = shared_host()
        self.libvirt = require_libvirt()
        self.conn = self.libvirt.open(self.host.uri)
        self.addCleanup(self.conn.close)
        self.vm_dir = Path(self.mktemp())
        self.backend = LibvirtBackend(reactor, vtpm_key=unseal)
        self.addCleanup(self.backend.close)

    async def departure(self, name: str) -> Departure:
        """An adopted domain (defined, shut off) leaving live: its libvirt
        migration started (not returned)."""
        define_guest(self.host, name, persistent_secret=True)
        self.addCleanup(_remove_domain, self.conn, name)
        bundle = await self.backend.adopt(self.vm_dir, name, self.host.uri, seal)
        journal = Journal(self.vm_dir / "journal.sqlite")
        self.addCleanup(journal.close)
        departure = Departure(bundle, wire.Variant.SHARED_STORAGE, "127.0.0.1:1", "secure", journal)
        departure.live_migration = _Started()  # type: ignore[assignment]
        return departure

    def stop_libvirtd(self) -> int:
        """SIGSTOP the host's libvirtd; continued at the test's end at the latest."""
        assert self.host.process is not None
        pid = self.host.process.pid
        # A libvirt connection an earlier test dropped in a reference cycle
        # would be closed by the collector on whatever thread allocates --
        # here the reactor's, blocking on the stopped libvirtd: collected now.
        gc.collect()
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(os.kill, pid, signal.SIGCONT)
        return pid

    def continue_later(self, pid: int, seconds: float) -> None:
        """SIGCONT ``pid`` after ``seconds``, from a thread of its own: a
        reactor blocked on the stopped libvirtd would never run a timer of
        its own (the test would hang, not fail)."""
        timer = threading.Timer(seconds, os.kill, (pid, signal.SIGCONT))
        timer.start()
        self.addCleanup(timer.join)

    async def watched(self, ask: Callable[[], Deferred[Any]]) -> tuple[Any, float, float]:
        """What ``ask()`` fires with, how long it took from the call, and
        the longest the reactor was away meanwhile (a 10 ms LoopingCall
        watches it from before the call)."""
        last = time.monotonic()
        gaps: list[float] = [0.0]

        def tick() -> None:
            nonlocal last
            now = time.monotonic()
            gaps.append(now - last)
            last = now

        loop = LoopingCall(tick)
        loop.clock = reactor
        started = time.monotonic()
        loop.start(0.01)
        try:
            result = await ask()
            took = time.monotonic() - started
            await deferLater(reactor, 0.03, lambda: None)  # its next tick sees the last gap
        finally:
            loop.stop()
        return result, took, max(gaps)

    async def test_questions_leave_the_reactor_free(self) -> None:
        """libvirtd stopped for 1.5 s while the source asks whether its QEMU
        runs, whether libvirt moved the guest, and where it is: the reactor
        ran every 10 ms throughout (never away 0.5 s: asked on its thread,
        the answers took the whole 1.5 s), and once libvirtd continues the
        answers are right (a shut-off domain: no QEMU, not moved, gone)."""
        departure = await self.departure("askee")
        pid = self.stop_libvirtd()
        self.continue_later(pid, 1.5)
        answers, took, gap = await self.watched(
            lambda: gatherResults(
                [
                    Deferred.fromCoroutine(departure.live_qemu_alive()),
                    Deferred.fromCoroutine(departure.moved_by_hypervisor()),
                    Deferred.fromCoroutine(departure.guest_here()),
                ]
            )
        )
        self.assertEqual(answers, [False, False, SourceGuest.GONE])
        self.assertGreater(took, 1.2)
        self.assertLess(gap, 0.5)

    async def test_unanswered_question_is_unknown(self) -> None:
        """libvirtd stopped for longer than the question may take: the
        answer is "cannot be asked" (UNKNOWN, on which nothing is decided),
        in time, the reactor free meanwhile -- not a guess, not a hang."""
        departure = await self.departure("askee2")
        self.patch(libvirt_backend, "QUERY_TIMEOUT", 1.0)
        pid = self.stop_libvirtd()
        self.continue_later(pid, 4.0)
        where, took, gap = await self.watched(
            lambda: Deferred.fromCoroutine(departure.guest_here())
        )
        self.assertIs(where, SourceGuest.UNKNOWN)
        self.assertLess(took, 3.5)
        self.assertLess(gap, 0.5)
        self.assertFalse(
            carried_decision(where, prepared=True) is not None, "decided on an unknown"
        )

    async def arrived_here(self, name: str) -> tuple[DestinationHost, MigrationRecord, Bundle]:
        """A destination host (libvirt backend) holding domain ``name``,
        adopted here, as a live arrival it moved into place (journaled
        ``incoming`` and ``committed``): what its recovery asks libvirt
        about.  Returns the host, the record and the bundle."""
        departure = await self.departure(name)
        host = DestinationHost(Path(self.mktemp()), backend="libvirt")
        self.addCleanup(host.journal.close)
        mid = "ab" * 16
        host.journal.begin(
            role="destination", vm=name, peer="127.0.0.1:1", variant="shared-storage",
            protocol="secure", id=mid, peer_name="source-a",
        )  # fmt: skip
        host.journal.phase(mid, Phase.INCOMING)
        host.journal.phase(mid, Phase.COMMITTED)
        departure.bundle.path.rename(host.vms / name)
        record = host.journal.get(mid)
        assert record is not None
        return host, record, Bundle.load(host.vms / name)

    async def test_destination_questions_leave_the_reactor_free(self) -> None:
        """The destination's recovery questions -- whether an arrival's QEMU
        runs, the VM's state (``Backend.ask``, as the read commands' settling
        asks it too) -- with libvirtd stopped for 1.5 s: the reactor ran
        every 10 ms throughout, the answers took the whole 1.5 s and are
        right once libvirtd continues (shut off: no QEMU)."""
        host, record, bundle = await self.arrived_here("askee3")
        pid = self.stop_libvirtd()
        self.continue_later(pid, 1.5)
        answers, took, gap = await self.watched(
            lambda: gatherResults(
                [
                    Deferred.fromCoroutine(host.live_qemu(record)),
                    Deferred.fromCoroutine(host.backend_status(bundle)),
                ]
            )
        )
        self.assertEqual(answers, [False, "shutoff"])
        self.assertGreater(took, 1.2)
        self.assertLess(gap, 0.5)

    async def test_unanswered_destination_question_fails(self) -> None:
        """libvirtd stopped for longer than a question may take: whether an
        arrival's QEMU runs fails in time ("cannot say"), never answered
        "gone" (on which it would be journaled LOST and discarded), and
        the reactor stays free meanwhile."""
        host, record, _ = await self.arrived_here("askee4")
        self.patch(libvirt_backend, "QUERY_TIMEOUT", 1.0)
        pid = self.stop_libvirtd()
        self.continue_later(pid, 4.0)

        async def ask() -> BaseException | None:
            try:
                await host.live_qemu(record)
            except LibvirtError as e:
                return e
            return None

        failed, took, gap = await self.watched(lambda: Deferred.fromCoroutine(ask()))
        self.assertIsInstance(failed, LibvirtError)
        self.assertLess(took, 3.5)
        self.assertLess(gap, 0.5)


def _remove_domain(conn: Any, name: str) -> None:
    """Destroy and undefine a test's domain (with its vTPM state) if left."""
    libvirt = require_libvirt()
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    if dom.isActive():
        dom.destroy()
    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_TPM)


class MigrationBandwidthTests(SynchronousTestCase):
    """``migrate --bandwidth`` (bytes per second) as libvirt's bandwidth."""

    def test_in_mib_per_second(self) -> None:
        """2 MiB/s is 2 for libvirt; less than 1 MiB/s is its least, 1."""
        self.assertEqual(migration_bandwidth(2 << 20), 2)
        self.assertEqual(migration_bandwidth(1000), 1)

    def test_default_is_libvirts_own(self) -> None:
        """The default (no --bandwidth: LIVE_MAX_BANDWIDTH) sets none."""
        self.assertEqual(migration_bandwidth(LIVE_MAX_BANDWIDTH), 0)
        self.assertEqual(migration_bandwidth(0), 0)

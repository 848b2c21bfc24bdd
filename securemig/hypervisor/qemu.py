"""
The QEMU backend: a VM is a QEMU process driven over QMP.

- start: QEMU daemonizes with a pid file and a QMP socket in the bundle;
  KVM when ``/dev/kvm`` is usable, else TCG;
- suspend: ``stop``, then ``migrate`` into the bundle's RAM image
  (``exec:cat > ram.img``), wait until it completed, ``quit``;
- resume: start QEMU with ``-incoming defer -S``, ``migrate-incoming`` from
  the RAM image, wait until it completed, ``cont``, check it runs;
- discard: end the VM's QEMU (by the pid in its pid file) and remove the
  bundle.

- live (issue 16): :meth:`QemuBackend.live_destination` waits paused on a
  unix socket, :meth:`QemuBackend.live_source` sends QEMU's pre-copy
  stream to one securemig listens on; :class:`LiveMigration` then waits
  for completion and continues the guest on exactly one side.  With
  ``multifd`` channels (``migrate --live --parallel N``, 1 to
  :data:`MAX_MULTIFD_CHANNELS`) both QEMUs get the ``multifd`` capability
  and ``multifd-channels`` N before ``migrate-incoming`` / ``migrate``:
  QEMU then makes N + 1 connections to the same socket (its main channel
  and one per multifd channel), each carried as its own sealed stream.

A manifest's ``guest`` is ``firmware`` or ``linux``: the Linux guest of
:mod:`securemig.hypervisor.guest` boots with its kernel command line and
two serial ports appended to files (console, heartbeat).  A firmware-only
guest needs no OS to show that state moved: a bundle may carry
``marker.bin``, which QEMU's loader device places at guest-physical
``MARKER_ADDRESS``; tests read it back with ``pmemsave``.

A VM with a vTPM (its manifest names one) gets a ``tpm-tis`` device backed
by the bundle's swtpm state: swtpm starts before QEMU, with the state key
(unsealed by the host TPM through the backend's ``vtpm_key``) and a
``--migration-key`` derived from it, so the vTPM state blobs QEMU puts into
the RAM image are encrypted; it ends when QEMU does.  QEMU's stream then
carries the vTPM's volatile and persistent state; the persistent state
also travels on its own, as the ``vtpm`` image, still encrypted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater

from securemig import files, runtime
from securemig.hypervisor import guest as linux_guest
from securemig.hypervisor import qmp
from securemig.hypervisor.bundle import Bundle, BundleError
from securemig.hypervisor.contract import LIVE_DOWNTIME_LIMIT_MS as LIVE_DOWNTIME_LIMIT_MS
from securemig.hypervisor.contract import LIVE_MAX_BANDWIDTH as LIVE_MAX_BANDWIDTH
from securemig.hypervisor.contract import Backend
from securemig.protocol.errors import ErrorCode, LocalFault
from securemig.trust import vtpm
from securemig.trust.tpm import swtpm

MARKER_ADDRESS = 0x200000
PACKAGE = "qemu-system-x86"
MIGRATION_TIMEOUT = 300.0
#: Seconds between two ``query-migrate`` while a live migration runs, when no
#: MIGRATION event comes first.
LIVE_POLL = 0.02
#: How long swtpm may take to end after its QEMU did.
SWTPM_EXIT_TIMEOUT = 5.0
#: How long QEMU or swtpm may take to end after SIGTERM before SIGKILL.
END_GRACE = 4.0
#: How often an ending program is looked at.
END_POLL = 0.02
#: How long :meth:`QemuBackend.status` waits for QMP's answer.
STATUS_TIMEOUT = 3.0


#: Most multifd channels a live migration may ask for (``--parallel``): each
#: is one more connection QEMU makes, one more sealed stream and one more
#: thread on both sides; 8 already outruns a loopback's AEAD per core.
MAX_MULTIFD_CHANNELS = 8

#: The file in a bundle that names its running QEMU's sockets.
SOCKET_ID = "sockets.id"

#: Returns the 32-byte state key of a bundle's vTPM (unsealed by this host's TPM).
VTPMKey = Callable[[Bundle], bytes]

#: Waits for a number of seconds: on the reactor's clock, or blocking.
Sleep = Callable[[float], Awaitable[None]]


async def _sleep_blocking(seconds: float) -> None:
    time.sleep(seconds)


def _run_blocking(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that never yields to an event loop (it only awaits
    :func:`_sleep_blocking`) to its end, here."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError("a blocking coroutine yielded to an event loop")


class QemuError(LocalFault, RuntimeError):
    """QEMU could not do what was asked; the message says what and why."""

    # The hypervisor fails where a VM is resumed or loaded (the reason says which).
    default_code = ErrorCode.RESUME_FAILED


def qemu_binary() -> str:
    """The QEMU executable, or an error naming the Debian package."""
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        raise QemuError(f"qemu-system-x86_64 not found: install the Debian package {PACKAGE}")
    return path


def accelerator() -> str:
    """KVM where this host can use it, TCG otherwise; ``SECUREMIG_QEMU_ACCEL``
    (``kvm`` or ``tcg``) overrides, e.g. to test under TCG on a KVM host."""
    forced = os.environ.get("SECUREMIG_QEMU_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


def guest_accelerator(bundle: Bundle) -> str:
    """The accelerator for this VM: :func:`accelerator`, except that the
    Linux guest gets KVM only where it was seen to boot under it (probed once,
    cached; ``SECUREMIG_QEMU_ACCEL`` still overrides)."""
    chosen = accelerator()
    if bundle.manifest.guest != "linux" or os.environ.get("SECUREMIG_QEMU_ACCEL"):
        return chosen
    try:
        return linux_guest.guest_accelerator(linux_guest.find(), qemu_binary(), chosen == "kvm")
    except linux_guest.GuestError as e:
        raise QemuError(str(e)) from None


def heartbeat_path(bundle: Bundle) -> Path:
    """Where a Linux guest's QEMU appends the guest's heartbeat lines
    (its second serial port)."""
    return bundle.path / "heartbeat.log"


def console_path(bundle: Bundle) -> Path:
    """Where a Linux guest's QEMU appends its console (first serial port)."""
    return bundle.path / "console.log"


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class QemuBackend(Backend):
    """QEMU over QMP; one QEMU process per VM, tracked by its pid file."""

    name = "qemu"

    def __init__(
        self, reactor: Any = None, memory_mib: int = 64, vtpm_key: VTPMKey | None = None
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reactor = reactor
        self.memory_mib = memory_mib
        #: How a VM's vTPM key is obtained; None on a host without a TPM
        #: identity, where VMs with a vTPM cannot start.
        self.vtpm_key = vtpm_key
        #: How long an ending QEMU or swtpm may take after SIGTERM.
        self.end_grace = END_GRACE

    # -- files of a running VM

    @staticmethod
    def _socket(bundle: Bundle, kind: str = "qmp", suffix: str = ".sock") -> Path:
        # Unix socket paths are limited to 107 bytes: in the runtime
        # directory (securemig.runtime), named by a digest of the bundle's
        # path.  Both are recorded when its QEMU starts (SOCKET_ID), so every
        # process finds them, and a bundle moved into place with its QEMU
        # running (a live arrival) too.
        try:
            recorded = (bundle.path / SOCKET_ID).read_text().split("\n")
        except (FileNotFoundError, NotADirectoryError):
            digest = hashlib.sha256(str(bundle.path.absolute()).encode()).hexdigest()[:16]
            return runtime.current() / f"{kind}-{digest}{suffix}"
        digest = recorded[0].strip()
        if len(recorded) > 1 and recorded[1].strip():
            return Path(recorded[1].strip()) / f"{kind}-{digest}{suffix}"
        # A QEMU started by an earlier release, whose sockets are in /tmp.
        return Path(tempfile.gettempdir()) / f"securemig-{kind}-{digest}{suffix}"

    def monitor(self, bundle: Bundle) -> Deferred[qmp.QMPProtocol]:
        """A QMP connection to the VM's QEMU."""
        return Deferred.fromCoroutine(qmp.connect(self.reactor, str(self._socket(bundle))))

    @staticmethod
    def _pidfile(bundle: Bundle, program: str = "qemu") -> Path:
        return bundle.path / f"{program}.pid"

    def _pid(self, bundle: Bundle, program: str = "qemu") -> int | None:
        """The pid of the VM's QEMU (or swtpm) if it runs."""
        try:
            pid = int(self._pidfile(bundle, program).read_text())
        except (FileNotFoundError, ValueError):
            return None
        # A killed daemonized QEMU may linger as a zombie until it is reaped.
        return pid if alive(pid) else None

    def stream_key(self, key: bytes) -> bytes | None:
        """The key swtpm encrypts the vTPM state in QEMU's stream with."""
        return vtpm.stream_key(key)

    def _start_vtpm(self, bundle: Bundle) -> list[str]:
        """Start the VM's swtpm, if it has a vTPM; returns QEMU's arguments
        that attach it."""
        if not bundle.manifest.vtpm:
            return []
        if self.vtpm_key is None:
            raise QemuError(
                f"VM {bundle.name} has a vTPM whose key is sealed to this host's TPM: "
                "give this host's --identity"
            )
        key = self.vtpm_key(bundle)
        socket_path = self._socket(bundle, "vtpm")
        # swtpm opens its state files by the directory's path each time: it
        # gets a link that follows the bundle when it moves with the VM
        # running (a live arrival moved into place).
        self._point_vtpm_link(bundle)
        try:
            swtpm.start_for_qemu(
                self._vtpm_link(bundle),
                socket_path,
                self._pidfile(bundle, "swtpm"),
                key,
                self.stream_key(key),
            )
        except RuntimeError as e:
            raise QemuError(f"the vTPM of VM {bundle.name} did not start: {e}") from None
        return [
            "-chardev",
            f"socket,id=vtpm,path={socket_path}",
            "-tpmdev",
            "emulator,id=vtpm0,chardev=vtpm",
            "-device",
            "tpm-tis,tpmdev=vtpm0",
        ]

    def _vtpm_link(self, bundle: Bundle) -> Path:
        return self._socket(bundle, "vtpm-state", "")

    def _point_vtpm_link(self, bundle: Bundle) -> None:
        """(Re)point the vTPM state link at this bundle's vTPM directory."""
        link = self._vtpm_link(bundle)
        fresh = link.with_name(link.name + ".new")
        fresh.unlink(missing_ok=True)
        fresh.symlink_to((bundle.path / vtpm.STATE_DIR).absolute())
        os.replace(fresh, link)

    def _argv(self, bundle: Bundle, incoming: bool) -> list[str]:
        argv = [
            qemu_binary(),
            "-machine",
            "pc",
            "-accel",
            guest_accelerator(bundle),
            "-m",
            str(bundle.manifest.memory_mib or self.memory_mib),
            "-display",
            "none",
            "-nodefaults",
            *self._guest_argv(bundle),
            "-qmp",
            f"unix:{self._socket(bundle)},server=on,wait=off",
            "-pidfile",
            str(self._pidfile(bundle)),
            "-daemonize",
        ]
        disk = bundle.manifest.shared_disk or (
            str(bundle.image_path("disk")) if bundle.image_path("disk").exists() else None
        )
        if disk:
            argv += ["-drive", f"file={disk},format=raw,if=virtio"]
        marker = bundle.path / "marker.bin"
        if marker.exists():
            argv += ["-device", f"loader,file={marker},addr={MARKER_ADDRESS:#x},force-raw=on"]
        if incoming:
            argv += ["-incoming", "defer", "-S"]
        return argv

    @staticmethod
    def _guest_argv(bundle: Bundle) -> list[str]:
        """The Linux guest's kernel, initramfs, command line and two serial
        ports (console, heartbeat) appended to files in the bundle; none for
        a firmware-only guest."""
        if bundle.manifest.guest != "linux":
            return ["-serial", "none"]
        try:
            built = linux_guest.find()
        except linux_guest.GuestError as e:
            raise QemuError(str(e)) from None
        return [
            # A guest kernel that panics (panic=-1: "reboot at once") makes its
            # QEMU exit instead of booting it again: a panic never looks like
            # a guest that restarted (its console says "Kernel panic").
            "-no-reboot",
            "-kernel",
            str(built.kernel),
            "-initrd",
            str(built.initrd),
            "-append",
            bundle.manifest.guest_cmdline or linux_guest.cmdline(),
            "-chardev",
            f"file,id=console,path={console_path(bundle)},append=on",
            "-serial",
            "chardev:console",
            "-chardev",
            f"file,id=heartbeat,path={heartbeat_path(bundle)},append=on",
            "-serial",
            "chardev:heartbeat",
        ]

    async def _spawn(self, bundle: Bundle, incoming: bool) -> None:
        """Start the VM's swtpm (if any), then its QEMU; on failure neither
        is left running."""
        (bundle.path / SOCKET_ID).unlink(missing_ok=True)
        digest = hashlib.sha256(str(bundle.path.absolute()).encode()).hexdigest()[:16]
        (bundle.path / SOCKET_ID).write_text(f"{digest}\n{runtime.current()}\n")
        self._socket(bundle).unlink(missing_ok=True)
        argv = self._argv(bundle, incoming)
        argv += self._start_vtpm(bundle)
        try:
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
        except BaseException:
            await self.end(bundle)
            raise
        if result.returncode != 0:
            await self.end(bundle)
            raise QemuError(f"QEMU did not start: {(result.stderr or result.stdout).strip()}")

    async def _wait_migration(self, monitor: qmp.QMPProtocol) -> None:
        deadline = time.monotonic() + MIGRATION_TIMEOUT
        while True:
            try:
                status = (await monitor.execute("query-migrate")).get("status")
            except qmp.Interrupted:
                raise QemuError(
                    "QEMU exited during the migration (at an incoming one, a RAM image it "
                    "cannot load, or a vTPM key that does not decrypt the vTPM state in it)"
                ) from None
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise QemuError(f"QEMU migration {status}")
            if time.monotonic() > deadline:
                raise QemuError("QEMU migration did not complete in time")
            await deferLater(self.reactor, 0.05, lambda: None)

    # -- the backend interface

    def start(self, bundle: Bundle) -> Deferred[None]:
        """Boot the VM (firmware only, or the Linux guest) and let it run."""
        return Deferred.fromCoroutine(self._start(bundle))

    async def _start(self, bundle: Bundle) -> None:
        await self._spawn(bundle, incoming=False)
        bundle.manifest.state = "running"
        bundle.save()

    def suspend(self, bundle: Bundle) -> Deferred[None]:
        """Stop the VM and write its state into the RAM image; QEMU exits."""
        return Deferred.fromCoroutine(self._suspend(bundle))

    async def _suspend(self, bundle: Bundle) -> None:
        if self._pid(bundle) is None:
            raise BundleError(f"VM {bundle.name} is not running under QEMU")
        ram = bundle.image_path("ram")
        monitor = await self.monitor(bundle)
        await monitor.execute("stop")
        await monitor.execute("migrate", uri=f"exec:cat > {shlex.quote(str(ram))}")
        await self._wait_migration(monitor)
        # The pids now, while their pid files exist: both programs remove
        # them on the way out, before they are gone.
        pids = {program: self._pid(bundle, program) for program in ("qemu", "swtpm")}
        await monitor.execute("quit")
        await monitor.closed
        # swtpm ends when QEMU does; only then is the vTPM's state final.
        await self._ended(bundle, "qemu", pids["qemu"])
        await self._ended(bundle, "swtpm", pids["swtpm"])
        self._remove_sockets(bundle)
        for image in bundle.manifest.images:
            image.size = bundle.image_path(image).stat().st_size
        bundle.manifest.state = "suspended"
        bundle.save()

    def resume(self, bundle: Bundle) -> Deferred[None]:
        """Start QEMU from the RAM image and let the VM run (a QEMU of this
        VM that is already running, paused, is continued instead)."""
        return Deferred.fromCoroutine(self._resume(bundle))

    async def _resume(self, bundle: Bundle) -> None:
        if self._pid(bundle) is not None:
            # Its QEMU runs already, loaded and paused: a live arrival (or the
            # source of a live migration that did not commit). Continue it,
            # its vTPM's state where the bundle now is.
            if bundle.manifest.vtpm:
                self._point_vtpm_link(bundle)
            monitor = await self.monitor(bundle)
            try:
                # An outgoing stream its migrate left running is cancelled first.
                await LiveMigration(self, bundle, monitor).cancel()
            finally:
                monitor.transport.loseConnection()  # type: ignore[union-attr,misc]
            return
        ram = bundle.image_path("ram")
        if not ram.exists():
            # A live arrival has no RAM image: its state was only in the QEMU
            # that loaded the stream.  A QEMU started to read a missing image
            # would wait (and spin) until MIGRATION_TIMEOUT with the VM locked.
            raise QemuError(
                f"VM {bundle.name} has no running QEMU and no RAM image ({ram}) to resume from"
            )
        await self._spawn(bundle, incoming=True)
        try:
            monitor = await self.monitor(bundle)
            await monitor.execute("migrate-incoming", uri=f"exec:cat {shlex.quote(str(ram))}")
            await self._wait_migration(monitor)
            await monitor.execute("cont")
            status = await monitor.execute("query-status")
            if status.get("status") != "running":
                raise QemuError(f"VM {bundle.name} is {status.get('status')} after resume")
            # QEMU serves one QMP client at a time: free it for the next.
            monitor.transport.loseConnection()  # type: ignore[union-attr,misc]
            await monitor.closed
        except BaseException:
            await self.end(bundle)
            raise
        bundle.manifest.state = "running"
        bundle.save()

    def discard(self, bundle: Bundle) -> Deferred[None]:
        """End the VM's QEMU, if any, and remove the bundle."""
        return Deferred.fromCoroutine(self._discard(bundle))

    async def _discard(self, bundle: Bundle) -> None:
        await self.end(bundle)
        # Its images unlinked by a detached remover (files.discard_tree).
        files.discard_tree(bundle.path)

    async def _ended(self, bundle: Bundle, program: str, pid: int | None) -> None:
        """Wait (without blocking the reactor) until ``program`` of this VM,
        process ``pid``, has exited; end it if it takes longer than it should."""
        deadline = time.monotonic() + SWTPM_EXIT_TIMEOUT
        # The pid, not the pid file: programs remove it before they are gone.
        while pid is not None and alive(pid):
            if time.monotonic() > deadline:
                await self._end(bundle, program, self._sleep)
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
                return
            await self._sleep(END_POLL)

    def _sleep(self, seconds: float) -> Deferred[None]:
        """Wait on the reactor's clock."""
        return deferLater(self.reactor, seconds, lambda: None)

    def end(self, bundle: Bundle) -> Deferred[None]:
        """End this VM's QEMU, then its swtpm, by the pids in their pid
        files (processes we started), and remove their sockets: SIGTERM,
        then SIGKILL after :attr:`end_grace`, waiting on the reactor's clock
        (the reactor thread never sleeps)."""
        return Deferred.fromCoroutine(self._end_all(bundle, self._sleep))

    def end_blocking(self, bundle: Bundle) -> None:
        """:meth:`end`, sleeping on this thread: only off the reactor thread
        (the disk executor's worker, the lab's synchronous stop)."""
        _run_blocking(self._end_all(bundle, _sleep_blocking))

    async def _end_all(self, bundle: Bundle, sleep: Sleep) -> None:
        await self._end(bundle, "qemu", sleep)
        await self._end(bundle, "swtpm", sleep)
        self._remove_sockets(bundle)

    def _remove_sockets(self, bundle: Bundle) -> None:
        # QEMU leaves its listening socket behind when it exits.
        for kind in ("qmp", "vtpm", "live"):
            self._socket(bundle, kind).unlink(missing_ok=True)
        self._vtpm_link(bundle).unlink(missing_ok=True)

    async def _end(self, bundle: Bundle, program: str, sleep: Sleep) -> None:
        """SIGTERM ``program`` of this VM, wait up to :attr:`end_grace` for it
        to exit, then SIGKILL it (and wait until it is gone)."""
        pid = self._pid(bundle, program)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.end_grace
        while alive(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                for _ in range(int(1 / END_POLL)):  # gone at once, unless uninterruptible
                    if not alive(pid):
                        return
                    await sleep(END_POLL)
                return
            await sleep(END_POLL)

    def live_source(
        self,
        bundle: Bundle,
        uri: str,
        downtime_limit_ms: int = LIVE_DOWNTIME_LIMIT_MS,
        max_bandwidth: int = LIVE_MAX_BANDWIDTH,
        multifd: int = 0,
    ) -> Deferred[LiveMigration]:
        """Start a live migration of the running VM to ``uri`` (``unix:PATH``
        of a socket securemig listens on): QEMU's pre-copy begins, the guest
        runs on.  ``multifd``: that many multifd channels (0: one stream),
        as the destination's QEMU was told (:meth:`live_destination`)."""
        return Deferred.fromCoroutine(
            _live_source(self, bundle, uri, downtime_limit_ms, max_bandwidth, multifd)
        )

    def live_info(self, bundle: Bundle, copy_storage: bool, parallel: int) -> Deferred[bytes]:
        """Source, before HELLO: ``backend_info`` of a live migration with
        ``parallel`` multifd channels (:func:`multifd_info`); a QEMU guest's
        disk is on shared storage, never copied."""
        if copy_storage:
            raise BundleError(
                f"VM {bundle.name}: --copy-storage is for libvirt domains; a QEMU "
                "guest migrates live with its disk on storage both hosts mount"
            )
        return succeed(multifd_info(parallel))

    def live_channels(self, backend_info: bytes) -> int:
        """Destination: the multifd channels a live arrival's HELLO asks
        for (:func:`multifd_channels`)."""
        return multifd_channels(backend_info)

    def live_socket(self, bundle: Bundle, tag: str = "") -> Path:
        """The unix socket of this VM's live stream (:func:`live_socket`)."""
        return live_socket(bundle, tag)

    def live_destination(
        self, bundle: Bundle, tag: str = "", multifd: int = 0
    ) -> Deferred[LiveMigration]:
        """Start the VM's swtpm (with the released key) and QEMU paused,
        waiting for a live migration on :func:`live_socket` (``tag``: see
        there); ``multifd``: with that many multifd channels besides its
        main one (0: one stream)."""
        return Deferred.fromCoroutine(_live_destination(self, bundle, tag, multifd))

    def query(self, bundle: Bundle, command: str, timeout: float = 30.0, **arguments: Any) -> Any:
        """Run one QMP command on the running VM over a plain blocking
        socket (for synchronous callers such as the demo); its return value.
        QemuError if QEMU refuses it or breaks QMP (the cause says which),
        OSError if its socket does."""
        try:
            return qmp.query(str(self._socket(bundle)), command, timeout, **arguments)
        except qmp.QMPError as e:
            raise QemuError(str(e)) from e

    def guest_memory(self, bundle: Bundle, address: int, size: int) -> bytes:
        """Guest-physical memory of the running VM (QMP ``pmemsave``)."""
        with tempfile.NamedTemporaryFile() as out:
            self.query(bundle, "pmemsave", val=address, size=size, filename=out.name)
            return Path(out.name).read_bytes()

    def console(self, bundle: Bundle) -> Path | None:
        """A Linux guest's console file (a firmware guest prints nothing)."""
        return console_path(bundle) if bundle.manifest.guest == "linux" else None

    def vtpm_attached(self, bundle: Bundle) -> bool:
        """Whether the running VM has its swtpm vTPM as a TPM device."""
        devices = self.query(bundle, "query-tpm")
        return any(d.get("options", {}).get("type") == "emulator" for d in devices) and (
            self._pid(bundle, "swtpm") is not None
        )

    def status(self, bundle: Bundle) -> str:
        """``running`` while QMP says its guest runs; ``paused`` while its
        QEMU runs with the guest stopped (``paused``, ``postmigrate`` after a
        live stream, ``inmigrate`` waiting for one, ...); ``busy`` while its
        QMP does not answer (QEMU serves one client at a time: a migration
        holds it); else what the manifest says (``stopped`` if it says
        running but its QEMU is gone)."""
        if self._pid(bundle) is not None:
            try:
                state = self.query(bundle, "query-status", timeout=STATUS_TIMEOUT).get("status")
            except (OSError, ValueError, QemuError):
                return "busy" if self._pid(bundle) is not None else self.status(bundle)
            return "running" if state == "running" else "paused"
        # The manifest may say running, but its QEMU is gone (ended, crashed).
        return "stopped" if bundle.manifest.state == "running" else bundle.manifest.state

    def has_process(self, bundle: Bundle) -> bool:
        """Whether a QEMU of this VM runs (its guest running or paused)."""
        return self._pid(bundle) is not None


# -- live migration (issue 16): the guest runs while its memory is copied


@dataclass(frozen=True)
class LiveStats:
    """What QEMU reports of a completed (or failed) live migration."""

    status: str
    total_ms: int
    downtime_ms: int
    setup_ms: int
    transferred: int
    iterations: int
    dirty_pages_rate: int
    #: Bytes QEMU sent on its multifd channels (0: one stream, no multifd).
    multifd_bytes: int = 0

    def guest_downtime_ms(self, started: float, running: float) -> int:
        """The guest's downtime as the source can bound it: from when its
        guest stopped (QEMU's completion, ``started`` + total time, less its
        downtime) to ``running`` (``time.monotonic()`` when the destination
        said its guest runs).  Never below the pause from its stop to the
        destination's ``cont``: QEMU counts from a moment after ``started``,
        and ``cont`` came before DONE.  (The guest's own view adds its first
        steps after ``cont``.)"""
        stopped = started + (self.total_ms - self.downtime_ms) / 1000
        return max(self.downtime_ms, round((running - stopped) * 1000))

    @classmethod
    def of(cls, info: dict[str, Any]) -> LiveStats:
        """From ``query-migrate``'s answer at the source."""
        ram = info.get("ram", {})
        return cls(
            status=str(info.get("status", "")),
            total_ms=int(info.get("total-time", 0)),
            downtime_ms=int(info.get("downtime", info.get("expected-downtime", 0))),
            setup_ms=int(info.get("setup-time", 0)),
            transferred=int(ram.get("transferred", 0)),
            iterations=int(ram.get("dirty-sync-count", 0)),
            dirty_pages_rate=int(ram.get("dirty-pages-rate", 0)),
            multifd_bytes=int(ram.get("multifd-bytes", 0)),
        )


class LiveMigration:
    """The QEMU side of one live migration of a running VM, at the source
    (:meth:`QemuBackend.live_source`) or the destination
    (:meth:`QemuBackend.live_destination`).

    The order is the two-phase commit's: the destination's QEMU waits
    paused (``-incoming defer -S``) on a unix socket; the source's QEMU
    sends its pre-copy stream to a unix socket securemig listens on (and
    relays); :meth:`wait` returns when QEMU says completed (source paused
    in ``postmigrate``, destination loaded and paused).  Then exactly one
    of: the destination :meth:`cont` (after the commit) and the source
    :meth:`finish` (its QEMU and swtpm end), or, before the commit, the
    source :meth:`cont` (the guest goes on where it was) and the
    destination :meth:`abandon` (its QEMU ends)."""

    def __init__(self, backend: QemuBackend, bundle: Bundle, monitor: qmp.QMPProtocol) -> None:
        self.backend = backend
        self.bundle = bundle
        self.monitor = monitor
        #: At the destination: the unix socket its QEMU listens on for the stream.
        self.socket: Path | None = None
        #: At the source: ``time.monotonic()`` just before QEMU was told to
        #: migrate (its total time counts from then), for the guest's downtime.
        self.started: float | None = None

    async def query(self) -> dict[str, Any]:
        """``query-migrate``; a QEMU that exited says so."""
        try:
            info: dict[str, Any] = await self.monitor.execute("query-migrate")
        except qmp.Interrupted:
            raise QemuError(
                f"the QEMU of VM {self.bundle.name} exited during the migration"
            ) from None
        return info

    async def wait(self, timeout: float = MIGRATION_TIMEOUT) -> LiveStats:
        """Until QEMU says the migration completed; its numbers.  QemuError
        if it failed, was cancelled, or QEMU exited."""
        deadline = time.monotonic() + timeout
        reactor = self.backend.reactor
        # Woken by QEMU's MIGRATION event (its status changed; the "events"
        # capability is on) as soon as it comes, else after LIVE_POLL: the
        # completion is on the guest's switchover path, a poll's wait is not.
        sleepers: list[Deferred[None]] = []

        def wake(_: object = None) -> None:
            for sleeper in sleepers:
                if not sleeper.called:
                    sleeper.callback(None)
            sleepers.clear()

        event: Deferred[Any] | None = None
        while True:
            info = await self.query()
            status = info.get("status")
            if status == "completed":
                return await self._completed(info)
            if status in ("failed", "cancelled"):
                reason = info.get("error-desc", status)
                raise QemuError(f"QEMU live migration of VM {self.bundle.name} {status}: {reason}")
            if time.monotonic() > deadline:
                raise QemuError(
                    f"QEMU live migration of VM {self.bundle.name} did not complete in time"
                )
            if event is None or event.called:
                event = self.monitor.event("MIGRATION")
                event.addBoth(wake)
            sleeper: Deferred[None] = Deferred()
            sleepers.append(sleeper)
            call = reactor.callLater(LIVE_POLL, wake)
            await sleeper
            if call.active():
                call.cancel()

    async def _completed(self, info: dict[str, Any]) -> LiveStats:
        """The numbers of a completed migration.  At the source QEMU says
        ``completed`` (and sends its MIGRATION event) a moment before it has
        stored the total time and downtime: woken by that event, the first
        ``query-migrate`` read both as 0 (seen in bench --live's qemu-tls
        moves).  So a source's answer without them is asked again, briefly."""
        for _ in range(50):
            if "ram" not in info or info.get("total-time"):
                break  # the destination's has none to wait for
            await deferLater(self.backend.reactor, 0.002, lambda: None)
            info = await self.query()
        return LiveStats.of(info)

    async def run_state(self) -> str:
        """QEMU's run state: ``running``, ``paused``, ``postmigrate``, ..."""
        return str((await self.monitor.execute("query-status")).get("status"))

    async def waits_loaded(self) -> bool:
        """At the destination, before the commit: whether its QEMU is still
        there with the loaded guest paused (never run)."""
        if not self.backend.has_process(self.bundle):
            return False
        try:
            await self.run_state()
        except qmp.QMPError:
            return False
        return self.backend.has_process(self.bundle)

    async def cont(self) -> None:
        """Let the guest run (here): at the destination after the commit, at
        the source when the migration is abandoned before it."""
        if await self.run_state() != "running":
            await self.monitor.execute("cont")
        if await self.run_state() != "running":
            raise QemuError(f"VM {self.bundle.name} does not run after cont")
        self.bundle.manifest.state = "running"
        self.bundle.save()

    async def alive_moved(self, bundle: Bundle) -> bool:
        """At the destination, after the move into place: whether its QEMU
        (the pid file the move carried along) still runs."""
        return await self.backend.process_alive(bundle)

    async def continue_moved(self, bundle: Bundle) -> bool:
        """At the destination, after the commit: the bundle moved into
        place.  Its QMP connection, opened when the stream started, outlived
        the move (a connected socket does not care that its file was
        renamed): the vTPM link is pointed at the moved state before any TPM
        command can write it, then ``cont`` on that connection; a reconnect
        (greeting, capabilities) and a migration query would be on the
        guest's switchover path."""
        self.bundle = bundle
        if bundle.manifest.vtpm:
            self.backend._point_vtpm_link(bundle)
        try:
            await self.cont()
        finally:
            self.release()
        return True

    async def cancel(self) -> None:
        """At the source, before the commit: stop sending (if QEMU still is)
        and let the guest go on here."""
        with contextlib.suppress(qmp.QMPError):
            if (await self.query()).get("status") in (
                "setup",
                "active",
                "pre-switchover",
                "device",
            ):
                await self.monitor.execute("migrate_cancel")
                for _ in range(250):
                    if (await self.query()).get("status") not in ("active", "cancelling"):
                        break
                    await deferLater(self.backend.reactor, 0.02, lambda: None)
        await self.cont()

    def abandon(self) -> Deferred[None]:
        """At the destination, before the commit: end its QEMU and swtpm."""
        self.release()
        return self.backend.end(self.bundle)

    async def finish(self) -> None:
        """At the source, after the commit: end its QEMU, then its swtpm."""
        pids = {program: self.backend._pid(self.bundle, program) for program in ("qemu", "swtpm")}
        with contextlib.suppress(qmp.QMPError):
            await self.monitor.execute("quit")
        await self.backend._ended(self.bundle, "qemu", pids["qemu"])
        await self.backend._ended(self.bundle, "swtpm", pids["swtpm"])
        await self.backend.end(self.bundle)

    def release(self) -> None:
        """Let go of the QMP connection (QEMU serves one client at a time),
        and of the stream's socket (the stream is over)."""
        self.monitor.transport.loseConnection()  # type: ignore[union-attr,misc]
        if self.socket is not None:
            self.socket.unlink(missing_ok=True)


def live_socket(bundle: Bundle, tag: str = "") -> Path:
    """The unix socket of a live migration's stream for this VM: where the
    destination's QEMU listens, or where securemig listens for the source's.
    ``tag`` (the migration id and the side) makes it one migration's own: a
    name derived from the bundle alone is the same for the source of a VM
    and an arrival of it that was moved into place there."""
    if tag:
        return runtime.current() / f"live-{tag}.sock"
    return QemuBackend._socket(bundle, "live")


def multifd_info(channels: int) -> bytes:
    """HELLO's ``backend_info`` of a QEMU live migration with ``channels``
    multifd channels: empty for none (the HELLO earlier releases read),
    else ``{"multifd": N}``.  BundleError for N outside 0 to
    :data:`MAX_MULTIFD_CHANNELS`."""
    if not 0 <= channels <= MAX_MULTIFD_CHANNELS:
        raise BundleError(f"--parallel: 1 to {MAX_MULTIFD_CHANNELS} multifd channels")
    return json.dumps({"multifd": channels}).encode() if channels else b""


def multifd_channels(backend_info: bytes) -> int:
    """The multifd channels a QEMU live arrival's HELLO asks for
    (:func:`multifd_info`); BundleError for anything else (a source is
    attested, not trusted to size the destination's threads and sockets)."""
    if not backend_info:
        return 0
    try:
        raw = json.loads(backend_info)
        channels = raw["multifd"]
        if set(raw) != {"multifd"}:
            raise ValueError(f"unknown fields {sorted(set(raw) - {'multifd'})}")
    except (ValueError, TypeError, KeyError) as e:
        raise BundleError(f"the arriving QEMU guest's live parameters are malformed: {e}") from None
    if type(channels) is not int or not 1 <= channels <= MAX_MULTIFD_CHANNELS:
        raise BundleError(
            f"the arriving QEMU guest asks for {channels!r} multifd channels "
            f"(1 to {MAX_MULTIFD_CHANNELS})"
        )
    return channels


async def set_multifd(monitor: qmp.QMPProtocol, channels: int) -> None:
    """Tell one QEMU to migrate with ``channels`` multifd channels, or none
    (0): both QEMUs must agree before ``migrate-incoming`` / ``migrate``.
    Set either way: a QEMU that arrived with multifd keeps the capability,
    and its next migration (one stream) would otherwise open channels the
    other side does not expect."""
    await monitor.execute(
        "migrate-set-capabilities",
        capabilities=[{"capability": "multifd", "state": bool(channels)}],
    )
    if channels:
        await monitor.execute("migrate-set-parameters", **{"multifd-channels": channels})


async def _live_source(
    backend: QemuBackend,
    bundle: Bundle,
    uri: str,
    downtime_limit_ms: int,
    max_bandwidth: int,
    multifd: int = 0,
) -> LiveMigration:
    if backend._pid(bundle) is None:
        raise BundleError(f"VM {bundle.name} is not running under QEMU")
    monitor = await backend.monitor(bundle)
    await set_multifd(monitor, multifd)
    await monitor.execute(
        "migrate-set-parameters",
        **{"downtime-limit": downtime_limit_ms, "max-bandwidth": max_bandwidth},
    )
    await _migration_events(monitor)
    started = time.monotonic()
    await monitor.execute("migrate", uri=uri)
    live = LiveMigration(backend, bundle, monitor)
    live.started = started
    return live


async def _migration_events(monitor: qmp.QMPProtocol) -> None:
    """Have QEMU send a MIGRATION event at each change of its migration's
    status (:meth:`LiveMigration.wait` wakes on it rather than polling)."""
    await monitor.execute(
        "migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}]
    )


async def _live_destination(
    backend: QemuBackend, bundle: Bundle, tag: str, multifd: int = 0
) -> LiveMigration:
    (bundle.path / vtpm.STATE_DIR).mkdir(exist_ok=True)
    socket = live_socket(bundle, tag)
    socket.unlink(missing_ok=True)
    await backend._spawn(bundle, incoming=True)
    try:
        monitor = await backend.monitor(bundle)
        await set_multifd(monitor, multifd)
        await _migration_events(monitor)
        await monitor.execute("migrate-incoming", uri=f"unix:{socket}")
    except BaseException:
        await backend.end(bundle)
        socket.unlink(missing_ok=True)
        raise
    live = LiveMigration(backend, bundle, monitor)
    live.socket = socket
    return live

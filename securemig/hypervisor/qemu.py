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

No guest OS is needed to show that state moved: a bundle may carry
``marker.bin``, which QEMU's loader device places at guest-physical
``MARKER_ADDRESS``; tests read it back with ``pmemsave``.  Not yet here:
the VM's vTPM attached through swtpm and its ``--migration-key``.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from securemig import storage
from securemig.bundle import Bundle, BundleError
from securemig.hypervisor import qmp

MARKER_ADDRESS = 0x200000
PACKAGE = "qemu-system-x86"
MIGRATION_TIMEOUT = 300.0


class QemuError(RuntimeError):
    """QEMU could not do what was asked; the message says what and why."""


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


class QemuBackend:
    """QEMU over QMP; one QEMU process per VM, tracked by its pid file."""

    name = "qemu"

    def __init__(self, reactor: Any = None, memory_mib: int = 64) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reactor = reactor
        self.memory_mib = memory_mib

    # -- files of a running VM

    @staticmethod
    def _socket(bundle: Bundle) -> Path:
        # Unix socket paths are limited to 107 bytes: keep it short, derived
        # from the bundle's path so every command finds it.
        digest = hashlib.sha256(str(bundle.path.absolute()).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"securemig-qmp-{digest}.sock"

    def monitor(self, bundle: Bundle) -> Deferred[qmp.QMPProtocol]:
        """A QMP connection to the VM's QEMU."""
        return Deferred.fromCoroutine(qmp.connect(self.reactor, str(self._socket(bundle))))

    @staticmethod
    def _pidfile(bundle: Bundle) -> Path:
        return bundle.path / "qemu.pid"

    def _pid(self, bundle: Bundle) -> int | None:
        try:
            pid = int(self._pidfile(bundle).read_text())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def _argv(self, bundle: Bundle, incoming: bool) -> list[str]:
        argv = [
            qemu_binary(),
            "-machine",
            "pc",
            "-accel",
            accelerator(),
            "-m",
            str(bundle.manifest.memory_mib or self.memory_mib),
            "-display",
            "none",
            "-nodefaults",
            "-serial",
            "none",
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

    def _spawn(self, bundle: Bundle, incoming: bool) -> None:
        self._socket(bundle).unlink(missing_ok=True)
        result = subprocess.run(
            self._argv(bundle, incoming), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise QemuError(f"QEMU did not start: {(result.stderr or result.stdout).strip()}")

    async def _wait_migration(self, monitor: qmp.QMPProtocol) -> None:
        deadline = time.monotonic() + MIGRATION_TIMEOUT
        while True:
            status = (await monitor.execute("query-migrate")).get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise QemuError(f"QEMU migration {status}")
            if time.monotonic() > deadline:
                raise QemuError("QEMU migration did not complete in time")
            await deferLater(self.reactor, 0.05, lambda: None)

    # -- the backend interface

    def start(self, bundle: Bundle) -> Deferred[None]:
        """Boot the VM (firmware only is enough) and let it run."""
        return Deferred.fromCoroutine(self._start(bundle))

    async def _start(self, bundle: Bundle) -> None:
        self._spawn(bundle, incoming=False)
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
        await monitor.execute("quit")
        await monitor.closed
        for image in bundle.manifest.images:
            if image.name == "ram":
                image.size = ram.stat().st_size
        bundle.manifest.state = "suspended"
        bundle.save()

    def resume(self, bundle: Bundle) -> Deferred[None]:
        """Start QEMU from the RAM image and let the VM run."""
        return Deferred.fromCoroutine(self._resume(bundle))

    async def _resume(self, bundle: Bundle) -> None:
        self._spawn(bundle, incoming=True)
        try:
            monitor = await self.monitor(bundle)
            ram = bundle.image_path("ram")
            await monitor.execute("migrate-incoming", uri=f"exec:cat {shlex.quote(str(ram))}")
            await self._wait_migration(monitor)
            await monitor.execute("cont")
            status = await monitor.execute("query-status")
            if status.get("status") != "running":
                raise QemuError(f"VM {bundle.name} is {status.get('status')} after resume")
            monitor.transport.loseConnection()  # type: ignore[union-attr,misc]
        except BaseException:
            self.end(bundle)
            raise
        bundle.manifest.state = "running"
        bundle.save()

    def discard(self, bundle: Bundle) -> Deferred[None]:
        """End the VM's QEMU, if any, and remove the bundle."""
        self.end(bundle)
        return Deferred.fromCoroutine(self._remove(bundle))

    async def _remove(self, bundle: Bundle) -> None:
        storage.remove_tree(bundle.path)

    def end(self, bundle: Bundle) -> None:
        """End the QEMU of this VM by the pid in its pid file (ours)."""
        pid = self._pid(bundle)
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        for _ in range(200):
            if self._pid(bundle) is None:
                return
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)

    def guest_memory(self, bundle: Bundle, address: int, size: int) -> bytes:
        """Guest-physical memory of the running VM, read over QMP with a plain
        blocking socket (for synchronous callers such as the demo)."""
        import json
        import socket

        with tempfile.NamedTemporaryFile() as out, socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(str(self._socket(bundle)))
            stream = sock.makefile("rw")
            stream.readline()  # greeting
            for command in (
                {"execute": "qmp_capabilities"},
                {
                    "execute": "pmemsave",
                    "arguments": {"val": address, "size": size, "filename": out.name},
                },
            ):
                stream.write(json.dumps(command) + "\n")
                stream.flush()
                while True:
                    reply = json.loads(stream.readline())
                    if "error" in reply:
                        raise QemuError(reply["error"].get("desc", "QMP error"))
                    if "return" in reply:
                        break
            return Path(out.name).read_bytes()

    def status(self, bundle: Bundle) -> str:
        """``running`` while its QEMU runs, else what the manifest says."""
        if self._pid(bundle) is not None:
            return "running"
        # The manifest may say running, but its QEMU is gone (ended, crashed).
        return "stopped" if bundle.manifest.state == "running" else bundle.manifest.state

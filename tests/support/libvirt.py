"""A libvirt domain's secret sealed to, and unsealed by, the shared TPM;
what any root user of a lab libvirt host would try to read it; the two lab
libvirt hosts the migration tests share, and a domain's removal."""

from __future__ import annotations

import atexit
import subprocess
import threading
import time

from securemig.hypervisor.bundle import Bundle
from securemig.hypervisor.libvirt import require_libvirt
from securemig.lab.libvirt import LibvirtHost
from securemig.trust.attestor import DEFAULT_PCRS
from securemig.trust.tpm.tpm import KeyBlob

from .tpm import shared_tpm


def seal(value: bytes) -> bytes:
    """Seal to the test's host TPM, as ``securemig vm adopt --identity`` does."""
    tpm = shared_tpm()[1]
    return tpm.seal(value, DEFAULT_PCRS, tpm.pcr_read(DEFAULT_PCRS)).to_bytes()


def unseal(bundle: Bundle) -> bytes:
    """The bundle's secret value, unsealed by the test's host TPM."""
    tpm = shared_tpm()[1]
    return tpm.unseal(KeyBlob.from_bytes(bundle.vtpm_key_path.read_bytes()), DEFAULT_PCRS)


def virsh_secret_value(host: LibvirtHost, secret_uuid: str) -> subprocess.CompletedProcess[str]:
    """``virsh secret-get-value`` as any root user of the host would try."""
    return subprocess.run(
        ["virsh", "-c", host.uri, "secret-get-value", secret_uuid],
        capture_output=True,
        text=True,
        check=False,
    )


class SecretWatch:
    """Asks ``virsh secret-get-value`` on every host, over and over, from a
    thread, for the whole migration: what any root user could try.  Records
    every answer that printed a value."""

    def __init__(self, hosts: list[LibvirtHost], secret_uuid: str) -> None:
        self.leaks: list[str] = []
        self.asked = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(hosts, secret_uuid), daemon=True)
        self._thread.start()

    def _run(self, hosts: list[LibvirtHost], secret_uuid: str) -> None:
        while not self._stop.is_set():
            for host in hosts:
                answer = subprocess.run(
                    ["virsh", "-c", host.uri, "secret-get-value", secret_uuid],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                self.asked += 1
                if answer.returncode == 0 or answer.stdout.strip():
                    self.leaks.append(f"{host.name}: {answer.stdout.strip()}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


_hosts: dict[tuple[tuple[str, int], ...], list[LibvirtHost]] = {}


def shared_hosts(pair: tuple[tuple[str, int], ...] = (("ma", 3), ("mb", 4))) -> list[LibvirtHost]:
    """Two lab libvirtds (``pair``: their names and indexes) for the
    migration tests, started once per test process and stopped with what
    they started at exit."""
    if pair not in _hosts:
        hosts = _hosts[pair] = []
        for name, index in pair:
            host = LibvirtHost(name, index)
            atexit.register(host.remove)
            host.start()
            hosts.append(host)
    return _hosts[pair]


def remove_domain(host: LibvirtHost, name: str) -> None:
    """Destroy and undefine a test's domain (with its vTPM state) if left
    (a transient one goes with destroy), over a fresh connection (the
    host's libvirtd may have been restarted)."""
    libvirt = require_libvirt()
    conn = libvirt.open(host.uri)
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            return
        persistent = dom.isPersistent()  # a transient one goes with destroy
        if dom.isActive():
            dom.destroy()
        if persistent:
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_TPM)
    finally:
        conn.close()

"""
The lab's libvirt hosts (:mod:`securemig.lab.libvirt`): real ``libvirtd``s in
their own mount namespaces, the project's Linux guest as a domain with an
encrypted ``tpm-crb`` vTPM, a NIC and a raw or qcow2 disk.
"""

from __future__ import annotations

import hashlib
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from securemig.hypervisor import guest as linux_guest
from securemig.hypervisor.heartbeat import Watch
from securemig.hypervisor.libvirt import LibvirtError, require_libvirt
from securemig.lab.libvirt import LibvirtHost, define_guest, libvirtd_binary


def extended(value: str) -> str:
    """PCR 16 after one extend of ``value`` from zero."""
    return hashlib.sha256(bytes(32) + bytes.fromhex(value)).hexdigest()


class LibvirtHostTests(SynchronousTestCase):
    """Two lab hosts, each one libvirtd in its own mount namespace."""

    def setUp(self) -> None:
        self.hosts = [LibvirtHost("a", 0), LibvirtHost("b", 1)]
        for host in self.hosts:
            self.addCleanup(host.remove)
            host.start()

    def test_two_hosts_boot_the_guest(self) -> None:
        """Each host is its own libvirt (distinct host UUID, socket, disks):
        the Linux guest boots on both -- raw disk on one, qcow2 on the other
        -- with its encrypted vTPM (PCR 16 extended by the guest) and a NIC;
        stopping a host ends libvirtd and the QEMU and swtpm it started."""
        libvirt = require_libvirt()
        uuids = set()
        watches = []
        for host, disk_format in zip(self.hosts, ("raw", "qcow2"), strict=True):
            domain = define_guest(host, "guest", disk_format=disk_format)
            conn = libvirt.open(host.uri)
            self.addCleanup(conn.close)
            caps = ET.fromstring(conn.getCapabilities())
            uuids.add(caps.findtext("host/uuid"))
            xml = ET.fromstring(conn.lookupByName("guest").XMLDesc())
            self.assertEqual(xml.find("devices/disk/driver").get("type"), disk_format)
            self.assertEqual(xml.find("devices/tpm").get("model"), "tpm-crb")
            self.assertIsNotNone(xml.find("devices/tpm/backend/encryption"))
            self.assertEqual(xml.find("devices/interface").get("type"), "user")
            self.assertTrue(host.path(domain.disk).exists())
            heartbeat = host.path(domain.heartbeat)
            watches.append(Watch(heartbeat))
            conn.lookupByName("guest").create()
        self.assertEqual(len(uuids), 2)
        for watch in watches:
            self.addCleanup(watch.stop)
            beat = watch.wait(3, timeout=120)
            self.assertEqual(beat.pcr16, extended(linux_guest.DEFAULT_PCR16))
        # Disks and logs live in each host's own trees.
        self.assertNotEqual(self.hosts[0].path(domain.disk), self.hosts[1].path(domain.disk))
        children = {host.name: host.children() for host in self.hosts}
        self.assertTrue(all(len(pids) >= 2 for pids in children.values()), children)
        for host in self.hosts:
            daemon = host.process
            host.stop()
            assert daemon is not None
            self.assertIsNotNone(daemon.poll())
            self.assertEqual(host.children(), [])
            for pid in children[host.name]:
                self.assertFalse(_alive(pid), f"pid {pid} of host {host.name} still runs")


def _alive(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state == "Z":
            return False
        time.sleep(0.05)
    return True


class MissingLibvirtTests(SynchronousTestCase):
    """What a machine without libvirt is told."""

    def test_missing_daemon_names_the_package(self) -> None:
        """No libvirtd on the search path: the error names the Debian package."""
        with self.assertRaises(LibvirtError) as caught:
            libvirtd_binary("/nonexistent")
        self.assertIn("libvirt-daemon-system", str(caught.exception))

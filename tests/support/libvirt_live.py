"""The fixture of libvirt domains migrated by the real securemig commands:
two lab libvirt hosts, source-a's and dest-b's enrolled identities, an
adopted and started domain, a ``twistd securemig --backend libvirt``
destination, and the checks every such test makes."""

from __future__ import annotations

import os
from typing import Any

from securemig.hypervisor.bundle import Bundle
from securemig.hypervisor.heartbeat import Watch
from securemig.hypervisor.libvirt import (
    CONNECT_ENV,
    RUN_DIR_ENV,
    UNSAFE_SHARED_ENV,
    require_libvirt,
)
from securemig.lab import processes
from securemig.lab.libvirt import LibvirtHost, define_guest

from .libvirt import remove_domain, shared_hosts
from .secure import SecureBase


class LibvirtLiveBase(SecureBase):
    """source-a's libvirtd runs an adopted, started domain; dest-b's
    securemig daemon serves its own libvirtd."""

    timeout = 900

    def setUp(self) -> None:
        super().setUp()
        self.a, self.b = shared_hosts()
        self.libvirt = require_libvirt()
        self.pcr16 = os.urandom(32).hex()

    def env(self, host: LibvirtHost) -> dict[str, str]:
        """What a securemig process of ``host`` is told of its libvirt."""
        return {CONNECT_ENV: host.uri, RUN_DIR_ENV: str(host.run_dir)}

    def start_libvirt_destination(self, **env: str) -> processes.Destination:
        """dest-b's ``twistd securemig --backend libvirt`` (``env`` added to
        what it is told of its libvirt)."""
        state = self.base / "dst"
        state.mkdir(parents=True, exist_ok=True)
        process, port = processes.start_twistd(
            "securemig",
            "--state-dir", str(state),
            "--listen", "tcp:0:interface=127.0.0.1",
            "--identity", str(self.dst_id),
            "--policy-dir", str(self.dst_policy),
            "--tofu",
            "--backend", "libvirt",
            port_file=self.base / "port",
            log_file=self.base / "dst.log",
            env={**self.env(self.b), **env},
        )  # fmt: skip
        destination = processes.Destination(process, port, state, self.base / "dst.log")
        self.addCleanup(destination.stop)
        return destination

    def adopted_guest(self, name: str, shared_disk: str | None = None) -> tuple[Any, Bundle, Watch]:
        """The Linux guest defined at source-a, adopted (its secret sealed to
        source-a's TPM, libvirt's copy undefined) and started; its disk the
        host's own, or a qcow2 at ``shared_disk`` both hosts see."""
        if shared_disk is None:
            domain = define_guest(self.a, name, pcr16=self.pcr16, persistent_secret=True)
        else:
            domain = define_guest(
                self.a,
                name,
                disk_format="qcow2",
                pcr16=self.pcr16,
                persistent_secret=True,
                disk=shared_disk,
            )
        for host in (self.a, self.b):
            self.addCleanup(remove_domain, host, name)
        adopt = processes.securemig(
            "vm", "adopt", name, "--dir", str(self.vm_dir), "--identity", str(self.src_id),
            "--connect", self.a.uri,
        )  # fmt: skip
        self.assertEqual(adopt.returncode, 0, adopt.stderr)
        start = processes.securemig(
            "vm", "start", name, "--dir", str(self.vm_dir), "--identity", str(self.src_id)
        )
        self.assertEqual(start.returncode, 0, start.stderr)
        watch = Watch(self.a.path(domain.heartbeat))
        self.addCleanup(watch.stop)
        # Kept (in the test's temporary directory): the lab hosts and their
        # domains' files go when the test process ends.
        self.addCleanup(watch.save, self.base / "consoles")
        return domain, Bundle.find(self.vm_dir, name), watch

    def migrate_domain(
        self,
        destination: processes.Destination,
        name: str,
        *extra: str,
        unsafe_shared: bool = False,
        dying: dict[str, str] | None = None,
    ) -> Any:
        """``securemig migrate NAME --live`` from source-a; ``unsafe_shared``:
        the disk is shared, which libvirt cannot tell on one machine;
        ``dying``: a crash point's environment."""
        env = {**os.environ, **self.env(self.a), **(dying or {})}
        if unsafe_shared:
            env[UNSAFE_SHARED_ENV] = "1"
        return self.migrate(destination, "--live", "--tofu", *extra, vm=name, env=env)

    def state_at(self, host: LibvirtHost, name: str) -> str:
        conn = self.libvirt.open(host.uri)
        try:
            try:
                return str(conn.lookupByName(name).state()[0])
            except self.libvirt.libvirtError:
                return "undefined"
        finally:
            conn.close()

    def assertSecretNowhere(self, secret_uuid: str) -> None:
        """No libvirt holds the secret, and no file of either host's libvirt
        trees names it."""
        for host in (self.a, self.b):
            conn = self.libvirt.open(host.uri)
            try:
                with self.assertRaises(self.libvirt.libvirtError):
                    conn.secretLookupByUUIDString(secret_uuid)
            finally:
                conn.close()
            secrets = host.path("/etc/libvirt/secrets")
            found = list(secrets.glob(f"{secret_uuid}*")) if secrets.exists() else []
            self.assertEqual(found, [], host.name)

"""
A lab on loopback: a site CA, a privacy CA and two enrolled hosts.

``securemig demo`` and ``securemig bench`` both need the whole system on one
machine: two swtpm host TPMs whose EK certificates come from a local
"vendor" CA, a real ``twistd securemig-pca`` over HTTPS, both hosts set up
with ``securemig host init`` logic (TLS identity, AK, enrollment), and
destinations started as real ``twistd securemig`` processes.  Every process
is ended by its pid when the lab stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from securemig import files, runtime
from securemig.hypervisor import backends
from securemig.hypervisor.bundle import Bundle, set_disk_owner
from securemig.lab import processes
from securemig.trust.attestor import open_attestor
from securemig.trust.identity import Identity, init_host, issue_tls
from securemig.trust.pca.core import PrivacyCA
from securemig.trust.pki import Authority
from securemig.trust.revocation import for_identity as revocation_for
from securemig.trust.tpm import swtpm
from securemig.trust.vtpm import CA_DIR as VTPM_CA_DIR

SOURCE, DESTINATION = "source-a", "dest-b"


class Lab:
    """Two enrolled hosts in ``work``; :meth:`start` builds them, :meth:`stop`
    ends every process."""

    def __init__(
        self, work: Path, say: Callable[..., None] = lambda *a: None, link: Any = None
    ) -> None:
        self.work = work
        self.say = say
        #: With a :class:`~securemig.lab.bench.link.Link`, destinations run behind it.
        self.link = link
        self.vm_dir = work / "vms"
        self._stops: list[Callable[[], object]] = []
        #: The lab's TPMs are its own: their lock files go to its run
        #: directory, not the machine's temporary directory, and so do the
        #: sockets of what the lab process starts itself (runtime.own_run_dir).
        self._locks = contextlib.ExitStack()

    def start(self) -> None:
        """Site CA, two host TPMs, the privacy CA, both hosts enrolled."""

        work, started = self.work, time.monotonic()
        self._locks.enter_context(runtime.own_run_dir(work))
        site = Authority.create("lab site CA")
        site.save(work / "site-ca")
        tctis = {host: self._host_tpm(host) for host in (SOURCE, DESTINATION)}
        self.say(
            f"   two swtpm host TPMs with EK certificates ({time.monotonic() - started:.1f} s)"
        )
        # Hosts enroll with their site-CA TLS certificates (mutual TLS to the PCA).
        PrivacyCA.init(
            work / "pca", swtpm.ca_certificates(self._vendor), site_ca=work / "site-ca" / "ca.pem"
        )
        tls = work / "pca-tls"
        tls.mkdir()
        issue_tls(site, "localhost", tls)
        pca, port = processes.start_pca(work / "pca", tls, work)
        self._stops.append(lambda: processes.end_process(pca))
        self.pca_url = f"https://localhost:{port}"
        self.say(f"   privacy CA `twistd securemig-pca` on {self.pca_url}")
        for host in (SOURCE, DESTINATION):
            self._enroll(host, tctis[host])

    @property
    def _vendor(self) -> Path:
        return self.work / "tpm-vendor-ca"

    def _host_tpm(self, host: str) -> str:
        """Provision and start ``host``'s swtpm host TPM; returns its TCTI."""
        swtpm.provision(self.work / f"tpm-{host}", self._vendor)
        # Behind a link, the destination reaches its TPM across it.
        tpm_ip = self.link.host_ip if self._behind_link(host) else "127.0.0.1"
        tpm = swtpm.start(self.work / f"tpm-{host}", host=tpm_ip)
        self._stops.append(tpm.stop)
        return tpm.tcti

    def _enroll(self, host: str, tcti: str) -> None:
        t = time.monotonic()
        work = self.work
        init_host(work / host, host, tcti, work / "site-ca", self.pca_url, work / "pca" / "ca.pem")
        self.say(
            f"   host {host}: TLS certificate, AK, enrolled (authorized by its site-CA "
            f"TLS certificate, EK certificate checked, credential activated) in "
            f"{time.monotonic() - t:.2f} s"
        )

    def add_host(self, host: str) -> None:
        """One more host (after :meth:`start`): its own swtpm host TPM, TLS
        identity and AK, enrolled with the lab's privacy CA.  A source named
        other than :data:`SOURCE` keeps its VMs in :meth:`vm_dir_of`."""
        self._enroll(host, self._host_tpm(host))

    def vm_dir_of(self, source: str) -> Path:
        """Where ``source``'s VMs live."""
        return self.vm_dir if source == SOURCE else self.work / f"vms-{source}"

    def _behind_link(self, host: str) -> bool:
        return self.link is not None and host == DESTINATION

    def address_of(self, host: str) -> str:
        """The IP address ``host``'s destination listens on."""
        return str(self.link.ns_ip) if self._behind_link(host) else "127.0.0.1"

    def on_stop(self, stop: Callable[[], object]) -> None:
        """Also do this when the lab stops (before its own processes end)."""
        self._stops.append(stop)

    def stop(self) -> None:
        """End every process the lab started, and then the guests (QEMUs and
        swtpms) a live arrival left in its hosts' staging (by the records
        there): it outlives the daemon that started it when a run fails."""
        for stop in reversed(self._stops):
            stop()
        self._stops.clear()
        for staged in sorted(self.work.glob("*/staging/*/")):
            backends.end_started_blocking(staged)
        # The runtime directories of its hosts' state directories that are
        # not inside them (a deep work directory): empty once all ended.
        for journal in sorted(self.work.glob("**/journal.sqlite")):
            runtime.remove_if_empty(runtime.for_state_dir(journal.parent))
        self._locks.close()

    def start_destination(
        self,
        keep: bool = True,
        host: str = DESTINATION,
        cipher: str | None = None,
        backend: str = backends.DEFAULT,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        port: int = 0,
    ) -> processes.Destination:
        """A ``twistd securemig`` for ``host`` (dest-b by default), secure and
        insecure listeners, ``extra`` options, ``env`` added to its
        environment (a lab libvirt host's ``LIBVIRT_DEFAULT_URI``), its
        secure listener on ``port`` (0: any; a daemon restarted after a
        crash takes its old one).  With ``keep`` the lab ends it at
        :meth:`stop`; else the caller does."""
        name = "destination" if host == DESTINATION else f"destination-{host}"
        if self._behind_link(host):
            # Behind the link the daemon cannot reach the privacy CA on this
            # side's loopback: it judges sources by the revocation list
            # fetched here for it (fresh for its --crl-max-age).
            identity = Identity.load(self.work / host)
            revocation = revocation_for(identity.directory, None, identity.pca_url)
            assert revocation is not None  # init_host records the PCA's URL
            revocation.fetch()
        state = self.work / name
        state.mkdir(exist_ok=True)
        insecure_port_file = self.work / f"{name}.insecure.port"
        insecure_port_file.unlink(missing_ok=True)
        process, port = processes.start_twistd(
            "securemig",
            "--state-dir",
            str(state),
            "--identity",
            str(self.work / host),
            "--listen",
            f"tcp:{port}:interface={self.address_of(host)}",
            "--insecure-listen",
            f"tcp:0:interface={self.address_of(host)}",
            "--insecure-port-file",
            str(insecure_port_file),
            "--tofu",
            *(["--tls-cipher", cipher] if cipher else []),
            "--backend",
            backend,
            *extra,
            port_file=self.work / f"{name}.port",
            log_file=self.work / f"{name}.log",
            wrapper=self.link.wrapper if self._behind_link(host) else (),
            env=env,
        )
        destination = processes.Destination(process, port, state, self.work / f"{name}.log")
        # The two listeners bind independently: wait for the second as well.
        try:
            destination.insecure_port = processes.wait_for_port(insecure_port_file, process)
        except BaseException:
            destination.stop()
            raise
        if keep:
            self._stops.append(destination.stop)
        return destination

    def start_source_daemon(self, source: str = SOURCE) -> processes.Destination:
        """The source host's own ``twistd securemig`` on the state directory
        :meth:`migrate` journals in, with its identity: the daemon that
        ``migrate --daemon`` asks to drive the migration.  The caller ends it."""
        name = f"{source}-daemon"
        port_file = self.work / f"{name}.port"
        process, port = processes.start_twistd(
            "securemig",
            "--state-dir",
            str(self.work / f"{source}-state"),
            "--identity",
            str(self.work / source),
            "--insecure-listen",
            "tcp:0:interface=127.0.0.1",
            "--insecure-port-file",
            str(port_file),
            port_file=port_file,
            log_file=self.work / f"{name}.log",
        )
        return processes.Destination(
            process, port, self.work / f"{source}-state", self.work / f"{name}.log"
        )

    def create_vm(
        self,
        name: str,
        size_mib: int,
        disk_mib: int | None,
        secure: bool,
        backend: str = backends.DEFAULT,
        shared_disk: Path | None = None,
        source: str = SOURCE,
        guest_cmdline: str | None = None,
    ) -> Bundle:
        """A VM at ``source``; with ``secure``, a vTPM whose key is sealed to
        the source's TPM; with ``backend="qemu"``, a QEMU guest, started
        (the Linux guest with this kernel command line, if one is given)."""

        sealed = vtpm = None
        if secure:
            key = os.urandom(32)
            with open_attestor(self.work / source, None, False) as attestor:
                sealed = attestor.seal(key)
            vtpm = (key, self.work / VTPM_CA_DIR)
        bundle = backends.create_vm(
            self.vm_dir_of(source),
            name,
            size_mib,
            kind=backend,
            disk_mib=disk_mib,
            shared_disk=shared_disk,
            owner=source if shared_disk else None,
            sealed_vtpm_key=sealed,
            vtpm=vtpm,
            guest="firmware" if guest_cmdline is None else "linux",
            guest_cmdline=guest_cmdline or "",
        )
        if backends.capabilities(backend).startable:
            started = processes.securemig(
                "vm",
                "start",
                name,
                "--dir",
                str(self.vm_dir_of(source)),
                "--identity",
                str(self.work / source),
            )
            if started.returncode != 0:
                raise RuntimeError(f"securemig vm start failed: {started.stderr.strip()}")
            bundle = Bundle.load(bundle.path)
        return bundle

    def migrate(
        self,
        destination: processes.Destination,
        name: str,
        secure: bool,
        vm_dir: Path | None = None,
        source: str = SOURCE,
        to: str = DESTINATION,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        state_dir: Path | None = None,
    ) -> Any:
        """Run ``securemig migrate`` as a process on behalf of ``source``
        (``env`` added to its environment), journaling in ``state_dir``
        (default: the source's own, as :meth:`start_source_daemon`'s; with
        ``--daemon`` in ``extra``, the directory of the daemon to ask);
        returns (summary, usage).  The insecure variant gets the identity
        too, to unseal a vTPM key it then sends in the clear."""
        import subprocess

        port = destination.port if secure else destination.insecure_port
        args = [
            processes.script("securemig"),
            "migrate",
            name,
            "--vm-dir",
            str(vm_dir or self.vm_dir_of(source)),
            "--to",
            f"{self.address_of(to)}:{port}",
            "--json",
            "--no-progress",
            "--state-dir",
            str(state_dir or self.work / f"{source}-state"),
            "--identity",
            str(self.work / source),
        ]
        args += ["--destination-name", to, "--tofu"] if secure else ["--insecure"]
        args += extra
        with tempfile.TemporaryFile() as errors:
            process = subprocess.Popen(
                args,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                env=None if env is None else {**os.environ, **env},
            )
            assert process.stdout is not None
            out = process.stdout.read()
            usage = processes.wait_process(process)  # wait4: the source's CPU and peak RSS
            if usage.status != 0:
                errors.seek(0)
                raise RuntimeError(
                    f"securemig migrate exited with {usage.status}: "
                    f"{errors.read().decode(errors='replace').strip()}"
                )
        return json.loads(out), usage

    def return_vm(self, destination: processes.Destination, name: str) -> Bundle:
        """Move an arrived VM back to the source (for repeated measurements),
        re-sealing its vTPM key to the source's TPM."""

        arrived = Bundle.load(destination.state_dir / "vms" / name)
        if arrived.vtpm_key_path.exists():
            with open_attestor(self.work / DESTINATION, None, False) as dest:
                key = dest.unseal(arrived.vtpm_key_path.read_bytes())
            with open_attestor(self.work / SOURCE, None, False) as source:
                files.write_durably(arrived.vtpm_key_path, source.seal(key), mode=0o600)
        if arrived.manifest.shared_disk:
            set_disk_owner(Path(arrived.manifest.shared_disk), SOURCE)
        arrived.manifest.state = "suspended"
        arrived.save()
        files.rename_durably(arrived.path, self.vm_dir / name)
        return Bundle.load(self.vm_dir / name)

"""
libvirt hosts for the lab: one system-mode ``libvirtd`` per host, each in
its own mount namespace (``doc/backend-libvirt.rst``, "The lab's libvirt
hosts"; the measured recipe is ``libvirt-recipe.md`` of the project's
shared notes).

A :class:`LibvirtHost` owns a short directory (unix socket paths are limited
to 107 bytes) holding one tree per path libvirt insists on: ``etc``,
``run``, ``lib``, ``log``, ``cache`` and ``swtpm-log`` are bind-mounted, in a
private mount namespace, over ``/etc/libvirt``, ``/run/libvirt``,
``/var/lib/libvirt``, ``/var/log/libvirt``, ``/var/cache/libvirt`` and
``/var/log/swtpm``; then ``libvirtd`` is exec'd in that namespace (``unshare``
without ``--fork`` execs, so the pid started is libvirtd's) with its own pid
file and a distinct ``host_uuid`` (migration refuses "the same host"
otherwise).  From the root namespace the host is
``qemu+unix:///system?socket=DIR/run/libvirt-sock``.

The mount points must exist in the root namespace: missing ones are created
empty (``/run/libvirt`` and ``/var/log/swtpm`` on a machine that never ran
libvirtd); nothing else is written outside the host's directory.

:meth:`LibvirtHost.stop` ends libvirtd by its pid, then the QEMUs and swtpms
it started (by the pid files it wrote in the host's ``run`` tree): a domain's
QEMU outlives its libvirtd by design.

:func:`guest_domain_xml` is the domain of the project's Linux guest
(:mod:`securemig.hypervisor.guest`): kernel + initramfs, a console and a
heartbeat serial port appended to files, a ``tpm-crb`` emulator vTPM
encrypted by a libvirt secret, a user-mode NIC (no host networking), a raw
or qcow2 disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from securemig.hypervisor import guest as linux_guest
from securemig.hypervisor.libvirt import LibvirtError, require_libvirt

#: Debian packages named when a part is missing.
DAEMON_PACKAGE = "libvirt-daemon-system"
CLIENT_PACKAGE = "libvirt-clients"
#: How long libvirtd may take to answer on its socket.
START_TIMEOUT = 30.0
#: How long libvirtd may take to end after SIGTERM.
STOP_TIMEOUT = 10.0

#: (tree in the host's directory, mount point in the namespace).
MOUNTS = (
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("swtpm-log", "/var/log/swtpm"),
)

LIBVIRTD_CONF = """\
# securemig lab host {name}
host_uuid = "{host_uuid}"
unix_sock_dir = "/run/libvirt"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
listen_tcp = 0
listen_tls = 0
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""

QEMU_CONF = """\
# securemig lab host {name}: no cgroups, namespaces, virtlogd or labels in a container
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
user = "root"
group = "root"
swtpm_user = "root"
swtpm_group = "root"
dynamic_ownership = 0
remember_owner = 0
migration_port_min = {port_min}
migration_port_max = {port_max}
"""


#: libvirtd's own TLS listener (``--listen``), for :class:`HostTLS`.
TLS_LIBVIRTD_CONF = """\
listen_addr = "127.0.0.1"
tls_port = "{tls.port}"
key_file = "{tls.directory}/serverkey.pem"
cert_file = "{tls.directory}/servercert.pem"
ca_file = "{tls.directory}/cacert.pem"
tls_no_verify_certificate = 0
"""

#: QEMU's TLS migration (``virsh migrate --tls``), peer verified.  libvirt
#: refuses a loopback ``migration_host`` or ``migration_address`` here: the
#: caller's ``--migrateuri`` names the host, as its certificate does.
TLS_QEMU_CONF = """\
migrate_tls_x509_cert_dir = "{tls.directory}/qemu"
migrate_tls_x509_verify = 1
"""


@dataclass(frozen=True)
class HostTLS:
    """A lab host's TLS for libvirt's own migration: its libvirtd listens on
    ``127.0.0.1:port``; ``directory`` holds libvirt's files (``cacert.pem``,
    ``servercert.pem``, ``serverkey.pem``, and ``clientcert.pem`` /
    ``clientkey.pem`` for a client's ``pkipath``) and ``qemu/`` QEMU's
    (``ca-cert.pem``, ``server-cert.pem``, ...), all for ``name`` from one
    site CA (:func:`write_tls`)."""

    directory: Path
    port: int
    name: str = "localhost"

    def uri(self) -> str:
        """The host's ``qemu+tls`` URI, the client's certificate in ``directory``."""
        return f"qemu+tls://{self.name}:{self.port}/system?pkipath={self.directory}"


def write_tls(directory: Path, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> None:
    """One host's certificate and key (server and client use, for
    ``localhost``) and the site CA's certificate under the names libvirt and
    QEMU look for."""
    (directory / "qemu").mkdir(parents=True, exist_ok=True)
    names = {
        "cacert.pem": ca_pem,
        "servercert.pem": cert_pem,
        "serverkey.pem": key_pem,
        "clientcert.pem": cert_pem,
        "clientkey.pem": key_pem,
        "qemu/ca-cert.pem": ca_pem,
        "qemu/server-cert.pem": cert_pem,
        "qemu/server-key.pem": key_pem,
        "qemu/client-cert.pem": cert_pem,
        "qemu/client-key.pem": key_pem,
    }
    for name, data in names.items():
        path = directory / name
        path.write_bytes(data)
        if name.endswith("key.pem"):
            path.chmod(0o600)


def libvirtd_binary(search_path: str | None = None) -> str:
    """The ``libvirtd`` executable (on ``$PATH`` or in ``/usr/sbin``), or an
    error naming the Debian package."""
    if search_path is None:
        search_path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    path = shutil.which("libvirtd", path=search_path)
    if path is None:
        raise LibvirtError(
            f"libvirtd not found: install the Debian package {DAEMON_PACKAGE} "
            "(with libvirt-daemon-system-sysv, --no-install-recommends; scripts/setup-debs.sh)"
        )
    return path


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _end_pid(pid: int, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; a process we started."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return


class LibvirtHost:
    """One lab host's ``libvirtd`` in its own mount namespace."""

    def __init__(
        self,
        name: str,
        index: int = 0,
        directory: Path | None = None,
        tls: HostTLS | None = None,
    ) -> None:
        self.name = name
        self.host_uuid = str(uuid.uuid4())
        # Short: the sockets libvirt makes under run/ must fit in 107 bytes.
        self.directory = directory or Path(tempfile.mkdtemp(prefix=f"smlv-{name}-", dir="/tmp"))
        self._index = index
        #: libvirt's own TLS (the benchmark's baseline): its RPC on a loopback
        #: port and QEMU's migration stream, certificates from a site CA.
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    # -- where things are, seen from the root namespace

    def path(self, inside: str) -> Path:
        """The root namespace's path of ``inside`` (a path as this host's
        libvirt and QEMUs see it): under one of the bind-mounted trees, this
        host's own file; elsewhere the same path (shared by every host)."""
        for tree, mount in MOUNTS:
            if inside == mount or inside.startswith(mount + "/"):
                return self.directory / tree / inside[len(mount) :].lstrip("/")
        # Elsewhere both namespaces see the same files (the lab's shared storage).
        return Path(inside)

    @property
    def run_dir(self) -> Path:
        """This host's ``/run/libvirt``, from the root namespace (the
        backend's ``run_dir``)."""
        return self.directory / "run"

    @property
    def socket(self) -> Path:
        """libvirtd's read-write socket."""
        return self.directory / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """The connection URI of this host's libvirtd, from the root namespace."""
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def log(self) -> Path:
        """libvirtd's own log file."""
        return self.directory / "log" / "libvirtd.log"

    # -- life cycle

    def start(self) -> str:
        """Start libvirtd; returns its URI once it answers."""
        libvirt = require_libvirt()
        binary = libvirtd_binary()
        for tree, mount in MOUNTS:
            (self.directory / tree).mkdir(parents=True, exist_ok=True)
            # The mount point must exist where the namespace is copied from.
            Path(mount).mkdir(parents=True, exist_ok=True)
        for sub in ("lib/images", "lib/qemu", "lib/swtpm", "log/qemu", "cache/qemu"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        libvirtd_conf = LIBVIRTD_CONF.format(name=self.name, host_uuid=self.host_uuid)
        port_min = 49152 + 100 * self._index
        qemu_conf = QEMU_CONF.format(name=self.name, port_min=port_min, port_max=port_min + 63)
        listen = ""
        if self.tls is not None:
            libvirtd_conf = libvirtd_conf.replace("listen_tls = 0", "listen_tls = 1")
            libvirtd_conf += TLS_LIBVIRTD_CONF.format(tls=self.tls)
            qemu_conf += TLS_QEMU_CONF.format(tls=self.tls)
            listen = " --listen"
        (self.directory / "etc" / "libvirtd.conf").write_text(libvirtd_conf)
        (self.directory / "etc" / "qemu.conf").write_text(qemu_conf)
        binds = " && ".join(
            f"mount --bind {self.directory / tree} {mount}" for tree, mount in MOUNTS
        )
        script = (
            f"{binds} && exec {binary}{listen} -f /etc/libvirt/libvirtd.conf "
            "-p /run/libvirt/libvirtd.pid"
        )
        out = open(self.directory / "libvirtd.out", "ab")  # noqa: SIM115 (outlives this call)
        try:
            # unshare without --fork execs sh, which execs libvirtd: one pid throughout.
            self.process = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        finally:
            out.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise LibvirtError(
                    f"libvirtd of lab host {self.name} exited ({self.process.returncode}): "
                    f"{self._tail()}"
                )
            if self.socket.exists():
                try:
                    libvirt.open(self.uri).close()
                    return self.uri
                except libvirt.libvirtError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise LibvirtError(f"libvirtd of lab host {self.name} did not answer in time")
            time.sleep(0.05)

    def _tail(self) -> str:
        lines: list[str] = []
        for log in (self.directory / "libvirtd.out", self.log):
            with contextlib.suppress(FileNotFoundError):
                lines += log.read_text(errors="replace").splitlines()[-5:]
        return " | ".join(lines) or "no output"

    def children(self) -> list[int]:
        """The pids of the QEMUs and swtpms this libvirtd started that still
        run (from the pid files it keeps in ``/run/libvirt/qemu``)."""
        pids = []
        for pidfile in sorted((self.directory / "run" / "qemu").rglob("*.pid")):
            try:
                pid = int(pidfile.read_text().strip())
            except (ValueError, OSError):
                continue
            if _alive(pid):
                pids.append(pid)
        return pids

    def kill_daemon(self) -> None:
        """SIGKILL libvirtd alone (a crash); its domains' QEMUs run on."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> str:
        """Start libvirtd again after :meth:`kill_daemon` (same trees, same
        host UUID): it finds the domains whose QEMU ran on and settles their
        interrupted jobs."""
        self.kill_daemon()
        return self.start()

    def stop(self) -> None:
        """End libvirtd by its pid, then what it started; idempotent."""
        if self.process is not None:
            if self.process.poll() is None:
                _end_pid(self.process.pid, STOP_TIMEOUT)
            self.process.wait()
        for pid in self.children():
            _end_pid(pid, 5.0)

    def remove(self) -> None:
        """Stop, and remove the host's directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


# -- the project's Linux guest as a libvirt domain


@dataclass(frozen=True)
class GuestDomain:
    """What :func:`define_guest` made: the domain's name and where its
    files are (paths as the host's namespace sees them)."""

    name: str
    secret_uuid: str
    disk: str
    heartbeat: str
    console: str


def guest_domain_xml(
    name: str,
    secret_uuid: str | None,
    disk: str | None,
    disk_format: str = "raw",
    memory_mib: int = 256,
    pcr16: str = linux_guest.DEFAULT_PCR16,
    nic: bool = True,
    vcpus: int = 1,
    dirty_mib_s: int = 0,
    wss_mib: int = 32,
) -> str:
    """The domain XML of the Linux guest on a lab host: heartbeat on its
    second serial port (``/var/log/libvirt/qemu/NAME-heartbeat.log``), a
    ``tpm-crb`` vTPM encrypted by secret ``secret_uuid`` (none without one),
    a user-mode NIC, a disk (``raw`` or ``qcow2``) at ``disk``."""
    built = linux_guest.find()
    log = f"/var/log/libvirt/qemu/{name}"
    devices = [
        "<emulator>/usr/bin/qemu-system-x86_64</emulator>",
        f"<serial type='file'><source path={quoteattr(log + '-console.log')} append='on'/>"
        "<target port='0'/></serial>",
        f"<serial type='file'><source path={quoteattr(log + '-heartbeat.log')} append='on'/>"
        "<target port='1'/></serial>",
        "<memballoon model='none'/>",
    ]
    if disk is not None:
        devices.append(
            f"<disk type='file' device='disk'><driver name='qemu' type={quoteattr(disk_format)}/>"
            f"<source file={quoteattr(disk)}/><target dev='vda' bus='virtio'/></disk>"
        )
    if nic:
        devices.append("<interface type='user'><model type='virtio'/></interface>")
    if secret_uuid is not None:
        devices.append(
            "<tpm model='tpm-crb'><backend type='emulator' version='2.0'>"
            f"<encryption secret={quoteattr(secret_uuid)}/></backend></tpm>"
        )
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(built.kernel))}</kernel>
    <initrd>{escape(str(built.initrd))}</initrd>
    <cmdline>{escape(linux_guest.cmdline(pcr16, dirty_mib_s, wss_mib))}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    {chr(10).join("    " + d for d in devices).strip()}
  </devices>
</domain>
"""


def secret_xml(secret_uuid: str, domain: str, ephemeral: bool, private: bool) -> str:
    """A libvirt secret of usage ``vtpm`` for ``domain``'s vTPM."""
    yes_no = {True: "yes", False: "no"}
    return (
        f"<secret ephemeral='{yes_no[ephemeral]}' private='{yes_no[private]}'>"
        f"<uuid>{secret_uuid}</uuid><usage type='vtpm'><name>{escape(domain)}-vtpm</name></usage>"
        "</secret>"
    )


def define_guest(
    host: LibvirtHost,
    name: str,
    disk_format: str = "raw",
    disk_mib: int = 64,
    memory_mib: int = 256,
    pcr16: str = linux_guest.DEFAULT_PCR16,
    vtpm: bool = True,
    persistent_secret: bool = False,
    disk: str | None = None,
    dirty_mib_s: int = 0,
    wss_mib: int = 32,
    secret_bytes: int = 32,
) -> GuestDomain:
    """Define the Linux guest on ``host`` the way an operator's domain
    would be before securemig adopts it: its disk created, its vTPM secret
    defined with a fresh random value of ``secret_bytes`` (libvirt takes
    any length; ``persistent_secret``: non-ephemeral, written to
    ``/etc/libvirt/secrets`` as libvirt does by default).  The
    disk is the host's own unless ``disk`` names a path outside its trees
    (storage every lab host sees).  Not started."""
    libvirt = require_libvirt()
    if disk is None:
        disk = f"/var/lib/libvirt/images/{name}.{'qcow2' if disk_format == 'qcow2' else 'img'}"
    create_disk(host, disk, disk_format, disk_mib)
    secret_uuid = str(uuid.uuid4()) if vtpm else None
    conn = libvirt.open(host.uri)
    try:
        if secret_uuid is not None:
            secret = conn.secretDefineXML(
                secret_xml(secret_uuid, name, ephemeral=not persistent_secret, private=False)
            )
            secret.setValue(os.urandom(secret_bytes))
        conn.defineXML(
            guest_domain_xml(
                name,
                secret_uuid,
                disk,
                disk_format,
                memory_mib,
                pcr16,
                dirty_mib_s=dirty_mib_s,
                wss_mib=wss_mib,
            )
        )
    finally:
        conn.close()
    log = f"/var/log/libvirt/qemu/{name}"
    return GuestDomain(name, secret_uuid or "", disk, log + "-heartbeat.log", log + "-console.log")


def create_disk(host: LibvirtHost, disk: str, disk_format: str, size_mib: int) -> None:
    """An empty (sparse) disk image on ``host`` at ``disk`` (its namespace's
    path), ``raw`` or ``qcow2``."""
    path = host.path(disk)
    path.parent.mkdir(parents=True, exist_ok=True)
    if disk_format == "raw":
        with open(path, "wb") as f:
            f.truncate(size_mib << 20)
    elif disk_format == "qcow2":
        if shutil.which("qemu-img") is None:
            raise LibvirtError("qemu-img not found: install the Debian package qemu-utils")
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_mib}M"],
            check=True,
            capture_output=True,
        )
    else:
        raise ValueError(f"disk format {disk_format!r}: raw or qcow2")

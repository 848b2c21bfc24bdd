"""
swtpm as a real part: provision TPM 2.0 simulators and run them on loopback.

``provision()`` runs ``swtpm_setup --tpm2 --create-ek-cert`` with a local CA
whose configuration and state live in a directory of ours (never the
system's ``/var/lib/swtpm-localca``), so the EK certificates chain to a CA
the privacy CA can be told to trust.  ``start()`` runs ``swtpm socket`` on
free loopback ports and returns the TCTI string to reach it; the process is
ended by its pid.  Used by the tests, the demo, and for vTPMs.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from tpm2_pytss import TPM2B_PUBLIC

from securemig.protocol.errors import ErrorCode, LocalFault
from securemig.trust.pki import EK_CERTIFICATE_EKU, Authority
from securemig.trust.tpm.tpm import TPM, unmarshal_exact

#: The Debian packages that provide what this module runs.
PACKAGES = "swtpm swtpm-tools"
START_TIMEOUT = 10.0
#: swtpm's control channel: initialize the TPM (read its state), no flags.
CMD_INIT = 0x02
#: prctl(2): the signal a child gets when its parent thread ends.
PR_SET_PDEATHSIG = 1
#: The file of a TPM's state in a swtpm state directory: there once provisioned.
STATE_FILE = "tpm2-00.permall"


class SwtpmMissing(LocalFault, RuntimeError):
    """swtpm is not installed; the message names the Debian packages."""

    default_code = ErrorCode.IO_ERROR


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SwtpmMissing(
            f"{name} not found: install the Debian packages {PACKAGES} (make setup does)"
        )
    return path


def local_ca(ca_dir: Path) -> Path:
    """Configure a swtpm local CA living in ``ca_dir``; returns the
    swtpm_setup configuration file that uses it.  The CA's keys are created
    by ``swtpm_localca`` on first use."""
    ca_dir.mkdir(parents=True, exist_ok=True)
    conf = ca_dir / "localca.conf"
    conf.write_text(
        f"statedir = {ca_dir}\n"
        f"signingkey = {ca_dir / 'signkey.pem'}\n"
        f"issuercert = {ca_dir / 'issuercert.pem'}\n"
        f"certserial = {ca_dir / 'certserial'}\n"
    )
    options = ca_dir / "localca.options"
    options.write_text(
        "--platform-manufacturer securemig\n--platform-version 2.1\n--platform-model swtpm\n"
    )
    setup = ca_dir / "swtpm_setup.conf"
    setup.write_text(
        f"create_certs_tool = {_tool('swtpm_localca')}\n"
        f"create_certs_tool_config = {conf}\n"
        f"create_certs_tool_options = {options}\n"
        "active_pcr_banks = sha256\n"
    )
    return setup


def ca_certificates(ca_dir: Path) -> list[Path]:
    """The local CA's root and intermediate certificates (what a privacy CA
    trusts as the 'TPM vendor' of these simulated TPMs)."""
    return [ca_dir / "swtpm-localca-rootca-cert.pem", ca_dir / "issuercert.pem"]


def ecc_vendor_chain(ca_dir: Path) -> tuple[Authority, Authority]:
    """A 'TPM vendor' for ECC EKs in ``ca_dir/ecc-root`` and
    ``ca_dir/ecc-intermediate`` (made on first use): a root CA and the
    intermediate it certifies, which issues EK certificates.  A privacy CA
    trusts the root only (``ecc-root/ca.pem``); the host sends the
    intermediate (``ecc-intermediate/ca.pem``) with its enrollment."""
    root_dir, intermediate_dir = ca_dir / "ecc-root", ca_dir / "ecc-intermediate"
    if not (intermediate_dir / "ca.key").exists():
        root = Authority.create("securemig simulated TPM vendor root", path_length=1)
        root.save(root_dir)
        root.intermediate("securemig simulated TPM vendor EK CA").save(intermediate_dir)
    return Authority.load(root_dir), Authority.load(intermediate_dir)


def certify_ecc_ek(tcti: str, ca_dir: Path) -> Path:
    """Give the TPM at ``tcti`` an ECC P-256 EK certificate (in NV, where a
    vendor puts it) issued by the intermediate of :func:`ecc_vendor_chain`;
    returns the intermediate's certificate (PEM), for ``host init
    --ek-chain``.  swtpm_setup makes only RSA-2048 and P-384 EK
    certificates."""
    _, intermediate = ecc_vendor_chain(ca_dir)
    with TPM(tcti) as tpm:
        public = unmarshal_exact(TPM2B_PUBLIC, tpm.ek_public("ecc"), "the ECC EK")
        key = serialization.load_der_public_key(bytes(public.publicArea.to_der()))
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(intermediate.cert.subject)
            .public_key(key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, True, False, False, False, False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([EK_CERTIFICATE_EKU]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(intermediate.key.public_key()),
                critical=False,
            )
            .sign(intermediate.key, hashes.SHA256())
        )
        tpm.write_ek_certificate("ecc", cert.public_bytes(serialization.Encoding.DER))
    return ca_dir / "ecc-intermediate" / "ca.pem"


#: State encryption of vTPMs: swtpm's strongest, with a 256-bit key.
CIPHER = "aes-256-cbc"


def _key_pipe(key: bytes) -> int:
    """A pipe's read end holding ``key`` in hex, for swtpm's ``fd=`` options;
    the key never touches a file."""
    if len(key) != 32:
        raise ValueError("a vTPM state key is 32 bytes")
    read, write = os.pipe()
    os.write(write, key.hex().encode())
    os.close(write)
    return read


def provision(
    state_dir: Path, ca_dir: Path, key: bytes | None = None, pcr_banks: str | None = None
) -> None:
    """Manufacture a TPM 2.0 in ``state_dir``: EK certificates from the CA in
    ``ca_dir``; with ``key``, its state encrypted at rest with that key;
    ``pcr_banks`` (e.g. ``sha1,sha256``) its active PCR banks (SHA-256 only
    by default)."""
    setup = local_ca(ca_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    certs = state_dir / "ek-certs"
    certs.mkdir(exist_ok=True)
    argv = [
        _tool("swtpm_setup"),
        "--tpm2",
        "--tpmstate",
        str(state_dir),
        "--create-ek-cert",
        "--config",
        str(setup),
        "--write-ek-cert-files",
        str(certs),
        "--overwrite",
    ]
    if pcr_banks is not None:
        argv += ["--pcr-banks", pcr_banks]
    fds: tuple[int, ...] = ()
    if key is not None:
        fds = (_key_pipe(key),)
        argv += ["--keyfile-fd", str(fds[0]), "--cipher", CIPHER]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False, pass_fds=fds)
    finally:
        for fd in fds:
            os.close(fd)
    if result.returncode != 0:
        raise RuntimeError(
            f"swtpm_setup failed ({result.returncode}): {(result.stderr or result.stdout).strip()}"
        )


def _free_port_pair(host: str = "127.0.0.1") -> int:
    """A port P with P and P+1 free: the swtpm TCTI expects control on P+1."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port + 1))
            except OSError:
                continue
        return port


def _proc_address(host: str, port: int) -> set[str]:
    """How ``/proc/net/tcp{,6}`` writes a local address ``host:port`` (and
    the wildcard address on that port)."""
    hexport = f"{port:04X}"
    if ":" in host:
        packed = socket.inet_pton(socket.AF_INET6, host)
        words = [packed[i : i + 4][::-1].hex().upper() for i in range(0, 16, 4)]
        return {"".join(words) + ":" + hexport, "0" * 32 + ":" + hexport}
    packed = socket.inet_aton(host)
    return {packed[::-1].hex().upper() + ":" + hexport, "00000000:" + hexport}


def listening_inodes(host: str, port: int) -> set[str]:
    """The socket inodes listening on ``host:port`` (TCP) in this network
    namespace, from ``/proc/net/tcp`` and ``/proc/net/tcp6``."""
    wanted = _proc_address(host, port)
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # sl, local_address, rem_address, st (0A: LISTEN), ..., inode
            if len(fields) > 9 and fields[3] == "0A" and fields[1] in wanted:
                found.add(fields[9])
    return found


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process ``pid`` holds open (its
    ``/proc/PID/fd`` links ``socket:[INODE]``); empty once it is gone."""
    inodes: set[str] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def listens_on(pid: int, host: str, port: int) -> bool:
    """Whether process ``pid`` itself owns the socket listening on
    ``host:port`` (not merely: something accepts connections there)."""
    return bool(listening_inodes(host, port) & socket_inodes(pid))


@dataclass
class Swtpm:
    """A running ``swtpm socket`` process."""

    process: subprocess.Popen[bytes]
    port: int
    ctrl_port: int
    state_dir: Path
    host: str = "127.0.0.1"

    @property
    def tcti(self) -> str:
        """The TCTI string to open this TPM with."""
        return f"swtpm:host={self.host},port={self.port}"

    def init(self) -> None:
        """Have a TPM started with ``initialized=False`` read its state now
        (the control channel's CMD_INIT); then TPM2_Startup is the caller's."""
        with socket.create_connection((self.host, self.ctrl_port), timeout=START_TIMEOUT) as c:
            c.sendall(struct.pack(">II", CMD_INIT, 0))
            answer = b""
            while len(answer) < 4:
                piece = c.recv(4 - len(answer))
                if not piece:
                    break
                answer += piece
        if len(answer) != 4 or struct.unpack(">I", answer)[0] != 0:
            raise RuntimeError(f"swtpm did not initialize (answer {answer.hex() or 'none'})")

    def stop(self) -> None:
        """End the process by its pid (SIGTERM, then SIGKILL)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _socket_argv(state_dir: Path) -> list[str]:
    """``swtpm socket`` for a TPM 2.0 whose state is in ``state_dir``."""
    return [_tool("swtpm"), "socket", "--tpm2", "--tpmstate", f"dir={state_dir}"]


def _killed_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when the thread
    that started it ends (``PR_SET_PDEATHSIG``): a short-lived TPM must not
    outlive a process that was killed while it ran.  Everything it needs
    is looked up here, before the fork."""
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)  # the parent died before the signal was armed

    return arm


def start(
    state_dir: Path,
    key: bytes | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    dies_with_parent: bool = False,
    initialized: bool = True,
) -> Swtpm:
    """Run the TPM in ``state_dir`` on free ports of ``host`` (loopback by
    default), or on ``port`` and ``port + 1``, until :meth:`Swtpm.stop`;
    ``key`` decrypts an encrypted state.  ``dies_with_parent``: killed
    when the starting thread (or its process) ends, for a TPM started for
    one short check.  ``initialized=False``: it reads its state only at
    :meth:`Swtpm.init` (started ahead, before that state is there)."""
    wanted = port
    preexec = _killed_with_parent() if dies_with_parent else None
    # A port chosen free can be taken before swtpm binds it: choose again.
    for _ in range(1 if wanted else 5):
        port = wanted or _free_port_pair(host)
        ctrl = port + 1
        argv = [
            *_socket_argv(state_dir),
            "--server",
            f"type=tcp,port={port},bindaddr={host}",
            "--ctrl",
            f"type=tcp,port={ctrl},bindaddr={host}",
        ]
        if initialized:
            argv += ["--flags", "not-need-init,startup-clear"]
        fds: tuple[int, ...] = ()
        if key is not None:
            fds = (_key_pipe(key),)
            argv += ["--key", f"fd={fds[0]},mode={CIPHER},format=hex"]
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=fds,
                # Not thread-safe in general; this one calls only prctl and
                # getppid, looked up before the fork.
                preexec_fn=preexec,
            )
        finally:
            for fd in fds:
                os.close(fd)
        deadline = time.monotonic() + START_TIMEOUT
        # The proof that the listener is this swtpm: its pid owns both
        # listening sockets (something else on the port would accept too).
        while process.poll() is None and time.monotonic() < deadline:
            if listens_on(process.pid, host, port) and listens_on(process.pid, host, ctrl):
                return Swtpm(process, port, ctrl, state_dir, host)
            time.sleep(0.02)
        if process.poll() is None:
            process.kill()
        process.wait()
    err = process.stderr.read().decode(errors="replace").strip() if process.stderr else ""
    raise RuntimeError(
        f"swtpm did not start on {host} ports {port} and {ctrl}"
        + (f" (it exited with {process.returncode}: {err})" if err else "")
    )


def start_for_qemu(
    state_dir: Path, ctrl_socket: Path, pidfile: Path, key: bytes, migration_key: bytes | None
) -> int:
    """Run the vTPM in ``state_dir`` for a QEMU ``tpm-emulator`` on the unix
    socket ``ctrl_socket``; returns its pid (also in ``pidfile``).

    swtpm daemonizes once its socket is listening, and ends by itself when
    QEMU closes the connection (``--terminate``).  ``key`` opens the state
    at rest; ``migration_key`` encrypts the state blobs QEMU fetches into
    its migration stream, so the RAM image never holds the vTPM in clear
    (None only in the test that shows what it would hold without one).
    Both keys reach swtpm through pipes."""
    ctrl_socket.unlink(missing_ok=True)
    fds = (_key_pipe(key),) + (() if migration_key is None else (_key_pipe(migration_key),))
    argv = [
        *_socket_argv(state_dir),
        "--ctrl",
        f"type=unixio,path={ctrl_socket}",
        "--key",
        f"fd={fds[0]},mode={CIPHER},format=hex",
        "--pid",
        f"file={pidfile}",
        "--terminate",
        "--daemon",
    ]
    if migration_key is not None:
        argv += ["--migration-key", f"fd={fds[1]},mode={CIPHER},format=hex"]
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, check=False, pass_fds=fds, timeout=START_TIMEOUT
        )
    finally:
        for fd in fds:
            os.close(fd)
    if result.returncode != 0:
        raise RuntimeError(f"swtpm did not start: {(result.stderr or result.stdout).strip()}")
    return int(pidfile.read_text())

"""
The Linux guest: a Debian kernel and busybox-static in an initramfs.

Built once at set-up time (``python -m securemig.hypervisor.guest``, run by
``make setup``) from Debian packages only, into ``.cache/guest/`` of the
checkout (``$SECUREMIG_GUEST_DIR`` overrides), and rebuilt only when missing:

- ``apt-get download`` the kernel (a ``linux-image-*-amd64`` package: the
  ``cloud`` flavour, which has the TPM TIS/CRB drivers and the 8250 UART
  built in and boots fastest, else the generic one, whose TPM modules are
  copied into the initramfs) and ``busybox-static`` (a copy already in
  apt's cache is used as it is: no network);
- ``dpkg-deb -x`` both; the initramfs is written by :func:`write_cpio`, a
  small newc writer (no root needed for ``/dev/console``, deterministic:
  sorted entries, mtime 0, owner 0).

The guest's ``/init`` (busybox sh, :data:`INIT`): loads the TPM modules it
carries, waits for ``/dev/tpm0``, extends PCR 16 with the 32-byte value
given as ``securemig.pcr16=HEX`` on the kernel command line (a raw
TPM2_PCR_Extend command written to ``/dev/tpm0`` with printf), then dirties
``securemig.dirty=MIB`` MiB per second of a ``securemig.wss=MIB`` working
set in a tmpfs, and prints ``hb SEQ PCR16`` on its second serial port every
``securemig.hb_ms`` milliseconds (the host reads it from a file).  Its
kernel messages and init's own lines go to the first serial port.

The same kernel may hang under KVM on some hosts (nested virtualisation):
:func:`guest_accelerator` boots it once under KVM with a short deadline,
caches the answer beside the guest and falls back to TCG.
"""

from __future__ import annotations

import glob
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: The packages the guest is made of (named in errors).
KERNEL_PACKAGES = ("linux-image-cloud-amd64", "linux-image-amd64")
BUSYBOX_PACKAGE = "busybox-static"
#: The kernel modules the guest loads when its kernel has them as modules.
TPM_MODULES = ("tpm_tis_core", "tpm_tis", "tpm_crb")
#: Bump when what is inside the initramfs changes: a cached one is rebuilt.
GUEST_VERSION = "1"
#: How long the KVM probe waits for the guest's first heartbeat.
KVM_PROBE_TIMEOUT = 20.0
#: Guest RAM for the probe boot.
PROBE_MEMORY_MIB = 128

#: The value the guest extends PCR 16 with when the command line names none.
DEFAULT_PCR16 = "5e" * 32

INIT = r"""#!/bin/busybox sh
# securemig's Linux guest (securemig/hypervisor/guest.py): vTPM use, a memory
# workload and a heartbeat on the second serial port.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
PCR16=__DEFAULT_PCR16__; DIRTY=0; WSS=32; HB_MS=20
for word in $(cat /proc/cmdline); do
    case "$word" in
        securemig.pcr16=*) PCR16=${word#*=} ;;
        securemig.dirty=*) DIRTY=${word#*=} ;;
        securemig.wss=*) WSS=${word#*=} ;;
        securemig.hb_ms=*) HB_MS=${word#*=} ;;
    esac
done
for module in /lib/modules/*.ko; do
    [ -e "$module" ] && insmod "$module" 2>/dev/null
done
i=0
while [ ! -c /dev/tpm0 ] && [ $i -lt 100 ]; do usleep 50000; i=$((i + 1)); done
if [ -c /dev/tpm0 ]; then
    # TPM2_PCR_Extend(PCR 16, password session, one sha256 digest): 65 bytes.
    cmd='\x80\x02\x00\x00\x00\x41\x00\x00\x01\x82\x00\x00\x00\x10\x00\x00\x00\x09'
    cmd="$cmd"'\x40\x00\x00\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x0b'
    cmd="$cmd$(echo "$PCR16" | sed 's/../\\x&/g')"
    exec 3<>/dev/tpm0
    printf "$cmd" >&3
    rc=$(dd bs=4096 count=1 <&3 2>/dev/null | od -An -tx1 | tr -d ' \n')
    exec 3>&-
    echo "securemig-guest: extend $rc"
    read -r pcr < /sys/class/tpm/tpm0/pcr-sha256/16
else
    echo "securemig-guest: no TPM"
    pcr=none
fi
echo "securemig-guest: pcr16 $pcr"
if [ "$DIRTY" -gt 0 ]; then
    mkdir -p /work
    mount -t tmpfs -o size=$((WSS + 1))m tmpfs /work
    dd if=/dev/urandom of=/work/pattern bs=64k count=16 2>/dev/null
    blocks=$((WSS * 16)); per=$((DIRTY * 16 / 10)); [ $per -lt 1 ] && per=1
    at=0
    ( while :; do
        n=0
        while [ $n -lt $per ]; do
            dd if=/work/pattern of=/work/set bs=64k count=1 seek=$at conv=notrunc 2>/dev/null
            at=$(((at + 1) % blocks)); n=$((n + 1))
        done
        usleep 100000
    done ) &
fi
stty -F /dev/ttyS1 raw -echo 2>/dev/null
exec 4>/dev/ttyS1
echo "securemig-guest: running dirty=$DIRTY wss=$WSS hb_ms=$HB_MS"
seq=0
while :; do
    seq=$((seq + 1))
    [ -c /dev/tpm0 ] && read -r pcr < /sys/class/tpm/tpm0/pcr-sha256/16
    echo "hb $seq $pcr" >&4
    usleep $((HB_MS * 1000))
done
""".replace("__DEFAULT_PCR16__", DEFAULT_PCR16)


class GuestError(RuntimeError):
    """The Linux guest could not be built or found; the message says why."""


# -- newc cpio


def _newc_header(
    ino: int, mode: int, size: int, name: bytes, nlink: int = 1, rdev: tuple[int, int] = (0, 0)
) -> bytes:
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


@dataclass(frozen=True)
class Entry:
    """One member of an initramfs: a directory, file, symlink or device."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def write_cpio(entries: list[Entry]) -> bytes:
    """An uncompressed newc archive of ``entries`` (sorted by name, owner 0,
    mtime 0), as the kernel unpacks an initramfs."""
    out = io.BytesIO()
    for ino, entry in enumerate(sorted(entries, key=lambda e: e.name), start=1):
        name = entry.name.encode()
        nlink = 2 if entry.mode & 0o170000 == 0o040000 else 1
        header = _newc_header(ino, entry.mode, len(entry.data), name, nlink, entry.rdev)
        out.write(header + name + b"\0")
        out.write(_pad(len(header) + len(name) + 1))
        out.write(entry.data + _pad(len(entry.data)))
    trailer = b"TRAILER!!!"
    header = _newc_header(0, 0, 0, trailer, nlink=1)
    out.write(header + trailer + b"\0" + _pad(len(header) + len(trailer) + 1))
    return out.getvalue()


# -- building


def guest_dir() -> Path:
    """Where the guest is built and cached: ``$SECUREMIG_GUEST_DIR``, else
    ``.cache/guest`` in the checkout."""
    configured = os.environ.get("SECUREMIG_GUEST_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2] / ".cache" / "guest"


@dataclass(frozen=True)
class Guest:
    """A built guest: its kernel and initramfs."""

    kernel: Path
    initrd: Path


def cmdline(pcr16: str = DEFAULT_PCR16, dirty_mib_s: int = 0, wss_mib: int = 32) -> str:
    """The guest's kernel command line: console on the first serial port, the
    guest's parameters (see :data:`INIT`)."""
    if not re.fullmatch(r"[0-9a-f]{64}", pcr16):
        raise GuestError("the PCR 16 value must be 64 lowercase hex digits (32 bytes)")
    if dirty_mib_s < 0 or wss_mib <= 0:
        raise GuestError("the dirty rate must be 0 or more and the working set positive")
    return (
        "console=ttyS0 quiet panic=-1 rdinit=/init mitigations=off "
        f"securemig.pcr16={pcr16} securemig.dirty={dirty_mib_s} securemig.wss={wss_mib}"
    )


def _run(argv: list[str], cwd: Path) -> str:
    try:
        result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise GuestError(f"{argv[0]} not found (install the Debian package apt)") from None
    if result.returncode != 0:
        raise GuestError(f"{' '.join(argv)} failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def _kernel_package(meta: str, work: Path) -> str | None:
    """The versioned kernel package that ``meta`` depends on, if apt knows it."""
    try:
        out = _run(["apt-cache", "depends", meta], work)
    except GuestError:
        return None
    found = re.search(r"Depends: (linux-image-[0-9][^\s]*-amd64)", out)
    return found.group(1) if found else None


def _fetch_deb(package: str, work: Path) -> Path:
    """A .deb of ``package``: from apt's cache if there, else ``apt-get download``."""
    cached = sorted(glob.glob(f"/var/cache/apt/archives/{package}_*_amd64.deb"))
    if cached:
        return Path(cached[-1])
    _run(["apt-get", "download", "-q", package], work)
    debs = sorted(work.glob(f"{package}_*.deb"))
    if not debs:
        raise GuestError(f"apt-get download {package} left no package")
    return debs[-1]


def _kernel_deb(work: Path) -> Path:
    # A kernel already in apt's cache needs no network.
    for flavour in ("cloud-amd64", "amd64"):
        cached = sorted(
            p
            for p in glob.glob(f"/var/cache/apt/archives/linux-image-[0-9]*-{flavour}_*.deb")
            if flavour != "amd64" or "-cloud-" not in p
        )
        if cached:
            return Path(cached[-1])
    for meta in KERNEL_PACKAGES:
        package = _kernel_package(meta, work)
        if package:
            return _fetch_deb(package, work)
    raise GuestError(
        f"no Debian kernel package found ({' or '.join(KERNEL_PACKAGES)}): run apt-get update"
    )


def _initramfs(busybox: Path, modules: list[Path]) -> bytes:
    entries = [Entry(d, 0o040755) for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules")]
    entries += [Entry("tmp", 0o041777)]
    entries.append(Entry("bin/busybox", 0o100755, busybox.read_bytes()))
    entries.append(Entry("bin/sh", 0o120777, b"busybox"))
    entries.append(Entry("init", 0o100755, INIT.encode()))
    # The console before devtmpfs is mounted: the kernel opens it for init.
    entries.append(Entry("dev/console", 0o020600, rdev=(5, 1)))
    # insmod takes modules in this order: the core before its users.
    for i, module in enumerate(modules):
        entries.append(Entry(f"lib/modules/{i:02d}-{module.name}", 0o100644, module.read_bytes()))
    return write_cpio(entries)


def _current(stamp: Path) -> bool:
    return stamp.read_text().strip() == GUEST_VERSION


def build(directory: Path | None = None) -> Guest:
    """Build the guest into ``directory`` (default :func:`guest_dir`) unless
    it is there already; the built guest."""
    directory = directory or guest_dir()
    kernel, initrd = directory / "vmlinuz", directory / "initrd.cpio"
    stamp = directory / "version"
    if kernel.exists() and initrd.exists() and stamp.exists() and _current(stamp):
        return Guest(kernel, initrd)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        work = Path(tmp)
        debs = {"kernel": _kernel_deb(work), "busybox": _fetch_deb(BUSYBOX_PACKAGE, work)}
        for part, deb in debs.items():
            _run(["dpkg-deb", "-x", str(deb), str(work / part)], work)
        vmlinuz = sorted((work / "kernel" / "boot").glob("vmlinuz-*"))
        busybox = work / "busybox" / "bin" / "busybox"
        if not vmlinuz or not busybox.exists():
            raise GuestError("the kernel or busybox package had no vmlinuz or busybox in it")
        modules = []
        for name in TPM_MODULES:
            modules += sorted((work / "kernel" / "lib" / "modules").glob(f"*/kernel/**/{name}.ko"))
        image = _initramfs(busybox, modules)
        shutil.copyfile(vmlinuz[-1], work / "vmlinuz")
        (work / "initrd.cpio").write_bytes(image)
        os.replace(work / "vmlinuz", kernel)
        os.replace(work / "initrd.cpio", initrd)
        (directory / "kernel-package").write_text(debs["kernel"].name + "\n")
        stamp.write_text(GUEST_VERSION + "\n")
    return Guest(kernel, initrd)


def find() -> Guest:
    """The built guest, or an error saying how to build it."""
    directory = guest_dir()
    guest = Guest(directory / "vmlinuz", directory / "initrd.cpio")
    if not (guest.kernel.exists() and guest.initrd.exists()):
        raise GuestError(
            f"the Linux guest is not built in {directory}: run `make setup` "
            f"(it needs the Debian packages {KERNEL_PACKAGES[0]} and {BUSYBOX_PACKAGE})"
        )
    return guest


# -- which accelerator boots it


def _probe_kvm(guest: Guest, qemu: str, timeout: float) -> bool:
    """Boot the guest once under KVM; whether a heartbeat came in time."""
    with tempfile.TemporaryDirectory() as tmp:
        hb = Path(tmp) / "hb"
        argv = [
            qemu,
            "-machine",
            "pc",
            "-accel",
            "kvm",
            "-m",
            str(PROBE_MEMORY_MIB),
            "-display",
            "none",
            "-nodefaults",
            "-serial",
            "null",
            "-chardev",
            f"file,id=hb,path={hb}",
            "-serial",
            "chardev:hb",
            "-kernel",
            str(guest.kernel),
            "-initrd",
            str(guest.initrd),
            "-append",
            cmdline(),
        ]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and process.poll() is None:
                if hb.exists() and b"hb " in hb.read_bytes():
                    return True
                time.sleep(0.1)
            return False
        finally:
            process.kill()
            process.wait()


def guest_accelerator(guest: Guest, qemu: str, kvm_usable: bool) -> str:
    """``kvm`` if this guest boots under KVM here (probed once, the answer
    cached beside the guest), else ``tcg``."""
    if not kvm_usable:
        return "tcg"
    cache = guest.kernel.parent / "accel"
    key = f"{guest.kernel.stat().st_size}:{guest.initrd.stat().st_size}:{qemu}"
    if cache.exists():
        cached_key, _, answer = cache.read_text().strip().rpartition(" ")
        if cached_key == key and answer in ("kvm", "tcg"):
            return answer
    answer = "kvm" if _probe_kvm(guest, qemu, KVM_PROBE_TIMEOUT) else "tcg"
    cache.write_text(f"{key} {answer}\n")
    return answer


def main() -> int:
    """Build the guest (for ``make setup``); one line on failure."""
    try:
        guest = build()
    except GuestError as e:
        print(f"setup: the Linux guest was not built: {e}", file=sys.stderr)
        return 1
    print(f"setup: Linux guest in {guest.kernel.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/bin/sh
# Install the Debian packages securemig needs, only those that are missing.
# Idempotent: does nothing (and needs no network) when all are present.
set -eu
want="swtpm swtpm-tools libtss2-dev tpm2-tools pkg-config qemu-system-x86"
# systemd-analyze (verify, security --offline) checks contrib/systemd in the tests.
want="$want systemd"
# The benchmark's OpenSSH baseline runs its own sshd (no system service is started).
want="$want openssh-server openssh-client"
# The libvirt backend: system-mode libvirtd (the -sysv flavour, so no systemd-container comes in),
# virsh, and the headers libvirt-python builds against (pip has only its sdist).
want="$want libvirt-daemon-system libvirt-daemon-system-sysv libvirt-clients libvirt-dev"
# qemu-img: qcow2 disks of libvirt domains.
want="$want qemu-utils"
# A Python without venv/ensurepip (Debian's python3 before python3-venv) cannot build .venv.
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    want="$want python3-venv"
fi
missing=""
for p in $want; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing="$missing $p"
    fi
done
[ -z "$missing" ] && exit 0
echo "setup: installing Debian packages:$missing"
if [ "$(id -u)" -eq 0 ]; then
    sudo=""
elif command -v sudo >/dev/null 2>&1; then
    sudo="sudo"
else
    echo "setup: missing Debian packages:$missing; install them as root (apt-get install$missing)" >&2
    exit 1
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing

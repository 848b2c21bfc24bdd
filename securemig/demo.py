"""
``securemig demo``: the whole system in one command, on loopback.

In a temporary directory it starts a privacy CA (``twistd securemig-pca``)
and two hosts, each with its own swtpm as host TPM, enrolled through the
privacy CA; creates a VM with a vTPM key sealed to the source's TPM;
migrates it securely (mutual TLS 1.3, attestation both ways, key release)
to a real ``twistd securemig`` destination; migrates an identical VM over
the insecure variant; checks what arrived, and prints a table of phases.
It ends every process it started.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from securemig import processes
from securemig.bundle import Bundle, create_image_vm

SOURCE, DESTINATION = "source-a", "dest-b"


def _digests(bundle: Bundle) -> dict[str, str]:
    result = {}
    for image in bundle.manifest.images:
        h = hashlib.sha256()
        with open(bundle.image_path(image), "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        result[image.name] = h.hexdigest()
    return result


class _Stopper:
    """Remembers every process started, to end them all by pid."""

    def __init__(self) -> None:
        self.stops: list[Callable[[], object]] = []

    def add(self, stop: Callable[[], object]) -> None:
        self.stops.append(stop)

    def stop_all(self) -> None:
        for stop in reversed(self.stops):
            stop()


def _setup(work: Path, stopper: _Stopper, say: Callable[..., None]) -> dict[str, Any]:
    """The site CA, two enrolled hosts and a destination; returns addresses."""
    from securemig.identity import init_host
    from securemig.identity import issue_tls as issue
    from securemig.pca.core import PrivacyCA
    from securemig.pki import Authority
    from securemig.tpm import swtpm

    started = time.monotonic()
    site = Authority.create("demo site CA")
    site.save(work / "site-ca")
    vendor = work / "tpm-vendor-ca"
    tpms = {}
    for host in (SOURCE, DESTINATION):
        swtpm.provision(work / f"tpm-{host}", vendor)
        tpm = swtpm.start(work / f"tpm-{host}")
        stopper.add(tpm.stop)
        tpms[host] = tpm
    say(f"   two swtpm host TPMs with EK certificates ({time.monotonic() - started:.1f} s)")
    PrivacyCA.init(work / "pca", swtpm.ca_certificates(vendor))
    (work / "pca-tls").mkdir()
    issue(site, "localhost", work / "pca-tls")
    tls = work / "pca-tls"
    pca_process, pca_port = processes.start_twistd(
        "securemig-pca",
        "--dir",
        str(work / "pca"),
        "--listen",
        f"ssl:0:privateKey={tls / 'tls.key'}:certKey={tls / 'tls.pem'}:interface=127.0.0.1",
        port_file=work / "pca.port",
        log_file=work / "pca.log",
    )
    stopper.add(lambda: processes.end_process(pca_process))
    say(f"   privacy CA `twistd securemig-pca` on https://localhost:{pca_port}")
    for host in (SOURCE, DESTINATION):
        t = time.monotonic()
        init_host(
            work / host,
            host,
            tpms[host].tcti,
            work / "site-ca",
            f"https://localhost:{pca_port}",
            work / "pca" / "ca.pem",
        )
        say(
            f"   host {host}: TLS certificate, AK, enrolled (EK certificate checked, "
            f"credential activated) in {time.monotonic() - t:.2f} s"
        )
    state = work / "destination"
    state.mkdir()
    process, port = processes.start_twistd(
        "securemig",
        "--state-dir",
        str(state),
        "--identity",
        str(work / DESTINATION),
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--insecure-listen",
        "tcp:0:interface=127.0.0.1",
        "--insecure-port-file",
        str(work / "insecure.port"),
        "--tofu",
        port_file=work / "secure.port",
        log_file=work / "destination.log",
    )
    destination = processes.Destination(process, port, state, work / "destination.log")
    stopper.add(destination.stop)
    insecure_port = int((work / "insecure.port").read_text())
    say(
        f"   destination {DESTINATION} `twistd securemig`: secure on port {port}, "
        f"insecure on port {insecure_port}"
    )
    return {"secure": port, "insecure": insecure_port, "state": state}


def _migrate(work: Path, name: str, port: int, secure: bool) -> dict[str, Any]:
    args = [
        "migrate",
        name,
        "--vm-dir",
        str(work / "vms"),
        "--to",
        f"127.0.0.1:{port}",
        "--json",
        "--no-progress",
    ]
    if secure:
        args += ["--identity", str(work / SOURCE), "--destination-name", DESTINATION, "--tofu"]
    else:
        args += ["--insecure"]
    result = processes.securemig(*args)
    if result.returncode != 0:
        raise RuntimeError(
            f"securemig migrate exited with {result.returncode}: {result.stderr.strip()}"
        )
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def run(size_mib: int = 256, as_json: bool = False, keep: bool = False) -> int:
    """Run the demo; returns the process exit status."""
    from securemig import vtpm
    from securemig.secure import open_attestor

    work = Path(tempfile.mkdtemp(prefix="securemig-demo-"))
    say: Callable[..., None] = (lambda *a: print(*a, file=sys.stderr)) if as_json else print
    stopper = _Stopper()
    try:
        say(f"securemig demo in {work}")
        say("1. setting up a site CA, a privacy CA and two hosts")
        ports = _setup(work, stopper, say)
        source = open_attestor(work / SOURCE, None, False)
        secret = os.urandom(32)
        secure_vm = create_image_vm(
            work / "vms",
            "demo-vm",
            size_mib,
            disk_mib=32,
            sealed_vtpm_key=source.seal(secret),
            vtpm=(secret, work / "vtpm-ca"),
        )
        source.tpm.close()
        vtpm_identity = secure_vm.manifest.vtpm
        plain_vm = create_image_vm(work / "vms", "demo-vm-insecure", size_mib, disk_mib=32)
        before = {"secure": _digests(secure_vm), "insecure": _digests(plain_vm)}
        say(
            f"2. created VM demo-vm (RAM {size_mib} MiB, disk 32 MiB, a swtpm vTPM encrypted "
            f"at rest, its key sealed to {SOURCE}'s TPM) and demo-vm-insecure (no vTPM)"
        )
        say("3. migrating demo-vm securely: mutual TLS 1.3, attestation both ways, key release")
        secure = _migrate(work, "demo-vm", ports["secure"], secure=True)
        say("4. migrating demo-vm-insecure over the insecure variant")
        insecure = _migrate(work, "demo-vm-insecure", ports["insecure"], secure=False)
        vms = ports["state"] / "vms"
        arrived = Bundle.load(vms / "demo-vm")
        destination = open_attestor(work / DESTINATION, None, False)
        released = destination.unseal(arrived.vtpm_key_path.read_bytes())
        checks = {
            "images_identical": _digests(arrived) == before["secure"]
            and _digests(Bundle.load(vms / "demo-vm-insecure")) == before["insecure"],
            "vtpm_key_released_to_destination_tpm": released == secret,
            "same_vtpm_at_destination": arrived.manifest.vtpm == vtpm_identity is not None
            and vtpm.identity(arrived.path / vtpm.STATE_DIR, released) == vtpm_identity,
            "source_copies_removed": not secure_vm.path.exists() and not plain_vm.path.exists(),
        }
        destination.tpm.close()
        result = {"secure": secure, "insecure": insecure, "checks": checks}
        if as_json:
            print(json.dumps(result, indent=2))
        else:
            _table(say, secure, insecure)
            for check, ok in checks.items():
                say(f"   {check.replace('_', ' ')}: {'yes' if ok else 'NO'}")
        ok = secure["outcome"] == insecure["outcome"] == "done" and all(checks.values())
        return 0 if ok else 1
    except RuntimeError as e:
        say(f"demo failed: {e}")
        return 1
    finally:
        stopper.stop_all()
        if keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _table(say: Callable[..., None], secure: dict[str, Any], insecure: dict[str, Any]) -> None:
    say("5. phases (seconds, from the source's journal):")
    say(f"   {'phase':<28} {'secure':>9} {'insecure':>9}")
    order = [
        "connect",
        "hello",
        "hello + attest destination",
        "attest source",
        "key transfer",
        "streams",
        "commit",
        "resume",
    ]
    seen = set(secure["phases"]) | set(insecure["phases"])
    names = [n for n in order if n in seen] + sorted(seen - set(order))
    for name in names:
        s = secure["phases"].get(name)
        i = insecure["phases"].get(name)
        say(
            f"   {name:<28} {'' if s is None else f'{s:9.4f}':>9} "
            f"{'' if i is None else f'{i:9.4f}':>9}"
        )
    say(f"   {'total':<28} {secure['seconds']:9.3f} {insecure['seconds']:9.3f}")
    say(f"   {'MiB/s':<28} {secure['throughput_mibps']:>9} {insecure['throughput_mibps']:>9}")

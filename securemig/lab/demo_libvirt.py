"""
``securemig demo --backend libvirt``: an operator's libvirt domain moved
between two attested hosts, in one command, on this machine.

In a temporary directory: the lab's privacy CA and two enrolled hosts
(:class:`~securemig.lab.lab.Lab`), two system-mode ``libvirtd``\\ s each in
its own mount namespace (:class:`~securemig.lab.libvirt.LibvirtHost`) and a
``twistd securemig --backend libvirt`` on each host, pointed at its host's
libvirtd by ``LIBVIRT_DEFAULT_URI``.  A domain of the project's Linux guest
(heartbeat, PCR 16) with a ``tpm-crb`` vTPM encrypted by a libvirt secret,
a NIC and a disk is defined the way a site has it (the secret readable and
stored in ``/etc/libvirt/secrets``), then ``securemig vm adopt`` and ``vm
start`` take it over, and it is migrated suspended to the destination and
back.  Then the destination's PCR 7 is extended and the migration refused:
that host never receives the secret, the domain runs on at the source.
Every check is printed (``--json``: as JSON); every process is ended by its
pid.  ``--live`` moves it live instead (libvirt's own migration, its
sockets carried sealed by securemig; the disk is one file both lab hosts
see, shared storage).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from securemig.hypervisor.heartbeat import Watch
from securemig.hypervisor.libvirt import (
    CONNECT_ENV,
    RUN_DIR_ENV,
    UNSAFE_SHARED_ENV,
    require_libvirt,
)
from securemig.lab import processes
from securemig.lab.lab import DESTINATION, SOURCE, Lab
from securemig.lab.libvirt import LibvirtHost, define_guest
from securemig.trust.attestor import open_attestor

#: The backend kind this demo shows (``securemig demo --backend KIND``).
KIND = "libvirt"
#: The demo's domain.
DOMAIN = "demo-domain"
#: How long the guest may take to boot or beat again (TCG on a busy machine).
BEAT_TIMEOUT = 240.0


def _secret_readable(host: LibvirtHost, secret_uuid: str) -> bool:
    """Whether ``virsh secret-get-value`` prints the secret on ``host``, as
    any root user there would try, or a file under ``/etc/libvirt/secrets``
    holds it."""
    answer = subprocess.run(
        ["virsh", "-c", host.uri, "secret-get-value", secret_uuid],
        capture_output=True,
        text=True,
        check=False,
    )
    files = list((host.directory / "etc" / "secrets").glob(f"{secret_uuid}*"))
    return answer.returncode == 0 or bool(files)


class _Demo:
    """One run: the lab, the two libvirt hosts, what was checked."""

    def __init__(self, work: Path, say: Callable[..., None], live: bool) -> None:
        self.work, self.say, self.live = work, say, live
        self.lab = Lab(work, say)
        self.hosts: dict[str, LibvirtHost] = {}
        self.checks: dict[str, bool] = {}
        self.migrations: list[dict[str, Any]] = []

    def host(self, name: str, index: int) -> LibvirtHost:
        host = LibvirtHost(name, index)
        self.lab.on_stop(host.remove)
        started = time.monotonic()
        host.start()
        pid = host.process.pid if host.process is not None else "?"
        self.say(
            f"   libvirtd of {name} in its own mount namespace (pid {pid}, "
            f"{time.monotonic() - started:.1f} s): {host.uri}"
        )
        self.hosts[name] = host
        return host

    def securemig(self, *args: str) -> str:
        done = processes.securemig(*args)
        if done.returncode != 0:
            raise RuntimeError(f"securemig {args[0]} {args[1]}: {done.stderr.strip()}")
        return done.stdout.strip()

    def migrate(self, destination: Any, vm_dir: Path, source: str, to: str) -> dict[str, Any]:
        env = _env(self.hosts[source])
        extra: tuple[str, ...] = ()
        if self.live:
            extra = ("--live",)
            # The demo's disk is one file both lab hosts see (one machine):
            # shared storage, which libvirt cannot tell from a copy.
            env[UNSAFE_SHARED_ENV] = "1"
        summary, _ = self.lab.migrate(
            destination, DOMAIN, True, vm_dir=vm_dir, source=source, to=to, extra=extra, env=env
        )
        self.migrations.append(summary)
        moved = summary.get("bytes") or summary.get("transferred") or 0
        self.say(
            f"   {summary.get('outcome')} in {summary.get('seconds', 0):.1f} s, "
            f"{moved / 2**20:.0f} MiB moved"
        )
        return summary

    def run(self) -> bool:
        say, work = self.say, self.work
        libvirt = require_libvirt()
        say("1. a site CA, a privacy CA, two enrolled hosts; a libvirtd for each")
        self.lab.start()
        a = self.host(SOURCE, 8)
        b = self.host(DESTINATION, 9)
        # Outside both hosts' bind-mounted trees: the same path in both
        # namespaces (a site's disk directory), copied by each migration.
        disk = a.directory / "disks" / f"{DOMAIN}.img"
        guest = define_guest(a, DOMAIN, persistent_secret=True, disk=str(disk))
        say(
            f"2. domain {DOMAIN} defined at {SOURCE} as a site has it: the Linux guest, a "
            "tpm-crb vTPM encrypted by libvirt secret "
            f"{guest.secret_uuid} (readable, in /etc/libvirt/secrets), a NIC, a 64 MiB disk"
        )
        vms = work / "vms"
        identity = str(work / SOURCE)
        for line in (
            self.securemig(
                "vm", "adopt", DOMAIN, "--dir", str(vms), "--connect", a.uri,
                "--identity", identity,
            ),
            self.securemig("vm", "start", DOMAIN, "--dir", str(vms), "--identity", identity),
        ):  # fmt: skip
            say(f"   {line}")
        watch = Watch(a.path(guest.heartbeat))
        self.lab.on_stop(watch.stop)
        first = watch.wait(3, BEAT_TIMEOUT)
        say(f"   the guest beats (heartbeat {first.seq}), PCR 16 = {first.pcr16[:16]}…")
        readable = {h.name: _secret_readable(h, guest.secret_uuid) for h in (a, b)}
        self.checks["secret_unreadable_after_adoption"] = not any(readable.values())

        at_b = self.lab.start_destination(backend=KIND, env=_env(b))
        at_a = self.lab.start_destination(host=SOURCE, backend=KIND, env=_env(a))
        say(f"   `twistd securemig --backend {KIND}` on both hosts")
        conn_a, conn_b = libvirt.open(a.uri), libvirt.open(b.uri)
        try:
            uuid_ = conn_a.lookupByName(DOMAIN).UUIDString()
            how = (
                "live (libvirt's migration, its sockets carried sealed, paused there until "
                "the commit)"
                if self.live
                else "suspended (save streamed, restored paused there)"
            )
            say(f"3. securemig migrate {DOMAIN} --to {DESTINATION}: {how}")
            self.migrate(at_b, vms, SOURCE, DESTINATION)
            watch.follow(b.path(guest.heartbeat))
            there = watch.wait(3, BEAT_TIMEOUT, source=1)
            self.checks["runs_at_destination_same_memory_and_pcr16"] = (
                there.pcr16 == first.pcr16 and watch.continuous()
            )
            self.checks["defined_at_destination_only"] = _defined(conn_b, uuid_) and not _defined(
                conn_a, uuid_
            )
            self.checks["secret_never_readable"] = not any(
                _secret_readable(h, guest.secret_uuid) for h in (a, b)
            )
            say(
                f"   heartbeat {there.seq} from {DESTINATION}, in sequence; PCR 16 kept; the "
                f"secret readable on neither host"
            )
            say(f"4. and back to {SOURCE}")
            self.migrate(at_a, at_b.state_dir / "vms", DESTINATION, SOURCE)
            home = watch.wait(3, BEAT_TIMEOUT, source=0)
            self.checks["back_at_source"] = (
                home.pcr16 == first.pcr16
                and watch.continuous()
                and _defined(conn_a, uuid_)
                and not _defined(conn_b, uuid_)
            )
            say(
                f"5. a refusal: {DESTINATION}'s PCR 7 (secure boot policy) is extended, then "
                f"{DOMAIN} is sent there again"
            )
            with open_attestor(work / DESTINATION, None, False) as dest:
                dest.tpm.pcr_extend(7, b"securemig demo: a changed boot policy")
            try:
                self.migrate(at_b, at_a.state_dir / "vms", SOURCE, DESTINATION)
                refusal = "NOT REFUSED"
            except RuntimeError as e:
                refusal = str(e).rsplit("securemig: ", 1)[-1]
            say(f"   refused: {refusal}")
            still = watch.wait(3, BEAT_TIMEOUT, source=0)
            self.checks["refused_no_secret_at_destination_domain_runs_at_source"] = (
                refusal != "NOT REFUSED"
                and conn_b.listSecrets() == []
                and not _defined(conn_b, uuid_)
                and conn_a.lookupByUUIDString(uuid_).state()[0] == libvirt.VIR_DOMAIN_RUNNING
                and still.pcr16 == first.pcr16
                and watch.continuous()
            )
        finally:
            conn_a.close()
            conn_b.close()
        say(f"   largest heartbeat gap seen: {watch.largest_gap_ms() / 1000:.1f} s")
        for check, ok in self.checks.items():
            say(f"   {check.replace('_', ' ')}: {'yes' if ok else 'NO'}")
        return all(self.checks.values())


def _env(host: LibvirtHost) -> dict[str, str]:
    """What a securemig process of ``host`` is told of its libvirt: its URI
    and where it sees libvirt's ``/run/libvirt`` (its own mount namespace's)."""
    return {CONNECT_ENV: host.uri, RUN_DIR_ENV: str(host.run_dir)}


def _defined(conn: Any, domain_uuid: str) -> bool:
    libvirt = require_libvirt()
    try:
        conn.lookupByUUIDString(domain_uuid)
    except libvirt.libvirtError:
        return False
    return True


def run(as_json: bool = False, keep: bool = False, live: bool = False) -> int:
    """Run the demo; returns the process exit status (0: every check held)."""
    work = Path(tempfile.mkdtemp(prefix="securemig-demo-"))
    say: Callable[..., None] = (lambda *a: print(*a, file=sys.stderr)) if as_json else print
    demo = _Demo(work, say, live)
    ok = False
    try:
        say(f"securemig demo --backend {KIND} in {work}")
        ok = demo.run()
    except (RuntimeError, TimeoutError, OSError) as e:
        say(f"demo failed: {e}")
    except Exception as e:  # libvirt's errors, which need no traceback either
        say(f"demo failed: {type(e).__name__}: {e}")
    finally:
        demo.lab.stop()
        if keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if as_json:
        pids = {
            name: host.process.pid for name, host in demo.hosts.items() if host.process is not None
        }
        print(
            json.dumps(
                {
                    "backend": KIND,
                    "checks": demo.checks,
                    "migrations": demo.migrations,
                    "libvirtd_pids": pids,
                }
            )
        )
    return 0 if ok else 1

"""
``securemig bench --libvirt``: a libvirt domain's live migration by
securemig (attested, libvirt's sockets carried sealed) and by libvirt's own
means, with and without TLS.

Two lab libvirt hosts (:class:`~securemig.lab.libvirt.LibvirtHost`, each a
system-mode ``libvirtd`` in its own mount namespace) and one domain of the
project's Linux guest (``--libvirt-mib`` of memory, its workload rewriting
``--dirty-mib-s`` MiB per second, a ``--disk-mib`` raw disk copied over NBD,
a ``tpm-crb`` vTPM encrypted by a libvirt secret, a NIC), moved back and
forth between the hosts, the protocols alternating within one run:

- ``libvirt-tls``: ``virsh migrate --live --tls --copy-storage-all`` with
  the destination's libvirtd reached over ``qemu+tls://`` (its TLS port on
  loopback); libvirt's RPC, QEMU's memory stream and the NBD disk copy all
  under TLS, certificates from a site CA made for the bench, every peer
  verified (``tls_no_verify_certificate = 0``, ``migrate_tls_x509_verify``);
- ``libvirt-plain``: the same ``virsh migrate`` without ``--tls``: the RPC on
  the destination's UNIX socket, QEMU's stream and NBD on plain TCP on
  loopback;
- ``secure-libvirt``: ``securemig migrate DOMAIN --live --copy-storage``
  between two enrolled hosts whose ``twistd securemig --backend libvirt``
  carry libvirt's sockets sealed (attestation both ways and the key
  release included in its time); skipped, and said so, where the libvirt
  backend does not migrate live;
- ``secure-libvirt-daemon`` (on request: ``--protocols``, see
  :data:`SERIES`): ``secure-libvirt`` driven by the source host's daemon,
  ``securemig migrate --live --copy-storage --daemon`` only asking it
  (:mod:`securemig.lab.bench.driven`); checked in the source's journal
  (``driven_by``).

Both hosts' ``twistd securemig`` run for the whole bench, started before
any clock, so in both securemig series their CPU is what they spend over
the move, as for libvirtd.

The domain is adopted by securemig (its secret sealed, in neither
libvirt).  The native baselines need the secret defined, with the same
value, on both hosts before the migration -- libvirt's requirement, what
securemig replaces -- so it is defined (ephemeral, private) on both hosts
for each native move and its unmeasured move back, and undefined after;
only securemig's arm moves the domain (and its bundle) for good, so the
native moves of a run start from the host securemig's last left it.

Each record has ``total_s`` (the wall clock of the ``virsh`` command),
``downtime_ms`` (libvirt's, from the destination's completed job),
``guest_downtime_ms`` (the largest gap between two heartbeats the host saw
across both hosts' files), ``cpu_s`` (user + system seconds of every
process of both sides over the move: both libvirtds, both QEMUs and swtpms
-- sampled every 0.1 s, so a process that ends, the source QEMU, loses at
most its last 0.1 s -- plus ``virsh``'s or ``securemig migrate``'s own,
and for securemig's arms both ``twistd securemig``), ``memory_bytes`` (libvirt's
``memory_processed``) and ``disk_bytes`` (``disk_processed``, when libvirt
reports it: 9.0 does not at the destination), and whether the guest kept running (heartbeat in
sequence), ``own_cpu_s`` (of ``cpu_s``: ``virsh``'s or ``securemig
migrate``'s own) and ``daemons_cpu_s`` (securemig's daemons', its arm
only); securemig's arm also ``outside_migration_s``, the part of its
``total_s`` outside the migration ``securemig migrate`` reports (its
``seconds``): the process's start-up -- Python and its imports -- and exit,
which ``virsh`` hardly has.  The report gives medians and the ratios
secure-libvirt / libvirt-tls and libvirt-tls / libvirt-plain.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securemig.hypervisor.backends import capabilities
from securemig.hypervisor.heartbeat import Watch
from securemig.hypervisor.libvirt import CONNECT_ENV, RUN_DIR_ENV, LibvirtError, require_libvirt
from securemig.lab import processes
from securemig.lab.bench.driven import CPU_COUNTED, daemon_driven, driver
from securemig.lab.bench.live import print_switchover, switchover_times
from securemig.lab.bench.provenance import byte_compile, one_line, provenance
from securemig.lab.lab import DESTINATION, SOURCE, Lab
from securemig.lab.libvirt import (
    HostTLS,
    LibvirtHost,
    create_disk,
    define_guest,
    secret_xml,
    write_tls,
)
from securemig.trust.pki import Authority

KIND = "libvirt"
#: The series run by default, in the order they alternate.
PROTOCOLS = ("secure-libvirt", "libvirt-tls", "libvirt-plain")
#: Every series ``--protocols`` may name with ``--libvirt``, in the order
#: they alternate.
SERIES = ("secure-libvirt", "secure-libvirt-daemon", "libvirt-tls", "libvirt-plain")
#: The series that are securemig's own (run where the backend migrates live).
SECUREMIG = ("secure-libvirt", "secure-libvirt-daemon")
DOMAIN = "bench-domain"
#: Lab host indexes: their QEMU migration port ranges (49152 + 100 * index).
INDEXES = (12, 13)
#: How long the guest may take to boot or to beat after a move.
BEAT_TIMEOUT = 240.0
#: How long one ``virsh migrate`` may take.
MIGRATE_TIMEOUT = 600.0


class CPUSampler:
    """The CPU time of a changing set of processes over an interval: every
    0.1 s it reads each pid ``pids()`` names and keeps the last value seen,
    so a process that ends during the interval still counts (all but its
    last tenth of a second); one first seen during it counts from zero."""

    def __init__(self, pids: Any) -> None:
        self._pids = pids
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._sample(baseline=True)
        self._thread = threading.Thread(target=self._run, daemon=True, name="cpu-sampler")
        self._thread.start()

    def _sample(self, baseline: bool = False) -> None:
        for pid in self._pids():
            value = processes.cpu_seconds(pid)
            if value is None:
                continue
            self._first.setdefault(pid, value if baseline else 0.0)
            self._last[pid] = value

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()

    def stop(self) -> float:
        """Stop sampling; the seconds used by all the processes seen."""
        self._stop.set()
        self._thread.join()
        self._sample()
        return round(sum(self._last[p] - self._first[p] for p in self._last), 2)

    def used(self, pids: list[int]) -> float:
        """The seconds used by those of ``pids`` seen (after :meth:`stop`)."""
        return round(sum(self._last[p] - self._first[p] for p in pids if p in self._last), 2)


#: Held while a libvirt bench runs (:func:`run`): one per machine.
MACHINE_LOCK = "/tmp/securemig-bench-libvirt.lock"


def _try_lock(f: Any) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _free_port(lo: int, hi: int) -> int:
    """A port of ``lo..hi`` free on loopback now (a destination QEMU's
    range), from the top: libvirt's own allocator (the NBD server) takes
    them from the bottom."""
    for port in range(hi, lo, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}..{hi}")


def _tls_ports() -> tuple[int, int]:
    """Loopback TLS ports for the two libvirtds, the kernel's choice of
    free ones (fixed ports collided when two benches ran at once: a test
    runner's two workers; libvirtd then would not start)."""
    with socket.socket() as a, socket.socket() as b:  # both held: two ports
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        return a.getsockname()[1], b.getsockname()[1]


def _site_tls(work: Path, names: list[str]) -> list[Path]:
    """A site CA made for the bench and, per host, its libvirt and QEMU TLS
    files (a certificate for ``localhost``, server and client use)."""
    ca = Authority.create("securemig bench site CA")
    ca_pem = ca.cert.public_bytes(serialization.Encoding.PEM)
    directories = []
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cert_pem = ca.issue(key.public_key(), "localhost").public_bytes(serialization.Encoding.PEM)
        directory = work / f"tls-{name}"
        write_tls(directory, ca_pem, cert_pem, key_pem)
        directories.append(directory)
    return directories


class _Bench:
    """The two hosts, the domain, and the moves."""

    def __init__(self, work: Path, memory_mib: int, dirty_mib_s: int, disk_mib: int) -> None:
        self.work = work
        self.memory_mib, self.dirty, self.disk_mib = memory_mib, dirty_mib_s, disk_mib
        self.hosts: list[LibvirtHost] = []
        self.libvirt = require_libvirt()
        self.lab = Lab(work / "lab")
        #: The secret's value: securemig keeps it sealed (the domain is
        #: adopted); the native arms need it defined on both hosts.
        self.value = os.urandom(32)
        #: The last ``securemig migrate``'s own migration seconds.
        self.last_seconds: float | None = None
        #: Who drove the last securemig move, by the source's journal.
        self.last_driver: str | None = None
        #: The last securemig move's journals: the source's, the destination's.
        self.last_journals: tuple[Path, Path] | None = None
        #: Where the domain's securemig bundle is, per host index.
        self.homes: dict[int, Path] = {}
        self.daemons: dict[int, Any] = {}

    def start(self) -> None:
        self.lab.start()
        for directory, index, port, name in zip(
            _site_tls(self.work, ["a", "b"]), INDEXES, _tls_ports(), ["ba", "bb"], strict=True
        ):
            host = LibvirtHost(name, index, tls=HostTLS(directory, port))
            self.hosts.append(host)
            host.start()
        a, b = self.hosts
        wss = max(16, min(self.memory_mib // 4, 4 * self.dirty or 16))
        disk = "/var/lib/libvirt/images/bench.img"
        self.guest = define_guest(
            a,
            DOMAIN,
            disk_mib=self.disk_mib,
            memory_mib=self.memory_mib,
            dirty_mib_s=self.dirty,
            wss_mib=wss,
            disk=disk,
        )
        conn = self.libvirt.open(a.uri)
        try:
            conn.secretLookupByUUIDString(self.guest.secret_uuid).setValue(self.value)
        finally:
            conn.close()
        # Adopted and started by securemig, as its arm needs; the native arms
        # get the secret defined on both hosts around each of their moves.
        vms = self.lab.vm_dir
        identity = str(self.lab.work / SOURCE)
        for args in (
            ("adopt", DOMAIN, "--dir", str(vms), "--connect", a.uri, "--identity", identity),
            ("start", DOMAIN, "--dir", str(vms), "--identity", identity),
        ):
            done = processes.securemig("vm", *args)
            if done.returncode != 0:
                raise RuntimeError(f"securemig vm {args[0]}: {done.stderr.strip()}")
        self.homes[0] = vms
        for index, host, name in ((0, a, SOURCE), (1, b, DESTINATION)):
            self.daemons[index] = self.lab.start_destination(
                host=name, backend=KIND, env=_env(host)
            )
        watch = Watch(a.path(self.guest.heartbeat))
        try:
            watch.wait(5, BEAT_TIMEOUT)
        finally:
            watch.stop()

    def stop(self) -> None:
        self.lab.stop()
        for host in self.hosts:
            host.remove()

    def pids(self) -> list[int]:
        pids = [h.process.pid for h in self.hosts if h.process is not None]
        for host in self.hosts:
            pids += host.children()
        return pids

    def _secret(self, defined: bool) -> None:
        """libvirt's way, for the native arms: the same secret on both
        hosts (ephemeral, private), or on neither."""
        for host in self.hosts:
            conn = self.libvirt.open(host.uri)
            try:
                with contextlib.suppress(self.libvirt.libvirtError):
                    conn.secretLookupByUUIDString(self.guest.secret_uuid).undefine()
                if defined:
                    secret = conn.secretDefineXML(
                        secret_xml(self.guest.secret_uuid, DOMAIN, ephemeral=True, private=True)
                    )
                    secret.setValue(self.value)
            finally:
                conn.close()

    def move(self, protocol: str, where: int) -> dict[str, Any]:
        """Move the domain from host ``where`` to the other by ``protocol``
        and measure it.  A native move is followed by an unmeasured one
        back (the domain's securemig bundle stays where it is), with the
        secret defined on both hosts only for the two."""
        if protocol in SECUREMIG:
            return self._measure(protocol, where, self._securemig)
        self._secret(True)
        try:
            self._disk_made(1 - where)
            record = self._measure(protocol, where, self._virsh)
            self._disk_left(where)
            self._disk_made(where)
            self._virsh("libvirt-plain", 1 - where)
            self._disk_left(1 - where)
        finally:
            self._secret(False)
        return record

    def _disk_made(self, index: int) -> None:
        """Before a native move to host ``index``: the empty disk it copies
        into, as a site using ``virsh migrate --copy-storage-all`` makes it
        (libvirt creates none without a storage pool of the directory);
        unmeasured.  securemig's arm creates its own."""
        path = self.hosts[index].path(self.guest.disk)
        if not path.exists():
            create_disk(self.hosts[index], self.guest.disk, "raw", self.disk_mib)

    def _disk_left(self, index: int) -> None:
        """After a native move from host ``index``: the stale copy libvirt
        leaves there removed, as securemig removes its own once committed
        (and its destination never writes over a file); unmeasured."""
        self.hosts[index].path(self.guest.disk).unlink(missing_ok=True)

    def _securemig(self, protocol: str, where: int) -> float:
        """``securemig migrate DOMAIN --live --copy-storage`` (``--daemon``
        for the daemon's series, asking the source host's); the CPU seconds
        of that process."""
        other = 1 - where
        names = (SOURCE, DESTINATION)
        asked = daemon_driven(protocol)
        # Driven by the daemon, the source's journal is its own.
        state_dir = (
            self.daemons[where].state_dir if asked else self.lab.work / f"{names[where]}-state"
        )
        summary, usage = self.lab.migrate(
            self.daemons[other],
            DOMAIN,
            True,
            vm_dir=self.homes[where],
            source=names[where],
            to=names[other],
            extra=("--live", "--copy-storage", *(("--daemon",) if asked else ())),
            env=_env(self.hosts[where]),
            state_dir=state_dir,
        )
        if summary.get("outcome") != "done":
            raise RuntimeError(f"{protocol}: {summary}")
        self.last_driver = driver(state_dir / "journal.sqlite", self.daemons[where].process.pid)
        self.last_journals = (
            state_dir / "journal.sqlite",
            self.daemons[other].state_dir / "journal.sqlite",
        )
        if self.last_driver != ("daemon" if asked else "command"):
            raise RuntimeError(
                f"{protocol}: the source's journal says the migration was driven by "
                f"{self.last_driver!r}"
            )
        self.last_seconds = float(summary["seconds"])
        self.homes[other] = self.daemons[other].state_dir / "vms"
        return float(usage.cpu_s)

    def _virsh(self, protocol: str, where: int) -> float:
        """``virsh migrate`` (``--tls`` for libvirt-tls); the CPU seconds
        of ``virsh``."""
        src, dst = self.hosts[where], self.hosts[1 - where]
        index = INDEXES[1 - where]
        port = _free_port(49152 + 100 * index, 49152 + 100 * index + 63)
        argv = ["virsh", "-c", src.uri, "migrate", "--live", "--persistent"]
        argv += [
            "--undefinesource",
            "--copy-storage-all",
            "--migrateuri",
            f"tcp://localhost:{port}",
        ]
        if protocol == "libvirt-tls":
            assert dst.tls is not None
            argv += ["--tls", DOMAIN, dst.tls.uri()]
        else:
            argv += [DOMAIN, dst.uri]
        with tempfile.TemporaryFile() as errors:
            process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errors)
            usage = processes.wait_process(process, timeout=MIGRATE_TIMEOUT)
            if usage.status != 0:
                errors.seek(0)
                raise RuntimeError(
                    f"{protocol}: virsh migrate failed: "
                    f"{errors.read().decode(errors='replace').strip()}"
                )
        return float(usage.cpu_s)

    def _measure(self, protocol: str, where: int, mover: Any) -> dict[str, Any]:
        src, dst = self.hosts[where], self.hosts[1 - where]
        # The destination's heartbeat file holds the previous visits' beats:
        # emptied (no QEMU writes it there now), then followed from its start.
        heartbeat = dst.path(self.guest.heartbeat)
        if heartbeat.exists():
            heartbeat.write_bytes(b"")
        watch = Watch(src.path(self.guest.heartbeat))
        watch.follow(heartbeat)
        # securemig's daemons are processes of its arm only.
        daemons = [d.process.pid for d in self.daemons.values()] if mover == self._securemig else []
        sampler = CPUSampler(lambda: self.pids() + daemons)
        started = time.monotonic()
        self.last_seconds = self.last_driver = self.last_journals = None
        try:
            own_cpu = mover(protocol, where)
            total = time.monotonic() - started
            cpu = sampler.stop() + own_cpu
            daemons_cpu = sampler.used(daemons)
            watch.wait(3, BEAT_TIMEOUT, source=1)
        finally:
            sampler.stop()
            watch.stop()
        stats = self._completed(dst)
        return {
            "protocol": protocol,
            "from": src.name,
            "total_s": round(total, 3),
            "downtime_ms": stats.get("downtime"),
            "guest_downtime_ms": watch.largest_gap_ms(),
            "cpu_s": round(cpu, 2),
            # Of it: virsh's or securemig migrate's own, and securemig's daemons'.
            "own_cpu_s": round(own_cpu, 2),
            "daemons_cpu_s": daemons_cpu if daemons else None,
            "memory_bytes": stats.get("memory_processed"),
            "disk_bytes": stats.get("disk_processed") or None,
            "guest_kept_running": watch.continuous(),
            "outside_migration_s": (
                None if self.last_seconds is None else round(total - self.last_seconds, 3)
            ),
            "driven_by": self.last_driver,
            # securemig's moves: where the guest's pause went (its commit).
            "switchover_ms": (
                None if self.last_journals is None else switchover_times(watch, *self.last_journals)
            ),
        }

    def _completed(self, host: LibvirtHost) -> dict[str, Any]:
        """libvirt's statistics of the domain's completed incoming job."""
        conn = self.libvirt.open(host.uri)
        try:
            stats = conn.lookupByName(DOMAIN).jobStats(self.libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
            return dict(stats)
        except self.libvirt.libvirtError:
            return {}
        finally:
            conn.close()


def _env(host: LibvirtHost) -> dict[str, str]:
    """What a securemig process of ``host`` is told of its libvirt."""
    return {CONNECT_ENV: host.uri, RUN_DIR_ENV: str(host.run_dir)}


def run(
    memory_mib: int,
    dirty_mib_s: int,
    disk_mib: int,
    repeat: int,
    json_path: Path | None = None,
    protocols: tuple[str, ...] = PROTOCOLS,
) -> int:
    """Run the bench and print its report; returns an exit status.
    ``protocols``: the series of :data:`SERIES` to run, alternating in that
    order (securemig's only where the libvirt backend migrates live)."""
    # securemig as installed (byte-compiled): a source tree run with
    # PYTHONDONTWRITEBYTECODE compiles its modules in every `securemig
    # migrate` (about 1 s of a move's start-up under this machine's load),
    # which virsh's arms do not pay.
    byte_compile()
    info = provenance()  # before the bench loads the machine
    say = partial(print, file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="securemig-bench-libvirt-"))
    bench = _Bench(work, memory_mib, dirty_mib_s, disk_mib)
    live = capabilities(KIND).live
    asked = tuple(p for p in SERIES if p in protocols)
    protocols = asked if live else tuple(p for p in asked if p not in SECUREMIG)
    if not protocols:
        say(
            f"bench --libvirt: nothing to run ({', '.join(asked)}: the libvirt backend "
            "does not migrate live yet)"
        )
        return 1
    records: list[dict[str, Any]] = []
    # Its lab hosts' QEMU migration ports are fixed ranges of the machine:
    # a second bench at once (a test runner's other worker) would take the
    # same ports.  One at a time, the next waits.
    machine_lock = open(MACHINE_LOCK, "a")  # noqa: SIM115 -- held for the run
    if not _try_lock(machine_lock):
        say(f"bench --libvirt: waiting for another one on this machine ({MACHINE_LOCK})")
        fcntl.flock(machine_lock, fcntl.LOCK_EX)
    try:
        say(f"bench --libvirt in {work}: two libvirtds, a {memory_mib} MiB domain")
        bench.start()
        where = 0
        for n in range(repeat):
            for protocol in protocols:
                record = bench.move(protocol, where)
                record["run"] = n
                records.append(record)
                say(
                    f"   {protocol} #{n} from {record['from']}: {record['total_s']:.2f} s, "
                    f"downtime {record['downtime_ms']} ms, guest gap "
                    f"{record['guest_downtime_ms']:.0f} ms, cpu {record['cpu_s']:.2f} s"
                )
                if protocol in SECUREMIG:
                    # The domain (and its securemig bundle) moved; a native
                    # move comes back unmeasured.  Without the securemig arm
                    # every move starts from the first host.
                    where = 1 - where
    except (RuntimeError, TimeoutError, LibvirtError, OSError) as e:
        say(f"bench --libvirt failed: {e}")
        return 1
    finally:
        bench.stop()
        shutil.rmtree(work, ignore_errors=True)
        machine_lock.close()
    not_run = tuple(p for p in asked if p not in protocols)
    return _report(
        records, protocols, memory_mib, dirty_mib_s, disk_mib, repeat, json_path, info, not_run
    )


#: The measures the report takes medians and ratios of.
MEASURES = ("total_s", "downtime_ms", "guest_downtime_ms", "cpu_s")
#: Parts of them it gives medians of (None where an arm has no such part).
PARTS = ("outside_migration_s", "own_cpu_s", "daemons_cpu_s")


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def _report(
    records: list[dict[str, Any]],
    protocols: tuple[str, ...],
    memory_mib: int,
    dirty: int,
    disk_mib: int,
    repeat: int,
    json_path: Path | None,
    info: dict[str, Any],
    not_run: tuple[str, ...] | None = None,
) -> int:
    """Print the medians and ratios of ``records`` (and write them with the
    records to ``json_path``); ``not_run``: the series asked for that the
    backend could not run (default: securemig's default one, when absent)."""
    medians = {
        p: {
            k: _median([r for r in records if r["protocol"] == p], k)
            for k in (*MEASURES, "memory_bytes", "disk_bytes", *PARTS)
        }
        for p in protocols
    }
    ratios: dict[str, dict[str, float | None]] = {}
    # Each securemig series against libvirt-tls (the goal's base), when both ran.
    for protocol in SECUREMIG:
        if protocol in medians and "libvirt-tls" in medians:
            ratios[f"{protocol} / libvirt-tls"] = {
                k: _ratio(medians[protocol][k], medians["libvirt-tls"][k]) for k in MEASURES
            }
    if "libvirt-tls" in medians and "libvirt-plain" in medians:
        ratios["libvirt-tls / libvirt-plain"] = {
            k: _ratio(medians["libvirt-tls"][k], medians["libvirt-plain"][k]) for k in MEASURES
        }
    if not_run is None:
        not_run = tuple(p for p in PROTOCOLS if p not in protocols)
    for record in records:
        record["provenance"] = info
    report = {
        "provenance": info,
        "memory_mib": memory_mib,
        "dirty_mib_s": dirty,
        "disk_mib": disk_mib,
        "repeat": repeat,
        "records": records,
        "medians": medians,
        "ratios": ratios,
        "not_run": {p: "the libvirt backend does not migrate live yet" for p in not_run},
        "cpu_counted": {p: CPU_COUNTED for p in protocols if p in SECUREMIG},
    }
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(one_line(info))
    print(
        f"libvirt live migration, {memory_mib} MiB guest rewriting {dirty} MiB/s, "
        f"{disk_mib} MiB disk copied (NBD), medians of {repeat}"
    )
    header = ("total s", 8), ("downtime ms", 12), ("guest ms", 9), ("cpu s", 7), ("MiB", 7)
    name_width = max([15, *(len(p) for p in protocols)])
    print(f"{'protocol':<{name_width}} " + " ".join(f"{name:>{width}}" for name, width in header))

    def cell(value: float | None, width: int, form: str) -> str:
        return f"{'-' if value is None else format(value, form):>{width}}"

    for protocol, m in medians.items():
        mib = None if m["memory_bytes"] is None else m["memory_bytes"] / (1 << 20)
        print(
            f"{protocol:<{name_width}} {cell(m['total_s'], 8, '.2f')} "
            f"{cell(m['downtime_ms'], 12, '.0f')} "
            f"{cell(m['guest_downtime_ms'], 9, '.0f')} {cell(m['cpu_s'], 7, '.2f')} "
            f"{cell(mib, 7, '.0f')}"
        )
    for name, values in ratios.items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in values.items()))
    for protocol, m in medians.items():
        if m["outside_migration_s"] is not None:
            print(
                f"{protocol}: {m['outside_migration_s']:.2f} s of its total outside the "
                "migration (securemig migrate's start-up and exit)"
            )
        if m["own_cpu_s"] is not None:
            daemons = m["daemons_cpu_s"]
            print(
                f"{protocol}: cpu of its command {m['own_cpu_s']:.2f} s"
                + ("" if daemons is None else f", of securemig's daemons {daemons:.2f} s")
            )
    print_switchover(records, tuple(p for p in SECUREMIG if p in medians))
    for protocol in not_run:
        print(f"{protocol}: not run (the libvirt backend does not migrate live yet)")
    if any(p in SECUREMIG for p in protocols):
        print(
            "cpu s: both libvirtds, QEMUs and swtpms over the move, plus virsh's own; for "
            f"securemig's series the {CPU_COUNTED}"
        )
    print("(MiB: guest memory libvirt sent; the disk copy is on top of it)")
    return 0

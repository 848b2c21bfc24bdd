"""
``securemig bench --live``: attested live migration against QEMU's own.

One Linux guest (``--live-mib`` of memory, its workload rewriting
``--dirty-mib-s`` MiB per second) is moved, alternating within one run:

- ``secure-live``: ``securemig migrate --live`` between two lab hosts
  (both attestations and the key release included in its time);
- ``qemu-tls``: QEMU to QEMU over TCP with ``tls-creds-x509`` on both
  (the hosts' site-CA certificates, peer verified: what libvirt does);
- ``qemu-plain``: QEMU to QEMU over plain TCP;
- ``secure-live-daemon`` (on request: ``--protocols``, see :data:`SERIES`):
  ``secure-live`` driven by the source host's daemon, ``securemig migrate
  --live --daemon`` only asking it (:mod:`securemig.lab.bench.driven`).

Both hosts' ``twistd securemig`` run for the whole bench, started before
any clock (the guest moves back and forth, so each is in turn the source's
and the destination's): in both securemig series their CPU is what they
spend over the move (``/proc/PID/stat`` before and after), never their
start-up, and the command's own is its ``wait4``.  The daemon series
checks in the source's journal that its daemon, not the command, drove it
(``driven_by``).

The two QEMU baselines move the guest from its bundle into a scratch copy
on the other side and back (only the first leg is measured); their swtpm
gets the VM's key, as a released key would give it.  Each record has
``total_s`` (wall clock of the move), ``downtime_ms`` (QEMU's),
``guest_downtime_ms`` (the largest heartbeat gap the host saw),
``cpu_s`` (user+system of every process of both sides over the move:
QEMU, swtpm, and securemig's own; under TCG the guest's own execution is
part of QEMU's), and ``wire_bytes`` (the bytes QEMU says it transferred,
``query-migrate``; secure-live's records add a 21-byte header and tag per
piece of up to 1 MiB on top), ``qemu_total_ms`` (QEMU's own total time
of the migration at the source, "stream s" in the table: from ``migrate``
to its completion, without secure-live's attestation and key release
before it and its commit after), and ``multifd_bytes`` (what QEMU says it
sent on multifd channels).  securemig's records add ``own_cpu_s`` (of
``cpu_s``: the command's own) and ``daemons_cpu_s`` (both daemons' over the
move).  The report gives medians and each securemig series' ratios against
qemu-tls.

``--parallel N`` runs all three with N multifd channels: secure-live is
``migrate --live --parallel N`` (each channel its own sealed stream), and
both QEMU baselines get the ``multifd`` capability and ``multifd-channels``
N on both QEMUs (qemu-tls then runs TLS on every channel, as libvirt's
``--parallel --tls`` does).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from twisted.internet.task import deferLater

from securemig.host.journal import Journal
from securemig.hypervisor import guest as linux_guest
from securemig.hypervisor.bundle import Bundle
from securemig.hypervisor.heartbeat import Watch
from securemig.hypervisor.qemu import (
    MAX_MULTIFD_CHANNELS,
    LiveMigration,
    QemuBackend,
    heartbeat_path,
    set_multifd,
)
from securemig.lab import processes
from securemig.lab.bench.driven import CPU_COUNTED, daemon_driven, driver
from securemig.lab.bench.provenance import one_line, provenance
from securemig.lab.lab import DESTINATION, SOURCE, Lab
from securemig.protocol.phases import Phase
from securemig.transport.reactor import run_reactor
from securemig.trust.attestor import open_attestor

#: The series run by default, in the order they alternate.
PROTOCOLS = ("secure-live", "qemu-tls", "qemu-plain")
#: Every series ``--protocols`` may name with ``--live``, in the order
#: they alternate (the ratios' base, qemu-tls, is then optional).
SERIES = ("secure-live", "secure-live-daemon", "qemu-tls", "qemu-plain")
#: The series that are securemig's own.
SECUREMIG = ("secure-live", "secure-live-daemon")
#: ``--parallel`` takes 0 (one stream) to this many multifd channels.
MAX_PARALLEL = MAX_MULTIFD_CHANNELS


def _cpu(pids: list[int]) -> float:
    """User+system seconds of these processes so far (0 for one that is gone)."""
    return sum(processes.cpu_seconds(pid) or 0.0 for pid in pids)


def _pids(bundle: Bundle) -> list[int]:
    pids = []
    for program in ("qemu", "swtpm"):
        with contextlib.suppress(FileNotFoundError, ValueError):
            pids.append(int((bundle.path / f"{program}.pid").read_text()))
    return pids


def _tls_dir(work: Path, identity: Path, endpoint: str) -> Path:
    """QEMU's tls-creds-x509 directory for a host's site-CA certificate."""
    directory = work / f"qemu-tls-{identity.name}-{endpoint}"
    if not directory.exists():
        directory.mkdir()
        shutil.copyfile(identity / "site-ca.pem", directory / "ca-cert.pem")
        shutil.copyfile(identity / "tls.pem", directory / f"{endpoint}-cert.pem")
        shutil.copyfile(identity / "tls.key", directory / f"{endpoint}-key.pem")
    return directory


async def _qemu_move(
    reactor: Any,
    src: Bundle,
    dst: Bundle,
    key: bytes,
    port: int,
    tls: tuple[Path, Path, str] | None,
    multifd: int = 0,
) -> dict[str, Any]:
    """One QEMU-to-QEMU live move, ``src`` to a fresh ``dst``, on
    ``multifd`` channels (0: one stream); its numbers."""
    backend = QemuBackend(reactor, vtpm_key=lambda b: key)
    (dst.path / "vtpm").mkdir(parents=True)
    dst.save()
    watch = Watch(heartbeat_path(src), heartbeat_path(dst))
    try:
        started = time.monotonic()
        before = _cpu(_pids(src))
        await backend._spawn(dst, incoming=True)
        incoming_monitor = await backend.monitor(dst)
        outgoing_monitor = await backend.monitor(src)
        uri = f"tcp:127.0.0.1:{port}"
        if tls is not None:
            for monitor, directory, endpoint in (
                (incoming_monitor, tls[1], "server"),
                (outgoing_monitor, tls[0], "client"),
            ):
                await monitor.execute(
                    "object-add",
                    **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(directory)},
                    endpoint=endpoint,
                    **{"verify-peer": True},
                )
            await incoming_monitor.execute("migrate-set-parameters", **{"tls-creds": "tls0"})
            await outgoing_monitor.execute(
                "migrate-set-parameters", **{"tls-creds": "tls0", "tls-hostname": tls[2]}
            )
        else:
            # A QEMU that received over TLS keeps its creds as parameters.
            for monitor in (incoming_monitor, outgoing_monitor):
                await monitor.execute("migrate-set-parameters", **{"tls-creds": ""})
        for monitor in (incoming_monitor, outgoing_monitor):
            await set_multifd(monitor, multifd)
        await incoming_monitor.execute("migrate-incoming", uri=uri)
        await outgoing_monitor.execute("migrate-set-parameters", **{"downtime-limit": 300})
        pids = _pids(src) + _pids(dst)
        before += _cpu(_pids(dst))
        await outgoing_monitor.execute("migrate", uri=uri)
        outgoing = LiveMigration(backend, src, outgoing_monitor)
        stats = await outgoing.wait()
        await LiveMigration(backend, dst, incoming_monitor).wait()
        await LiveMigration(backend, dst, incoming_monitor).cont()
        cpu = _cpu(pids) - before
        await outgoing.finish()
        incoming_monitor.transport.loseConnection()  # type: ignore[union-attr,misc]
        total = time.monotonic() - started
        await deferLater(reactor, 0.5, lambda: None)  # heartbeats from the destination
        return {
            "total_s": round(total, 3),
            "downtime_ms": stats.downtime_ms,
            "qemu_total_ms": stats.total_ms,
            "guest_downtime_ms": watch.largest_gap_ms(),
            "cpu_s": round(cpu, 2),
            "wire_bytes": stats.transferred,
            "multifd_bytes": stats.multifd_bytes,
            "guest_kept_running": watch.continuous(),
            # Where the heartbeat's sequence broke, if it did (a lost beat,
            # a repeated one, a restart): what a failed run is read by.
            "heartbeat_breaks": watch.breaks()[:5],
        }
    finally:
        watch.stop()


def run(
    memory_mib: int,
    dirty_mib_s: int,
    repeat: int,
    json_path: Path | None = None,
    parallel: int = 0,
    protocols: tuple[str, ...] = PROTOCOLS,
) -> int:
    """Run the live bench and print its report; returns an exit status.
    ``parallel``: every protocol on that many multifd channels;
    ``protocols``: the series of :data:`SERIES` to run, alternating in that
    order."""
    protocols = tuple(p for p in SERIES if p in protocols)
    linux_guest.find()
    info = provenance()  # before the bench loads the machine
    work = Path(tempfile.mkdtemp(prefix="securemig-bench-live-"))
    say = partial(print, file=sys.stderr)
    lab = Lab(work, say)
    try:
        lab.start()
        records = run_reactor(
            partial(_measure, lab, work, memory_mib, dirty_mib_s, repeat, parallel, protocols)
        )
        return _report(
            records, memory_mib, dirty_mib_s, repeat, json_path, info, parallel, protocols
        )
    except (RuntimeError, TimeoutError) as e:
        say(f"bench --live failed: {e}")
        return 1
    finally:
        lab.stop()
        shutil.rmtree(work, ignore_errors=True)


async def _measure(
    lab: Lab,
    work: Path,
    memory_mib: int,
    dirty_mib_s: int,
    repeat: int,
    parallel: int,
    protocols: tuple[str, ...],
    reactor: Any,
) -> list[dict[str, Any]]:
    """Every record, alternating protocols ``repeat`` times.  (The lab's
    commands block the reactor while they run: nothing else is on it.)"""
    qemu = QemuBackend(reactor)
    records: list[dict[str, Any]] = []
    hosts = {
        SOURCE: lab.start_destination(host=SOURCE, backend="qemu"),
        DESTINATION: lab.start_destination(backend="qemu"),
    }
    wss = max(16, min(memory_mib // 4, 4 * dirty_mib_s or 16))
    vm = lab.create_vm(
        "bench-vm",
        memory_mib,
        None,
        secure=True,
        backend="qemu",
        guest_cmdline=linux_guest.cmdline(dirty_mib_s=dirty_mib_s, wss_mib=wss),
    )
    # Where the VM is on each host: it starts in the lab's VM directory and
    # arrives in each daemon's state directory.
    homes = {SOURCE: vm.path.parent, DESTINATION: hosts[DESTINATION].state_dir / "vms"}
    for host in (SOURCE, DESTINATION):
        for path in (
            hosts[host].state_dir / "vms" / "bench-vm",
            work / f"scratch-{host}" / "bench-vm",
        ):
            lab.on_stop(partial(qemu.end_blocking, Bundle(path, vm.manifest)))
    lab.on_stop(partial(qemu.end_blocking, Bundle(vm.path, vm.manifest)))
    first = Watch(heartbeat_path(vm))
    first.wait(5, timeout=120.0)
    first.stop()
    where = SOURCE
    for n in range(repeat):
        for protocol in protocols:
            other = DESTINATION if where == SOURCE else SOURCE
            bundle = Bundle.load(homes[where] / "bench-vm")
            if protocol in SECUREMIG:
                homes[other] = hosts[other].state_dir / "vms"
                target = Bundle(homes[other] / "bench-vm", vm.manifest)
                watch = Watch(heartbeat_path(bundle), heartbeat_path(target))
                # Both hosts' daemons run since before the clock (each is the
                # destination of the moves the other way): either series
                # counts what they spend over the move, the command its own.
                daemons = [hosts[other].process.pid, hosts[where].process.pid]
                pids = _pids(bundle)
                before = _cpu(pids)
                share = processes.CpuShare(daemons)
                # Driven by the daemon, the source's journal is its own.
                asked = daemon_driven(protocol)
                ask = ("--daemon",) if asked else ()
                state_dir = hosts[where].state_dir if asked else lab.work / f"{where}-state"
                started, wall = time.monotonic(), time.time()
                summary, usage = lab.migrate(
                    hosts[other], "bench-vm", secure=True, vm_dir=homes[where],
                    source=where, to=other, state_dir=state_dir,
                    extra=("--live", "--parallel", str(parallel), *ask),
                )  # fmt: skip
                total = time.monotonic() - started
                daemons_cpu = share.used()
                cpu = _cpu(pids + _pids(target)) - before + daemons_cpu + usage.cpu_s
                await deferLater(reactor, 0.5, lambda: None)
                watch.stop()
                journals = (
                    state_dir / "journal.sqlite",
                    hosts[other].state_dir / "journal.sqlite",
                )
                driven_by = driver(journals[0], hosts[where].process.pid)
                if driven_by != ("daemon" if asked else "command"):
                    raise RuntimeError(
                        f"{protocol}: the source's journal says the migration was driven "
                        f"by {driven_by!r}"
                    )
                records.append(
                    {
                        "protocol": protocol,
                        "run": n,
                        "total_s": round(total, 3),
                        "downtime_ms": summary["downtime_ms"],
                        "qemu_total_ms": summary["qemu_total_ms"],
                        "guest_downtime_ms": watch.largest_gap_ms(),
                        "cpu_s": round(cpu, 2),
                        "own_cpu_s": round(usage.cpu_s, 3),
                        "daemons_cpu_s": round(daemons_cpu, 3),
                        "driven_by": driven_by,
                        "wire_bytes": summary["transferred"],
                        "multifd_bytes": summary.get("multifd_bytes", 0),
                        "guest_kept_running": watch.continuous(),
                        "heartbeat_breaks": watch.breaks()[:5],
                        "switchover_ms": switchover_times(watch, *journals),
                        "phases_s": _phases(wall, *journals),
                    }
                )
                where = other
                continue
            with open_attestor(work / where, None, False) as attestor:
                key = attestor.unseal(bundle.vtpm_key_path.read_bytes())
            tls = None
            if protocol == "qemu-tls":
                tls = (
                    _tls_dir(work, work / where, "client"),
                    _tls_dir(work, work / other, "server"),
                    other,
                )
            scratch = Bundle(work / f"scratch-{other}" / "bench-vm", bundle.manifest)
            shutil.rmtree(scratch.path, ignore_errors=True)
            try:
                record = await _qemu_move(
                    reactor, bundle, scratch, key, _free_port(), tls, parallel
                )
            except RuntimeError as e:
                raise RuntimeError(f"{protocol}: {e}") from None
            records.append({"protocol": protocol, "run": n, **record})
            # Back into its bundle, unmeasured, as it was.
            sealed = bundle.vtpm_key_path.read_bytes()
            try:
                await _qemu_move_back(reactor, scratch, bundle, key, _free_port(), sealed)
            except RuntimeError as e:
                raise RuntimeError(f"{protocol}, moving back: {e}") from None
    return records


async def _qemu_move_back(
    reactor: Any, scratch: Bundle, bundle: Bundle, key: bytes, port: int, sealed: bytes
) -> None:
    """Move the guest from the scratch copy back into its bundle (plain),
    its sealed key kept."""
    manifest = bundle.manifest
    shutil.rmtree(bundle.path)
    bundle = Bundle(bundle.path, manifest)
    await _qemu_move(reactor, scratch, bundle, key, port, None)
    bundle.vtpm_key_path.write_bytes(sealed)
    shutil.rmtree(scratch.path, ignore_errors=True)


#: The phases of the commit each side journals on the switchover path, in
#: the order they come: (report name, role, phase).
SWITCHOVER = (
    ("dst_prepared", "destination", Phase.PREPARED),
    ("src_committed", "source", Phase.COMMITTED),
    ("dst_committed", "destination", Phase.COMMITTED),
    ("dst_continuing", "destination", Phase.CONTINUING),
    ("dst_resumed", "destination", Phase.RESUMED),
)


def switchover_times(
    watch: Watch, source_journal: Path, destination_journal: Path
) -> dict[str, float]:
    """Where the guest's pause went: milliseconds from the source's last
    heartbeat before the largest gap (the guest stopped within one
    heartbeat after it) to each phase of the commit the two journals
    recorded (each stamped as its write began), and to the destination's
    first heartbeat (``first_beat``: the guest runs again).  Empty if the
    gap or a record is missing."""
    beats = watch.beats
    gaps = [(b.at - a.at, a, b) for a, b in itertools.pairwise(beats)]
    if not gaps:
        return {}
    _, last, first = max(gaps, key=lambda g: g[0])
    # Journals stamp wall-clock time, the watch monotonic time.
    offset = time.time() - time.monotonic()
    stopped = last.at + offset
    events: dict[str, dict[Phase, float]] = {}
    for role, path in (("source", source_journal), ("destination", destination_journal)):
        journal = Journal(path)
        try:
            record = next((r for r in journal.records(5) if r.role == role), None)
        finally:
            journal.close()
        if record is None:
            return {}
        events[role] = {Phase(p): at for p, at in record.events}
    times = {
        name: round((events[role][phase] - stopped) * 1000, 1)
        for name, role, phase in SWITCHOVER
        if phase in events[role]
    }
    times["first_beat"] = round((first.at - last.at) * 1000, 1)
    return times


def _phases(started: float, source_journal: Path, destination_journal: Path) -> dict[str, float]:
    """When each side journaled each phase of the last migration, in seconds
    after the bench started ``securemig migrate`` (wall clock ``started``):
    where secure-live's total time goes.  Keys are ``src:PHASE`` and
    ``dst:PHASE`` (a phase journaled twice: its first time)."""
    times: dict[str, float] = {}
    for role, path in (("source", source_journal), ("destination", destination_journal)):
        journal = Journal(path)
        try:
            record = next((r for r in journal.records(5) if r.role == role), None)
        finally:
            journal.close()
        for phase, at in record.events if record is not None else ():
            times.setdefault(f"{role[:3]}:{phase}", round(at - started, 3))
    return times


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _key(protocol: str) -> str:
    """A series' name as a JSON key: ``secure-live-daemon``, ``secure_live_daemon``."""
    return protocol.replace("-", "_")


def _report(
    records: list[dict[str, Any]],
    memory_mib: int,
    dirty: int,
    repeat: int,
    json_path: Path | None,
    info: dict[str, Any] | None = None,
    parallel: int = 0,
    protocols: tuple[str, ...] = PROTOCOLS,
) -> int:
    medians: dict[str, dict[str, float]] = {}
    for protocol in protocols:
        rows = [r for r in records if r["protocol"] == protocol]
        medians[protocol] = {
            k: statistics.median(r[k] for r in rows)
            for k in (
                "total_s",
                "qemu_total_ms",
                "downtime_ms",
                "guest_downtime_ms",
                "cpu_s",
                "wire_bytes",
            )
        }
        for k in ("own_cpu_s", "daemons_cpu_s"):
            if rows and all(k in r for r in rows):
                medians[protocol][k] = statistics.median(r[k] for r in rows)
    # Each securemig series against qemu-tls (the goal's base), when both ran.
    ratios: dict[str, dict[str, float | None]] = {}
    tls = medians.get("qemu-tls")
    for protocol in SECUREMIG:
        if protocol in medians and tls is not None:
            ratios[protocol] = {
                k: round(medians[protocol][k] / tls[k], 2) if tls[k] else None
                for k in ("total_s", "qemu_total_ms", "downtime_ms", "guest_downtime_ms", "cpu_s")
            }
    info = info or provenance()
    for record in records:
        record["provenance"] = info
    report: dict[str, Any] = {
        "provenance": info,
        "memory_mib": memory_mib,
        "dirty_mib_s": dirty,
        "repeat": repeat,
        "parallel": parallel,
        "protocols": list(protocols),
        "records": records,
        "medians": medians,
        "cpu_counted": {p: CPU_COUNTED for p in protocols if p in SECUREMIG},
    }
    for protocol, values in ratios.items():
        report[f"{_key(protocol)}_vs_qemu_tls"] = values
    for protocol in SECUREMIG:
        if protocol in medians:
            report[f"{_key(protocol)}_switchover_ms"] = _switchover_medians(records, protocol)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(one_line(info))
    channels = f", {parallel} multifd channels each" if parallel else ", one stream each"
    print(
        f"live migration, {memory_mib} MiB guest rewriting {dirty} MiB/s{channels}, "
        f"medians of {repeat}"
    )
    header = (
        ("total s", 8),
        ("stream s", 9),
        ("downtime ms", 12),
        ("guest ms", 9),
        ("cpu s", 7),
        ("MiB", 7),
    )
    width = max([12, *(len(p) for p in protocols)])
    print(f"{'protocol':<{width}} " + " ".join(f"{name:>{w}}" for name, w in header))
    for protocol, m in medians.items():
        print(
            f"{protocol:<{width}} {m['total_s']:>8.2f} {m['qemu_total_ms'] / 1000:>9.2f} "
            f"{m['downtime_ms']:>12.0f} "
            f"{m['guest_downtime_ms']:>9.0f} {m['cpu_s']:>7.2f} {m['wire_bytes'] / (1 << 20):>7.0f}"
        )
    for protocol, values in ratios.items():
        print(
            f"{protocol} / qemu-tls: total "
            + ", ".join(f"{k} {v}" for k, v in values.items())
            + f" ({protocol}'s total includes both attestations and the key release)"
        )
    for protocol in SECUREMIG:
        m = medians.get(protocol, {})
        if "own_cpu_s" in m:
            print(
                f"{protocol}: cpu of its command {m['own_cpu_s']:.2f} s, of securemig's "
                f"daemons over the move {m['daemons_cpu_s']:.2f} s"
            )
    if any(p in SECUREMIG for p in protocols):
        print(
            "cpu s: every QEMU and swtpm of both sides over the move; for securemig's series "
            f"also the {CPU_COUNTED}"
        )
    print_switchover(records, tuple(p for p in SECUREMIG if p in medians))
    return 0


def print_switchover(records: list[dict[str, Any]], protocols: tuple[str, ...]) -> None:
    """One line per securemig series of ``protocols``: the medians of its
    records' :func:`switchover_times` times (where the guest's pause went)."""
    for protocol in protocols:
        switchover = _switchover_medians(records, protocol)
        if switchover:
            print(
                f"{protocol} switchover, ms after the source's last heartbeat (medians): "
                + ", ".join(f"{k} {v:.0f}" for k, v in switchover.items())
            )


def _switchover_medians(
    records: list[dict[str, Any]], protocol: str = "secure-live"
) -> dict[str, float]:
    """Median of each :func:`switchover_times` time over ``protocol``'s records."""
    rows = [r.get("switchover_ms") or {} for r in records if r["protocol"] == protocol]
    names = [name for name, _, _ in SWITCHOVER] + ["first_beat"]
    return {
        name: statistics.median(r[name] for r in rows if name in r)
        for name in names
        if any(name in r for r in rows)
    }

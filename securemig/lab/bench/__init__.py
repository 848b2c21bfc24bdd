"""
``securemig bench``: what a migration costs, against a plain copy.

A lab of two enrolled swtpm hosts (:mod:`securemig.lab.lab`) moves the same VM
(RAM image of each size, a vTPM, with ``--disk-mib`` a disk) between real
``securemig migrate`` and ``twistd securemig`` processes, a fresh
destination per run.  For each size, variant and repeat, in one run:

- ``plain-copy`` (the floor): ``cat IMAGE > /dev/tcp/ADDRESS/PORT``, a C
  tool with no interpreter on the clock, into the receiver of
  :mod:`securemig.lab.bench.plaincopy`, started before the clock as a
  destination daemon is (the destination's write-behind, then fsync);
- ``ssh-aes128-gcm``, ``ssh-chacha20``: the same file through OpenSSH
  (``ssh -c CIPHER 'cat > F && sync F'``) to an sshd of the bench's own
  (:mod:`securemig.lab.bench.ssh`), what moving an image by hand costs;
- ``insecure``: the insecure twin (plain TCP, no cryptography: no TLS, no
  hash; the vTPM key in the clear);
- ``secure``: mutual TLS 1.3, attestation both ways, key release, images
  on the data channel (per ``--ciphers``, ``secure-CIPHER``);
- ``secure-tls`` (on request): the same with the images inside TLS, as
  before the data channel existed;
- ``secure-daemon`` (on request): ``secure``, driven by the source host's
  own daemon (``securemig migrate --daemon``: the command only asks it),
  that daemon started before the clock as the destination's is; the CPU
  of both daemons is what they spend over the run (``/proc/PID/stat``
  before and after: :mod:`securemig.lab.bench.driven`), the source's plus
  the client's (wait4), so neither daemon's start and stop is in it (the
  other series' destination CPU includes its fresh daemon's, as it always
  did); the peak RSS of each side its daemon's (VmHWM);
- with ``--concurrency N``, also ``secure xN``: N secure migrations of
  distinct VMs at once into one destination (:func:`_concurrent_migrations`),
  against one alone.

Each run records wall time per phase (from the source's journal) and in
total, CPU seconds (user + system) and peak RSS of each process, bytes
moved and bytes on the wire (TCP_INFO), and throughput.  Runs alternate so a
noisy machine hurts every protocol alike; the report gives medians, min-max
and the ratios that matter, and checks the performance targets.  Every
record carries its provenance (:mod:`securemig.lab.bench.provenance`).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from securemig import files
from securemig.hypervisor.bundle import create_image_vm
from securemig.lab import processes
from securemig.lab.bench.driven import CPU_COUNTED, daemon_driven, driver
from securemig.lab.bench.link import Link
from securemig.lab.bench.provenance import byte_compile, one_line, provenance
from securemig.lab.bench.report import (
    FLOOR,
    IN_PROCESS,
    WHOLE,
    concurrency_table,
    cpu_per_gib,
    insecure_twin,
    protocols_of,
    series,
    sizes_of,
    write_all,
)
from securemig.lab.bench.ssh import CIPHERS as SSH_CIPHERS
from securemig.lab.bench.ssh import Sshd, SshError
from securemig.lab.lab import DESTINATION, Lab

PLAIN_COPY = "securemig.lab.bench.plaincopy"
#: The floor's sender: bash opens the connection, then cat copies (no interpreter).
SEND = 'exec cat -- "$1" > "/dev/tcp/$2/$3"'


def _plain_copy(work: Path, image: Path, lab: Any) -> dict[str, Any]:
    port_file = work / "plain.port"
    out = work / "plain.out"
    port_file.unlink(missing_ok=True)
    # Where a destination would be: behind the link, if there is one.
    address = lab.address_of(DESTINATION)
    wrapper = lab.link.wrapper if lab.link is not None else ()
    receiver = subprocess.Popen(
        [*wrapper, sys.executable, "-m", PLAIN_COPY, "recv", str(port_file), str(out), address],
        stdout=subprocess.PIPE,
        text=True,
    )
    while not port_file.exists():
        if receiver.poll() is not None:
            raise RuntimeError("plain-copy receiver died")
        time.sleep(0.01)
    port = int(port_file.read_text())
    started = time.monotonic()
    # The sender: cat (C), no interpreter start-up on the clock; bash's
    # /dev/tcp connects and execs nothing but cat's copy loop.
    sender = subprocess.Popen(
        ["bash", "-c", SEND, "plain-copy", str(image), address, str(port)],
    )
    send_peak = _peak_of_exec(sender.pid, "cat")
    send_usage = processes.wait_process(sender)
    # wait4's ru_maxrss of a child of this (large) process is at least this
    # process's own (see processes.peak_rss_mib): cat's own VmHWM instead.
    if send_peak is not None:
        send_usage.peak_rss_mib = send_peak
    # The receiver's report of its peak memory, then reap it with wait4 (CPU).
    assert receiver.stdout is not None
    recv_peak = int(receiver.stdout.read()) / 1024
    recv_usage = processes.wait_process(receiver)
    recv_usage.peak_rss_mib = recv_peak
    total = time.monotonic() - started
    if send_usage.status or recv_usage.status:
        raise RuntimeError("plain copy failed")
    size = image.stat().st_size
    out.unlink()
    record = _record("plain-copy", size, total, {}, send_usage, recv_usage)
    # Nothing but the copy runs in the sender: its whole process is in process.
    record.update(floor=FLOOR, in_process_s=record["total_s"])
    if send_peak is None:  # cat ended between two looks: only an upper bound
        record["peak_rss_note"] = "source: wait4's ru_maxrss, an upper bound"
    return record


def _peak_of_exec(pid: int, name: str) -> float | None:
    """The peak RSS (VmHWM, MiB) of our child ``pid`` once it is the
    program ``name``, sampled until it exits; left unreaped for wait4."""
    peak = None
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            comm = ""
        value = processes.peak_rss_mib(pid) if comm == name else None
        if value is not None:
            peak = max(peak or 0.0, value)
        time.sleep(0.002)
    return peak


def _ssh_copy(sshd: Sshd, protocol: str, work: Path, image: Path) -> dict[str, Any]:
    """The same image through ``ssh -c CIPHER`` into an fsynced file."""
    out = work / "ssh.out"
    out.unlink(missing_ok=True)
    copy = sshd.copy(image, out, SSH_CIPHERS[protocol])
    out.unlink()
    server = processes.Rusage(copy.server_cpu_s, copy.server_peak_rss_mib, 0)
    record = _record(protocol, image.stat().st_size, copy.seconds, {}, copy.client, server)
    # Not counted: ssh's framing, padding and MACs are its own business.
    record.update(cipher=SSH_CIPHERS[protocol], wire_bytes=None)
    return record


def _warm(bundle_dir: Path) -> None:
    """Read a VM's images once, outside the measurement: the destination of
    the previous run dropped them from the page cache (write-behind), while
    a VM just suspended, and the plain copy's file, are in it."""
    for path in bundle_dir.rglob("*.img"):
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass


def _record(
    protocol: str,
    size: int,
    total: float,
    phases: dict[str, float],
    source: processes.Rusage,
    destination: processes.Rusage,
) -> dict[str, Any]:
    return {
        "protocol": protocol,
        "variant": "full",
        "cipher": None,
        "size_mib": size >> 20,
        "phases": phases,
        "total_s": round(total, 4),
        "cpu_s": {"source": round(source.cpu_s, 3), "destination": round(destination.cpu_s, 3)},
        "peak_rss_mib": {
            "source": round(source.peak_rss_mib, 1),
            "destination": round(destination.peak_rss_mib, 1),
        },
        "wire_bytes": size,
        "throughput_mibps": round((size >> 20) / total, 1),
    }


def _idle_destination(work: Path) -> dict[str, Any]:
    """A destination started and stopped with no migration: its fixed costs."""
    state = work / "idle"
    shutil.rmtree(state, ignore_errors=True)
    started = time.monotonic()
    usage = processes.start_destination(state).stop()
    record = _record("idle-destination", 0, time.monotonic() - started, {}, usage, usage)
    record["cpu_s"]["source"] = record["peak_rss_mib"]["source"] = 0.0
    return record


def _summarise(records: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"{'size':>6} {'protocol':<20} {'time s':>8} {'x plain':>8} {'x plain ip':>10} "
        f"{'MiB/s':>7} {'CPU src':>8} {'CPU dst':>8} {'CPU/GiB':>8} {'RSS src':>8} {'RSS dst':>8}",
    ]

    for size in sizes_of(records):
        runs = [r for r in records if r["size_mib"] == size]
        base = statistics.median(r["total_s"] for r in runs if series(r) == "plain-copy")
        base_inproc = statistics.median(
            r.get("in_process_s", r["total_s"]) for r in runs if series(r) == "plain-copy"
        )
        for protocol in protocols_of(records):
            rs = [r for r in runs if series(r) == protocol]
            if not rs:
                continue
            med = statistics.median(r["total_s"] for r in rs)

            def m(key: str, side: str, rs: list[dict[str, Any]] = rs) -> float:
                return statistics.median(r[key][side] for r in rs)

            inproc = [r["in_process_s"] for r in rs if "in_process_s" in r]
            inproc_ratio = (
                f"{statistics.median(inproc) / base_inproc:>10.2f}"
                if inproc and base_inproc and len(inproc) == len(rs)
                else f"{'-':>10}"
            )
            lines.append(
                f"{size:>5}M {protocol:<20} {med:>8.3f} {med / base:>8.2f} {inproc_ratio} "
                f"{size / med:>7.0f} {m('cpu_s', 'source'):>8.2f} "
                f"{m('cpu_s', 'destination'):>8.2f} "
                f"{statistics.median(cpu_per_gib(r) for r in rs):>8.2f} "
                f"{m('peak_rss_mib', 'source'):>7.1f}M "
                f"{m('peak_rss_mib', 'destination'):>7.1f}M"
            )
        whole = {
            p: statistics.median(r["total_s"] for r in runs if series(r) == p)
            for p in protocols_of(records)
            if any(series(r) == p for r in runs)
        }
        medians = {
            p: statistics.median(r["in_process_s"] for r in runs if series(r) == p)
            for p in protocols_of(records)
            if any(series(r) == p for r in runs)
            and all("in_process_s" in r for r in runs if series(r) == p)
        }
        for p in whole:
            twin = insecure_twin(p)
            if p.startswith("secure") and twin in whole:
                inproc_text = (
                    f"{medians[p] / medians[twin]:.2f}" if p in medians and twin in medians else "-"
                )
                lines.append(
                    f"{size:>5}M {p} vs {twin}: {WHOLE} {whole[p] / whole[twin]:.2f}, "
                    f"{IN_PROCESS} {inproc_text}"
                )
    together = concurrency_table(records)
    if together:
        lines += ["migrations at once:", *together]
    return lines


def _discarded(vm_dir: Path, timeout: float = 60.0) -> None:
    """Wait (outside the timing) until the source's copy of a migrated VM
    is unlinked: a detached remover does it after the command ended
    (:func:`securemig.files.discard_tree`), and its filesystem work must not
    land in the next run's time.  Its CPU is not in the records (no
    ``wait4`` reaches it): doc/performance.rst gives it, measured apart."""
    deadline = time.monotonic() + timeout
    while files.discarding(vm_dir) and time.monotonic() < deadline:
        time.sleep(0.01)


def _lab_migration(
    lab: Any, name: str, size: int, protocol: str, cipher: str | None, variant: str
) -> dict[str, Any]:
    """One migration between the lab's two hosts, with a fresh destination
    process (so its CPU and peak RSS are this migration's: with its start
    and stop, or for a daemon-driven series over the run only)."""
    secure = protocol != "insecure"
    extra = ("--tls-data",) if protocol == "secure-tls" else ()
    _warm(lab.vm_dir / name)
    destination = lab.start_destination(keep=False, cipher=cipher, extra=extra)
    daemon = None
    dst_cpu = None
    try:
        shares = None
        if daemon_driven(protocol):
            # Started before the clock, as the destination's daemon is; both
            # counted over the run, as a deployed host's running daemons.
            daemon = lab.start_source_daemon()
            shares = (
                processes.CpuShare([daemon.process.pid]),
                processes.CpuShare([destination.process.pid]),
            )
        asked = ("--daemon",) if daemon is not None else ()
        started = time.monotonic()
        summary, src_usage = lab.migrate(
            destination,
            name,
            secure=secure,
            extra=(("--shared-storage",) if variant == "shared-storage" else ()) + asked,
        )
        total = time.monotonic() - started
        # The summary's peak RSS is the process that ran the migration (the
        # daemon's VmHWM with --daemon, its own start-up included).
        src_usage.peak_rss_mib = summary["peak_rss_mib"]
        if shares is not None and daemon is not None:
            # The daemon's share: its CPU over the run (it drove the migration).
            src_usage.cpu_s += shares[0].used()
            dst_cpu = shares[1].used()
            driven_by = driver(daemon.state_dir / "journal.sqlite", daemon.process.pid)
            if driven_by != "daemon":
                raise RuntimeError(
                    f"{protocol}: the source's journal says the migration was driven by "
                    f"{driven_by!r}"
                )
    finally:
        dst_usage = destination.stop()
        if daemon is not None:
            daemon.stop()
    if dst_cpu is not None:
        dst_usage.cpu_s = dst_cpu
    _discarded(lab.vm_dir)
    lab.return_vm(destination, name)
    label = f"{protocol}-{cipher}" if cipher else protocol
    record = _record(label, size, total, summary["phases"], src_usage, dst_usage)
    record.update(
        variant=variant,
        cipher=cipher if secure else None,
        in_process_s=summary["seconds"],
        bytes=summary["bytes"],
        wire_bytes=summary.get("wire_bytes"),
        throughput_mibps=round(summary["bytes"] / (1 << 20) / total, 1),
    )
    streams = summary["phases"].get("streams")
    if streams:
        record["stream_mibps"] = round(summary["bytes"] / (1 << 20) / streams, 1)
    if daemon is not None:
        record.update(driven_by="daemon", cpu_counted=CPU_COUNTED)
    return record


def _concurrent_migrations(
    lab: Any, names: list[str], size: int, protocol: str, cipher: str | None
) -> dict[str, Any]:
    """``len(names)`` migrations at once, each its own ``securemig migrate``
    process, into one fresh destination process: the wall time until the
    last ended, each one's own time, the CPU of all sources together and of
    the destination."""
    secure = protocol != "insecure"
    for name in names:
        _warm(lab.vm_dir / name)
    destination = lab.start_destination(keep=False, cipher=cipher)

    def one(name: str) -> tuple[float, Any, Any]:
        started = time.monotonic()
        summary, usage = lab.migrate(destination, name, secure=secure)
        return time.monotonic() - started, summary, usage

    try:
        started = time.monotonic()
        with ThreadPoolExecutor(len(names)) as pool:
            results = list(pool.map(one, names))
        total = time.monotonic() - started
    finally:
        dst_usage = destination.stop()
    _discarded(lab.vm_dir)
    for name in names:
        lab.return_vm(destination, name)
    sources = processes.Rusage(
        sum(u.cpu_s for _, _, u in results),
        max(summary["peak_rss_mib"] for _, summary, _ in results),
        0,
    )
    label = f"{protocol}-{cipher}" if cipher else protocol
    record = _record(label, size, total, {}, sources, dst_usage)
    moved = sum(summary["bytes"] for _, summary, _ in results)
    record.update(
        cipher=cipher if secure else None,
        concurrency=len(names),
        per_migration_s=[round(t, 4) for t, _, _ in results],
        bytes=moved,
        wire_bytes=None,
        throughput_mibps=round(moved / (1 << 20) / total, 1),
    )
    return record


#: What ``--protocols`` may name besides the plain copy.
PROTOCOLS = ("insecure", "secure", "secure-tls", "secure-daemon")
VARIANTS = ("full", "shared-storage")


def run(
    sizes: list[int],
    repeat: int,
    work_dir: Path | None,
    json_path: Path | None,
    protocols: tuple[str, ...] = ("insecure", "secure"),
    out: Path | None = None,
    ciphers: tuple[str | None, ...] = (None,),
    variants: tuple[str, ...] = ("full",),
    disk_mib: int = 0,
    link_mbit: int | None = None,
    concurrency: int = 1,
) -> int:
    """Run the benchmark and print its table; with ``json_path`` write the
    records there and the CSV, report and plots beside it (with ``out``, in
    that directory); with ``concurrency`` above 1, also that many secure
    migrations at once per size and repeat.  Returns an exit status."""

    # Where the outputs go must exist before an hour of measuring, not after.
    for directory in (out, json_path.parent if json_path else None):
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
    link = None
    if link_mbit is not None:
        link = Link(link_mbit)
        print(
            f"destination side in network namespace {link.namespace}, behind a "
            f"{link_mbit} Mbit/s veth link (tbf)",
            file=sys.stderr,
        )
    byte_compile()
    info = provenance()
    work = Path(tempfile.mkdtemp(prefix="securemig-bench-", dir=work_dir))
    records: list[dict[str, Any]] = []
    lab = Lab(work / "lab", link=link)
    sshd: Sshd | None = None
    try:
        # Before the lab's minutes of set-up: sshd and ssh must be installed.
        # Where a destination would be, as for the plain copy.
        wrapper = link.wrapper if link is not None else ()
        sshd = Sshd(work / "sshd", lab.address_of(DESTINATION), wrapper)
        idle = _idle_destination(work)
        records.append(idle)
        print(
            f"idle destination: {idle['cpu_s']['destination']:.2f} CPU-s to start and stop, "
            f"peak RSS {idle['peak_rss_mib']['destination']:.1f} MiB",
            file=sys.stderr,
        )
        per_variant = sum(len(ciphers) if p.startswith("secure") else 1 for p in protocols)
        concurrent = concurrency > 1
        progress = tqdm(
            total=len(sizes)
            * repeat
            * (1 + len(SSH_CIPHERS) + len(variants) * per_variant + concurrent),
            unit="run",
            desc="bench",
            file=sys.stderr,
            disable=not sys.stderr.isatty(),
        )
        print("setting up two enrolled hosts with swtpm TPMs ...", file=sys.stderr)
        lab.start()
        sshd.start()
        print(f"sshd (pid {sshd.pid}) on {sshd.address} port {sshd.port}", file=sys.stderr)
        for size in sizes:
            print(f"creating {size} MiB VMs ...", file=sys.stderr)
            plain = create_image_vm(work / "plain", f"plain-{size}", size)
            steps: list[Callable[[], dict[str, Any]]] = [
                partial(_plain_copy, work, plain.image_path("ram"), lab)
            ]
            steps += [
                partial(_ssh_copy, sshd, protocol, work, plain.image_path("ram"))
                for protocol in SSH_CIPHERS
            ]
            names = []
            for variant in variants:
                name = f"bench-{size}-{variant}"
                names.append(name)
                shared = None
                if variant == "shared-storage":
                    (work / "shared").mkdir(exist_ok=True)
                    shared = work / "shared" / f"{name}.disk"
                lab.create_vm(name, size, disk_mib or None, secure=True, shared_disk=shared)
                for protocol in protocols:
                    for cipher in ciphers if protocol.startswith("secure") else (None,):
                        steps.append(
                            partial(
                                _lab_migration, lab, name, size << 20, protocol, cipher, variant
                            )
                        )
            if concurrent:
                together = [f"bench-{size}-c{i}" for i in range(concurrency)]
                for name in together:
                    lab.create_vm(name, size, disk_mib or None, secure=True)
                names += together
                steps.append(
                    partial(_concurrent_migrations, lab, together, size << 20, "secure", None)
                )
            for i in range(repeat):
                for step in steps:  # alternate, so noise hurts every protocol alike
                    record = step()
                    record["repeat"] = i
                    records.append(record)
                    progress.update(1)
                    progress.write(
                        f"  {size} MiB run {i + 1}/{repeat} {series(record):<16} "
                        f"{record['variant']:<14} {record['total_s']:.3f} s",
                        file=sys.stderr,
                    )
            shutil.rmtree(plain.path)
            for name in names:
                shutil.rmtree(lab.vm_dir / name)
            shutil.rmtree(work / "shared", ignore_errors=True)
        progress.close()
    except SshError as e:
        print(f"securemig: error: the ssh baseline: {e}", file=sys.stderr)
        return 1  # the CLI's EXIT_FAILED
    finally:
        if sshd is not None:
            sshd.close()
        lab.stop()
        if link is not None:
            link.close()
        shutil.rmtree(work, ignore_errors=True)
    for record in records:
        record["provenance"] = info
        record["link_mbit"] = link_mbit
        # The disk image that travelled (none on shared storage).
        moved_disk = record["protocol"] not in ("plain-copy", "idle-destination", *SSH_CIPHERS)
        record["disk_mib"] = disk_mib if moved_disk and record["variant"] == "full" else 0

    if json_path is not None:
        json_path.write_text(json.dumps(records, indent=2))
        print(f"wrote {json_path}", file=sys.stderr)
    if out is not None or json_path is not None:
        directory = out if out is not None else json_path.parent  # type: ignore[union-attr]
        prefix = "" if out is not None else f"{json_path.stem}-"  # type: ignore[union-attr]
        for path in write_all(records, directory, prefix):
            print(f"wrote {path}", file=sys.stderr)
    print(one_line(info))
    print("\n".join(_summarise(records)))
    print(
        "time: wall seconds of the whole source command; x plain: its ratio to the plain "
        "copy's median;\nx plain ip: the same ratio in process (without the source "
        "interpreter's start-up); "
        "CPU: per process, from wait4 (ssh's server side: every per-connection process sshd "
        "reaped); CPU/GiB: both sides per GiB; RSS: its VmHWM (the destination's include its "
        "own start-up).\n"
        f"{WHOLE}: ratio of the whole-process medians; {IN_PROCESS}: of the in-process "
        "medians; same size, same variant, same run.\n"
        f"{FLOOR}."
    )
    if any(r.get("cpu_counted") for r in records):
        print(f"secure-daemon: {CPU_COUNTED}; RSS: each daemon's VmHWM.")
    return 0

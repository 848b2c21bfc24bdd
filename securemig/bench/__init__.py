"""
``securemig bench``: what a migration costs, against a plain copy.

For each size and repeat, in the same run and over the same file:

- ``plain-copy``: :mod:`securemig.bench.plaincopy` sends the RAM image
  through a loopback socket into an fsynced file (the floor);
- ``insecure``: a real ``twistd securemig`` destination and a real
  ``securemig migrate --insecure`` source move the same VM.

With ``--protocols secure`` (the default runs both) a lab of two enrolled
swtpm hosts (:mod:`securemig.lab`) runs the secure variant too, on a VM
with a vTPM; its numbers are then directly comparable with the insecure
twin's of the same size in the same run.

Each run records wall time, CPU seconds (user + system) and peak RSS of each
process (from ``wait4``), bytes and throughput.  Runs alternate between the
two so a noisy machine hurts both alike; the report gives medians and the
ratio to the baseline measured in the same invocation.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from securemig import processes
from securemig.bundle import Bundle, create_image_vm


def _plain_copy(work: Path, image: Path) -> dict[str, Any]:
    port_file = work / "plain.port"
    out = work / "plain.out"
    port_file.unlink(missing_ok=True)
    py = [sys.executable, "-m", "securemig.bench.plaincopy"]
    receiver = subprocess.Popen(
        [*py, "recv", str(port_file), str(out)], stdout=subprocess.PIPE, text=True
    )
    while not port_file.exists():
        if receiver.poll() is not None:
            raise RuntimeError("plain-copy receiver died")
        time.sleep(0.01)
    started = time.monotonic()
    sender = subprocess.Popen(
        [*py, "send", port_file.read_text(), str(image)], stdout=subprocess.PIPE, text=True
    )
    # Read each one's report of its peak memory, then reap it with wait4 (CPU).
    assert sender.stdout is not None and receiver.stdout is not None
    send_peak = int(sender.stdout.read()) / 1024
    send_usage = processes.wait_process(sender)
    recv_peak = int(receiver.stdout.read()) / 1024
    recv_usage = processes.wait_process(receiver)
    send_usage.peak_rss_mib, recv_usage.peak_rss_mib = send_peak, recv_peak
    total = time.monotonic() - started
    if send_usage.status or recv_usage.status:
        raise RuntimeError("plain copy failed")
    size = image.stat().st_size
    out.unlink()
    return _record("plain-copy", size, total, {}, send_usage, recv_usage)


def _migration(work: Path, vm_dir: Path, name: str, size: int) -> dict[str, Any]:
    state = work / "dst"
    shutil.rmtree(state, ignore_errors=True)
    destination = processes.start_destination(state)
    try:
        started = time.monotonic()
        source = subprocess.Popen(
            [
                processes.script("securemig"),
                "migrate",
                name,
                "--vm-dir",
                str(vm_dir),
                "--to",
                destination.address,
                "--insecure",
                "--json",
                "--no-progress",
                "--state-dir",
                str(work / "src-state"),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        out = source.stdout.read() if source.stdout else ""
        src_usage = processes.wait_process(source)
        total = time.monotonic() - started
    finally:
        dst_usage = destination.stop()
    if src_usage.status != 0:
        raise RuntimeError(f"migration failed: {out}")
    summary = json.loads(out)
    src_usage.peak_rss_mib = summary["peak_rss_mib"]
    # Put the VM back for the next run: same bytes, same file system.
    arrived = Bundle.load(state / "vms" / name)
    arrived.manifest.state = "suspended"
    arrived.save()
    arrived.path.rename(vm_dir / name)
    record = _record("insecure", size, total, summary["phases"], src_usage, dst_usage)
    # The same run without the source interpreter's start-up (~0.3 s of imports).
    record["in_process_s"] = summary["seconds"]
    return record


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
        f"{'size':>6} {'protocol':<16} {'time s':>8} {'x plain':>8} {'in-proc':>8} {'MiB/s':>7} "
        f"{'CPU src':>8} {'CPU dst':>8} {'RSS src':>8} {'RSS dst':>8}",
    ]
    for size in sorted({r["size_mib"] for r in records if r["size_mib"]}):
        runs = [r for r in records if r["size_mib"] == size]
        base = statistics.median(r["total_s"] for r in runs if r["protocol"] == "plain-copy")
        for protocol in protocols_of(records):
            rs = [r for r in runs if r["protocol"] == protocol]
            if not rs:
                continue
            med = statistics.median(r["total_s"] for r in rs)

            def m(key: str, side: str, rs: list[dict[str, Any]] = rs) -> float:
                return statistics.median(r[key][side] for r in rs)

            inproc = [r["in_process_s"] for r in rs if "in_process_s" in r]
            inproc_ratio = f"{statistics.median(inproc) / base:>8.2f}" if inproc else f"{'':>8}"
            lines.append(
                f"{size:>5}M {protocol:<16} {med:>8.3f} {med / base:>8.2f} {inproc_ratio} "
                f"{size / med:>7.0f} {m('cpu_s', 'source'):>8.2f} "
                f"{m('cpu_s', 'destination'):>8.2f} {m('peak_rss_mib', 'source'):>7.1f}M "
                f"{m('peak_rss_mib', 'destination'):>7.1f}M"
            )
        medians = {
            p: statistics.median(r["in_process_s"] for r in runs if r["protocol"] == p)
            for p in protocols_of(records)
            if p != "plain-copy" and any(r["protocol"] == p for r in runs)
        }
        for p in medians:
            if p.startswith("secure") and "insecure" in medians:
                lines.append(f"{size:>5}M {p}/insecure: {medians[p] / medians['insecure']:.2f}")
    return lines


def protocols_of(records: list[dict[str, Any]]) -> list[str]:
    """The protocols measured, in table order (``secure-CIPHER`` after ``secure``)."""
    present = {r["protocol"] for r in records if r["size_mib"]}
    order = ["plain-copy", "insecure", "secure"]
    return [p for p in order if p in present] + sorted(present - set(order))


def _secure_migration(lab: Any, name: str, size: int, cipher: str | None) -> dict[str, Any]:
    destination = lab.start_destination(keep=False, cipher=cipher)
    try:
        started = time.monotonic()
        summary, src_usage = lab.migrate(destination, name, secure=True)
        total = time.monotonic() - started
        src_usage.peak_rss_mib = summary["peak_rss_mib"]
    finally:
        dst_usage = destination.stop()
    lab.return_vm(destination, name)
    protocol = f"secure-{cipher}" if cipher else "secure"
    record = _record(protocol, size, total, summary["phases"], src_usage, dst_usage)
    record["cipher"] = cipher
    record["in_process_s"] = summary["seconds"]
    return record


def run(
    sizes: list[int],
    repeat: int,
    work_dir: Path | None,
    json_path: Path | None,
    protocols: tuple[str, ...] = ("insecure", "secure"),
    out: Path | None = None,
    ciphers: tuple[str | None, ...] = (None,),
) -> int:
    """Run the benchmark and print its table (and, with ``out``, write the
    records, a report and plots there); returns an exit status."""
    from securemig.lab import Lab

    work = Path(tempfile.mkdtemp(prefix="securemig-bench-", dir=work_dir))
    records: list[dict[str, Any]] = []
    lab = None
    try:
        idle = _idle_destination(work)
        records.append(idle)
        print(
            f"idle destination: {idle['cpu_s']['destination']:.2f} CPU-s to start and stop, "
            f"peak RSS {idle['peak_rss_mib']['destination']:.1f} MiB",
            file=sys.stderr,
        )
        secure_runs = len(ciphers) if "secure" in protocols else 0
        total_runs = len(sizes) * repeat * (1 + ("insecure" in protocols) + secure_runs)
        progress = tqdm(
            total=total_runs,
            unit="run",
            desc="bench",
            file=sys.stderr,
            disable=not sys.stderr.isatty(),
        )
        if "secure" in protocols:
            print("setting up two enrolled hosts with swtpm TPMs ...", file=sys.stderr)
            lab = Lab(work / "lab")
            lab.start()
        for size in sizes:
            vm_dir = work / "src"
            name = f"bench-{size}"
            print(f"creating {size} MiB VMs ...", file=sys.stderr)
            bundle = create_image_vm(vm_dir, name, size)
            steps: list[Callable[[], dict[str, Any]]] = [
                partial(_plain_copy, work, bundle.image_path("ram"))
            ]
            if "insecure" in protocols:
                steps.append(partial(_migration, work, vm_dir, name, size << 20))
            if lab is not None:
                lab.create_vm(name, size, None, secure=True)
                for cipher in ciphers:
                    steps.append(partial(_secure_migration, lab, name, size << 20, cipher))
            for i in range(repeat):
                for step in steps:  # alternate, so noise hurts every protocol alike
                    record = step()
                    record["repeat"] = i
                    records.append(record)
                    progress.update(1)
                    progress.write(
                        f"  {size} MiB run {i + 1}/{repeat} {record['protocol']:<16} "
                        f"{record['total_s']:.3f} s",
                        file=sys.stderr,
                    )
            shutil.rmtree(vm_dir / name)
            if lab is not None:
                shutil.rmtree(lab.vm_dir / name)
        progress.close()
    finally:
        if lab is not None:
            lab.stop()
        shutil.rmtree(work, ignore_errors=True)
    if json_path is not None:
        json_path.write_text(json.dumps(records, indent=2))
    if out is not None:
        from securemig.bench.report import write_all

        for path in write_all(records, out):
            print(f"wrote {path}", file=sys.stderr)
    print("\n".join(_summarise(records)))
    print(
        "time: wall seconds of the whole source command; x plain: its ratio to the plain "
        "copy's median;\nin-proc: the same ratio without the source interpreter's start-up; "
        "CPU: per process, from wait4; RSS: its VmHWM (the destination's include its own "
        "start-up).\n"
        "secure/insecure: ratio of the in-process medians, same size, same run."
    )
    return 0

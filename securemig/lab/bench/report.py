"""
The benchmark's outputs: records as JSON and CSV, a report, and plots.

The report's tables are shaped like the source thesis's: one row per size
and protocol with the median and the min-max range of wall time, CPU time
of each side and peak memory of each side, then the ratios that decide
whether security is worth its cost: secure/insecure, and each against the
plain copy of the same bytes measured in the same run.

Each ratio label has one definition, the same in every table, the summary
and the targets (:data:`WHOLE` and :data:`IN_PROCESS`): a ratio of
whole-process wall times is never printed under the name of one of
in-process times, nor the other way round.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from securemig.lab.bench.driven import CPU_COUNTED
from securemig.lab.bench.provenance import header_lines
from securemig.protocol.phases import Activity

#: secure / insecure of the whole source command's wall time (interpreter
#: start-up, CLI, migration, exit), medians, same size, variant and run.
WHOLE = "secure / insecure (whole process)"
#: secure / insecure of the migration's own seconds inside the source
#: process (``in_process_s``: without the interpreter's start-up), medians.
IN_PROCESS = "secure / insecure (in process)"
#: How the floor is measured (:func:`securemig.lab.bench._plain_copy`).
FLOOR = (
    "plain-copy (the floor): `cat IMAGE > /dev/tcp/ADDRESS/PORT` (a C tool, no "
    "interpreter on the clock) into a receiver started before the clock (recv_into, the "
    "destination's write-behind, fsync), as a destination daemon is started before it"
)


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in record.items() if not isinstance(v, dict)}
    for key in ("cpu_s", "peak_rss_mib"):
        for side, value in record[key].items():
            row[f"{key}_{side}"] = value
    for phase, seconds in record.get("phases", {}).items():
        row[f"phase_{phase}"] = seconds
    for key, value in record.get("provenance", {}).items():
        row[f"provenance_{key}"] = value
    return row


def write_csv(records: list[dict[str, Any]], path: Path) -> None:
    """One row per run; phases as ``phase_<name>`` columns."""
    rows = [_flat(r) for r in records]
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _stat(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    return (
        f"{statistics.median(values):.{digits}f} "
        f"({min(values):.{digits}f}-{max(values):.{digits}f})"
    )


def series(record: dict[str, Any]) -> str:
    """A record's line in tables and plots: the protocol (``secure-CIPHER``
    with ``--ciphers``), ``/shared`` for the shared-storage variant, `` xN``
    for N migrations at once."""
    suffix = "/shared" if record.get("variant") == "shared-storage" else ""
    together = concurrency(record)
    return f"{record['protocol']}{suffix}{f' x{together}' if together > 1 else ''}"


def concurrency(record: dict[str, Any]) -> int:
    """How many migrations a record measured at once (1: one alone)."""
    return int(record.get("concurrency", 1))


def insecure_twin(label: str) -> str:
    """The insecure series a secure one is compared with (same variant)."""
    return "insecure/shared" if label.endswith("/shared") else "insecure"


def protocols_of(records: list[dict[str, Any]]) -> list[str]:
    """The series measured, in table order: the baselines (plain copy,
    OpenSSH), insecure, secure (``secure-CIPHER`` after it), each variant
    in turn."""
    present = {series(r) for r in records if r["size_mib"] and concurrency(r) == 1}
    migrations = ["insecure", "secure", "secure-daemon", "secure-tls"]
    order = ["plain-copy", *SSH_SERIES, *migrations, *(f"{p}/shared" for p in migrations)]
    return [p for p in order if p in present] + sorted(present - set(order))


#: The OpenSSH baselines (:mod:`securemig.lab.bench.ssh`), in table order.
SSH_SERIES = ("ssh-aes128-gcm", "ssh-chacha20")


def sizes_of(records: list[dict[str, Any]]) -> list[int]:
    """The image sizes measured, in MiB, ascending."""
    return sorted({r["size_mib"] for r in records if r["size_mib"]})


def cpu_s(record: dict[str, Any]) -> float:
    """CPU seconds of a run, both sides together."""
    return float(record["cpu_s"]["source"] + record["cpu_s"]["destination"])


def cpu_per_gib(record: dict[str, Any]) -> float:
    """CPU seconds of both sides per GiB moved (by all of a record's
    migrations together)."""
    return cpu_s(record) / (record["size_mib"] * concurrency(record) / 1024)


def _runs(records: list[dict[str, Any]], size: int, protocol: str) -> list[dict[str, Any]]:

    return [r for r in records if r["size_mib"] == size and series(r) == protocol]


def _wire(runs: list[dict[str, Any]]) -> str:
    """Median bytes on the wire (TCP payload, both connections), in MiB."""
    values = [r["wire_bytes"] for r in runs if r.get("wire_bytes")]
    return f"{statistics.median(values) / (1 << 20):.1f}" if values else "-"


def report(records: list[dict[str, Any]]) -> str:
    """The report as Markdown."""
    sizes = sizes_of(records)
    info = next((r["provenance"] for r in records if r.get("provenance")), None)
    lines = [
        "# securemig benchmark",
        "",
        *(header_lines(info) if info else ["- provenance: not recorded"]),
        f"- {FLOOR}",
        "",
        "Medians over the repeats, (min-max).  Time: wall seconds of the whole source",
        "command.  CPU: user+system seconds per process.  RSS: peak resident MiB per",
        "process.  The destination's CPU and RSS include its own start-up.",
        *(
            ["", f"secure-daemon: {CPU_COUNTED}; RSS: each daemon's VmHWM (its start-up in it)."]
            if any(r.get("cpu_counted") for r in records)
            else []
        ),
        "",
        "| size MiB | protocol | time s | CPU source s | CPU destination s "
        "| CPU s/GiB (both) | RSS source | RSS destination | MiB/s | wire MiB |",
        "|---:|---|---|---|---|---:|---|---|---:|---:|",
    ]
    for size in sizes:
        for protocol in protocols_of(records):
            rs = _runs(records, size, protocol)
            if not rs:
                continue
            total = [r["total_s"] for r in rs]
            lines.append(
                f"| {size} | {protocol} | {_stat(total)} "
                f"| {_stat([r['cpu_s']['source'] for r in rs])} "
                f"| {_stat([r['cpu_s']['destination'] for r in rs])} "
                f"| {statistics.median(cpu_per_gib(r) for r in rs):.2f} "
                f"| {_stat([r['peak_rss_mib']['source'] for r in rs], 1)} "
                f"| {_stat([r['peak_rss_mib']['destination'] for r in rs], 1)} "
                f"| {size / statistics.median(total):.0f} | {_wire(rs)} |"
            )
    lines += [
        "",
        "## Ratios (medians, same size, same run)",
        "",
        "Whole process: wall seconds of the whole source command, start-up included.  "
        "In process: the migration's seconds inside the source process, without the "
        "interpreter's start-up.",
        "",
        "| size MiB | secure variant | insecure / plain (whole process) "
        f"| secure / plain (whole process) | {WHOLE} | {IN_PROCESS} "
        "| CPU secure / insecure (both sides) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        med: dict[str, float] = {}
        inproc: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for protocol in protocols_of(records):
            rs = _runs(records, size, protocol)
            if rs:
                med[protocol] = statistics.median(r["total_s"] for r in rs)
                cpu[protocol] = statistics.median(cpu_s(r) for r in rs)
                if all("in_process_s" in r for r in rs):
                    inproc[protocol] = statistics.median(r["in_process_s"] for r in rs)

        def ratio(a: str, b: str, values: dict[str, float]) -> str:
            return f"{values[a] / values[b]:.2f}" if a in values and b in values else "-"

        for secure in [p for p in med if p.startswith("secure")]:
            twin = insecure_twin(secure)
            lines.append(
                f"| {size} | {secure} | {ratio(twin, 'plain-copy', med)} "
                f"| {ratio(secure, 'plain-copy', med)} | {ratio(secure, twin, med)} "
                f"| {ratio(secure, twin, inproc)} | {ratio(secure, twin, cpu)} |"
            )
    against = _against_ssh(records, sizes)
    if against:
        lines += ["", "## Against OpenSSH (medians, same size, same run)", "", *against]
    together = concurrency_table(records)
    if together:
        lines += ["", "## Migrations at once (one destination, distinct VMs)", "", *together]
    lines += ["", "## Shaped like the thesis's tables 6.3 and 6.4", "", *thesis_table(records)]
    phases = _phase_table(records, sizes)
    if phases:
        lines += ["", "## Phases (median seconds, from the source's journal)", "", *phases]
    lines += ["", *targets(records)]
    return "\n".join(lines) + "\n"


def _against_ssh(records: list[dict[str, Any]], sizes: list[int]) -> list[str]:
    """How many times faster than each ssh baseline every migration is
    (whole-process wall time: ssh's includes its own start-up and key
    exchange, as securemig's does)."""
    lines = [
        "| size MiB | protocol | "
        + " | ".join(f"{s} time / its (whole process)" for s in SSH_SERIES)
        + " |",
        "|---:|---|" + "---:|" * len(SSH_SERIES),
    ]
    for size in sizes:
        ssh = {
            s: statistics.median(r["total_s"] for r in _runs(records, size, s))
            for s in SSH_SERIES
            if _runs(records, size, s)
        }
        if not ssh:
            continue
        for protocol in protocols_of(records):
            rs = _runs(records, size, protocol)
            if protocol == "plain-copy" or protocol in SSH_SERIES or not rs:
                continue
            med = statistics.median(r["total_s"] for r in rs)
            cells = [f"{ssh[s] / med:.2f}" if s in ssh else "-" for s in SSH_SERIES]
            lines.append(f"| {size} | {protocol} | " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else []


def concurrency_table(records: list[dict[str, Any]]) -> list[str]:
    """N migrations at once against one alone of the same size and protocol,
    same run: the wall time until the last ended, each one's own time, the
    aggregate throughput, and the CPU of all sources and the destination."""
    lines = [
        "| size MiB | migrations | wall s (all) | per migration s | alone s "
        "| per migration / alone | aggregate MiB/s | alone MiB/s | aggregate / alone "
        "| CPU sources s | CPU destination s | CPU s/GiB (both) |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in sizes_of(records):
        groups = sorted(
            {series(r) for r in records if r["size_mib"] == size and concurrency(r) > 1}
        )
        for name in groups:
            rs = _runs(records, size, name)
            n = concurrency(rs[0])
            alone_name = name.rsplit(" x", 1)[0]
            alone = [r["total_s"] for r in _runs(records, size, alone_name)]
            wall = [r["total_s"] for r in rs]
            each = [t for r in rs for t in r.get("per_migration_s", [])]
            aggregate = n * size / statistics.median(wall)
            if alone:
                a = statistics.median(alone)
                alone_cells = (
                    f"{a:.3f} | {statistics.median(each) / a:.2f} | {aggregate:.0f} "
                    f"| {size / a:.0f} | {aggregate / (size / a):.2f}"
                )
            else:
                alone_cells = f"- | - | {aggregate:.0f} | - | -"
            lines.append(
                f"| {size} | {n} x {alone_name} | {_stat(wall)} | {_stat(each)} | {alone_cells} "
                f"| {statistics.median(r['cpu_s']['source'] for r in rs):.2f} "
                f"| {statistics.median(r['cpu_s']['destination'] for r in rs):.2f} "
                f"| {statistics.median(cpu_per_gib(r) for r in rs):.2f} |"
            )
    return lines if len(lines) > 2 else []


#: The thesis's CPU seconds (client, server) that this repository quotes
#: (``doc/performance.rst``): 1024 MB of RAM, AES-128, 2006 hardware.
#: Its other rows (128-512 MB, other ciphers, with and without the disk
#: image) are not in the repository, and the report says so.
THESIS_CPU = {(1024, "insecure"): (13.1, 18.3), (1024, "secure"): (25.8, 36.5)}
#: The thesis's time, secure over insecure, above 512 MB of RAM (AES-128).
THESIS_TIME_RATIO = "~1.10 (above 512 MB)"


def _cipher_name(record: dict[str, Any]) -> str:
    if not record["protocol"].startswith("secure"):
        return "none"
    return str(record.get("cipher") or "default (OpenSSL's choice)")


def _in_process(runs: list[dict[str, Any]]) -> float | None:
    """Median seconds without the source interpreter's start-up; None where
    a run did not record them (never its whole-process time instead)."""
    if not runs or any("in_process_s" not in r for r in runs):
        return None
    return statistics.median(r["in_process_s"] for r in runs)


def thesis_table(records: list[dict[str, Any]]) -> list[str]:
    """CPU seconds of client (source) and server (destination) per size,
    cipher and disk image, secure and insecure, medians; the thesis's own
    numbers beside ours where the repository has them (2006 hardware), and
    secure/insecure in time and CPU beside its ~10 %."""
    lines = [
        "| size MiB | disk image MiB | protocol | cipher | client CPU s | server CPU s "
        f"| {IN_PROCESS} | secure / insecure CPU "
        "| thesis client CPU s | thesis server CPU s | thesis secure / insecure |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    migrations = [
        r
        for r in records
        if r["protocol"] in ("insecure", "secure") or r["protocol"].startswith("secure-")
        if r["size_mib"] and concurrency(r) == 1 and r["protocol"] != "secure-tls"
    ]
    keys = sorted(
        {(r["size_mib"], int(r.get("disk_mib") or 0), series(r)) for r in migrations},
        key=lambda k: (k[0], k[1], k[2] != "insecure", k[2]),
    )
    for size, disk, name in keys:
        rs = [r for r in migrations if (r["size_mib"], int(r.get("disk_mib") or 0)) == (size, disk)]
        mine = [r for r in rs if series(r) == name]
        twin = [r for r in rs if series(r) == insecure_twin(name)]
        time_ratio = cpu_ratio = "-"
        if name != insecure_twin(name) and twin:
            a, b = _in_process(mine), _in_process(twin)
            time_ratio = f"{a / b:.2f}" if a is not None and b else "-"
            cpu = statistics.median(cpu_s(r) for r in mine)
            cpu_ratio = f"{cpu / statistics.median(cpu_s(r) for r in twin):.2f}"
        kind = "insecure" if name == insecure_twin(name) else "secure"
        thesis = THESIS_CPU.get((size, kind))
        if thesis is not None and disk == 0:
            thesis_cells = f"{thesis[0]} | {thesis[1]} | "
            thesis_cells += (
                f"time {THESIS_TIME_RATIO}, CPU "
                f"{sum(THESIS_CPU[(size, 'secure')]) / sum(THESIS_CPU[(size, 'insecure')]):.2f}"
                " (AES-128, 2006 hardware)"
                if kind == "secure"
                else "(2006 hardware)"
            )
        else:
            thesis_cells = "not in the repository | not in the repository | -"
        lines.append(
            f"| {size} | {disk} | {name} | {_cipher_name(mine[0])} "
            f"| {statistics.median(r['cpu_s']['source'] for r in mine):.2f} "
            f"| {statistics.median(r['cpu_s']['destination'] for r in mine):.2f} "
            f"| {time_ratio} | {cpu_ratio} | {thesis_cells} |"
        )
    lines += [
        "",
        "Client: the source's `securemig migrate`; server: the destination's "
        f"`twistd securemig` (whole processes, start-up included).  {IN_PROCESS}: "
        "medians of the migration's seconds inside the source process, same size, disk "
        "and run.  The thesis's numbers are "
        "those this repository quotes (1024 MB, AES-128, its disk image not stated); "
        "its rows for 128-512 MB and its other ciphers are not in the repository.",
    ]
    return lines


def _phase_table(records: list[dict[str, Any]], sizes: list[int]) -> list[str]:
    names: list[str] = []
    for r in records:
        names += [n for n in r["phases"] if n not in names]
    if not names:
        return []
    lines = [
        "| size MiB | protocol | " + " | ".join(names) + " |",
        "|---:|---|" + "---:|" * len(names),
    ]
    for size in sizes:
        for protocol in protocols_of(records):
            rs = [r for r in _runs(records, size, protocol) if r["phases"]]
            if rs:
                cells = [
                    f"{statistics.median(r['phases'][n] for r in rs):.4f}"
                    if all(n in r["phases"] for r in rs)
                    else "-"
                    for n in names
                ]
                lines.append(f"| {size} | {protocol} | " + " | ".join(cells) + " |")
    return lines


#: Activities that are not the fixed cost of a migration (the source's
#: release of its copy removes the images, so it grows with them): named by
#: :class:`~securemig.protocol.phases.Activity` itself.
VARIABLE_PHASES = frozenset(a for a in Activity if a.varies_with_size)


def fixed_cost(record: dict[str, Any]) -> float:
    """Seconds of a run outside its streams, commit, release and resume."""
    return sum(v for k, v in record["phases"].items() if k not in VARIABLE_PHASES)


def targets(records: list[dict[str, Any]]) -> list[str]:
    """The performance targets, each with what this run measured."""
    sizes = sizes_of(records)
    lines = [
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]

    def row(target: str, measured: str, met: bool | None) -> None:
        verdict = "not measured" if met is None else ("yes" if met else "**no**")
        if met is None and "no target" in target:
            verdict = "-"
        lines.append(f"| {target} | {measured} | {verdict} |")

    def median(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    big = 1024 if 1024 in sizes else (sizes[-1] if sizes else 0)
    secure, insecure = _runs(records, big, "secure"), _runs(records, big, "insecure")
    s = median([r["in_process_s"] for r in secure if "in_process_s" in r])
    i = median([r["in_process_s"] for r in insecure if "in_process_s" in r])
    whole_s = median([r["total_s"] for r in secure])
    whole_i = median([r["total_s"] for r in insecure])
    if whole_s is not None and whole_i is not None:
        row(
            f"{WHOLE}, {big} MiB, full (reported, no target)",
            f"{whole_s / whole_i:.3f} ({whole_s:.2f} s / {whole_i:.2f} s)",
            None,
        )
    if s is not None and i is not None:
        # The twin does no cryptography, so this ratio is all of security's
        # cost (TLS, attestation, key release, AEAD): hence 1.10, not 1.03.
        row(
            f"{IN_PROCESS}, {big} MiB, full, ≤ 1.10",
            f"{s / i:.3f} ({s:.2f} s / {i:.2f} s, in-process medians)",
            s / i <= 1.10,
        )
    else:
        row(f"{IN_PROCESS}, 1 GiB, full, ≤ 1.10", "needs both protocols", None)
    ssh = _runs(records, big, "ssh-aes128-gcm")
    stream = median([r["stream_mibps"] for r in secure if r.get("stream_mibps")])
    secure_s = median([r["total_s"] for r in secure])
    if ssh and secure_s is not None:
        ssh_s = statistics.median(r["total_s"] for r in ssh)
        ssh_mibps = statistics.median(r["throughput_mibps"] for r in ssh)
        row(
            f"secure ≥ 1.3 x ssh aes128-gcm, {big} MiB (whole-process time)",
            f"{ssh_s / secure_s:.2f} x ({ssh_s:.2f} s / {secure_s:.2f} s); secure streams "
            f"{stream or 0:.0f} MiB/s, ssh {ssh_mibps:.0f} MiB/s",
            ssh_s / secure_s >= 1.3,
        )
    else:
        row(
            "secure ≥ 1.3 x ssh aes128-gcm (whole-process time)",
            f"secure streams {stream or 0:.0f} MiB/s; needs secure and the ssh baseline",
            None,
        )
    cpu = median([cpu_s(r) / (r["size_mib"] / 1024) for r in secure])
    idle = median(
        [r["cpu_s"]["destination"] for r in records if r["protocol"] == "idle-destination"]
    )
    plain = median([cpu_s(r) / (r["size_mib"] / 1024) for r in _runs(records, big, "plain-copy")])
    if cpu is not None:
        net = f"; {cpu - (idle or 0) / (big / 1024):.2f} without the destination's start-up"
        floor = f"; the plain copy alone: {plain:.2f} s/GiB" if plain else ""
        row(
            "secure CPU, both sides, ≤ 2.0 s/GiB",
            f"{cpu:.2f} s/GiB at {big} MiB (whole processes){net if idle else ''}{floor}",
            cpu <= 2.0,
        )
    if 1024 in sizes and 4096 in sizes:
        worst = 0.0
        for side in ("source", "destination"):
            a = median([r["peak_rss_mib"][side] for r in _runs(records, 1024, "secure")])
            b = median([r["peak_rss_mib"][side] for r in _runs(records, 4096, "secure")])
            if a and b:
                worst = max(worst, abs(b - a) / a)
        row("peak RSS of each side within 10 % from 1 GiB to 4 GiB", f"{worst:.1%}", worst <= 0.10)
    else:
        row("peak RSS of each side within 10 % from 1 GiB to 4 GiB", "needs sizes 1024,4096", None)
    fixed = median([fixed_cost(r) for size in sizes for r in _runs(records, size, "secure")])
    if fixed is not None:
        row(
            "fixed cost (all but streams, commit, release, resume) ≤ 150 ms",
            f"{fixed * 1000:.0f} ms",
            fixed <= 0.150,
        )
    return lines


def plots(records: list[dict[str, Any]], out: Path, prefix: str = "") -> list[Path]:
    """PNG plots: time, CPU per side, memory per side, throughput, by size;
    none (said on stderr) without matplotlib, the optional ``bench`` extra."""
    # Imported here: matplotlib is an optional, heavy dependency of plots only.
    try:
        import matplotlib
    except ImportError:
        print("no plots: matplotlib is missing (pip install 'securemig[bench]')", file=sys.stderr)
        return []

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    sizes = sizes_of(records)
    written = []

    def series(protocol: str, value: Any) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for size in sizes:
            rs = _runs(records, size, protocol)
            if rs:
                xs.append(size)
                ys.append(statistics.median(value(r) for r in rs))
        return xs, ys

    charts = [
        ("time.png", "wall time (s)", [("", lambda r: r["total_s"])]),
        ("throughput.png", "MiB/s", [("", lambda r: r["size_mib"] / r["total_s"])]),
        (
            "cpu.png",
            "CPU (s)",
            [
                (" source", lambda r: r["cpu_s"]["source"]),
                (" destination", lambda r: r["cpu_s"]["destination"]),
            ],
        ),
        (
            "memory.png",
            "peak RSS (MiB)",
            [
                (" source", lambda r: r["peak_rss_mib"]["source"]),
                (" destination", lambda r: r["peak_rss_mib"]["destination"]),
            ],
        ),
    ]
    for name, label, values in charts:
        fig, ax = plt.subplots(figsize=(6, 4))
        for protocol in protocols_of(records):
            for suffix, value in values:
                xs, ys = series(protocol, value)
                if xs:
                    ax.plot(xs, ys, marker="o", label=protocol + suffix)
        ax.set_xlabel("image size (MiB)")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{prefix}{name}", dpi=100)
        plt.close(fig)
        written.append(out / f"{prefix}{name}")
    return written


def write_all(records: list[dict[str, Any]], out: Path, prefix: str = "") -> list[Path]:
    """records.json (unless ``prefix``: then the caller wrote it),
    records.csv, report.md and the plots, in ``out``, names after ``prefix``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if not prefix:
        (out / "records.json").write_text(json.dumps(records, indent=2))
        written.append(out / "records.json")
    write_csv(records, out / f"{prefix}records.csv")
    (out / f"{prefix}report.md").write_text(report(records))
    written += [out / f"{prefix}records.csv", out / f"{prefix}report.md"]
    return written + plots(records, out, prefix)

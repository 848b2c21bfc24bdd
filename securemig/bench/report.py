"""
The benchmark's outputs: records as JSON and CSV, a report, and plots.

The report's tables are shaped like the source thesis's: one row per size
and protocol with the median and the min-max range of wall time, CPU time
of each side and peak memory of each side, then the ratios that decide
whether security is worth its cost: secure/insecure, and each against the
plain copy of the same bytes measured in the same run.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in record.items() if not isinstance(v, dict)}
    for key in ("cpu_s", "peak_rss_mib"):
        for side, value in record[key].items():
            row[f"{key}_{side}"] = value
    for phase, seconds in record.get("phases", {}).items():
        row[f"phase_{phase}"] = seconds
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


def protocols_of(records: list[dict[str, Any]]) -> list[str]:
    """The protocols measured, in table order."""
    from securemig.bench import protocols_of as order

    return order(records)


def _runs(records: list[dict[str, Any]], size: int, protocol: str) -> list[dict[str, Any]]:
    return [r for r in records if r["size_mib"] == size and r["protocol"] == protocol]


def report(records: list[dict[str, Any]]) -> str:
    """The report as Markdown."""
    sizes = sorted({r["size_mib"] for r in records if r["size_mib"]})
    lines = [
        "# securemig benchmark",
        "",
        "Medians over the repeats, (min-max).  Time: wall seconds of the whole source",
        "command.  CPU: user+system seconds per process.  RSS: peak resident MiB per",
        "process.  The destination's CPU and RSS include its own start-up.",
        "",
        "| size MiB | protocol | time s | CPU source s | CPU destination s "
        "| RSS source | RSS destination | MiB/s |",
        "|---:|---|---|---|---|---|---|---:|",
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
                f"| {_stat([r['peak_rss_mib']['source'] for r in rs], 1)} "
                f"| {_stat([r['peak_rss_mib']['destination'] for r in rs], 1)} "
                f"| {size / statistics.median(total):.0f} |"
            )
    lines += [
        "",
        "## Ratios (medians, same size, same run)",
        "",
        "| size MiB | secure variant | insecure / plain | secure / plain "
        "| secure / insecure | CPU secure / insecure (both sides) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for size in sizes:
        med: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for protocol in protocols_of(records):
            rs = _runs(records, size, protocol)
            if rs:
                med[protocol] = statistics.median(r["total_s"] for r in rs)
                cpu[protocol] = statistics.median(
                    r["cpu_s"]["source"] + r["cpu_s"]["destination"] for r in rs
                )

        def ratio(a: str, b: str, values: dict[str, float]) -> str:
            return f"{values[a] / values[b]:.2f}" if a in values and b in values else "-"

        for secure in [p for p in med if p.startswith("secure")]:
            lines.append(
                f"| {size} | {secure} | {ratio('insecure', 'plain-copy', med)} "
                f"| {ratio(secure, 'plain-copy', med)} | {ratio(secure, 'insecure', med)} "
                f"| {ratio(secure, 'insecure', cpu)} |"
            )
    phases = _phase_table(records, sizes)
    if phases:
        lines += ["", "## Phases of the secure variant (median seconds)", "", *phases]
    return "\n".join(lines) + "\n"


def _phase_table(records: list[dict[str, Any]], sizes: list[int]) -> list[str]:
    names: list[str] = []
    for r in records:
        if r["protocol"].startswith("secure"):
            names += [n for n in r["phases"] if n not in names]
    if not names:
        return []
    lines = ["| size MiB | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for size in sizes:
        rs = _runs(records, size, "secure")
        if rs:
            cells = [f"{statistics.median(r['phases'].get(n, 0.0) for r in rs):.4f}" for n in names]
            lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return lines


def plots(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """PNG plots: time, CPU per side, memory per side, throughput, by size."""
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    sizes = sorted({r["size_mib"] for r in records if r["size_mib"]})
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
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)
    return written


def write_all(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """records.json, records.csv, report.md and the plots, in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "records.json").write_text(json.dumps(records, indent=2))
    write_csv(records, out / "records.csv")
    (out / "report.md").write_text(report(records))
    return [out / "records.json", out / "records.csv", out / "report.md", *plots(records, out)]

"""
``twistd securemig --metrics ENDPOINT``: a Prometheus endpoint (``GET
/metrics``), served by ``prometheus_client``'s Twisted resource.

What it exposes comes from three places:

- the host's journal (``STATE_DIR/journal.sqlite``), read at each scrape
  (:class:`JournalCollector`): every migration this host took part in, as
  source (``securemig migrate`` journals there too) or destination, so the
  counts survive restarts and include the CLI's migrations;
- the pre-authentication caps of the secure listener
  (:class:`PreauthCollector`): connections pending their TLS handshake and
  those refused, dropped or timed out;
- the process's own instruments (:mod:`securemig.metrics`): TPM queue
  waits, refused arrivals by code.

No label holds a VM or host name (cardinality, and names an operator may
not want scraped); the endpoint has no authentication: bind it to loopback
or a management network.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from twisted.web.server import Site

from securemig import metrics
from securemig.protocol.phases import Phase

#: Upper bounds (s) of the migration duration histogram.
DURATION_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: Bounds of the live downtime histogram, in seconds.
DOWNTIME_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)

#: The labels of a migration: role, variant, protocol (secure or insecure), mode.
LABELS = ["role", "variant", "protocol", "mode"]

_ROWS = """
SELECT m.role, m.variant, m.protocol,
       EXISTS (SELECT 1 FROM events e WHERE e.migration = m.id
               AND e.phase IN (?, ?)) AS live,
       m.phase, m.outcome, m.error, m.bytes, m.started, m.updated, m.downtime_ms
FROM migrations m
"""
#: The phases that mark a live migration, on either side (``_ROWS``'s parameters).
_LIVE_PHASES = (Phase.LIVE, Phase.INCOMING)


def _code(error: str | None) -> str:
    """The code of a journaled error (``CODE: reason``); empty for none."""
    if not error:
        return ""
    head = error.split(":", 1)[0].strip()
    return head if head.isupper() and head.replace("_", "").isalpha() else "UNKNOWN"


def _buckets(
    values: list[float], bounds: tuple[float, ...]
) -> tuple[list[tuple[str, float]], float]:
    """Cumulative histogram buckets of ``values`` (Prometheus' ``le``
    bounds, then ``+Inf``) and their sum."""
    buckets: list[tuple[str, float]] = [
        (str(bound), sum(1 for v in values if v <= bound)) for bound in bounds
    ]
    buckets.append(("+Inf", len(values)))
    return buckets, sum(values)


def _counter(
    name: str, text: str, labels: list[str], counts: Counter[tuple[str, ...]]
) -> CounterMetricFamily:
    """A counter family with one sample per label tuple of ``counts``."""
    family = CounterMetricFamily(name, text, labels=labels)
    for key, n in sorted(counts.items()):
        family.add_metric(list(key), n)
    return family


def _histogram(
    name: str, text: str, values: dict[tuple[str, ...], list[float]], bounds: tuple[float, ...]
) -> HistogramMetricFamily:
    """A histogram family (by :data:`LABELS`) of the observations in ``values``."""
    family = HistogramMetricFamily(name, text, labels=LABELS)
    for key, observed in sorted(values.items()):
        family.add_metric(list(key), *_buckets(observed, bounds))
    return family


class JournalCollector(Collector):
    """Migration counts, durations, bytes and in-doubt ones, read from the
    journal at ``path`` at each scrape (read-only, its own connection: a
    scrape runs in a thread)."""

    def __init__(self, path: Path, clock: Any = time) -> None:
        self.path = path
        self.clock = clock

    def _rows(self) -> list[tuple[Any, ...]]:
        if not self.path.exists():
            return []
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute(_ROWS, _LIVE_PHASES).fetchall()
        finally:
            db.close()

    def collect(self) -> Iterator[Metric]:
        started: Counter[tuple[str, ...]] = Counter()
        ended: Counter[tuple[str, ...]] = Counter()
        moved: Counter[tuple[str, ...]] = Counter()
        durations: dict[tuple[str, ...], list[float]] = {}
        downtimes: dict[tuple[str, ...], list[float]] = {}
        running: Counter[str] = Counter()
        in_doubt: Counter[str] = Counter()
        oldest_doubt = 0.0
        now = self.clock.time()
        for (
            role,
            variant,
            protocol,
            live,
            phase,
            outcome,
            error,
            nbytes,
            begun,
            updated,
            downtime_ms,
        ) in self._rows():
            labels: tuple[str, ...] = (role, variant, protocol, "live" if live else "suspended")
            started[labels] += 1
            moved[labels] += nbytes or 0
            if outcome == "in-doubt" or phase == Phase.IN_DOUBT:
                in_doubt[role] += 1
                oldest_doubt = max(oldest_doubt, now - begun)
            if outcome is None:
                if phase != Phase.IN_DOUBT:
                    running[role] += 1
                continue
            ended[(*labels, outcome, _code(error))] += 1
            if outcome in ("done", "aborted"):
                durations.setdefault(labels, []).append(max(0.0, updated - begun))
            if downtime_ms is not None:
                downtimes.setdefault(labels, []).append(downtime_ms / 1000)
        yield _counter(
            "securemig_migrations_started",
            "Migrations begun on this host (journaled), by role, variant, protocol and mode",
            LABELS,
            started,
        )
        yield _counter(
            "securemig_migrations_ended",
            "Migrations ended, by role, variant, protocol, mode, outcome (done, aborted, "
            "in-doubt) and error code (empty when done)",
            [*LABELS, "outcome", "code"],
            ended,
        )
        yield _counter(
            "securemig_migration_bytes",
            "Image bytes sent (source) or received (destination), by role, variant, "
            "protocol and mode",
            LABELS,
            moved,
        )
        yield _histogram(
            "securemig_migration_duration_seconds",
            "Duration of ended migrations (done or aborted), from their start to their end",
            durations,
            DURATION_BUCKETS,
        )
        yield _histogram(
            "securemig_migration_downtime_seconds",
            "QEMU's downtime of live migrations (source: the guest paused for the last "
            "pages), journaled once the destination's guest runs",
            downtimes,
            DOWNTIME_BUCKETS,
        )
        gauge = GaugeMetricFamily(
            "securemig_migrations_running", "Migrations under way now, by role", labels=["role"]
        )
        for role in ("source", "destination"):
            gauge.add_metric([role], running[role])
        yield gauge
        gauge = GaugeMetricFamily(
            "securemig_migrations_in_doubt",
            "Migrations held in doubt now (a destination keeps the staging until its "
            "source resolves it), by role",
            labels=["role"],
        )
        for role in ("source", "destination"):
            gauge.add_metric([role], in_doubt[role])
        yield gauge
        yield GaugeMetricFamily(
            "securemig_migrations_in_doubt_oldest_seconds",
            "Age of the oldest migration in doubt (0: none)",
            value=oldest_doubt,
        )


class PreauthCollector(Collector):
    """The secure listener's connections before their TLS handshake
    (:class:`~securemig.transport.limits.PendingConnections`)."""

    def __init__(self, limits: Any) -> None:
        self.limits = limits

    def collect(self) -> Iterator[Metric]:
        limits = self.limits
        yield GaugeMetricFamily(
            "securemig_preauth_pending",
            "Connections accepted and not yet through the TLS handshake",
            value=len(limits.pending),
        )
        yield CounterMetricFamily(
            "securemig_preauth_refused",
            "Connections closed at accept: their address was at --per-source-max-startups",
            value=limits.refused,
        )
        yield CounterMetricFamily(
            "securemig_preauth_dropped",
            "Pending connections closed to make room (random early drop, --max-startups)",
            value=limits.dropped,
        )
        yield CounterMetricFamily(
            "securemig_preauth_timed_out",
            "Connections aborted at --handshake-timeout",
            value=limits.timed_out,
        )


_registered: list[Collector] = []


def metrics_site(state_dir: Path, limits: Any | None) -> Site:
    """The web site of the endpoint: ``/metrics`` (also ``/``)."""
    # Imported here: it imports the global reactor (twistd installs its own
    # first); and twisted.web is a tenth of the daemon's start-up CPU (through
    # twisted.spread, decimal), not paid without --metrics.
    from prometheus_client.twisted import MetricsResource
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    # One site per process; a second (tests) replaces the first's collectors.
    for collector in _registered:
        metrics.REGISTRY.unregister(collector)
    _registered[:] = [JournalCollector(state_dir / "journal.sqlite")]
    if limits is not None:
        _registered.append(PreauthCollector(limits))
    for collector in _registered:
        metrics.REGISTRY.register(collector)
    # Twisted declares IResource through zope, which mypy does not see.
    resource: Any = MetricsResource(metrics.REGISTRY)
    root = Resource()
    root.putChild(b"metrics", resource)
    root.putChild(b"", resource)
    site = Site(root)
    site.noisy = False
    return site

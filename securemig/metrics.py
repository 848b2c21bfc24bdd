"""
The in-process instruments of ``twistd securemig --metrics`` (Prometheus,
through ``prometheus_client``): what only the running process sees.  They
live in :data:`REGISTRY`, which the daemon serves when ``--metrics`` is
given (:mod:`securemig.app.metrics_service`, which adds what the journal
and the pre-authentication caps hold); counting costs a few nanoseconds and
needs no endpoint, so the layers below record unconditionally.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

#: securemig's own registry (not the library's global one: no process
#: metrics of whatever else runs in the interpreter, no duplicate names
#: when tests build services twice).
REGISTRY = CollectorRegistry(auto_describe=True)

TPM_QUEUE_WAIT = Histogram(
    "securemig_tpm_queue_wait_seconds",
    "Time a TPM operation waited for its turn on the host TPM (other threads "
    "and processes of the host using it)",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)

REFUSALS = Counter(
    "securemig_refusals",
    "Arrivals refused before admission (a source not allowed, a VM already "
    "here, no space, a bad HELLO), by error code",
    ["code"],
    registry=REGISTRY,
)

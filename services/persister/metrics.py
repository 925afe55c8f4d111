"""Prometheus metrics of the persister (the shared RPC metrics live in ``mesh.metrics``).

No label carries a tenant or conversation id.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BATCH_SIZE = Histogram(
    "mesh_persister_batch_events",
    "Log records per batch written to PostgreSQL.",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
)
FLUSH_SECONDS = Histogram(
    "mesh_persister_flush_seconds",
    "Time to write one batch to PostgreSQL (one transaction, commit included).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
BARRIER_SECONDS = Histogram(
    "mesh_persister_barrier_seconds",
    "Time Flush and consistent reads waited for the log to be committed.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
ROWS_WRITTEN = Counter(
    "mesh_persister_rows_written_total",
    "Rows inserted into PostgreSQL, by table.",
    ["table"],
)
DUPLICATES_IGNORED = Counter(
    "mesh_persister_duplicates_ignored_total",
    "Log records that changed nothing because they were already stored (replays).",
)
BATCH_FAILURES = Counter(
    "mesh_persister_batch_failures_total",
    "Batch writes that failed and were retried (offsets stayed uncommitted).",
)
REMEMBER_FAILURES = Counter(
    "mesh_persister_remember_failures_total",
    "Remember calls to the memory service that failed, by outcome (retried or dropped).",
    ["outcome"],
)
PENDING_EVENTS = Gauge(
    "mesh_persister_pending_events",
    "Log records consumed but not yet committed.",
)
OUTBOX_INDEXED = Counter(
    "mesh_persister_memory_indexed_total",
    "Finished turns the memory outbox handed to the memory service.",
)
REMEMBER_SECONDS = Histogram(
    "mesh_persister_remember_seconds",
    "Time of one Remember call to the memory service.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

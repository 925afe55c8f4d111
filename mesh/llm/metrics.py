"""The engine's own metrics, named after the figures vLLM operators already know.

``num_requests_running`` and ``num_requests_waiting`` are generations in the batch and waiting
for a slot; ``prefix_cache_queries`` and ``prefix_cache_hits`` count prompt tokens looked up in
the cache and found there (their ratio is the hit ratio).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from mesh.llm.kv import SequencePool

RUNNING = Gauge("mesh_engine_num_requests_running", "Generations in the engine's batch.", ["model"])
WAITING = Gauge(
    "mesh_engine_num_requests_waiting", "Generations waiting for a batch slot.", ["model"]
)
KV_USAGE = Gauge(
    "mesh_engine_kv_cache_usage_ratio",
    "Share of the KV cache reserved by running generations or kept by idle ones.",
    ["model"],
)
KV_CACHED = Gauge(
    "mesh_engine_kv_cache_idle_tokens",
    "KV cache cells idle sequences keep for prefix reuse.",
    ["model"],
)
BATCH_SIZE = Histogram(
    "mesh_engine_batch_tokens",
    "Tokens per decode step (one per running generation plus prompt chunks).",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
PREFIX_QUERIES = Counter(
    "mesh_engine_prefix_cache_queries_total",
    "Prompt tokens of admitted generations (looked up in the prefix cache).",
    ["model"],
)
PREFIX_HITS = Counter(
    "mesh_engine_prefix_cache_hits_total",
    "Prompt tokens found in the prefix cache and not read again.",
    ["model"],
)
QUEUE_WAIT = Histogram(
    "mesh_engine_queue_wait_seconds",
    "Time from a generation's submission to its admission into the batch.",
    ["model"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)


class Labels:
    """One engine's children of the metrics above (labels resolved once)."""

    def __init__(self, model: str) -> None:
        self._running = RUNNING.labels(model)
        self._waiting = WAITING.labels(model)
        self._kv_usage = KV_USAGE.labels(model)
        self._kv_cached = KV_CACHED.labels(model)
        self._batch = BATCH_SIZE.labels(model)
        self._queries = PREFIX_QUERIES.labels(model)
        self._hits = PREFIX_HITS.labels(model)
        self._wait = QUEUE_WAIT.labels(model)

    def observe_state(self, running: int, waiting: int, pool: SequencePool) -> None:
        self._running.set(running)
        self._waiting.set(waiting)
        self._kv_usage.set(pool.used_cells / pool.cells)
        self._kv_cached.set(pool.cached_tokens)

    def batch(self, tokens: int) -> None:
        self._batch.observe(tokens)

    def admitted(self, prompt_tokens: int, cached_tokens: int, waited_s: float) -> None:
        self._queries.inc(prompt_tokens)
        self._hits.inc(cached_tokens)
        self._wait.observe(waited_s)

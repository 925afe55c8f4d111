"""Row ``recall``: memory recall latency at 10k and 100k chunks, pgvector vs Elasticsearch.

Each store is the memory service's own (``mesh.memory.postgres.PostgresMemoryStore`` on a fresh
database of the run's PostgreSQL; ``mesh.memory.elasticsearch.ElasticsearchMemoryStore`` on a
node from ``mesh.infra.elasticsearch`` with ``--es``). One tenant holds every chunk, the worst
case for the tenant filter. Chunks are synthetic: 40 words drawn from a Zipf-distributed
vocabulary of made-up words, with vectors summed from the real embedder's word vectors (the
embedder itself is too slow to run 100k times in a benchmark, and recall only needs vectors of
the same shape and distribution). Queries are 4 mid-frequency words embedded by the real
embedder, as the memory service would, ``top_k`` 4 as the agent asks.

Loading uses the stores' batched ``upsert``. Searches alternate between the stores query by
query, so both see the same machine load.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from bench.common import Context, Row, p50_p99, project_state_dir, verdict
from mesh.memory.base import MemoryStore, StoredChunk
from mesh.memory.embedding import DEFAULT_DIMS, HashingEmbedder
from mesh.memory.postgres import PostgresMemoryStore

TENANT = "bench"
VOCABULARY = 5000
WORDS_PER_CHUNK = 40
QUERY_WORDS = 4
TOP_K = 4
BATCH = 1000
TARGET_P99_MS = 50.0
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


class Corpus:
    """Deterministic synthetic chunks and queries."""

    def __init__(self, seed: int = 7) -> None:
        self._rng = np.random.default_rng(seed)
        words: list[str] = []
        seen: set[str] = set()
        while len(words) < VOCABULARY:
            size = int(self._rng.integers(2, 5))
            word = "".join(_SYLLABLES[int(i)] for i in self._rng.integers(0, len(_SYLLABLES), size))
            if word not in seen:
                seen.add(word)
                words.append(word)
        self.words = words
        ranks = np.arange(1, VOCABULARY + 1, dtype=np.float64)
        self._weights = (1.0 / ranks) / (1.0 / ranks).sum()
        self.embedder = HashingEmbedder(DEFAULT_DIMS)
        self._vectors: npt.NDArray[np.float32] = np.array(
            self.embedder.embed(words), dtype=np.float32
        )

    def chunks(self, start: int, count: int) -> list[StoredChunk]:
        picks = self._rng.choice(VOCABULARY, size=(count, WORDS_PER_CHUNK), p=self._weights)
        vectors = self._vectors[picks].sum(axis=1)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return [
            StoredChunk(
                chunk_id=f"chunk-{start + i}",
                tenant_id=TENANT,
                text=" ".join(self.words[int(w)] for w in picks[i]),
                vector=vectors[i].tolist(),
                conversation_id=f"conversation-{(start + i) // 20}",
                source_id=f"turn-{(start + i) // 4}",
            )
            for i in range(count)
        ]

    def queries(self, count: int) -> list[tuple[str, list[float]]]:
        rng = np.random.default_rng(99)
        out = []
        for _ in range(count):
            # Mid-frequency words: neither stop-word-like nor absent from most chunks.
            text = " ".join(self.words[int(i)] for i in rng.integers(20, 2000, QUERY_WORDS))
            out.append((text, self.embedder.embed_one(text)))
        return out


async def _load(
    ctx: Context, stores: dict[str, MemoryStore], corpus: Corpus, have: int, want: int
) -> float:
    """Grow every store from ``have`` to ``want`` chunks, the same chunks in each; returns
    chunks per second (into all stores at once)."""
    started = time.monotonic()
    loaded = have
    while loaded < want:
        chunks = corpus.chunks(loaded, min(BATCH, want - loaded))
        # The stores are separate servers: loading them at once overlaps their indexing.
        await asyncio.gather(*(store.upsert(chunks) for store in stores.values()))
        loaded += len(chunks)
        if loaded % 10_000 == 0 or loaded == want:
            rate = (loaded - have) / max(time.monotonic() - started, 1e-9)
            ctx.progress(f"recall: {loaded:,}/{want:,} chunks in each store ({rate:,.0f}/s)")
    return (want - have) / max(time.monotonic() - started, 1e-9)


async def _search(store: MemoryStore, query: tuple[str, list[float]]) -> float:
    started = time.perf_counter()
    hits = await store.search(TENANT, query[0], query[1], TOP_K)
    elapsed = (time.perf_counter() - started) * 1000
    if not hits:
        raise RuntimeError("recall found nothing for a query made of corpus words")
    return elapsed


async def _open_es(ctx: Context, stack: contextlib.AsyncExitStack) -> MemoryStore:
    # Imported here: the embedded profile runs without the Elasticsearch client installed.
    from mesh.infra.elasticsearch import ElasticsearchServer
    from mesh.memory.elasticsearch import ElasticsearchMemoryStore

    server = ElasticsearchServer(project_state_dir(), heap="1g", node_dir=ctx.path("es-node"))
    ctx.progress("recall: starting Elasticsearch")
    try:
        url = await asyncio.to_thread(server.start)
    except BaseException:
        await asyncio.to_thread(server.stop)
        raise
    stack.push_async_callback(asyncio.to_thread, server.stop)
    store = ElasticsearchMemoryStore(url, index_prefix="bench-recall", dims=DEFAULT_DIMS)
    await stack.enter_async_context(store)
    return store


async def run(ctx: Context, *, es: bool, sizes: Sequence[int] | None = None) -> list[Row]:
    levels = sorted(sizes or ((200, 500) if ctx.quick else (10_000, 100_000)))
    n_queries = 20 if ctx.quick else 300
    ctx.progress("recall: building the synthetic corpus")
    corpus = Corpus()
    queries = corpus.queries(n_queries + 10)
    rows: list[Row] = []
    async with contextlib.AsyncExitStack() as stack:
        pg: MemoryStore = PostgresMemoryStore(
            ctx.database("recall"), dims=DEFAULT_DIMS, table="bench_chunks"
        )
        await stack.enter_async_context(pg)
        stores: dict[str, MemoryStore] = {"pgvector": pg}
        if es:
            stores["elasticsearch"] = await _open_es(ctx, stack)
        loaded = 0
        for size in levels:
            load_rate = await _load(ctx, stores, corpus, loaded, size)
            loaded = size
            ctx.progress(f"recall: {n_queries} queries per store at {size:,} chunks")
            latencies: dict[str, list[float]] = {name: [] for name in stores}
            for index, query in enumerate(queries):
                order = list(stores) if index % 2 == 0 else list(reversed(stores))
                for name in order:
                    elapsed = await _search(stores[name], query)
                    if index >= 10:  # the first queries warm caches and connections
                        latencies[name].append(elapsed)
            rows.append(_row(size, latencies, load_rate))
    return rows


def _row(size: int, latencies: dict[str, list[float]], load_rate: float) -> Row:
    pg50, pg99 = p50_p99(latencies["pgvector"])
    metrics: dict[str, float] = {
        "chunks": size,
        "queries": len(latencies["pgvector"]),
        "pgvector_p50_ms": pg50,
        "pgvector_p99_ms": pg99,
        "load_chunks_per_s": load_rate,
    }
    worst = pg99
    subject = "elasticsearch: not run (--es)"
    comparison = "-"
    if "elasticsearch" in latencies:
        es50, es99 = p50_p99(latencies["elasticsearch"])
        metrics.update({"elasticsearch_p50_ms": es50, "elasticsearch_p99_ms": es99})
        subject = f"elasticsearch p50 {es50:.1f} / p99 {es99:.1f} ms"
        comparison = f"ES/pgvector p50 {es50 / pg50:.2f}x, p99 {es99 / pg99:.2f}x"
        worst = max(worst, es99)
    return Row(
        row="recall",
        variant=f"{size:,} chunks",
        baseline=f"pgvector p50 {pg50:.1f} / p99 {pg99:.1f} ms",
        subject=subject,
        comparison=comparison,
        target=f"p99 <= {TARGET_P99_MS:.0f} ms",
        verdict=verdict(worst <= TARGET_P99_MS),
        metrics=metrics,
        note=(
            f"one tenant, top_k {TOP_K}, hybrid (vector + full-text) search; loaded with "
            f"batched upserts at {load_rate:,.0f} chunks/s"
        ),
    )


__all__ = ["run"]

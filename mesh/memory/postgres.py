"""The memory store on PostgreSQL: pgvector for nearest neighbours, full-text search for terms.

Search is one SQL statement: the tenant's top candidates by cosine distance (HNSW index) and by
``ts_rank`` (GIN index) are fused with reciprocal rank fusion, so a chunk both rankers like beats
one only a single ranker likes. Every statement filters by ``tenant_id``; there is no code path
that reads or deletes rows without it.

The full-text half ORs the query's words (a question has more words than the fact it is after)
and leaves out words found in more than ``common_term_fraction`` of all chunks, which would
make it score most of a tenant's rows for little ranking value; the vector half still sees
them. This keeps recall latency flat as memory grows (see ``_refresh_common_terms``).

Works with pgvector >= 0.5 (HNSW). Up to 0.7, HNSW applies the tenant filter after the index
scan, so the vector half sees at most ``hnsw.ef_search`` candidates before filtering; the store
raises ``ef_search`` per query to compensate, and on pgvector >= 0.8 it turns on iterative index
scans instead, which keep scanning until enough of the tenant's rows are found. The full-text
half is exact either way.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager

import numpy as np
import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from mesh.errors import Unavailable
from mesh.lifecycle import AsyncStartStop
from mesh.memory.base import (
    RRF_K,
    ChunkHit,
    StoredChunk,
    check_document_chunks,
    check_search,
    fusion_candidates,
    require_tenant,
)

log = logging.getLogger(__name__)

_MAX_EF_SEARCH = 1000  # pgvector's upper bound for hnsw.ef_search
# Long queries add little to ranking and cost GIN lookups; keep the distinct terms bounded.
_MAX_QUERY_TERMS = 64
_TEXT_CONFIGS = frozenset({"simple", "english"})
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# Two services starting on one database must not race on CREATE EXTENSION / CREATE TABLE.
_SCHEMA_LOCK_KEY = 0x6D656D6F7279  # "memory"
_QUERY_WORD = re.compile(r"\w+", re.UNICODE)


def _vector_literal(vector: Sequence[float], dims: int) -> str:
    array = np.asarray(vector, dtype=np.float32)
    if array.shape != (dims,):
        raise ValueError(f"vector has shape {array.shape}, the store expects ({dims},)")
    if not np.all(np.isfinite(array)):
        raise ValueError("vector has NaN or infinite components")
    return "[" + ",".join(f"{value:.7g}" for value in array.tolist()) + "]"


def _query_words(query_text: str) -> list[str]:
    """The query's distinct lower-cased words, in order, at most ``_MAX_QUERY_TERMS``.

    Only word characters survive, so quotes and minus signs in user text cannot turn into
    search operators; ``or``, the one word ``websearch_to_tsquery`` reads as an operator, is
    dropped.
    """
    seen: dict[str, None] = {}
    for word in _QUERY_WORD.findall(query_text.lower()):
        if word != "or":
            seen.setdefault(word, None)
        if len(seen) >= _MAX_QUERY_TERMS:
            break
    return list(seen)


class PostgresMemoryStore(AsyncStartStop):
    """``MemoryStore`` on PostgreSQL + pgvector. Creates its schema on ``start``.

    Args:
        dsn: libpq connection string or URI.
        dims: embedding dimension; a table created with another dimension is an error.
        table: table name (a plain lower-case identifier), so tests or tenants of one database
            can keep separate tables.
        text_config: full-text configuration: ``english`` (default; stems words and drops stop
            words, which would otherwise match nearly every chunk of an OR-ed query) or
            ``simple`` (exact lower-cased words, for corpora that are mostly not English).
            Fixed when the table is created.
        min_pool_size: connections kept open.
        max_pool_size: most connections at once.
        connect_timeout_s: how long ``start`` and each operation wait for a connection.
        common_term_fraction: words whose lexemes occur in more than this fraction of all
            chunks are left out of the full-text half of a search (1.0 keeps every word).
        stats_refresh_s: how often the list of common lexemes is re-read.
    """

    def __init__(
        self,
        dsn: str,
        *,
        dims: int = 256,
        table: str = "memory_chunks",
        text_config: str = "english",
        min_pool_size: int = 1,
        max_pool_size: int = 8,
        connect_timeout_s: float = 30.0,
        common_term_fraction: float = 0.05,
        stats_refresh_s: float = 60.0,
    ) -> None:
        if dims < 1:
            raise ValueError(f"dims must be positive, got {dims}")
        if not _IDENTIFIER.fullmatch(table):
            raise ValueError(f"table must be a lower-case SQL identifier, got {table!r}")
        if text_config not in _TEXT_CONFIGS:
            raise ValueError(
                f"text_config must be one of {sorted(_TEXT_CONFIGS)}, got {text_config!r}"
            )
        self._dims = dims
        self._table = sql.Identifier(table)
        self._table_name = table
        self._text_config = text_config
        self._timeout_s = connect_timeout_s
        self._iterative_scan = False
        self._common_term_fraction = common_term_fraction
        self._stats_refresh_s = stats_refresh_s
        self._common_terms: list[str] = []
        self._common_checked_at = -math.inf
        self._dsn = dsn
        self._pool_sizes = (min_pool_size, max_pool_size)
        self._pool = self._new_pool()
        self._started = False

    def _new_pool(self) -> AsyncConnectionPool:
        # A closed pool cannot be opened again, so every start gets a new one.
        return AsyncConnectionPool(
            self._dsn,
            min_size=self._pool_sizes[0],
            max_size=self._pool_sizes[1],
            # Reads are single statements; writes that must be atomic open a transaction.
            kwargs={"autocommit": True},
            timeout=self._timeout_s,
            open=False,
            name=f"memory-{self._table_name}",
        )

    @property
    def dims(self) -> int:
        return self._dims

    async def start(self) -> None:
        if self._started:
            return
        self._pool = self._new_pool()
        try:
            await self._pool.open(wait=True, timeout=self._timeout_s)
        except PoolTimeout as error:
            await self._pool.close()
            raise Unavailable(
                f"could not connect to PostgreSQL for memory within {self._timeout_s:.0f}s",
                reason="MEMORY_STORE_UNAVAILABLE",
            ) from error
        try:
            await self._create_schema()
        except BaseException:
            await self._pool.close()
            raise
        self._started = True

    async def stop(self) -> None:
        self._started = False
        await self._pool.close()

    async def _create_schema(self) -> None:
        t = self._table
        name = self._table_name
        statements: list[sql.SQL | sql.Composed] = [
            sql.SQL("CREATE EXTENSION IF NOT EXISTS vector"),
            sql.SQL(
                """CREATE TABLE IF NOT EXISTS {t} (
                    tenant_id text NOT NULL,
                    chunk_id text NOT NULL,
                    conversation_id text NOT NULL DEFAULT '',
                    document_id text NOT NULL DEFAULT '',
                    source_id text NOT NULL DEFAULT '',
                    text text NOT NULL,
                    embedding vector({dims}) NOT NULL,
                    tsv tsvector GENERATED ALWAYS AS (to_tsvector({cfg}, text)) STORED,
                    created_at timestamptz NOT NULL DEFAULT now(),
                    PRIMARY KEY (tenant_id, chunk_id)
                )"""
            ).format(t=t, dims=sql.Literal(self._dims), cfg=sql.Literal(self._text_config)),
            sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {t} (tenant_id)").format(
                i=sql.Identifier(f"{name}_tenant_idx"), t=t
            ),
            sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {t} (tenant_id, conversation_id)").format(
                i=sql.Identifier(f"{name}_conversation_idx"), t=t
            ),
            sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {t} (tenant_id, source_id)").format(
                i=sql.Identifier(f"{name}_source_idx"), t=t
            ),
            sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {t} (tenant_id, document_id)").format(
                i=sql.Identifier(f"{name}_document_idx"), t=t
            ),
            sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {t} USING gin (tsv)").format(
                i=sql.Identifier(f"{name}_tsv_idx"), t=t
            ),
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS {i} ON {t} USING hnsw (embedding vector_cosine_ops)"
            ).format(i=sql.Identifier(f"{name}_embedding_idx"), t=t),
        ]
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
            for statement in statements:
                await conn.execute(statement)
            row = await (
                await conn.execute(
                    """SELECT format_type(a.atttypid, a.atttypmod)
                       FROM pg_attribute a
                       WHERE a.attrelid = to_regclass(%s) AND a.attname = 'embedding'""",
                    (name,),
                )
            ).fetchone()
            version_row = await (
                await conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            ).fetchone()
        expected = f"vector({self._dims})"
        if row is None or row[0] != expected:
            found = row[0] if row else "nothing"
            raise RuntimeError(
                f"table {name!r} stores {found} embeddings but the store was configured for "
                f"{expected}; use another table (or database) or re-ingest after dropping it"
            )
        version = str(version_row[0]) if version_row else "0"
        self._iterative_scan = _version_tuple(version) >= (0, 8)
        log.info("memory store ready: table %s, pgvector %s", name, version)

    def _connection(self) -> AbstractAsyncContextManager[psycopg.AsyncConnection[TupleRow]]:
        if self._pool.closed:
            raise RuntimeError("PostgresMemoryStore is not started; call start() or use async with")
        return self._pool.connection()

    async def ping(self) -> None:
        async with self._connection() as conn:
            await conn.execute("SELECT 1")

    async def has_source(self, tenant_id: str, source_id: str) -> bool:
        require_tenant(tenant_id)
        query = sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM {t} WHERE tenant_id = %s AND source_id = %s)"
        ).format(t=self._table)
        async with self._guard(), self._connection() as conn:
            row = await (await conn.execute(query, (tenant_id, source_id))).fetchone()
        return bool(row and row[0])

    def _rows(self, chunks: Sequence[StoredChunk]) -> list[tuple[str, ...]]:
        rows: dict[tuple[str, str], tuple[str, ...]] = {}
        for chunk in chunks:
            require_tenant(chunk.tenant_id)
            # The last of equal ids wins, as it would with separate upserts.
            rows[(chunk.tenant_id, chunk.chunk_id)] = (
                chunk.tenant_id,
                chunk.chunk_id,
                chunk.conversation_id,
                chunk.document_id,
                chunk.source_id,
                chunk.text.replace("\x00", " "),
                _vector_literal(chunk.vector, self._dims),
            )
        return list(rows.values())

    def _upsert_sql(self) -> sql.Composed:
        return sql.SQL(
            """INSERT INTO {t}
                   (tenant_id, chunk_id, conversation_id, document_id, source_id, text, embedding)
               VALUES (%s, %s, %s, %s, %s, %s, %s::vector)
               ON CONFLICT (tenant_id, chunk_id) DO UPDATE SET
                   conversation_id = EXCLUDED.conversation_id,
                   document_id = EXCLUDED.document_id,
                   source_id = EXCLUDED.source_id,
                   text = EXCLUDED.text,
                   embedding = EXCLUDED.embedding
               WHERE ({t}.conversation_id, {t}.document_id, {t}.source_id, {t}.text,
                      {t}.embedding)
                     IS DISTINCT FROM (EXCLUDED.conversation_id, EXCLUDED.document_id,
                      EXCLUDED.source_id, EXCLUDED.text, EXCLUDED.embedding)"""
        ).format(t=self._table)

    async def upsert(self, chunks: Sequence[StoredChunk]) -> int:
        rows = self._rows(chunks)
        if not rows:
            return 0
        # executemany pipelines the statements: one round trip's worth of latency per batch.
        # Identical replays match the WHERE clause of nothing, so they rewrite no row (no dead
        # tuples, no index churn).
        async with self._guard(), self._connection() as conn, conn.transaction():
            async with conn.cursor() as cur:
                await cur.executemany(self._upsert_sql(), rows)
        return len(rows)

    async def replace_document(
        self, tenant_id: str, document_id: str, chunks: Sequence[StoredChunk]
    ) -> int:
        check_document_chunks(tenant_id, document_id, chunks)
        rows = self._rows(chunks)
        delete = sql.SQL("DELETE FROM {t} WHERE tenant_id = %s AND document_id = %s").format(
            t=self._table
        )
        # One transaction: readers see the old document or the new one, never a mix or nothing.
        async with self._guard(), self._connection() as conn, conn.transaction():
            await conn.execute(delete, (tenant_id, document_id))
            if rows:
                async with conn.cursor() as cur:
                    await cur.executemany(self._upsert_sql(), rows)
        return len(rows)

    def _search_sql(self) -> sql.Composed:
        return sql.SQL(
            """WITH
               q AS (
                   -- Plain and websearch queries AND their terms, so a question phrased in more
                   -- words than the fact it is after would match nothing: OR them, and let
                   -- ts_rank order chunks by the terms they share. Words whose lexemes are all
                   -- common (see _refresh_common_terms) are left to the vector half.
                   SELECT websearch_to_tsquery({cfg}, coalesce(string_agg(w.word, ' or '), ''))
                          AS query
                   FROM unnest(%(words)s::text[]) AS w(word)
                   WHERE NOT (tsvector_to_array(to_tsvector({cfg}, w.word)) <@ %(common)s::text[])
               ),
               by_vector AS (
                   SELECT chunk_id, row_number() OVER (ORDER BY distance, chunk_id) AS rank
                   FROM (
                       SELECT chunk_id, embedding <=> %(vector)s::vector AS distance
                       FROM {t}
                       WHERE tenant_id = %(tenant)s
                         AND (%(conversation)s = '' OR conversation_id = %(conversation)s)
                       ORDER BY embedding <=> %(vector)s::vector
                       LIMIT %(candidates)s
                   ) nearest
               ),
               by_text AS (
                   SELECT chunk_id, row_number() OVER (ORDER BY score DESC, chunk_id) AS rank
                   FROM (
                       SELECT c.chunk_id, ts_rank(c.tsv, q.query, 1) AS score
                       FROM {t} c, q
                       WHERE c.tenant_id = %(tenant)s
                         AND (%(conversation)s = '' OR c.conversation_id = %(conversation)s)
                         AND c.tsv @@ q.query
                       ORDER BY score DESC
                       LIMIT %(candidates)s
                   ) matching
               ),
               fused AS (
                   SELECT chunk_id, sum(1.0 / ({rrf_k} + rank)) AS score,
                          min(text_rank) AS text_rank
                   FROM (
                       SELECT chunk_id, rank, NULL::bigint AS text_rank FROM by_vector
                       UNION ALL
                       SELECT chunk_id, rank, rank AS text_rank FROM by_text
                   ) ranks
                   GROUP BY chunk_id
               )
               SELECT c.chunk_id, c.text, f.score::float8, c.conversation_id, c.document_id
               FROM fused f
               JOIN {t} c ON c.tenant_id = %(tenant)s AND c.chunk_id = f.chunk_id
               -- Equal scores mean each chunk was found by one ranker at the same rank; the
               -- one that contains query terms verbatim goes first.
               ORDER BY f.score DESC, f.text_rank NULLS LAST, c.chunk_id
               LIMIT %(top_k)s"""
        ).format(t=self._table, cfg=sql.Literal(self._text_config), rrf_k=sql.Literal(RRF_K))

    async def _refresh_common_terms(self, conn: psycopg.AsyncConnection[TupleRow]) -> None:
        """Cache the lexemes found in more than ``common_term_fraction`` of the chunks.

        An OR-ed query with a word that nearly every chunk contains makes ``ts_rank`` score
        most of the tenant's rows, which grows linearly with memory size, while such a word
        barely changes the ranking (the vector half still sees it). Like a common-terms query in
        Lucene, the full-text half leaves them out. Frequencies come from the planner's
        statistics (``ANALYZE``/autovacuum collect them for tsvector columns), so this costs one
        catalog read per refresh; before the first ``ANALYZE`` nothing is left out.
        """
        self._common_checked_at = time.monotonic()
        if self._common_term_fraction >= 1.0:
            return
        cur = await conn.execute(
            """SELECT e.lexeme
               FROM pg_stats s,
                    unnest(s.most_common_elems::text::text[], s.most_common_elem_freqs)
                        AS e(lexeme, fraction)
               WHERE s.schemaname = current_schema() AND s.tablename = %s
                 AND s.attname = 'tsv' AND e.lexeme IS NOT NULL AND e.fraction > %s""",
            (self._table_name, self._common_term_fraction),
        )
        self._common_terms = sorted(str(row[0]) for row in await cur.fetchall())

    async def search(
        self,
        tenant_id: str,
        query_text: str,
        query_vector: Sequence[float],
        top_k: int,
        conversation_id: str = "",
    ) -> list[ChunkHit]:
        check_search(tenant_id, top_k)
        candidates = fusion_candidates(top_k)
        params: dict[str, object] = {
            "tenant": tenant_id,
            "conversation": conversation_id,
            "words": _query_words(query_text),
            "common": self._common_terms,
            "vector": _vector_literal(query_vector, self._dims),
            "candidates": candidates,
            "top_k": top_k,
        }
        async with self._guard(), self._connection() as conn:
            if time.monotonic() - self._common_checked_at > self._stats_refresh_s:
                await self._refresh_common_terms(conn)
                params["common"] = self._common_terms
            rows = await self._run_search(conn, params, candidates)
        return [
            ChunkHit(
                chunk_id=row[0],
                text=row[1],
                score=float(row[2]),
                conversation_id=row[3],
                document_id=row[4],
            )
            for row in rows
        ]

    async def _run_search(
        self,
        conn: psycopg.AsyncConnection[TupleRow],
        params: dict[str, object],
        candidates: int,
    ) -> list[TupleRow]:
        # Pipelined: BEGIN, the settings, the search and COMMIT cost one round trip.
        async with conn.pipeline(), conn.transaction():
            # SET LOCAL scope: the pooled connection goes back with the server defaults.
            if self._iterative_scan:
                await conn.execute(
                    "SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true)"
                )
            await conn.execute(
                "SELECT set_config('hnsw.ef_search', %s, true)",
                (str(min(_MAX_EF_SEARCH, max(100, 2 * candidates))),),
            )
            async with conn.cursor() as cur:
                await cur.execute(self._search_sql(), params)
                return await cur.fetchall()

    async def delete(self, tenant_id: str, conversation_id: str = "") -> int:
        require_tenant(tenant_id)
        if conversation_id:
            query = sql.SQL("DELETE FROM {t} WHERE tenant_id = %s AND conversation_id = %s")
            params: tuple[str, ...] = (tenant_id, conversation_id)
        else:
            query = sql.SQL("DELETE FROM {t} WHERE tenant_id = %s")
            params = (tenant_id,)
        async with self._guard(), self._connection() as conn:
            cur = await conn.execute(query.format(t=self._table), params)
            return max(cur.rowcount, 0)

    def _guard(self) -> _Unavailable:
        return _Unavailable()


class _Unavailable:
    """Reports a lost database as UNAVAILABLE (retryable) instead of an internal error."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, PoolTimeout | psycopg.OperationalError):
            raise Unavailable(
                "the memory database is unavailable; retry shortly",
                reason="MEMORY_STORE_UNAVAILABLE",
                retry_after_s=1.0,
            ) from exc


def _version_tuple(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for part in version.split("."):
        digits = re.match(r"\d+", part)
        parts.append(int(digits.group()) if digits else 0)
    return tuple(parts)


__all__ = ["RRF_K", "PostgresMemoryStore"]

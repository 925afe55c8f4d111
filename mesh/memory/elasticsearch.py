"""The memory store on Elasticsearch 8.x: kNN for nearest neighbours, BM25 for terms.

All tenants share one index (``<index_prefix>-chunks``) that the store creates on ``start``;
every query and delete carries a ``tenant_id`` term filter, and there is no code path without
it. A search is one ``_msearch`` round trip holding a kNN search and a BM25 ``match`` search, each
filtered by tenant (and conversation); the two rankings are fused here with reciprocal rank
fusion, because the server's RRF retriever is a licensed x-pack feature that a basic or
test-distribution node lacks. Ranking ties break on ``chunk_id``, as in the PostgreSQL store.

Works with any 8.x node (the 8.x client refuses 9.x servers): ``_delete_by_query`` is used when
the reindex module is installed, otherwise deletes search the ids and bulk-delete them. Writes
refresh the index before returning, so reads see them at once.

Scoring note: BM25's term statistics are per shard, across tenants. They weigh terms, they never
return another tenant's chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from elastic_transport import TlsError
from elasticsearch import (
    ApiError,
    AsyncElasticsearch,
    AuthenticationException,
    ConnectionError,
    ConnectionTimeout,
    NotFoundError,
)

from mesh.errors import FailedPrecondition, Unavailable
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

_MAX_WINDOW = 10_000  # Elasticsearch's cap on kNN num_candidates and on from+size
_BULK_BATCH = 500
_DELETE_BATCH = 1_000
_MAX_QUERY_TERMS = 64
_QUERY_WORD = re.compile(r"\w+", re.UNICODE)
_INDEX_PREFIX = re.compile(r"[a-z0-9][a-z0-9._-]{0,200}")
_SOURCE_FIELDS = ["chunk_id", "text", "conversation_id", "document_id"]
# Status codes after which the same request may well succeed shortly.
_RETRYABLE_STATUS = frozenset({429, 502, 503, 504})


def index_mapping(dims: int) -> dict[str, Any]:
    """The chunk index mapping: keyword filters, standard-analyzed text, an HNSW vector."""
    keyword = {"type": "keyword"}
    return {
        # A typo in a field name must fail the write, not grow the mapping.
        "dynamic": "strict",
        "properties": {
            "tenant_id": keyword,
            "chunk_id": keyword,
            "conversation_id": keyword,
            "document_id": keyword,
            "source_id": keyword,
            "text": {"type": "text", "analyzer": "standard"},
            "vector": {
                "type": "dense_vector",
                "dims": dims,
                "index": True,
                "similarity": "cosine",
                # Full float HNSW: 8.x quantizes by default (int8_hnsw), which reorders close
                # neighbours and would make this backend rank differently from pgvector.
                "index_options": {"type": "hnsw"},
            },
        },
    }


def chunk_doc_id(tenant_id: str, chunk_id: str) -> str:
    """The ``_id`` of a chunk: chunk ids are unique per tenant only, so the tenant is part of it.

    Hashed, so no tenant or chunk id can collide with another pair by containing a separator, and
    the id stays under Elasticsearch's 512-byte limit.
    """
    key = json.dumps([tenant_id, chunk_id], ensure_ascii=False)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def query_terms(query_text: str) -> str:
    """The query's distinct words, space-separated, at most ``_MAX_QUERY_TERMS`` of them.

    A ``match`` query ORs them; bounding them keeps a pasted essay from exceeding the clause
    limit, and only word characters survive, as in the PostgreSQL store.
    """
    seen: dict[str, None] = {}
    for word in _QUERY_WORD.findall(query_text.lower()):
        seen.setdefault(word, None)
        if len(seen) >= _MAX_QUERY_TERMS:
            break
    return " ".join(seen)


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[str]], *, k: int = RRF_K
) -> list[tuple[str, float]]:
    """Fuse best-first rankings of ids: ``sum(1 / (k + rank))`` over the rankings holding an id.

    Ranks start at 1. An id repeated within one ranking counts once, at its best rank. Returns
    ``(id, score)`` best first; equal scores order by id, so the result is deterministic.
    """
    if k < 0:
        raise ValueError(f"k must not be negative, got {k}")
    scores: dict[str, float] = {}
    for ranking in rankings:
        seen: set[str] = set()
        for rank, key in enumerate(ranking, start=1):
            if key in seen:
                continue
            seen.add(key)
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def _candidates(top_k: int) -> int:
    return fusion_candidates(top_k, cap=_MAX_WINDOW)


def _vector(vector: Sequence[float], dims: int) -> list[float] | None:
    """The vector as JSON-ready floats, or None for the zero vector (cosine cannot rank it)."""
    array = np.asarray(vector, dtype=np.float32)
    if array.shape != (dims,):
        raise ValueError(f"vector has shape {array.shape}, the store expects ({dims},)")
    if not np.all(np.isfinite(array)):
        raise ValueError("vector has NaN or infinite components")
    if not np.any(array):
        return None
    # float32 precision, printed short: half the JSON of full float64 reprs.
    return [float(f"{value:.7g}") for value in array.tolist()]


def _filters(tenant_id: str, conversation_id: str = "") -> list[dict[str, Any]]:
    filters: list[dict[str, Any]] = [{"term": {"tenant_id": tenant_id}}]
    if conversation_id:
        filters.append({"term": {"conversation_id": conversation_id}})
    return filters


def search_bodies(
    *,
    tenant_id: str,
    terms: str,
    vector: list[float] | None,
    top_k: int,
    conversation_id: str = "",
) -> list[dict[str, Any]]:
    """The request bodies of one search: BM25 (if there are terms), then kNN (if a vector)."""
    candidates = _candidates(top_k)
    filters = _filters(tenant_id, conversation_id)
    bodies: list[dict[str, Any]] = []
    if terms:
        bodies.append(
            {
                "size": candidates,
                "query": {"bool": {"must": [{"match": {"text": terms}}], "filter": filters}},
                # No sort clause (not even _score + chunk_id as a tie-break): any sort turns off
                # Lucene's skipping of non-competitive documents (WAND), which made queries with
                # common words 4x slower at 10k chunks. Ties are ordered in _ranking instead.
                "_source": _SOURCE_FIELDS,
                "track_total_hits": False,
            }
        )
    if vector is not None:
        bodies.append(
            {
                "size": candidates,
                "knn": {
                    "field": "vector",
                    "query_vector": vector,
                    "k": candidates,
                    # Wider HNSW beam than k, as the PostgreSQL store raises ef_search.
                    "num_candidates": min(_MAX_WINDOW, max(100, 2 * candidates)),
                    "filter": {"bool": {"filter": filters}},
                },
                "_source": _SOURCE_FIELDS,
                "track_total_hits": False,
            }
        )
    return bodies


def _ranking(hits: Sequence[Mapping[str, Any]]) -> list[str]:
    # Sorted again here: equal scores come back in segment order, which changes when a chunk is
    # rewritten; ordering them by chunk id keeps results stable across replays.
    ordered = sorted(
        hits, key=lambda hit: (-(hit.get("_score") or 0.0), hit["_source"]["chunk_id"])
    )
    return [hit["_source"]["chunk_id"] for hit in ordered]


class ElasticsearchMemoryStore(AsyncStartStop):
    """``MemoryStore`` on Elasticsearch 8.x. Creates its index on ``start``.

    Args:
        url: the node or cluster URL, e.g. ``http://127.0.0.1:9200``.
        index_prefix: lower-case prefix of the index name (``<prefix>-chunks``), so tests and
            deployments sharing a cluster keep separate indices.
        dims: embedding dimension; an existing index with another dimension is an error.
        shards: primary shards of a new index. One keeps BM25 statistics exact for small data.
        replicas: replicas of a new index; 0 suits a single node (1 for a real cluster).
        request_timeout_s: per-request timeout.
        username, password: HTTP basic authentication (a cluster with security on).
        ca: PEM bundle the cluster's certificate must chain to (an ``https://`` URL); None
            trusts the system's store.
    """

    def __init__(
        self,
        url: str,
        *,
        index_prefix: str = "mesh-memory",
        dims: int = 256,
        shards: int = 1,
        replicas: int = 0,
        request_timeout_s: float = 30.0,
        username: str = "",
        password: str = "",
        ca: Path | None = None,
    ) -> None:
        if dims < 1:
            raise ValueError(f"dims must be positive, got {dims}")
        if not _INDEX_PREFIX.fullmatch(index_prefix):
            raise ValueError(
                f"index_prefix must be lower-case letters, digits, '.', '_' or '-' and start "
                f"with a letter or digit, got {index_prefix!r}"
            )
        self._url = url
        self._auth = (username, password) if username else None
        self._ca = ca
        self._dims = dims
        self._index = f"{index_prefix}-chunks"
        self._shards = shards
        self._replicas = replicas
        self._timeout_s = request_timeout_s
        self._client: AsyncElasticsearch | None = None
        self._delete_by_query = True

    @property
    def dims(self) -> int:
        return self._dims

    @property
    def index(self) -> str:
        return self._index

    async def start(self) -> None:
        if self._client is not None:
            return
        tls: dict[str, Any] = {} if self._ca is None else {"ca_certs": str(self._ca)}
        client = AsyncElasticsearch(
            self._url,
            request_timeout=self._timeout_s,
            max_retries=2,
            retry_on_timeout=True,
            basic_auth=self._auth,
            **tls,
        )
        try:
            async with _Unavailable():
                try:
                    await self._create_index(client)
                    self._delete_by_query = await _has_reindex_module(client)
                except TlsError as error:
                    # Retrying cannot help: the fix is the CA bundle (or the URL's scheme).
                    raise FailedPrecondition(
                        f"TLS with Elasticsearch at {self._url} failed: {error.message}. Its "
                        "certificate must chain to the CA bundle in MESH_ES_CA",
                        reason="MEMORY_STORE_TLS",
                    ) from error
                except AuthenticationException as error:
                    user = self._auth[0] if self._auth else None
                    refused = f"the password of user {user!r}" if user else "requests without"
                    raise FailedPrecondition(
                        f"Elasticsearch at {self._url} refused {refused}"
                        + ("" if user else " credentials")
                        + " (401): check MESH_ES_USER and MESH_ES_PASSWORD",
                        reason="MEMORY_STORE_CREDENTIALS",
                    ) from error
        except BaseException:
            await client.close()
            raise
        self._client = client
        log.info(
            "memory store ready: index %s on %s (delete_by_query: %s)",
            self._index,
            self._url,
            self._delete_by_query,
        )

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def _create_index(self, client: AsyncElasticsearch) -> None:
        if not (await client.indices.exists(index=self._index)).body:
            try:
                await client.indices.create(
                    index=self._index,
                    mappings=index_mapping(self._dims),
                    settings={
                        "number_of_shards": self._shards,
                        "number_of_replicas": self._replicas,
                    },
                    wait_for_active_shards="1",
                )
            except ApiError as error:
                # Two stores starting at once: the other one created it, which is fine.
                if error.error != "resource_already_exists_exception":
                    raise
        mapping = (await client.indices.get_mapping(index=self._index)).body
        properties = mapping[self._index]["mappings"].get("properties", {})
        found = properties.get("vector", {}).get("dims")
        if found != self._dims:
            raise RuntimeError(
                f"index {self._index!r} stores {found}-dimensional vectors but the store was "
                f"configured for {self._dims}; use another index prefix or re-ingest after "
                f"deleting the index"
            )

    def _es(self) -> AsyncElasticsearch:
        if self._client is None:
            raise RuntimeError(
                "ElasticsearchMemoryStore is not started; call start() or use async with"
            )
        return self._client

    async def ping(self) -> None:
        # Cluster health, not info(): the info endpoint is missing from our embedded node.
        async with _Unavailable():
            await self._es().cluster.health(index=self._index, timeout="1s")

    async def has_source(self, tenant_id: str, source_id: str) -> bool:
        require_tenant(tenant_id)
        query = {"bool": {"filter": [*_filters(tenant_id), {"term": {"source_id": source_id}}]}}
        async with _Unavailable():
            response = await self._es().search(
                index=self._index, query=query, size=0, terminate_after=1, track_total_hits=1
            )
        return int(response.body["hits"]["total"]["value"]) > 0

    def _documents(self, chunks: Sequence[StoredChunk]) -> dict[str, dict[str, Any]]:
        documents: dict[str, dict[str, Any]] = {}
        for chunk in chunks:
            require_tenant(chunk.tenant_id)
            # The last of equal ids wins, as it would with separate upserts.
            documents[chunk_doc_id(chunk.tenant_id, chunk.chunk_id)] = {
                "tenant_id": chunk.tenant_id,
                "chunk_id": chunk.chunk_id,
                "conversation_id": chunk.conversation_id,
                "document_id": chunk.document_id,
                "source_id": chunk.source_id,
                "text": chunk.text,
                "vector": _vector(chunk.vector, self._dims),
            }
        return documents

    async def upsert(self, chunks: Sequence[StoredChunk]) -> int:
        documents = self._documents(chunks)
        await self._write(documents)
        return len(documents)

    async def _write(self, documents: Mapping[str, Mapping[str, Any]]) -> None:
        items = list(documents.items())
        for start in range(0, len(items), _BULK_BATCH):
            operations: list[Mapping[str, Any]] = []
            for doc_id, source in items[start : start + _BULK_BATCH]:
                # update + doc_as_upsert rather than index: an identical replay is a no-op on the
                # server (detect_noop), so replays leave no deleted copies that would skew BM25
                # statistics until the next merge.
                operations.append(
                    {"update": {"_index": self._index, "_id": doc_id, "retry_on_conflict": 3}}
                )
                operations.append({"doc": source, "doc_as_upsert": True})
            # A refresh makes every earlier batch visible too; one per call is enough.
            last = start + _BULK_BATCH >= len(items)
            async with _Unavailable():
                response = await self._es().bulk(operations=operations, refresh=last)
            _raise_item_errors(response.body, "update")

    async def replace_document(
        self, tenant_id: str, document_id: str, chunks: Sequence[StoredChunk]
    ) -> int:
        check_document_chunks(tenant_id, document_id, chunks)
        documents = self._documents(chunks)
        # No transactions here: write the new chunks first, then drop the old ones that are not
        # among them, so a reader sees old and new side by side for a moment, never nothing.
        await self._write(documents)
        stale = {
            "bool": {
                "filter": [*_filters(tenant_id), {"term": {"document_id": document_id}}],
                "must_not": [{"terms": {"chunk_id": [d["chunk_id"] for d in documents.values()]}}],
            }
        }
        await self._delete_matching(stale)
        return len(documents)

    async def search(
        self,
        tenant_id: str,
        query_text: str,
        query_vector: Sequence[float],
        top_k: int,
        conversation_id: str = "",
    ) -> list[ChunkHit]:
        check_search(tenant_id, top_k)
        bodies = search_bodies(
            tenant_id=tenant_id,
            terms=query_terms(query_text),
            vector=_vector(query_vector, self._dims),
            top_k=top_k,
            conversation_id=conversation_id,
        )
        if not bodies:
            return []
        searches: list[Mapping[str, Any]] = []
        for body in bodies:
            searches.extend(({"index": self._index}, body))
        async with _Unavailable():
            response = await self._es().msearch(searches=searches)
        rankings: list[list[str]] = []
        sources: dict[str, Mapping[str, Any]] = {}
        for result in response.body["responses"]:
            if "error" in result:
                _raise_search_error(result)
            hits = result["hits"]["hits"]
            rankings.append(_ranking(hits))
            for hit in hits:
                sources.setdefault(hit["_source"]["chunk_id"], hit["_source"])
        return [
            ChunkHit(
                chunk_id=chunk_id,
                text=sources[chunk_id]["text"],
                score=score,
                conversation_id=sources[chunk_id].get("conversation_id", ""),
                document_id=sources[chunk_id].get("document_id", ""),
            )
            for chunk_id, score in reciprocal_rank_fusion(rankings)[:top_k]
        ]

    async def delete(self, tenant_id: str, conversation_id: str = "") -> int:
        require_tenant(tenant_id)
        return await self._delete_matching(
            {"bool": {"filter": _filters(tenant_id, conversation_id)}}
        )

    async def _delete_matching(self, query: Mapping[str, Any]) -> int:
        es = self._es()
        if self._delete_by_query:
            async with _Unavailable():
                response = await es.delete_by_query(
                    index=self._index, query=query, refresh=True, conflicts="proceed"
                )
            failures = response.body.get("failures") or []
            if failures:
                raise RuntimeError(f"delete_by_query on {self._index} failed: {failures[0]}")
            return int(response.body["deleted"])
        # Without the reindex module: page through the matching ids and bulk-delete them. Each
        # round deletes what it saw and refreshes, so the next search sees only what is left.
        deleted = 0
        while True:
            async with _Unavailable():
                page = await es.search(
                    index=self._index,
                    query=query,
                    size=_DELETE_BATCH,
                    source=False,
                    sort=["_doc"],
                    track_total_hits=False,
                )
            ids = [hit["_id"] for hit in page.body["hits"]["hits"]]
            if not ids:
                return deleted
            async with _Unavailable():
                response = await es.bulk(
                    operations=[{"delete": {"_index": self._index, "_id": i}} for i in ids],
                    refresh=True,
                )
            _raise_item_errors(response.body, "delete")
            removed = sum(
                1 for item in response.body["items"] if item["delete"].get("result") == "deleted"
            )
            deleted += removed
            if removed == 0:
                # Someone else deleted them first; stop rather than loop on what we cannot see.
                return deleted


async def _has_reindex_module(client: AsyncElasticsearch) -> bool:
    """Whether every node has the reindex module (``_delete_by_query``)."""
    try:
        response = await client.nodes.info(metric="plugins", filter_path="nodes.*.modules.name")
    except ApiError:
        # Not allowed to list nodes (a restricted cloud user): real clusters have the module.
        return True
    nodes = response.body.get("nodes", {})
    return bool(nodes) and all(
        any(module.get("name") == "reindex" for module in node.get("modules", []))
        for node in nodes.values()
    )


def _raise_item_errors(body: Mapping[str, Any], action: str) -> None:
    if not body.get("errors"):
        return
    for item in body["items"]:
        result = item[action]
        error = result.get("error")
        if error is None:
            continue
        if result.get("status") in _RETRYABLE_STATUS:
            raise Unavailable(
                f"Elasticsearch is overloaded ({error.get('type')}); retry shortly",
                reason="MEMORY_STORE_UNAVAILABLE",
                retry_after_s=1.0,
            )
        raise RuntimeError(
            f"Elasticsearch rejected {action} of {result.get('_id')}: "
            f"{error.get('type')}: {error.get('reason')}"
        )


def _raise_search_error(result: Mapping[str, Any]) -> None:
    error = result["error"]
    status = result.get("status")
    if status in _RETRYABLE_STATUS:
        raise Unavailable(
            f"Elasticsearch could not search now ({error.get('type')}); retry shortly",
            reason="MEMORY_STORE_UNAVAILABLE",
            retry_after_s=1.0,
        )
    raise RuntimeError(f"Elasticsearch search failed ({status}): {error}")


class _Unavailable:
    """Reports an unreachable or overloaded cluster as UNAVAILABLE (retryable)."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, ConnectionError | ConnectionTimeout):
            raise Unavailable(
                "Elasticsearch is unreachable; retry shortly",
                reason="MEMORY_STORE_UNAVAILABLE",
                retry_after_s=1.0,
            ) from exc
        if isinstance(exc, ApiError) and not isinstance(exc, NotFoundError):
            if exc.meta.status in _RETRYABLE_STATUS:
                raise Unavailable(
                    f"Elasticsearch is unavailable ({exc.meta.status}); retry shortly",
                    reason="MEMORY_STORE_UNAVAILABLE",
                    retry_after_s=1.0,
                ) from exc


__all__ = [
    "RRF_K",
    "ElasticsearchMemoryStore",
    "chunk_doc_id",
    "index_mapping",
    "query_terms",
    "reciprocal_rank_fusion",
    "search_bodies",
]

"""The memory store interface. Backends: PostgreSQL (pgvector + full-text), Elasticsearch.

Every backend passes the same conformance suite (tests/conformance/test_memory.py). Chunking and
embedding happen before the store (``mesh.memory.chunking``, ``mesh.memory.embedding``), so
backends rank the same chunks with the same vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mesh.lifecycle import AsyncResource


@dataclass(frozen=True, slots=True)
class StoredChunk:
    """A chunk ready to store. ``chunk_id`` is deterministic so replays overwrite, not add."""

    chunk_id: str
    tenant_id: str
    text: str
    vector: Sequence[float]
    conversation_id: str = ""
    document_id: str = ""
    source_id: str = ""  # request id (remembered messages) or document id (ingested documents)


@dataclass(frozen=True, slots=True)
class ChunkHit:
    """A recalled chunk; ``score`` is the fused rank score, higher is better."""

    chunk_id: str
    text: str
    score: float
    conversation_id: str
    document_id: str


# Reciprocal rank fusion constant from Cormack et al. (2009), for both stores: it damps the head
# of each list so one ranker's first place does not drown the other's.
RRF_K = 60
# Candidates each ranker contributes to the fusion, relative to top_k, with a floor, so that
# both backends fuse comparable lists.
_CANDIDATES_PER_RESULT = 4
_MIN_CANDIDATES = 40


def fusion_candidates(top_k: int, *, cap: int | None = None) -> int:
    """How many results each ranker contributes to the fusion for ``top_k`` (at most ``cap``)."""
    candidates = max(_MIN_CANDIDATES, top_k * _CANDIDATES_PER_RESULT)
    return candidates if cap is None else min(cap, candidates)


def require_tenant(tenant_id: str) -> None:
    """Every store call is tenant-scoped; an empty tenant is a caller bug, never "all tenants"."""
    if not tenant_id:
        raise ValueError("tenant_id is required: memory is never read or written across tenants")


def check_search(tenant_id: str, top_k: int) -> None:
    """The arguments of ``search``: a tenant and at least one hit wanted."""
    require_tenant(tenant_id)
    if top_k < 1:
        raise ValueError(f"top_k must be positive, got {top_k}")


def check_document_chunks(tenant_id: str, document_id: str, chunks: Sequence[StoredChunk]) -> None:
    """The arguments of ``replace_document``: every chunk belongs to that tenant and document."""
    require_tenant(tenant_id)
    if not document_id:
        raise ValueError("document_id is required")
    for chunk in chunks:
        if chunk.tenant_id != tenant_id or chunk.document_id != document_id:
            raise ValueError(
                f"chunk {chunk.chunk_id} belongs to tenant {chunk.tenant_id!r} / document "
                f"{chunk.document_id!r}, not {tenant_id!r} / {document_id!r}"
            )


class MemoryStore(AsyncResource, Protocol):
    """Tenant-scoped chunk storage with hybrid (vector + full-text) search."""

    async def ping(self) -> None:
        """One cheap round trip to the backend (the readiness probe); raises when it cannot."""
        ...

    async def has_source(self, tenant_id: str, source_id: str) -> bool:
        """Whether chunks with this source id were stored (idempotent Remember)."""
        ...

    async def upsert(self, chunks: Sequence[StoredChunk]) -> int:
        """Store chunks (replacing equal ids) in one bulk call; returns how many were written."""
        ...

    async def replace_document(
        self, tenant_id: str, document_id: str, chunks: Sequence[StoredChunk]
    ) -> int:
        """Replace every chunk of a document with ``chunks``."""
        ...

    async def search(
        self,
        tenant_id: str,
        query_text: str,
        query_vector: Sequence[float],
        top_k: int,
        conversation_id: str = "",
    ) -> list[ChunkHit]:
        """Top ``top_k`` chunks of the tenant by reciprocal rank fusion of kNN and BM25/FTS."""
        ...

    async def delete(self, tenant_id: str, conversation_id: str = "") -> int:
        """Delete a conversation's chunks, or all of the tenant's when it is empty."""
        ...

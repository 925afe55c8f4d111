"""What the memory service does, without gRPC: validate, chunk, embed, store, search.

Errors are ``mesh.errors`` exceptions with stable reasons; the servicer never catches them, the
shared error interceptor turns them into statuses.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from mesh.errors import InvalidArgument
from mesh.memory.base import ChunkHit, MemoryStore, StoredChunk
from mesh.memory.chunking import ChunkingConfig, chunk_id, chunk_text
from mesh.memory.embedding import Embedder
from services.memory.settings import Limits

DEFAULT_TOP_K = 5
MAX_TOP_K = 100

# Source ids of messages and documents live in one column; prefixes keep a request id from ever
# colliding with a document id of the same tenant.
_MESSAGE_SOURCE = "msg:"
_DOCUMENT_SOURCE = "doc:"

RECALL_SECONDS = Histogram(
    "mesh_memory_recall_seconds",
    "Time to embed a query and search the store.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
CHUNKS_WRITTEN = Counter(
    "mesh_memory_chunks_written_total",
    "Chunks written to the store, by operation.",
    ["operation"],
)
CHUNKS_DELETED = Counter("mesh_memory_chunks_deleted_total", "Chunks deleted by Forget.")


@dataclass(frozen=True, slots=True)
class DocumentHeader:
    """First frame of an ingest: which document the following text belongs to."""

    tenant_id: str
    document_id: str
    title: str = ""


@dataclass(frozen=True, slots=True)
class TextPart:
    """A following frame of an ingest: the next piece of the document's text."""

    text: str


@dataclass(frozen=True, slots=True)
class EmptyFrame:
    """A frame with neither a header nor text (a client bug, reported as such)."""


IngestFrame = DocumentHeader | TextPart | EmptyFrame


@dataclass(frozen=True, slots=True)
class IngestResult:
    document_id: str
    chunks_stored: int


class MemoryCore:
    """Remember, Recall, Ingest and Forget over one store and one embedder.

    Args:
        store: a started ``MemoryStore``.
        embedder: turns chunks and queries into vectors; its ``dims`` must match the store's.
        chunking: chunk size and overlap.
        limits: input bounds.
    """

    def __init__(
        self,
        *,
        store: MemoryStore,
        embedder: Embedder,
        chunking: ChunkingConfig | None = None,
        limits: Limits | None = None,
    ) -> None:
        self._store = store
        self._embedder = embedder
        self._chunking = chunking or ChunkingConfig()
        self._limits = limits or Limits()

    # -- validation -------------------------------------------------------------------------

    def _id(self, value: str, field: str, *, required: bool, reason: str = "") -> str:
        if not value.strip():
            if required:
                raise InvalidArgument(
                    f"{field} is required",
                    reason=reason or f"{field.upper()}_REQUIRED",
                    field=field,
                )
            return ""
        if len(value) > self._limits.max_id_chars:
            raise InvalidArgument(
                f"{field} is {len(value)} characters long; the limit is "
                f"{self._limits.max_id_chars}",
                reason="ID_TOO_LONG",
                field=field,
            )
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
            raise InvalidArgument(
                f"{field} contains control characters", reason="INVALID_ID", field=field
            )
        return value

    def _tenant(self, tenant_id: str) -> str:
        return self._id(tenant_id, "tenant_id", required=True, reason="TENANT_REQUIRED")

    def _top_k(self, top_k: int) -> int:
        if top_k == 0:
            return DEFAULT_TOP_K
        if not 1 <= top_k <= MAX_TOP_K:
            raise InvalidArgument(
                f"top_k must be between 1 and {MAX_TOP_K} (0 means {DEFAULT_TOP_K}), got {top_k}",
                reason="TOP_K_OUT_OF_RANGE",
                field="top_k",
            )
        return top_k

    # -- helpers ----------------------------------------------------------------------------

    async def _chunks(
        self,
        text: str,
        *,
        tenant_id: str,
        source_id: str,
        conversation_id: str = "",
        document_id: str = "",
    ) -> list[StoredChunk]:
        def build() -> list[StoredChunk]:
            pieces = chunk_text(text, self._chunking)
            vectors = self._embedder.embed(pieces)
            return [
                StoredChunk(
                    chunk_id=chunk_id(tenant_id, source_id, index),
                    tenant_id=tenant_id,
                    text=piece,
                    vector=vector,
                    conversation_id=conversation_id,
                    document_id=document_id,
                    source_id=source_id,
                )
                for index, (piece, vector) in enumerate(zip(pieces, vectors, strict=True))
            ]

        # Chunking and embedding a document is CPU work; other RPCs keep flowing meanwhile.
        return await asyncio.to_thread(build)

    # -- operations -------------------------------------------------------------------------

    async def remember(
        self, *, tenant_id: str, conversation_id: str, text: str, request_id: str
    ) -> int:
        """Store a message; returns chunks written, 0 when ``request_id`` was already stored.

        Without a request id, the message's content (conversation and text) is its identity,
        so a retried call still stores it once.
        """
        tenant_id = self._tenant(tenant_id)
        conversation_id = self._id(
            conversation_id, "conversation_id", required=True, reason="CONVERSATION_REQUIRED"
        )
        request_id = self._id(request_id, "request_id", required=False)
        if not text.strip():
            raise InvalidArgument(
                "text is empty; there is nothing to remember", reason="TEXT_REQUIRED", field="text"
            )
        if len(text) > self._limits.max_text_chars:
            raise InvalidArgument(
                f"text is {len(text)} characters long; Remember takes at most "
                f"{self._limits.max_text_chars} (use Ingest for documents)",
                reason="TEXT_TOO_LARGE",
                field="text",
            )
        if not request_id:
            request_id = (
                "sha256:"
                + hashlib.sha256(
                    f"{len(conversation_id)}:{conversation_id}|{text}".encode()
                ).hexdigest()
            )
        source_id = _MESSAGE_SOURCE + request_id
        if await self._store.has_source(tenant_id, source_id):
            return 0
        chunks = await self._chunks(
            text, tenant_id=tenant_id, source_id=source_id, conversation_id=conversation_id
        )
        written = await self._store.upsert(chunks)
        CHUNKS_WRITTEN.labels("remember").inc(written)
        return written

    async def recall(
        self, *, tenant_id: str, query: str, top_k: int, conversation_id: str = ""
    ) -> list[ChunkHit]:
        """The tenant's best chunks for ``query``, best first."""
        tenant_id = self._tenant(tenant_id)
        conversation_id = self._id(conversation_id, "conversation_id", required=False)
        k = self._top_k(top_k)
        if not query.strip():
            raise InvalidArgument("query is empty", reason="QUERY_REQUIRED", field="query")
        if len(query) > self._limits.max_query_chars:
            raise InvalidArgument(
                f"query is {len(query)} characters long; the limit is "
                f"{self._limits.max_query_chars}",
                reason="QUERY_TOO_LARGE",
                field="query",
            )
        started = time.perf_counter()
        # One short text embeds in microseconds; a thread hop would cost more than it saves.
        [vector] = self._embedder.embed([query])
        hits = await self._store.search(tenant_id, query, vector, k, conversation_id)
        RECALL_SECONDS.observe(time.perf_counter() - started)
        return hits

    async def ingest(self, frames: AsyncIterator[IngestFrame]) -> IngestResult:
        """Store a document streamed as a header frame then text frames; replaces its old version.

        The document is read fully before anything is written, so a stream that breaks off
        leaves the previous version untouched.
        """
        header: DocumentHeader | None = None
        parts: list[str] = []
        size = 0
        async for frame in frames:
            if isinstance(frame, EmptyFrame):
                raise InvalidArgument(
                    "an ingest frame has neither header nor text; every frame must set one",
                    reason="INGEST_FRAME_EMPTY",
                )
            if isinstance(frame, DocumentHeader):
                if header is not None:
                    raise InvalidArgument(
                        "the header was sent twice; send exactly one header, as the first frame",
                        reason="INGEST_HEADER_REPEATED",
                        field="header",
                    )
                header = DocumentHeader(
                    tenant_id=self._tenant(frame.tenant_id),
                    document_id=self._id(frame.document_id, "document_id", required=True),
                    title=frame.title,
                )
                size = len(header.title)
                continue
            if header is None:
                raise InvalidArgument(
                    "text arrived before the header; the first frame must be the header",
                    reason="INGEST_HEADER_REQUIRED",
                    field="header",
                )
            size += len(frame.text)
            if size > self._limits.max_document_chars:
                raise InvalidArgument(
                    f"the document exceeds {self._limits.max_document_chars} characters",
                    reason="DOCUMENT_TOO_LARGE",
                    field="text",
                )
            parts.append(frame.text)
        if header is None:
            raise InvalidArgument(
                "the stream ended without a header; the first frame must be the header",
                reason="INGEST_HEADER_REQUIRED",
                field="header",
            )
        body = "".join(parts)
        if not body.strip():
            raise InvalidArgument(
                f"document {header.document_id!r} has no text",
                reason="DOCUMENT_EMPTY",
                field="text",
            )
        # The title is part of what a document is about; recall by title should find it.
        text = f"{header.title.strip()}\n\n{body}" if header.title.strip() else body
        chunks = await self._chunks(
            text,
            tenant_id=header.tenant_id,
            source_id=_DOCUMENT_SOURCE + header.document_id,
            document_id=header.document_id,
        )
        written = await self._store.replace_document(header.tenant_id, header.document_id, chunks)
        CHUNKS_WRITTEN.labels("ingest").inc(written)
        return IngestResult(document_id=header.document_id, chunks_stored=written)

    async def forget(self, *, tenant_id: str, conversation_id: str = "") -> int:
        """Delete a conversation's memory, or all of the tenant's when it is empty."""
        tenant_id = self._tenant(tenant_id)
        conversation_id = self._id(conversation_id, "conversation_id", required=False)
        deleted = await self._store.delete(tenant_id, conversation_id)
        CHUNKS_DELETED.inc(deleted)
        return deleted


__all__ = [
    "DEFAULT_TOP_K",
    "MAX_TOP_K",
    "DocumentHeader",
    "EmptyFrame",
    "IngestFrame",
    "IngestResult",
    "MemoryCore",
    "TextPart",
]

"""MemoryCore over an in-memory store: validation, idempotency, ingest framing, forget."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Self

import pytest

from mesh.errors import InvalidArgument
from mesh.memory.base import ChunkHit, StoredChunk
from mesh.memory.chunking import ChunkingConfig
from mesh.memory.embedding import HashingEmbedder
from services.memory.core import (
    DEFAULT_TOP_K,
    DocumentHeader,
    EmptyFrame,
    IngestFrame,
    MemoryCore,
    TextPart,
)
from services.memory.settings import Limits


class FakeStore:
    """A MemoryStore in a dict: word overlap as the score, enough to test the core."""

    def __init__(self) -> None:
        self.chunks: dict[tuple[str, str], StoredChunk] = {}
        self.searches: list[tuple[str, str, int, str]] = []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def has_source(self, tenant_id: str, source_id: str) -> bool:
        return any(
            c.tenant_id == tenant_id and c.source_id == source_id for c in self.chunks.values()
        )

    async def upsert(self, chunks: Sequence[StoredChunk]) -> int:
        for chunk in chunks:
            self.chunks[(chunk.tenant_id, chunk.chunk_id)] = chunk
        return len(chunks)

    async def replace_document(
        self, tenant_id: str, document_id: str, chunks: Sequence[StoredChunk]
    ) -> int:
        for key, chunk in list(self.chunks.items()):
            if chunk.tenant_id == tenant_id and chunk.document_id == document_id:
                del self.chunks[key]
        return await self.upsert(chunks)

    async def search(
        self,
        tenant_id: str,
        query_text: str,
        query_vector: Sequence[float],
        top_k: int,
        conversation_id: str = "",
    ) -> list[ChunkHit]:
        self.searches.append((tenant_id, query_text, top_k, conversation_id))
        words = set(query_text.lower().split())
        hits = [
            ChunkHit(
                c.chunk_id,
                c.text,
                float(len(words & set(c.text.lower().split()))),
                c.conversation_id,
                c.document_id,
            )
            for c in self.chunks.values()
            if c.tenant_id == tenant_id
            and (not conversation_id or c.conversation_id == conversation_id)
        ]
        hits.sort(key=lambda h: -h.score)
        return hits[:top_k]

    async def delete(self, tenant_id: str, conversation_id: str = "") -> int:
        doomed = [
            key
            for key, c in self.chunks.items()
            if c.tenant_id == tenant_id
            and (not conversation_id or c.conversation_id == conversation_id)
        ]
        for key in doomed:
            del self.chunks[key]
        return len(doomed)


def make_core(store: FakeStore, **limits: int) -> MemoryCore:
    return MemoryCore(
        store=store,
        embedder=HashingEmbedder(32),
        chunking=ChunkingConfig(max_words=8, overlap_words=2),
        limits=Limits(**limits),
    )


async def frames(items: Iterable[IngestFrame]) -> AsyncIterator[IngestFrame]:
    for item in items:
        yield item


async def expect_invalid(reason: str, awaitable: object) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        await awaitable  # type: ignore[misc]
    assert caught.value.reason == reason, caught.value.message
    assert caught.value.message
    return caught.value


async def test_remember_chunks_embeds_and_stores() -> None:
    store = FakeStore()
    core = make_core(store)
    text = "One two three four five. Six seven eight nine ten. Eleven twelve."
    stored = await core.remember(tenant_id="t", conversation_id="c", text=text, request_id="r1")
    assert stored == len(store.chunks) >= 2
    for chunk in store.chunks.values():
        assert (chunk.tenant_id, chunk.conversation_id, chunk.document_id) == ("t", "c", "")
        assert chunk.source_id == "msg:r1"
        assert len(chunk.vector) == 32


async def test_remember_is_idempotent_by_request_id() -> None:
    store = FakeStore()
    core = make_core(store)
    args = {"tenant_id": "t", "conversation_id": "c", "text": "remember me", "request_id": "r1"}
    assert await core.remember(**args) == 1
    assert await core.remember(**args) == 0
    # Same request id under another tenant is another message.
    assert await core.remember(**{**args, "tenant_id": "u"}) == 1
    assert len(store.chunks) == 2


async def test_remember_without_request_id_dedups_by_content() -> None:
    store = FakeStore()
    core = make_core(store)
    args = {"tenant_id": "t", "conversation_id": "c", "text": "same text", "request_id": ""}
    assert await core.remember(**args) == 1
    assert await core.remember(**args) == 0
    assert await core.remember(**{**args, "conversation_id": "d"}) == 1


async def test_remember_validation() -> None:
    core = make_core(FakeStore(), max_text_chars=20, max_id_chars=10)
    ok = {"tenant_id": "t", "conversation_id": "c", "text": "hello", "request_id": "r"}
    error = await expect_invalid("TENANT_REQUIRED", core.remember(**{**ok, "tenant_id": ""}))
    assert error.field == "tenant_id"
    await expect_invalid("TENANT_REQUIRED", core.remember(**{**ok, "tenant_id": "  "}))
    await expect_invalid("CONVERSATION_REQUIRED", core.remember(**{**ok, "conversation_id": ""}))
    await expect_invalid("TEXT_REQUIRED", core.remember(**{**ok, "text": " \n "}))
    await expect_invalid("TEXT_TOO_LARGE", core.remember(**{**ok, "text": "x" * 21}))
    await expect_invalid("ID_TOO_LONG", core.remember(**{**ok, "request_id": "r" * 11}))
    await expect_invalid("INVALID_ID", core.remember(**{**ok, "tenant_id": "a\x00b"}))


async def test_recall_scopes_to_tenant_and_conversation_and_defaults_top_k() -> None:
    store = FakeStore()
    core = make_core(store)
    await core.remember(tenant_id="t", conversation_id="c1", text="alpha beta", request_id="1")
    await core.remember(tenant_id="t", conversation_id="c2", text="alpha gamma", request_id="2")
    await core.remember(tenant_id="u", conversation_id="c1", text="alpha delta", request_id="3")
    hits = await core.recall(tenant_id="t", query="alpha", top_k=0)
    assert {h.text for h in hits} == {"alpha beta", "alpha gamma"}
    assert store.searches[-1] == ("t", "alpha", DEFAULT_TOP_K, "")
    hits = await core.recall(tenant_id="t", query="alpha", top_k=1, conversation_id="c2")
    assert [h.text for h in hits] == ["alpha gamma"]


@pytest.mark.parametrize("top_k", [-1, 101, 1000])
async def test_recall_rejects_top_k_out_of_range(top_k: int) -> None:
    error = await expect_invalid(
        "TOP_K_OUT_OF_RANGE", make_core(FakeStore()).recall(tenant_id="t", query="q", top_k=top_k)
    )
    assert error.field == "top_k"
    assert "between 1 and 100" in error.message


@pytest.mark.parametrize("top_k", [1, 100])
async def test_recall_accepts_top_k_bounds(top_k: int) -> None:
    assert await make_core(FakeStore()).recall(tenant_id="t", query="q", top_k=top_k) == []


async def test_recall_validation() -> None:
    core = make_core(FakeStore(), max_query_chars=10)
    await expect_invalid("TENANT_REQUIRED", core.recall(tenant_id="", query="q", top_k=1))
    await expect_invalid("QUERY_REQUIRED", core.recall(tenant_id="t", query="  ", top_k=1))
    await expect_invalid("QUERY_TOO_LARGE", core.recall(tenant_id="t", query="q" * 11, top_k=1))


async def test_ingest_stores_document_with_title_and_replaces_it() -> None:
    store = FakeStore()
    core = make_core(store)
    result = await core.ingest(
        frames(
            [
                DocumentHeader("t", "doc-1", "Handbook"),
                TextPart("Vacation policy: twenty days. "),
                TextPart("Remote work is allowed on Fridays."),
            ]
        )
    )
    assert result.document_id == "doc-1"
    assert result.chunks_stored == len(store.chunks) >= 2
    texts = " ".join(c.text for c in store.chunks.values())
    assert "Handbook" in texts and "Fridays." in texts
    assert {c.document_id for c in store.chunks.values()} == {"doc-1"}
    assert {c.source_id for c in store.chunks.values()} == {"doc:doc-1"}

    again = await core.ingest(frames([DocumentHeader("t", "doc-1"), TextPart("Short now.")]))
    assert again.chunks_stored == 1
    assert [c.text for c in store.chunks.values()] == ["Short now."]


async def test_ingest_frame_order_errors() -> None:
    core = make_core(FakeStore())
    header = DocumentHeader("t", "d")
    error = await expect_invalid(
        "INGEST_HEADER_REQUIRED", core.ingest(frames([TextPart("x"), header]))
    )
    assert "first frame must be the header" in error.message
    error = await expect_invalid(
        "INGEST_HEADER_REPEATED", core.ingest(frames([header, TextPart("x"), header]))
    )
    assert "twice" in error.message
    await expect_invalid("INGEST_HEADER_REQUIRED", core.ingest(frames([])))
    await expect_invalid("INGEST_FRAME_EMPTY", core.ingest(frames([header, EmptyFrame()])))


async def test_ingest_content_errors() -> None:
    core = make_core(FakeStore(), max_document_chars=10)
    await expect_invalid("TENANT_REQUIRED", core.ingest(frames([DocumentHeader("", "d")])))
    await expect_invalid(
        "DOCUMENT_ID_REQUIRED", core.ingest(frames([DocumentHeader("t", ""), TextPart("x")]))
    )
    await expect_invalid("DOCUMENT_EMPTY", core.ingest(frames([DocumentHeader("t", "d")])))
    await expect_invalid(
        "DOCUMENT_EMPTY", core.ingest(frames([DocumentHeader("t", "d"), TextPart("  ")]))
    )
    await expect_invalid(
        "DOCUMENT_TOO_LARGE",
        core.ingest(frames([DocumentHeader("t", "d"), TextPart("x" * 6), TextPart("y" * 6)])),
    )


async def test_ingest_stops_reading_at_the_first_bad_frame() -> None:
    consumed: list[IngestFrame] = []

    async def tracked() -> AsyncIterator[IngestFrame]:
        for item in [TextPart("early"), DocumentHeader("t", "d"), TextPart("late")]:
            consumed.append(item)
            yield item

    await expect_invalid("INGEST_HEADER_REQUIRED", make_core(FakeStore()).ingest(tracked()))
    assert len(consumed) == 1


async def test_forget_conversation_then_tenant() -> None:
    store = FakeStore()
    core = make_core(store)
    for conversation in ("c1", "c2"):
        await core.remember(
            tenant_id="t", conversation_id=conversation, text="x", request_id=conversation
        )
    await core.remember(tenant_id="u", conversation_id="c1", text="x", request_id="c1")
    assert await core.forget(tenant_id="t", conversation_id="c1") == 1
    assert await core.forget(tenant_id="t") == 1
    assert await core.forget(tenant_id="t") == 0
    assert len(store.chunks) == 1
    await expect_invalid("TENANT_REQUIRED", core.forget(tenant_id=""))

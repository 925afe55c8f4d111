"""One behavioural suite for every memory store: PostgreSQL (pgvector + FTS) and Elasticsearch.

Each test gets a fresh, started store. Chunks are made the way the service makes them (the real
chunker and the hashing embedder), so backends are compared on the same vectors.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from mesh.memory.base import ChunkHit, MemoryStore, StoredChunk
from mesh.memory.chunking import chunk_id
from mesh.memory.embedding import HashingEmbedder
from mesh.memory.factory import EmbeddedPostgresMemoryStore
from mesh.memory.postgres import PostgresMemoryStore

DIMS = 256
EMBEDDER = HashingEmbedder(DIMS)

# Plausible chat memory that shares vocabulary with the facts but not their key terms.
DISTRACTORS = [
    "The lab meeting moved to Thursday afternoon because the projector is broken.",
    "Remember to water the plants in the office kitchen before the weekend.",
    "The quarterly report is due at the end of the month, ask finance for numbers.",
    "Our team lunch will be at the Italian place near the train station.",
    "The printer on the third floor keeps jamming when printing double sided.",
    "Security asked everyone to wear badges visible at all times in the building.",
    "The new intern starts Monday and needs a laptop and an account.",
    "Parking in the north lot is closed for repaving until next Friday.",
    "The code review for the billing service is waiting on two approvals.",
    "Door hinges in the east wing squeak; facilities has a ticket for it.",
    "The coffee machine descaling schedule is posted on the fridge.",
    "Bring a jacket, the server room is kept very cold.",
    "Our database backup runs every night at two in the morning.",
    "The lab supplies order includes gloves, pipettes and sample tubes.",
    "Fire drill next Wednesday; meet at the assembly point by the fountain.",
    "The wifi password for guests changes every month at reception.",
    "Alice is on vacation until the twelfth, Bob covers her tickets.",
    "The staging cluster will be rebuilt on Saturday morning.",
    "Please label food in the shared fridge with your name and date.",
    "The elevator inspection certificate expires in March.",
]
FACT = "The door code for the cryogenics lab is 4417-XK, valid until June."


def chunk(
    tenant: str,
    text: str,
    *,
    source: str,
    index: int = 0,
    conversation: str = "",
    document: str = "",
) -> StoredChunk:
    return StoredChunk(
        chunk_id=chunk_id(tenant, source, index),
        tenant_id=tenant,
        text=text,
        vector=EMBEDDER.embed_one(text),
        conversation_id=conversation,
        document_id=document,
        source_id=source,
    )


def messages(
    tenant: str, texts: Sequence[str], conversation: str, prefix: str
) -> list[StoredChunk]:
    return [
        chunk(tenant, text, source=f"{prefix}-{i}", conversation=conversation)
        for i, text in enumerate(texts)
    ]


async def search(
    store: MemoryStore, tenant: str, query: str, top_k: int = 5, conversation: str = ""
) -> list[ChunkHit]:
    return await store.search(tenant, query, EMBEDDER.embed_one(query), top_k, conversation)


@pytest.fixture(
    params=[
        pytest.param("postgres", marks=pytest.mark.integration),
        pytest.param("elasticsearch", marks=[pytest.mark.integration, pytest.mark.infra]),
    ]
)
async def memory_store(request: pytest.FixtureRequest) -> AsyncIterator[MemoryStore]:
    store: MemoryStore
    if request.param == "postgres":
        store = PostgresMemoryStore(request.getfixturevalue("pg_dsn"), dims=DIMS)
    else:
        from mesh.memory.elasticsearch import ElasticsearchMemoryStore

        store = ElasticsearchMemoryStore(
            request.getfixturevalue("elasticsearch_url"),
            index_prefix=f"conformance-{uuid.uuid4().hex[:12]}",
            dims=DIMS,
            # HTTPS and the elastic user's password, as in the scale profile.
            **request.getfixturevalue("elasticsearch_client"),
        )
    async with store:
        yield store


async def test_recall_finds_an_exact_term_fact_among_distractors(memory_store: MemoryStore) -> None:
    stored = messages("acme", DISTRACTORS, "c1", "d") + [
        chunk("acme", FACT, source="fact", conversation="c1")
    ]
    assert await memory_store.upsert(stored) == len(stored)
    for query in ("what is the door code of the cryogenics lab?", "4417-XK", "cryogenics"):
        hits = await search(memory_store, "acme", query, top_k=3)
        assert hits, query
        assert hits[0].text == FACT, (query, [h.text for h in hits])
        assert hits[0].chunk_id == chunk_id("acme", "fact", 0)
        assert hits[0].conversation_id == "c1"
        assert hits[0].document_id == ""


async def test_tenants_never_see_each_others_chunks(memory_store: MemoryStore) -> None:
    await memory_store.upsert(messages("acme", [FACT, *DISTRACTORS[:5]], "c1", "a"))
    await memory_store.upsert(messages("globex", DISTRACTORS[5:10], "c1", "g"))
    acme_ids = {chunk_id("acme", f"a-{i}", 0) for i in range(6)}

    for query in ("door code cryogenics lab 4417-XK", "lab", "the"):
        hits = await search(memory_store, "globex", query, top_k=100)
        assert {h.chunk_id for h in hits}.isdisjoint(acme_ids), query
        assert FACT not in {h.text for h in hits}
        assert len(hits) <= 5
    assert await search(memory_store, "initech", "door code", top_k=100) == []
    assert await memory_store.has_source("acme", "a-0")
    assert not await memory_store.has_source("globex", "a-0")
    # Deleting another tenant's memory does not touch this one's.
    assert await memory_store.delete("globex") == 5
    assert len(await search(memory_store, "acme", "lab", top_k=100)) == 6


async def test_same_chunk_id_in_two_tenants_are_two_chunks(memory_store: MemoryStore) -> None:
    shared_id = "0" * 32
    a = StoredChunk(shared_id, "acme", FACT, EMBEDDER.embed_one(FACT), "c", "", "s")
    b = StoredChunk(shared_id, "globex", DISTRACTORS[0], EMBEDDER.embed_one(DISTRACTORS[0]), "c")
    await memory_store.upsert([a])
    await memory_store.upsert([b])
    [hit_a] = await search(memory_store, "acme", "door code", top_k=10)
    [hit_b] = await search(memory_store, "globex", "door code", top_k=10)
    assert (hit_a.text, hit_b.text) == (FACT, DISTRACTORS[0])


async def test_conversation_filter(memory_store: MemoryStore) -> None:
    await memory_store.upsert(messages("acme", DISTRACTORS[:6], "c1", "one"))
    await memory_store.upsert(messages("acme", DISTRACTORS[6:12], "c2", "two"))
    await memory_store.upsert([chunk("acme", FACT, source="doc", document="handbook")])

    only_c2 = await search(memory_store, "acme", "lab code door", top_k=100, conversation="c2")
    assert len(only_c2) == 6
    assert {h.conversation_id for h in only_c2} == {"c2"}
    everything = await search(memory_store, "acme", "lab code door", top_k=100)
    assert len(everything) == 13
    assert {h.conversation_id for h in everything} == {"c1", "c2", ""}
    assert {h.document_id for h in everything} == {"", "handbook"}
    assert await search(memory_store, "acme", "lab", top_k=5, conversation="c3") == []


async def test_replayed_upsert_changes_nothing(memory_store: MemoryStore) -> None:
    stored = messages("acme", [FACT, *DISTRACTORS], "c1", "m")
    await memory_store.upsert(stored)
    before = await search(memory_store, "acme", "door code lab", top_k=10)
    await memory_store.upsert(stored)
    await memory_store.upsert(list(reversed(stored)))
    after = await search(memory_store, "acme", "door code lab", top_k=10)
    assert [(h.chunk_id, h.text) for h in after] == [(h.chunk_id, h.text) for h in before]
    assert [h.score for h in after] == pytest.approx([h.score for h in before])
    assert len(await search(memory_store, "acme", "lab", top_k=100)) == len(stored)
    assert await memory_store.delete("acme") == len(stored)


async def test_upsert_overwrites_a_chunk_with_the_same_id(memory_store: MemoryStore) -> None:
    await memory_store.upsert([chunk("acme", "first version of the note", source="s")])
    await memory_store.upsert([chunk("acme", "second version of the note", source="s")])
    hits = await search(memory_store, "acme", "version note", top_k=10)
    assert [h.text for h in hits] == ["second version of the note"]
    assert await memory_store.upsert([]) == 0


async def test_ping_answers_while_the_backend_does(memory_store: MemoryStore) -> None:
    await memory_store.ping()  # the readiness probe of the memory service


async def test_has_source(memory_store: MemoryStore) -> None:
    assert not await memory_store.has_source("acme", "turn-1")
    await memory_store.upsert([chunk("acme", FACT, source="turn-1", conversation="c")])
    assert await memory_store.has_source("acme", "turn-1")
    assert not await memory_store.has_source("acme", "turn-2")


async def test_replace_document(memory_store: MemoryStore) -> None:
    old = [
        chunk("acme", text, source="doc:manual", index=i, document="manual")
        for i, text in enumerate(
            ["Old manual says the cafeteria opens at seven.", *DISTRACTORS[:3]]
        )
    ]
    other = chunk(
        "acme", "Another document about the cafeteria menu.", source="doc:x", document="x"
    )
    await memory_store.upsert([*old, other])
    assert any(
        h.text.startswith("Old manual") for h in await search(memory_store, "acme", "cafeteria")
    )

    new = [
        chunk(
            "acme",
            "New manual: the cafeteria opens at eight.",
            source="doc:manual",
            document="manual",
        )
    ]
    assert await memory_store.replace_document("acme", "manual", new) == 1
    hits = await search(memory_store, "acme", "manual cafeteria opens", top_k=100)
    assert sorted(h.text for h in hits) == sorted([new[0].text, other.text])
    assert {h.document_id for h in hits} == {"manual", "x"}

    # Replacing with nothing removes the document; other tenants' documents are untouched.
    await memory_store.upsert(
        [chunk("globex", "Globex manual.", source="doc:manual", document="manual")]
    )
    assert await memory_store.replace_document("acme", "manual", []) == 0
    assert [h.text for h in await search(memory_store, "acme", "manual", top_k=100)] == [other.text]
    assert [h.text for h in await search(memory_store, "globex", "manual")] == ["Globex manual."]


async def test_delete_by_conversation_then_by_tenant(memory_store: MemoryStore) -> None:
    await memory_store.upsert(messages("acme", DISTRACTORS[:4], "c1", "one"))
    await memory_store.upsert(messages("acme", DISTRACTORS[4:7], "c2", "two"))
    await memory_store.upsert([chunk("acme", FACT, source="doc", document="d")])
    await memory_store.upsert(messages("globex", DISTRACTORS[:2], "c1", "g"))

    assert await memory_store.delete("acme", "c1") == 4
    remaining = await search(memory_store, "acme", "the lab", top_k=100)
    assert len(remaining) == 4
    assert "c1" not in {h.conversation_id for h in remaining}
    assert await memory_store.delete("acme", "c1") == 0

    assert await memory_store.delete("acme") == 4
    assert await search(memory_store, "acme", "the lab", top_k=100) == []
    assert not await memory_store.has_source("acme", "two-0")
    assert len(await search(memory_store, "globex", "the lab", top_k=100)) == 2


async def test_top_k_bounds_the_result(memory_store: MemoryStore) -> None:
    await memory_store.upsert(messages("acme", DISTRACTORS, "c1", "m"))
    assert len(await search(memory_store, "acme", "the office lab", top_k=7)) == 7
    assert len(await search(memory_store, "acme", "the office lab", top_k=1)) == 1
    # Fewer chunks than top_k: all of them, each once.
    hits = await search(memory_store, "acme", "the office lab", top_k=100)
    assert len(hits) == len({h.chunk_id for h in hits}) == len(DISTRACTORS)


async def test_scores_are_positive_and_descending(memory_store: MemoryStore) -> None:
    await memory_store.upsert(messages("acme", [FACT, *DISTRACTORS], "c1", "m"))
    for query in ("door code", "lab supplies gloves", "zzz unknown words"):
        hits = await search(memory_store, "acme", query, top_k=15)
        assert len(hits) == 15
        scores = [h.score for h in hits]
        assert all(score > 0 for score in scores)
        assert scores == sorted(scores, reverse=True), query


async def test_a_postgres_store_starts_again_after_stop(pg_dsn: str) -> None:
    store = PostgresMemoryStore(pg_dsn, dims=DIMS)
    for _ in range(2):  # a closed connection pool cannot reopen: each start needs its own
        async with store:
            assert (
                await store.search("t-restart", "anything", EMBEDDER.embed_one("anything"), 3) == []
            )


async def test_the_embedded_store_starts_again_after_stop(tmp_path: Path) -> None:
    store = EmbeddedPostgresMemoryStore(tmp_path / "postgres", dims=DIMS)
    for _ in range(2):
        async with store:
            assert (
                await store.search("t-restart", "anything", EMBEDDER.embed_one("anything"), 3) == []
            )

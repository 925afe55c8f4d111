"""Pure logic of the Elasticsearch memory store: fusion, ids, mapping and request bodies."""

from __future__ import annotations

import pytest

from mesh.errors import Unavailable
from mesh.memory.base import StoredChunk
from mesh.memory.elasticsearch import (
    RRF_K,
    ElasticsearchMemoryStore,
    _raise_item_errors,
    _ranking,
    _vector,
    chunk_doc_id,
    index_mapping,
    query_terms,
    reciprocal_rank_fusion,
    search_bodies,
)


def test_rrf_sums_reciprocal_ranks_over_rankings() -> None:
    fused = dict(reciprocal_rank_fusion([["a", "b", "c"], ["c", "a"]]))
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert fused["b"] == pytest.approx(1 / 62)
    assert fused["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert RRF_K == 60


def test_rrf_prefers_agreement_and_orders_best_first() -> None:
    # "both" is second in each list; each list's winner appears in that list only.
    fused = reciprocal_rank_fusion([["x", "both"], ["y", "both"]])
    assert [key for key, _ in fused] == ["both", "x", "y"]
    scores = [score for _, score in fused]
    assert scores == sorted(scores, reverse=True)


def test_rrf_breaks_ties_by_id_and_counts_duplicates_once() -> None:
    assert reciprocal_rank_fusion([["b"], ["a"]]) == [("a", 1 / 61), ("b", 1 / 61)]
    assert reciprocal_rank_fusion([["a", "a", "b"]]) == [("a", 1 / 61), ("b", 1 / 63)]
    assert reciprocal_rank_fusion([]) == []
    assert reciprocal_rank_fusion([[], []]) == []
    assert reciprocal_rank_fusion([["a"]], k=0) == [("a", 1.0)]
    with pytest.raises(ValueError, match="negative"):
        reciprocal_rank_fusion([["a"]], k=-1)


def test_ranking_orders_equal_scores_by_chunk_id() -> None:
    hits = [
        {"_score": 1.0, "_source": {"chunk_id": "b"}},
        {"_score": 2.0, "_source": {"chunk_id": "z"}},
        {"_score": 1.0, "_source": {"chunk_id": "a"}},
    ]
    assert _ranking(hits) == ["z", "a", "b"]


def test_doc_id_includes_the_tenant_and_cannot_be_spoofed_by_separators() -> None:
    assert chunk_doc_id("acme", "c1") == chunk_doc_id("acme", "c1")
    assert chunk_doc_id("acme", "c1") != chunk_doc_id("globex", "c1")
    assert chunk_doc_id("a/b", "c") != chunk_doc_id("a", "b/c")
    assert chunk_doc_id('a", "b', "c") != chunk_doc_id("a", 'b", "c')
    assert len(chunk_doc_id("t" * 1000, "c" * 1000).encode()) <= 512


def test_mapping_has_filters_text_and_cosine_hnsw_vector() -> None:
    mapping = index_mapping(256)
    assert mapping["dynamic"] == "strict"
    props = mapping["properties"]
    for field in ("tenant_id", "chunk_id", "conversation_id", "document_id", "source_id"):
        assert props[field] == {"type": "keyword"}
    assert props["text"] == {"type": "text", "analyzer": "standard"}
    vector = props["vector"]
    assert (vector["type"], vector["dims"], vector["index"], vector["similarity"]) == (
        "dense_vector",
        256,
        True,
        "cosine",
    )
    assert vector["index_options"] == {"type": "hnsw"}


def test_query_terms_keep_distinct_words_only() -> None:
    assert query_terms('What is the "door" CODE, the door code?') == "what is the door code"
    assert query_terms("4417-XK") == "4417 xk"
    assert query_terms("-- ** ()") == ""
    assert len(query_terms(" ".join(f"w{i}" for i in range(500))).split()) == 64


def test_search_bodies_filter_every_ranker_by_tenant_and_conversation() -> None:
    bm25, knn = search_bodies(
        tenant_id="acme", terms="door code", vector=[1.0, 0.0], top_k=5, conversation_id="c1"
    )
    filters = [{"term": {"tenant_id": "acme"}}, {"term": {"conversation_id": "c1"}}]
    assert bm25["query"]["bool"]["filter"] == filters
    assert bm25["query"]["bool"]["must"] == [{"match": {"text": "door code"}}]
    assert "sort" not in bm25  # a sort clause would turn off Lucene's top-k skipping
    assert knn["knn"]["filter"] == {"bool": {"filter": filters}}
    assert knn["knn"]["query_vector"] == [1.0, 0.0]
    # Same candidate window as the PostgreSQL store: max(40, 4 * top_k).
    assert bm25["size"] == knn["size"] == knn["knn"]["k"] == 40
    assert knn["knn"]["num_candidates"] >= knn["knn"]["k"]


def test_search_bodies_without_conversation_or_terms_or_vector() -> None:
    [knn] = search_bodies(tenant_id="acme", terms="", vector=[1.0], top_k=100)
    assert knn["knn"]["filter"] == {"bool": {"filter": [{"term": {"tenant_id": "acme"}}]}}
    assert knn["knn"]["k"] == 400
    [bm25] = search_bodies(tenant_id="acme", terms="x", vector=None, top_k=5000)
    assert bm25["size"] == 10_000  # Elasticsearch's window cap
    assert search_bodies(tenant_id="acme", terms="", vector=None, top_k=5) == []


def test_vector_validation() -> None:
    assert _vector([0.5, 0.25], 2) == [0.5, 0.25]
    assert _vector([0.0, 0.0], 2) is None  # cosine cannot rank it; stored without a vector
    with pytest.raises(ValueError, match="shape"):
        _vector([1.0], 2)
    with pytest.raises(ValueError, match="NaN"):
        _vector([float("nan"), 1.0], 2)
    third = _vector([1 / 3], 1)
    assert third is not None and third[0] == pytest.approx(1 / 3, rel=1e-6)


def test_bulk_item_errors() -> None:
    _raise_item_errors({"errors": False, "items": []}, "update")
    rejected = {"status": 429, "error": {"type": "es_rejected_execution_exception"}}
    with pytest.raises(Unavailable) as caught:
        _raise_item_errors({"errors": True, "items": [{"update": rejected}]}, "update")
    assert caught.value.reason == "MEMORY_STORE_UNAVAILABLE"
    bad = {"_id": "x", "status": 400, "error": {"type": "document_parsing_exception"}}
    with pytest.raises(RuntimeError, match="document_parsing_exception"):
        _raise_item_errors({"errors": True, "items": [{"update": bad}]}, "update")


def test_constructor_validates_and_needs_start() -> None:
    with pytest.raises(ValueError, match="index_prefix"):
        ElasticsearchMemoryStore("http://127.0.0.1:1", index_prefix="Upper")
    with pytest.raises(ValueError, match="dims"):
        ElasticsearchMemoryStore("http://127.0.0.1:1", dims=0)
    store = ElasticsearchMemoryStore("http://127.0.0.1:1", index_prefix="t1")
    assert store.index == "t1-chunks"
    with pytest.raises(RuntimeError, match="not started"):
        store._es()


async def test_writes_validate_before_any_request() -> None:
    store = ElasticsearchMemoryStore("http://127.0.0.1:1", dims=2)
    with pytest.raises(ValueError, match="tenant_id"):
        await store.search("", "q", [1.0, 0.0], 5)
    with pytest.raises(ValueError, match="top_k"):
        await store.search("acme", "q", [1.0, 0.0], 0)
    other = StoredChunk("c", "acme", "t", [1.0, 0.0], document_id="other")
    with pytest.raises(ValueError, match="belongs to"):
        await store.replace_document("acme", "manual", [other])

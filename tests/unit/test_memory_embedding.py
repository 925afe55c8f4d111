"""The hashing embedder: shape, norm, determinism across processes, and useful similarity."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mesh.memory.embedding import DEFAULT_DIMS, Embedder, HashingEmbedder


def _cos(a: list[float], b: list[float]) -> float:
    return float(np.dot(np.asarray(a), np.asarray(b)))


def test_vectors_have_the_configured_size_and_unit_norm() -> None:
    embedder = HashingEmbedder()
    vectors = embedder.embed(["hello world", "a", "?!", ""])
    assert embedder.dims == DEFAULT_DIMS == 256
    for vector in vectors:
        assert len(vector) == 256
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_dimension_is_configurable() -> None:
    embedder = HashingEmbedder(64)
    assert len(embedder.embed_one("some text")) == 64
    with pytest.raises(ValueError):
        HashingEmbedder(4)


def test_texts_without_words_still_differ_and_are_not_zero() -> None:
    embedder = HashingEmbedder()
    a, b = embedder.embed(["?!", "..."])
    assert np.any(np.asarray(a) != 0) and np.any(np.asarray(b) != 0)
    assert a != b


def test_satisfies_the_protocol() -> None:
    embedder: Embedder = HashingEmbedder(32)
    assert embedder.dims == 32


def test_identical_across_processes_and_hash_seeds() -> None:
    text = "Deterministic vectors survive restarts: 4417-XK"
    script = (
        "import json; from mesh.memory.embedding import HashingEmbedder; "
        f"print(json.dumps(HashingEmbedder().embed_one({text!r})))"
    )
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        outputs.append(json.loads(result.stdout))
    assert outputs[0] == outputs[1]
    assert outputs[0] == pytest.approx(HashingEmbedder().embed_one(text), abs=1e-7)


def test_similarity_follows_shared_words_and_spelling() -> None:
    embedder = HashingEmbedder()
    query = embedder.embed_one("door code of the laboratory")
    related = embedder.embed_one("The laboratory door code is 4417")
    unrelated = embedder.embed_one("Bananas grow in tropical climates")
    assert _cos(query, related) > _cos(query, unrelated) + 0.2
    # Character trigrams: inflections and typos stay close, unlike unrelated words.
    base = embedder.embed_one("embedding")
    assert _cos(base, embedder.embed_one("embeddings")) > 0.35
    assert _cos(base, embedder.embed_one("embeding")) > 0.35
    assert abs(_cos(base, embedder.embed_one("volcano"))) < 0.3


def test_case_and_word_order_do_not_matter() -> None:
    embedder = HashingEmbedder()
    assert embedder.embed_one("Red Apple") == pytest.approx(embedder.embed_one("apple red"))

"""Text embeddings for the memory service.

The default embedder is a deterministic feature-hashing model (``HashingEmbedder``), not a neural
network. Why:

- Offline: the mesh must run where no model can be downloaded, and tests must not need one.
- Fast and dependency-light: numpy only, tens of microseconds per chunk on one CPU core, so
  ingest never waits on an accelerator the agent needs for generation.
- Deterministic: the same text gives the same vector in every process, on every machine and
  after every restart (it hashes with BLAKE2, not Python's salted ``hash``), so stored vectors
  never go stale between deployments and backends rank identically.

It captures lexical overlap (shared words) and spelling closeness (shared character trigrams:
"embedding" is near "embeddings" and near a typo of it), not meaning. That is enough for the
hybrid search it feeds: the full-text half (PostgreSQL ``ts_rank`` or Elasticsearch BM25) carries
exact-term matches, and rank fusion rewards chunks both halves agree on. A semantic model (a
llama.cpp embedding GGUF, say) plugs in behind the ``Embedder`` protocol; changing the embedder
or its dimension means re-ingesting, since old and new vectors are not comparable.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

_WORD = re.compile(r"\w+", re.UNICODE)

DEFAULT_DIMS = 256


class Embedder(Protocol):
    """Turns texts into fixed-size vectors; cosine similarity ranks them."""

    @property
    def dims(self) -> int:
        """Length of every vector."""
        ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One L2-normalised vector per text, in order. CPU-bound: call it off the event loop."""
        ...


_Features = tuple[npt.NDArray[np.intp], npt.NDArray[np.float32]]


class HashingEmbedder:
    """Signed feature hashing of word unigrams and character trigrams, L2-normalised.

    Each lower-cased word adds ``1 + log(count)`` at one hashed position, and its character
    trigrams (of ``#word#``, so prefixes and suffixes count) share ``trigram_weight`` between
    them (as much as the word itself by default, so "embedding" and "embeddings" are close).
    A hash bit picks the sign, so colliding features cancel on average instead of piling up.
    Texts without any word still get a non-zero vector (from their raw characters), because
    cosine similarity is undefined for the zero vector.
    """

    def __init__(
        self, dims: int = DEFAULT_DIMS, *, trigram_weight: float = 1.0, cache_size: int = 65_536
    ) -> None:
        if dims < 8:
            raise ValueError(f"dims must be >= 8, got {dims}")
        if trigram_weight < 0:
            raise ValueError(f"trigram_weight must be >= 0, got {trigram_weight}")
        self._dims = dims
        self._trigram_weight = trigram_weight
        # Vocabulary is Zipfian: a bounded cache makes repeat words cost one dict lookup.
        self._word_features = functools.lru_cache(maxsize=cache_size)(self._compute_word_features)

    @property
    def dims(self) -> int:
        return self._dims

    def _slot(self, feature: str) -> tuple[int, float]:
        digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
        value = int.from_bytes(digest, "little")
        return value % self._dims, (1.0 if value >> 63 else -1.0)

    def _compute_word_features(self, word: str) -> _Features:
        slots = [self._slot("w:" + word)]
        weights = [1.0]
        padded = f"#{word}#"
        trigrams = [padded[i : i + 3] for i in range(len(padded) - 2)]
        if trigrams and self._trigram_weight > 0:
            share = self._trigram_weight / math.sqrt(len(trigrams))
            for trigram in trigrams:
                slots.append(self._slot("c:" + trigram))
                weights.append(share)
        index = np.array([slot for slot, _ in slots], dtype=np.intp)
        signed = np.array([sign * w for (_, sign), w in zip(slots, weights, strict=True)])
        return index, signed.astype(np.float32)

    def _fallback(self, text: str) -> npt.NDArray[np.float32]:
        vector = np.zeros(self._dims, dtype=np.float32)
        slot, sign = self._slot("raw:" + text.strip())
        vector[slot] = sign
        return vector

    def embed_one(self, text: str) -> list[float]:
        """The vector of one text."""
        vector: list[float] = self._vector(text).tolist()
        return vector

    def _vector(self, text: str) -> npt.NDArray[np.float32]:
        counts = Counter(word.lower() for word in _WORD.findall(text))
        if not counts:
            return self._fallback(text)
        indices: list[npt.NDArray[np.intp]] = []
        values: list[npt.NDArray[np.float32]] = []
        for word, count in counts.items():
            index, signed = self._word_features(word)
            indices.append(index)
            values.append(signed * np.float32(1.0 + math.log(count)))
        vector = np.bincount(
            np.concatenate(indices), weights=np.concatenate(values), minlength=self._dims
        ).astype(np.float32)
        norm = float(np.linalg.norm(vector))
        if norm == 0.0:  # every feature cancelled out; vanishingly rare, still must not be zero
            return self._fallback(text)
        return vector / np.float32(norm)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [self._vector(text).tolist() for text in texts]


__all__ = ["DEFAULT_DIMS", "Embedder", "HashingEmbedder"]

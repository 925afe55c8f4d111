"""Splitting text into overlapping chunks with deterministic ids.

Chunks follow sentence boundaries where they can, so a recalled passage reads as whole sentences;
a sentence longer than a chunk is cut by words. Consecutive chunks share a few trailing sentences
so a fact that straddles a boundary is still whole in one of them.

Chunk ids hash the tenant, the source (request id or document id) and the chunk's index, so
replaying a write produces the same ids and overwrites instead of adding duplicates.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

# A sentence ends at ., ! or ? followed by whitespace, or at a blank line (paragraphs, titles and
# list items often have no final punctuation).
_SENTENCE_BREAK = re.compile(r"(?<=[.!?。！？])\s+|\n\s*\n")


@dataclass(frozen=True, slots=True)
class ChunkingConfig:
    """How big chunks are and how much consecutive chunks overlap, in words."""

    max_words: int = 120
    overlap_words: int = 30

    def __post_init__(self) -> None:
        if self.max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {self.max_words}")
        if not 0 <= self.overlap_words < self.max_words:
            raise ValueError(
                f"overlap_words must be in [0, max_words), got {self.overlap_words} "
                f"with max_words={self.max_words}"
            )


def _sentences(text: str, max_words: int) -> list[list[str]]:
    """Sentences as word lists, with any sentence longer than ``max_words`` cut into pieces."""
    # NUL cannot be stored in PostgreSQL text and other control characters only add noise.
    cleaned = text.replace("\x00", " ")
    units: list[list[str]] = []
    for sentence in _SENTENCE_BREAK.split(cleaned):
        words = sentence.split()
        for start in range(0, len(words), max_words):
            units.append(words[start : start + max_words])
    return units


def chunk_text(text: str, config: ChunkingConfig | None = None) -> list[str]:
    """Split ``text`` into chunks of at most ``max_words`` words, overlapping by whole sentences.

    The overlap carried into the next chunk is the longest run of trailing sentences of the
    previous chunk that fits in ``overlap_words``; it never covers a whole chunk, so every chunk
    adds new text. Whitespace inside a chunk is collapsed to single spaces. Returns an empty list
    for text without words.
    """
    cfg = config or ChunkingConfig()
    units = _sentences(text, cfg.max_words)
    chunks: list[str] = []
    start = 0
    while start < len(units):
        end = start
        words = 0
        while end < len(units) and (end == start or words + len(units[end]) <= cfg.max_words):
            words += len(units[end])
            end += 1
        chunks.append(" ".join(word for unit in units[start:end] for word in unit))
        if end == len(units):
            break
        # The carried sentences must leave room for the next new sentence, or the next chunk
        # would repeat part of this one and add nothing.
        budget = min(cfg.overlap_words, cfg.max_words - len(units[end]))
        next_start = end
        overlap = 0
        while next_start - 1 > start and overlap + len(units[next_start - 1]) <= budget:
            next_start -= 1
            overlap += len(units[next_start])
        start = next_start
    return chunks


def chunk_id(tenant_id: str, source_id: str, index: int) -> str:
    """Deterministic id of chunk ``index`` of ``source_id``; equal inputs give equal ids."""
    # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
    key = f"{len(tenant_id)}:{tenant_id}|{len(source_id)}:{source_id}|{index}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


__all__ = ["ChunkingConfig", "chunk_id", "chunk_text"]

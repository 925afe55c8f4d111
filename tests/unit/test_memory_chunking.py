"""Chunking: sizes, sentence boundaries, overlap, deterministic ids."""

from __future__ import annotations

import pytest

from mesh.memory.chunking import ChunkingConfig, chunk_id, chunk_text


def _sentence(index: int, words: int = 5) -> str:
    return " ".join(f"s{index}w{i}" for i in range(words - 1)) + f" end{index}."


def test_empty_and_blank_text_give_no_chunks() -> None:
    assert chunk_text("") == []
    assert chunk_text("   \n\n\t ") == []


def test_short_text_is_one_chunk_with_whitespace_collapsed() -> None:
    assert chunk_text("Hello   world.\nSecond  line.") == ["Hello world. Second line."]


def test_chunks_respect_max_words_and_sentence_boundaries() -> None:
    text = " ".join(_sentence(i) for i in range(20))  # 20 sentences of 5 words
    config = ChunkingConfig(max_words=12, overlap_words=0)
    chunks = chunk_text(text, config)
    assert all(len(chunk.split()) <= 12 for chunk in chunks)
    # Two whole sentences fit in 12 words, a third does not: every chunk ends a sentence.
    assert all(chunk.endswith(".") for chunk in chunks)
    assert len(chunks) == 10
    assert " ".join(chunks) == " ".join(text.split())


def test_overlap_repeats_trailing_sentences_and_every_chunk_adds_text() -> None:
    text = " ".join(_sentence(i) for i in range(12))
    chunks = chunk_text(text, ChunkingConfig(max_words=15, overlap_words=5))
    assert len(chunks) > 1
    for previous, current in zip(chunks, chunks[1:], strict=False):
        last_sentence = " ".join(previous.split()[-5:])
        assert current.startswith(last_sentence)
        assert current.split()[-1] not in previous.split()
    # Every sentence is in some chunk.
    joined = " ".join(chunks)
    for i in range(12):
        assert f"end{i}." in joined


def test_long_sentence_is_cut_by_words() -> None:
    text = " ".join(f"w{i}" for i in range(250))  # no sentence breaks at all
    chunks = chunk_text(text, ChunkingConfig(max_words=100, overlap_words=20))
    assert [len(chunk.split()) for chunk in chunks] == [100, 100, 50]
    assert chunks[0].split()[0] == "w0"
    assert chunks[2].split()[-1] == "w249"


def test_blank_lines_are_sentence_boundaries() -> None:
    text = "Title without a period\n\nBody sentence one. Body sentence two."
    chunks = chunk_text(text, ChunkingConfig(max_words=4, overlap_words=0))
    assert chunks == ["Title without a period", "Body sentence one.", "Body sentence two."]


def test_nul_characters_are_dropped() -> None:
    assert chunk_text("a\x00b c") == ["a b c"]


def test_chunking_is_deterministic() -> None:
    text = " ".join(_sentence(i, words=7) for i in range(50))
    config = ChunkingConfig(max_words=30, overlap_words=8)
    assert chunk_text(text, config) == chunk_text(text, config)


@pytest.mark.parametrize(("max_words", "overlap"), [(0, 0), (10, 10), (10, -1)])
def test_bad_config_is_rejected(max_words: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        ChunkingConfig(max_words=max_words, overlap_words=overlap)


def test_chunk_ids_are_deterministic_and_distinct() -> None:
    assert chunk_id("t", "s", 0) == chunk_id("t", "s", 0)
    ids = {
        chunk_id("t", "s", 0),
        chunk_id("t", "s", 1),
        chunk_id("u", "s", 0),
        chunk_id("t", "u", 0),
        chunk_id("ab", "c", 0),
        chunk_id("a", "bc", 0),
    }
    assert len(ids) == 6
    assert all(len(value) == 32 and int(value, 16) >= 0 for value in ids)

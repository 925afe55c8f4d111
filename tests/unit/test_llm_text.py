"""Incremental UTF-8 decoding and stop-sequence matching (no model needed)."""

from __future__ import annotations

import pytest

from mesh.llm.text import StopMatcher, Utf8Decoder


def test_multibyte_character_split_over_tokens_is_held_until_complete() -> None:
    decoder = Utf8Decoder()
    data = "a🙂é".encode()
    pieces = [decoder.feed(data[i : i + 1]) for i in range(len(data))]
    # "a", then three empty pieces while the emoji is incomplete, then the emoji, then "é".
    assert pieces == ["a", "", "", "", "🙂", "", "é"]
    assert decoder.flush() == ""


def test_invalid_bytes_become_replacement_characters_not_errors() -> None:
    decoder = Utf8Decoder()
    assert decoder.feed(b"\xff") == "\ufffd"
    assert decoder.feed(b"ok") == "ok"


def test_truncated_sequence_is_replaced_at_flush() -> None:
    decoder = Utf8Decoder()
    assert decoder.feed("日".encode()[:2]) == ""
    assert decoder.flush() == "\ufffd"


def test_no_stops_passes_text_through() -> None:
    matcher = StopMatcher([])
    assert matcher.feed("hello") == ("hello", False)


def test_stop_sequence_inside_one_piece() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("abcSTOPdef") == ("abc", True)


def test_stop_sequence_spanning_pieces_is_never_emitted() -> None:
    matcher = StopMatcher(["\nUser:"])
    emitted = []
    for piece in ["Hi", " there", "\n", "Us", "er", ": more"]:
        text, matched = matcher.feed(piece)
        emitted.append(text)
        if matched:
            break
    assert matched
    assert "".join(emitted) == "Hi there"
    assert emitted == ["Hi", " there", "", "", "", ""]


def test_held_prefix_is_released_when_it_does_not_complete() -> None:
    matcher = StopMatcher(["abc"])
    assert matcher.feed("xab") == ("x", False)
    assert matcher.held == "ab"
    assert matcher.feed("d") == ("abd", False)
    assert matcher.feed("a") == ("", False)
    assert matcher.flush() == "a"


def test_earliest_of_several_stops_wins() -> None:
    matcher = StopMatcher(["world", "lo w"])
    assert matcher.feed("hello world") == ("hel", True)


@pytest.mark.parametrize("stop", ["aab", "aaab"])
def test_overlapping_prefixes(stop: str) -> None:
    matcher = StopMatcher([stop])
    out = []
    for ch in "xaaaab":
        text, matched = matcher.feed(ch)
        out.append(text)
        if matched:
            break
    assert matched
    assert "".join(out) == "xaaaab"[: "xaaaab".index(stop)]

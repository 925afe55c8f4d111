"""Turning a stream of token bytes into safe text pieces.

Tokens are byte strings: a character may span several tokens (byte-fallback vocabularies), and a
stop sequence may span several pieces. Both are handled by holding text back until it is known
to be final, never by retracting text that was already emitted.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class Utf8Decoder:
    """Incremental UTF-8 decoding: incomplete sequences wait for their next bytes.

    Invalid bytes become U+FFFD instead of failing, since a sampled byte token can be anything.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        """Text completed by ``data``; bytes of a partial character are kept for later."""
        return self._decoder.decode(data, final=False)

    def flush(self) -> str:
        """Whatever is still held, with an incomplete trailing sequence replaced."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Finds stop sequences across pieces without ever emitting any part of a match.

    Text that could be the start of a stop sequence is held until the next piece decides it.
    Emitted text therefore never ends with a proper prefix of a stop sequence, which is why a
    match can only begin inside the held text.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    @property
    def held(self) -> str:
        return self._held

    def feed(self, text: str) -> tuple[str, bool]:
        """Return ``(text safe to emit, whether a stop sequence matched)``.

        On a match the returned text is everything before the earliest match; the caller stops.
        """
        if not self._stops:
            return text, False
        buffer = self._held + text
        earliest = -1
        for stop in self._stops:
            at = buffer.find(stop)
            if at != -1 and (earliest == -1 or at < earliest):
                earliest = at
        if earliest != -1:
            self._held = ""
            return buffer[:earliest], True
        keep = self._longest_stop_prefix_suffix(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """Release held text at the end of generation (it never became a stop sequence)."""
        held, self._held = self._held, ""
        return held

    def _longest_stop_prefix_suffix(self, buffer: str) -> int:
        best = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:size]):
                    best = size
                    break
        return best

"""One generation as the decode thread sees it: what to feed next, and what a token means.

Turning sampled tokens into text pieces and finish reasons is the same for every sequence in a
batch, and independent of llama.cpp, so it lives here, apart from the scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.generation import FinishReason
from mesh.llm.text import StopMatcher, Utf8Decoder


@dataclass(frozen=True, slots=True)
class Piece:
    """Text of one generated token (``tokens == 1``) or of held text released at the end.

    ``text`` may be empty: a token that ends inside a multi-byte character, or text held back
    because it may be the start of a stop sequence.
    """

    text: str
    tokens: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one sampled token produced: a piece to emit (maybe none) and whether it ended."""

    piece: Piece | None
    finished: FinishReason | None


class TokenReader:
    """Reads a generation's sampled tokens into pieces, applying stop sequences and the limit.

    Args:
        limit: the most tokens to generate.
        stops: stop sequences; generation ends before the first one, which is never emitted.
    """

    def __init__(self, limit: int, stops: tuple[str, ...]) -> None:
        self._limit = limit
        self._decoder = Utf8Decoder()
        self._stopper = StopMatcher(stops)
        self.produced = 0

    def end_of_generation(self) -> Outcome:
        """The model ended its reply: release held text unless it completes a stop sequence."""
        emit, matched = self._stopper.feed(self._decoder.flush())
        tail = emit if matched else emit + self._stopper.flush()
        reason = FinishReason.STOP_SEQUENCE if matched else FinishReason.STOP
        return Outcome(Piece(tail, 0) if tail else None, reason)

    def token(self, data: bytes) -> Outcome:
        """A generated token's bytes."""
        self.produced += 1
        emit, matched = self._stopper.feed(self._decoder.feed(data))
        if matched:
            return Outcome(Piece(emit, 1), FinishReason.STOP_SEQUENCE)
        if self.produced >= self._limit:
            rest, matched = self._stopper.feed(self._decoder.flush())
            emit += rest if matched else rest + self._stopper.flush()
            reason = FinishReason.STOP_SEQUENCE if matched else FinishReason.LENGTH
            return Outcome(Piece(emit, 1), reason)
        return Outcome(Piece(emit, 1), None)

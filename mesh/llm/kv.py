"""Which llama.cpp sequence a generation runs in, and what each sequence keeps in the KV cache.

The context's cache is one pool of cells shared by all sequences. A running sequence holds a
reservation for its whole window (prompt plus reply). When it finishes it stays in the cache,
idle, with the tokens it processed, so the conversation's next turn can continue from the
longest prefix the two share instead of prefilling it again. Idle sequences give their cells
back least recently used first whenever a new generation needs the room or the sequence id.

Pure bookkeeping: the caller applies the decisions to llama.cpp (``Claim.drop`` and
``Claim.keep``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

# The shortest shared prefix worth continuing from.
MIN_REUSE = 8


@dataclass(slots=True)
class _Entry:
    seq: int
    tokens: list[int] = field(default_factory=list)  # what the cache holds, by position
    reserved: int = 0  # cells a running sequence may grow to; 0 when idle
    used_at: int = 0


@dataclass(frozen=True, slots=True)
class Claim:
    """A sequence for a new generation.

    ``keep`` leading tokens of the prompt are already in the cache; the caller removes the
    sequence's cells from ``keep`` on, and every cell of each sequence in ``drop``.
    """

    seq: int
    keep: int
    drop: tuple[int, ...]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class SequencePool:
    """Sequence ids ``0..sequences-1`` over ``cells`` cache cells.

    Args:
        sequences: sequence ids the context was created with (running plus idle).
        running: the most sequences that may run at once.
        cells: cache cells shared by all sequences.
    """

    def __init__(self, *, sequences: int, running: int, cells: int) -> None:
        if running < 1 or sequences < running:
            raise ValueError("need 1 <= running <= sequences")
        self._entries = [_Entry(seq) for seq in range(sequences)]
        self._max_running = running
        self.cells = cells
        self._clock = itertools.count(1)

    @property
    def running(self) -> int:
        return sum(1 for e in self._entries if e.reserved)

    @property
    def cached_tokens(self) -> int:
        """Cells idle sequences hold for reuse."""
        return sum(len(e.tokens) for e in self._entries if not e.reserved)

    @property
    def used_cells(self) -> int:
        """Cells reserved by running sequences plus cells idle ones keep."""
        return self._used()

    def _used(self, exclude: _Entry | None = None) -> int:
        return sum(
            e.reserved if e.reserved else len(e.tokens) for e in self._entries if e is not exclude
        )

    def claim(self, prompt: Sequence[int], reserve: int) -> Claim | None:
        """A sequence for ``prompt`` that may grow to ``reserve`` cells; None: wait for one."""
        if self.running >= self._max_running or reserve > self.cells:
            return None
        idle = [e for e in self._entries if not e.reserved]
        if not idle:
            return None
        # The idle sequence sharing the longest prefix; else an empty one; else the stalest.
        best = max(idle, key=lambda e: (common_prefix(e.tokens, prompt), -e.used_at))
        keep = common_prefix(best.tokens, prompt)
        if keep < MIN_REUSE:
            # Sharing a BOS token or two is not worth overwriting another conversation's prefix.
            keep = 0
            empty = [e for e in idle if not e.tokens]
            best = empty[0] if empty else min(idle, key=lambda e: e.used_at)
        # At least the prompt's last token is decoded again: its logits start the reply.
        keep = min(keep, len(prompt) - 1)
        drop: list[int] = []
        # Evict other idle sequences, least recently used first, until the reservation fits.
        others = sorted((e for e in idle if e is not best and e.tokens), key=lambda e: e.used_at)
        while self._used(exclude=best) + reserve > self.cells and others:
            victim = others.pop(0)
            victim.tokens = []
            drop.append(victim.seq)
        if self._used(exclude=best) + reserve > self.cells:
            return None
        best.tokens = list(prompt[:keep])
        best.reserved = reserve
        best.used_at = next(self._clock)
        return Claim(best.seq, keep, tuple(drop))

    def release(self, seq: int, tokens: Sequence[int]) -> None:
        """A generation ended; ``tokens`` are what its cells now hold (empty: nothing kept)."""
        entry = self._entries[seq]
        entry.reserved = 0
        entry.tokens = list(tokens)
        entry.used_at = next(self._clock)

    def evict_idle(self) -> list[int]:
        """Forget every idle sequence's tokens; returns their ids for the caller to clear."""
        evicted = [e.seq for e in self._entries if not e.reserved and e.tokens]
        for seq in evicted:
            self._entries[seq].tokens = []
        return evicted

"""The log's one rule for duplicates: the first record in log order wins."""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class FirstWins(dict[K, V]):
    """A dict that keeps the first value offered for each key and ignores the rest.

    The turn-event log may hold a token's ``(turn_id, seq)`` more than once: an agent that lost
    its turn to another (a zombie) may still append, and a redelivered turn is continued after
    the tokens already logged. Every reader resolves this the same way, by keeping the first
    record in log order, so all of them see the same text: the gateway's streams, the agent
    continuing a turn, and the persister both within a batch and against earlier batches (where
    PostgreSQL's ``ON CONFLICT DO NOTHING`` applies the same rule). Keys are ``(turn_id, seq)``,
    or just ``seq`` for one turn's tokens, or ``turn_id`` for the once-per-turn records.

    A plain dict underneath, so lookups cost what a dict's do; write through ``offer``.
    """

    __slots__ = ()

    def offer(self, key: K, value: V) -> bool:
        """Keep ``value`` for ``key`` unless a value came first; True when it was kept."""
        if key in self:
            return False
        self[key] = value
        return True

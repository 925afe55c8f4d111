"""The log's rules for repeated records: fencing by attempt, then the first in log order wins."""

from __future__ import annotations

from typing import TypeVar

from mesh.turnlog._events import TokenEmitted, TurnFinished, TurnStarted

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


class Attempts(dict[str, int]):
    """The log's fencing rule for readers: the newest ``TurnStarted`` so far decides.

    An agent that takes a turn over appends a ``TurnStarted`` with the next attempt number, then
    reads the turn's events up to it and continues after the last token it finds there. A token
    or ``TurnFinished`` of an older attempt that lands after that ``TurnStarted`` is a zombie's
    (an agent that lost the turn but still had records in flight): the new owner never saw it,
    so no reader may count it. Every reader applies this in log order, and ``FirstWins`` among
    what it admits, so all of them still see the same text. Keys are turn ids; values are the
    newest attempt seen. Records from before attempts existed carry 0 and are never fenced off
    by each other.
    """

    __slots__ = ()

    def admit(self, event: object) -> bool:
        """Whether ``event`` counts; a ``TurnStarted`` also raises its turn's attempt."""
        if isinstance(event, TurnStarted):
            self.started(event.turn_id, event.attempt)
            return True
        if isinstance(event, TokenEmitted | TurnFinished):
            return self.counts(event.turn_id, event.attempt)
        return True

    def started(self, turn_id: str, attempt: int) -> None:
        """A ``TurnStarted`` of ``attempt``: later records of older attempts no longer count."""
        if attempt > self.get(turn_id, 0):
            self[turn_id] = attempt

    def counts(self, turn_id: str, attempt: int) -> bool:
        """Whether a token or finish of ``attempt`` counts after the starts seen so far."""
        return attempt >= self.get(turn_id, 0)

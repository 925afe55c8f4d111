"""Turns nobody follows: counting the clients attached to a turn, and when to give it up.

A gateway appends ``ClientAttached`` when a client resumes a turn (or retries its start) and
``ClientDetached`` when a client's stream closes before the turn ended; the start itself counts
as the first follower. A turn not started with ``background`` whose count stays at zero for the
grace period (``MESH_AGENT_ORPHAN_GRACE_S``) is cancelled, so a client that went away does not
keep a batch slot busy, while a page reload or a dropped connection that resumes within the
grace period loses nothing. A gateway that dies appends nothing: its clients stay counted, and
the turn runs to its end, which is the safe side.

The agent's event tails see these records for every turn of its partitions; a turn's count is
what the claim's read of its events found, plus what the tails saw after that read's end.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from mesh import turnlog

_TURNS_REMEMBERED = 10_000


@dataclass
class Followers:
    """Clients following one turn: 1 (its start) + attached - detached."""

    count: int = 1
    last_left_ms: int = 0  # when the last client left (log time), 0 if none did

    def apply(self, event: turnlog.TurnEvent, at_ms: int) -> bool:
        """Count ``event`` if it is an attach or a detach; whether it was one."""
        if isinstance(event, turnlog.ClientAttached):
            self.count += 1
        elif isinstance(event, turnlog.ClientDetached):
            self.count -= 1
            self.last_left_ms = max(self.last_left_ms, at_ms)
        else:
            return False
        return True

    def orphaned_for_ms(self, now_ms: int) -> int | None:
        """How long nobody has followed the turn, or None while someone does."""
        if self.count > 0:
            return None
        return max(0, now_ms - self.last_left_ms)


@dataclass
class SeenByTails:
    """Attach and detach records the event tails saw, per turn (the most recent turns only)."""

    _turns: OrderedDict[str, list[tuple[int, turnlog.TurnEvent, int]]] = field(
        default_factory=OrderedDict
    )

    def note(self, offset: int, event: turnlog.TurnEvent, at_ms: int) -> None:
        seen = self._turns.setdefault(event.turn_id, [])
        seen.append((offset, event, at_ms))
        self._turns.move_to_end(event.turn_id)
        while len(self._turns) > _TURNS_REMEMBERED:
            self._turns.popitem(last=False)

    def since(self, turn_id: str, offset: int) -> list[tuple[turnlog.TurnEvent, int]]:
        """What the tails saw for the turn at ``offset`` or later, in log order."""
        return [(event, at_ms) for at, event, at_ms in self._turns.get(turn_id, ()) if at >= offset]

"""Which claimed turn runs next, and which request offsets may be committed.

``FairQueue``: turns taken from the log wait here until a batch slot is free. Tenants take
turns round-robin (one turn each per round, weights all equal: deficit round-robin with a cost
of one per turn), so a tenant's burst cannot hold every slot while another tenant's single turn
waits. Within a tenant turns keep log order, and a conversation never has two turns running:
its next turn waits until the previous one finished, so it sees that one in its history.

``CommitTracker``: turns of one partition finish out of order once several run at once. The
group offset may only move past a turn that is finished and has no unfinished turn before it,
so a crash redelivers every unfinished turn and nothing else is lost or skipped.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Waiting(Generic[T]):
    tenant: str
    conversation: str
    item: T


class FairQueue(Generic[T]):
    """Round-robin across tenants, FIFO within one, one running turn per conversation."""

    def __init__(self) -> None:
        self._tenants: OrderedDict[str, deque[Waiting[T]]] = OrderedDict()
        self._last: str | None = None  # the tenant served most recently

    def __len__(self) -> int:
        return sum(len(q) for q in self._tenants.values())

    def push(self, tenant: str, conversation: str, item: T) -> None:
        self._tenants.setdefault(tenant, deque()).append(Waiting(tenant, conversation, item))

    def _rotation(self) -> list[str]:
        """Tenants in serving order: the one served last goes behind every other."""
        last = self._last
        order = [t for t in self._tenants if t != last]
        return order + [last] if last is not None and last in self._tenants else order

    def pop(self, busy: Callable[[str], bool]) -> Waiting[T] | None:
        """The next turn to run, skipping conversations for which ``busy`` is true; or None.

        The tenant served moves to the back of the rotation, behind tenants that arrived
        while it was being served.
        """
        order = self._rotation()
        for tenant in order:
            queue = self._tenants[tenant]
            seen: set[str] = set()
            for index, waiting in enumerate(queue):
                if waiting.conversation in seen or busy(waiting.conversation):
                    seen.add(waiting.conversation)
                    continue
                del queue[index]
                self._last = tenant
                if queue:
                    self._tenants.move_to_end(tenant)
                else:
                    del self._tenants[tenant]
                return waiting
        return None

    def remove_if(self, predicate: Callable[[T], bool]) -> list[T]:
        """Take out every waiting item for which ``predicate`` holds."""
        removed: list[T] = []
        for tenant in list(self._tenants):
            queue = self._tenants[tenant]
            kept = deque(w for w in queue if not predicate(w.item))
            removed += [w.item for w in queue if predicate(w.item)]
            if kept:
                self._tenants[tenant] = kept
            else:
                del self._tenants[tenant]
        return removed


class CommitTracker:
    """Offsets taken from one partition and which are finished; tells what may be committed."""

    def __init__(self) -> None:
        self._open: OrderedDict[int, bool] = OrderedDict()  # offset -> finished, in log order

    def taken(self, offset: int) -> None:
        self._open[offset] = False

    def finished(self, offset: int) -> int | None:
        """Mark ``offset`` finished; returns the highest offset now safe to commit, if it moved."""
        if offset not in self._open:
            return None
        self._open[offset] = True
        highest: int | None = None
        while self._open:
            first, done = next(iter(self._open.items()))
            if not done:
                break
            self._open.popitem(last=False)
            highest = first
        return highest

    def unfinished(self) -> Iterable[int]:
        return [offset for offset, done in self._open.items() if not done]

"""The gateway's small in-process caches: one bounded LRU, the idempotency window on it, and
the counters of what is held (streams, starts in flight)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from services.gateway.model import TurnInfo

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def uncount(counter: Counter[K], key: K) -> None:
    """One less of ``key`` held; a key none is held of leaves the counter (it stays small)."""
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


class BoundedLru(Generic[K, V]):
    """At most ``size`` entries; the least recently used one goes first.

    ``get``, ``in`` and ``put`` count as a use; ``peek`` and ``pop`` do not.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def __contains__(self, key: K) -> bool:
        if key in self._items:
            self._items.move_to_end(key)
            return True
        return False

    def peek(self, key: K) -> V | None:
        return self._items.get(key)

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def pop(self, key: K) -> None:
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


class IdempotencyCache:
    """Recent ``(tenant, request_id) -> accepted turn`` on this gateway.

    Bounded in time and size and local to the process: it answers a client retrying the same
    gateway without a round trip. Retries on other gateways, or after a restart, are matched by
    the persister's claims (``idempotency``).
    """

    def __init__(
        self, *, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        # Looking an entry up does not keep it: the oldest request goes first, as it expires first.
        self._entries: BoundedLru[tuple[str, str], tuple[float, asyncio.Future[TurnInfo | None]]]
        self._entries = BoundedLru(max_entries)

    def get(self, key: tuple[str, str]) -> asyncio.Future[TurnInfo | None] | None:
        entry = self._entries.peek(key)
        if entry is None:
            return None
        if self._clock() - entry[0] > self._ttl_s:
            self._entries.pop(key)
            return None
        return entry[1]

    def put(self, key: tuple[str, str], future: asyncio.Future[TurnInfo | None]) -> None:
        self._entries.put(key, (self._clock(), future))

    def discard(self, key: tuple[str, str], future: asyncio.Future[TurnInfo | None]) -> None:
        entry = self._entries.peek(key)
        if entry is not None and entry[1] is future:
            self._entries.pop(key)

    def __len__(self) -> int:
        return len(self._entries)

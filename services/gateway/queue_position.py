"""How full a request partition is, and a waiting turn's place in it under the agents' policy.

The requests of a partition past the agents' committed offset are the turns not yet finished
there. Agents start them round-robin across tenants (``services.agent.scheduling``), so a turn
whose tenant has ``k`` unfinished turns ahead of it goes after those ``k`` and after at most
``k + 1`` of each other tenant's turns ahead of it: that count is its queue position. Turns
already generating are among them, so the position is an upper bound that reaches 0 once the
turn is the next to start.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from mesh import turnlog
from mesh.log import AGENTS_GROUP, TURN_REQUESTS, EventLog, LogError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Pending:
    """The unfinished requests of one partition: from ``committed`` on, with their tenants."""

    committed: int
    end: int
    tenants: tuple[tuple[int, str], ...]  # (offset, tenant) in log order
    keys: tuple[str, ...] = ()  # the API key of each request in ``tenants``, "" when unknown

    @property
    def depth(self) -> int:
        return self.end - self.committed

    def count(self, tenant: str) -> int:
        """The tenant's unfinished requests among those read."""
        return sum(1 for _, t in self.tenants if t == tenant)

    def count_key(self, key_id: str) -> int:
        """The API key's unfinished requests among those read."""
        return self.keys.count(key_id)


def fair_position(pending: Pending, request_offset: int, tenant: str) -> int:
    """Turns that start before the one at ``request_offset`` under round-robin over tenants."""
    ahead = Counter(t for offset, t in pending.tenants if offset < request_offset)
    own = ahead.pop(tenant, 0)
    return own + sum(min(count, own + 1) for count in ahead.values())


class QueueTracker:
    """Each partition's pending requests, read at most once per ``poll_s``.

    Every waiting stream asks for its position periodically and every start asks for the depth;
    one read per partition and period serves them all.
    """

    def __init__(
        self,
        log: EventLog,
        *,
        poll_s: float,
        scan_limit: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._poll_s = poll_s
        self._scan_limit = scan_limit
        self._clock = clock
        self._cache: dict[int, tuple[float, Pending]] = {}
        self._inflight: dict[int, asyncio.Future[Pending]] = {}

    async def pending(self, partition: int) -> Pending:
        cached = self._cache.get(partition)
        if cached is not None and self._clock() - cached[0] < self._poll_s:
            return cached[1]
        value = await _single_flight(self._inflight, partition, lambda: self._read(partition))
        self._cache[partition] = (self._clock(), value)
        return value

    def note_appended(self, partition: int, offset: int, tenant: str, key_id: str = "") -> None:
        """Count a request this gateway just appended in the cached read of its partition, so
        the checks until the next read see it (a read taken before the append does not)."""
        cached = self._cache.get(partition)
        if cached is None or offset < cached[1].end:
            return
        at, pending = cached
        self._cache[partition] = (
            at,
            Pending(
                pending.committed,
                offset + 1,
                (*pending.tenants, (offset, tenant)),
                (*pending.keys, key_id),
            ),
        )

    async def _read(self, partition: int) -> Pending:
        committed, end = await asyncio.gather(
            self._log.committed(TURN_REQUESTS, AGENTS_GROUP, partition),
            self._log.end_offset(TURN_REQUESTS, partition),
        )
        # Past the scan limit the queue is refused anyway; positions count what was read.
        stop = min(end, committed + self._scan_limit)
        records = await self._log.read_range(TURN_REQUESTS, partition, committed, stop)
        owners = [(r.offset, *_owner(r.value)) for r in records]
        tenants = tuple((offset, tenant) for offset, tenant, _ in owners)
        return Pending(committed, end, tenants, tuple(key for _, _, key in owners))

    async def position(self, partition: int, request_offset: int, tenant: str) -> int:
        try:
            pending = await self.pending(partition)
        except LogError:
            # A position is advisory; a log hiccup must not fail the stream.
            return -1
        return fair_position(pending, request_offset, tenant)


def _owner(value: bytes) -> tuple[str, str]:
    """The request's tenant and API key id."""
    try:
        request = turnlog.decode_request(value)
    except turnlog.UndecodableRecord:
        return "", ""  # agents skip it at once; it still counts as one turn of nobody's
    return request.tenant_id, request.key_id


async def _single_flight(
    inflight: dict[int, asyncio.Future[T]], key: int, read: Callable[[], Awaitable[T]]
) -> T:
    """One ``read`` per key at a time; callers arriving meanwhile share its result."""
    running = inflight.get(key)
    if running is not None:
        return await asyncio.shield(running)
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    inflight[key] = future
    try:
        value = await read()
    except BaseException as error:
        future.set_exception(error if isinstance(error, Exception) else LogError("cancelled"))
        future.exception()  # retrieved: waiters re-raise it, nobody else must
        raise
    finally:
        del inflight[key]
    future.set_result(value)
    return value

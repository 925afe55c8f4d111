"""Queue positions of waiting turns, read from the agents' committed offsets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from mesh.log import TURN_REQUESTS, EventLog, LogError


class QueueTracker:
    """Queue positions: ``request offset - committed offset of group agents``, per partition.

    Every waiting stream asks for its position periodically; the committed offset of a partition
    is read once per ``poll_s`` however many streams wait on it.
    """

    def __init__(
        self, log: EventLog, *, poll_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = log
        self._poll_s = poll_s
        self._clock = clock
        self._cache: dict[int, tuple[float, int]] = {}
        self._inflight: dict[int, asyncio.Future[int]] = {}

    async def committed(self, partition: int) -> int:
        cached = self._cache.get(partition)
        if cached is not None and self._clock() - cached[0] < self._poll_s:
            return cached[1]
        inflight = self._inflight.get(partition)
        if inflight is not None:
            return await asyncio.shield(inflight)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._inflight[partition] = future
        try:
            value = await self._log.committed(TURN_REQUESTS, "agents", partition)
        except BaseException as error:
            future.set_exception(error if isinstance(error, Exception) else LogError("cancelled"))
            future.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._inflight[partition]
        self._cache[partition] = (self._clock(), value)
        future.set_result(value)
        return value

    async def position(self, partition: int, request_offset: int) -> int:
        try:
            committed = await self.committed(partition)
        except LogError:
            # A position is advisory; a log hiccup must not fail the stream.
            return -1
        return max(0, request_offset - committed)

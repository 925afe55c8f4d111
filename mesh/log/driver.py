"""What both log drivers are built from, so the embedded one and Kafka behave alike by sharing it.

Each piece has one job: the appends still in flight (``flush``), the cache of partition counts
(which never change once a topic exists), the set of open group members a stopping log closes,
what the two ``EventLog`` classes keep alike (``LogDriver``), what a group member is and does
alike in both drivers (``GroupMember``), and handing a result from a driver's thread to the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, Self, TypeVar

from mesh.lifecycle import AsyncStartStop
from mesh.log.base import LogError, Record, await_appends


class Inflight:
    """Append futures not yet resolved; ``flush`` waits for them all."""

    def __init__(self) -> None:
        self._futures: set[asyncio.Future[int]] = set()

    def add(self, future: asyncio.Future[int]) -> None:
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)

    async def flush(self) -> None:
        await await_appends(list(self._futures))

    def fail(self, error: LogError) -> None:
        """Fail every append still waiting (the log stopped before they were acknowledged)."""
        for future in list(self._futures):
            if not future.done():
                future.set_exception(error)


class PartitionCounts:
    """Partition counts per topic, asked of the storage once: they never change once created."""

    def __init__(self, lookup: Callable[[str], Awaitable[int | None]]) -> None:
        # ``lookup`` answers None for a topic that does not exist (yet).
        self._lookup = lookup
        self._counts: dict[str, int] = {}

    def remember(self, topic: str, count: int) -> None:
        self._counts[topic] = count

    async def get(self, topic: str) -> int:
        count = self._counts.get(topic)
        if count is None:
            count = await self._lookup(topic)
            if count is None:
                raise LogError(f"topic {topic!r} does not exist")
            self._counts[topic] = count
        return count

    async def check(self, topic: str, partition: int) -> None:
        """LogError unless ``partition`` exists in ``topic``."""
        count = await self.get(topic)
        if not 0 <= partition < count:
            raise LogError(f"topic {topic!r} has {count} partitions, not partition {partition}")


class _Closable(Protocol):
    async def close(self) -> None: ...


_C = TypeVar("_C", bound=_Closable)


class Members(Generic[_C]):
    """The group members a log opened and has not seen close; stopping the log closes them."""

    def __init__(self) -> None:
        self._members: set[_C] = set()

    def add(self, member: _C) -> _C:
        self._members.add(member)
        return member

    def discard(self, member: _C) -> None:
        self._members.discard(member)

    def __iter__(self) -> Iterator[_C]:
        return iter(list(self._members))

    async def close_all(self) -> None:
        for member in list(self._members):
            await member.close()


def call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """``loop.call_soon_threadsafe`` from a driver's thread, ignoring a loop already closed."""
    with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
        loop.call_soon_threadsafe(callback, *args)


@dataclass(frozen=True, slots=True)
class Membership:
    """Who a group member is, and how fast its group gives up on it once it goes quiet."""

    topic: str
    group: str
    member_id: str
    session_timeout_s: float
    heartbeat_interval_s: float


class LogDriver(AsyncStartStop, Generic[_C]):
    """What both drivers' ``EventLog`` keep alike: ``async with``, group timing, open members."""

    def __init__(self, *, session_timeout_s: float, heartbeat_interval_s: float) -> None:
        self.session_timeout_s = session_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        # Stopping the log closes its members first.
        self._consumers: Members[_C] = Members()

    def _membership(self, topic: str, group: str, member_id: str) -> Membership:
        return Membership(
            topic, group, member_id, self.session_timeout_s, self.heartbeat_interval_s
        )


class GroupMember:
    """What the group members of both drivers do alike: who they are, iterating once, closing."""

    def __init__(self, membership: Membership, on_close: Callable[[Self], None]) -> None:
        self._topic = membership.topic
        self._group = membership.group
        self._member_id = membership.member_id
        self._session_timeout_s = membership.session_timeout_s
        self._heartbeat_interval_s = membership.heartbeat_interval_s
        # Tells the log that opened this member to forget it.
        self._on_close = on_close
        self._iterating = False
        self._closed = False

    def _begin_iteration(self) -> bool:
        """Mark the records taken; False if the member closed first, LogError the second time."""
        if self._iterating:
            raise LogError("a group consumer can be iterated only once")
        self._iterating = True
        return not self._closed

    def _begin_close(self: Self) -> bool:
        """Mark the member closed and have its log forget it; False if it was closed already."""
        if self._closed:
            return False
        self._closed = True
        self._on_close(self)
        return True

    def _log_owned(self, log: logging.Logger, owned: Iterable[int]) -> None:
        log.info(
            "member %s of %s/%s now owns %s",
            self._member_id,
            self._group,
            self._topic,
            sorted(owned),
        )

    def _log_commit_dropped(self, log: logging.Logger, record: Record) -> None:
        # Like Kafka refusing a commit from a stale generation: the partition's new owner will
        # see the record again, and consumers are idempotent.
        log.warning(
            "member %s no longer owns %s/%d; commit of offset %d dropped",
            self._member_id,
            self._topic,
            record.partition,
            record.offset,
        )

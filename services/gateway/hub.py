"""One shared tail per turn-event partition, fanned out to per-turn subscribers.

Every stream on this gateway watches one turn. Rather than one log reader per stream, the hub
runs one tail per partition (started at the partitions' end offsets when the gateway starts) and
hands each record to the subscribers of its turn.

Subscribers have bounded buffers. One that falls ``capacity`` events behind (a slow client, a
Chat stream out of credit) is not buffered further: it is marked lagging and, once its consumer
has drained what it holds, reads the missed records back from the log with ``read_range`` until
it reaches the tail again. A slow stream therefore costs log reads, never unbounded memory, and
never slows the tail that every other stream depends on.

The same catch-up path replays history: a resume subscribes at the turn's ``events_start``
(behind the tail), so it starts lagging and reads its past from the log before going live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Container

from mesh import turnlog
from mesh.lifecycle import AsyncStartStop
from mesh.log import TURN_EVENTS, EventLog, Record
from mesh.retry import Backoff

_log = logging.getLogger(__name__)

# Records read per catch-up call; a partition holds many conversations' events interleaved.
CATCH_UP_CHUNK = 1000
# Ended turns a hub remembers, most recent first.
ENDED_MEMORY = 10_000


def _decode(record: Record, wanted: Container[str]) -> list[turnlog.TurnEvent]:
    """The record's events if they belong to a wanted turn; none for others and for garbage."""
    try:
        return turnlog.decode_events(record.value, turns=wanted)
    except turnlog.UndecodableRecord:
        _log.warning("undecodable turn event at offset %d skipped", record.offset)
        return []


class Subscription:
    """One consumer's view of one turn's events, in log order, each record at most once.

    Only the consumer that created it calls ``take``; the hub calls ``_push`` from its tail.
    """

    __slots__ = (
        "turn_id",
        "partition",
        "next_offset",
        "overflows",
        "notify",
        "_hub",
        "_buffer",
        "_capacity",
        "_lagging",
        "_closed",
        "_wanted",
    )

    def __init__(
        self,
        hub: TurnHub,
        turn_id: str,
        partition: int,
        from_offset: int,
        capacity: int,
        notify: asyncio.Event,
    ) -> None:
        self.turn_id = turn_id
        self.partition = partition
        # Offset of the first record this subscription has not handed out yet.
        self.next_offset = from_offset
        self.overflows = 0
        self.notify = notify
        self._hub = hub
        # (offset, event): the offset is where a later catch-up read resumes.
        self._buffer: deque[tuple[int, turnlog.TurnEvent]] = deque()
        self._capacity = capacity
        self._lagging = from_offset < hub.position(partition)
        self._closed = False
        self._wanted = frozenset((turn_id,))

    def note_ended(self) -> None:
        """The stream saw its turn finish: tell the hub (``TurnHub.has_ended``)."""
        self._hub.note_ended(self.turn_id)

    @property
    def lagging(self) -> bool:
        return self._lagging

    @property
    def closed(self) -> bool:
        return self._closed

    def ready(self) -> bool:
        """Whether ``take`` has something to do right now."""
        return not self._closed and (bool(self._buffer) or self._lagging)

    def _push(self, offset: int, event: turnlog.TurnEvent) -> None:
        # Records below next_offset were handed out already (by a catch-up read); records that
        # arrive while lagging will be read back from the log instead.
        if self._lagging or offset < self.next_offset:
            return
        if len(self._buffer) >= self._capacity:
            self._lagging = True
            self.overflows += 1
        else:
            self._buffer.append((offset, event))
        self.notify.set()

    async def take(self, limit: int = 1024) -> list[turnlog.TurnEvent]:
        """Up to ``limit`` events in log order; empty when nothing is ready (wait on ``notify``)."""
        buffer = self._buffer
        if buffer:
            count = min(limit, len(buffer))
            taken = [buffer.popleft() for _ in range(count)]
            self.next_offset = taken[-1][0] + 1
            return [event for _, event in taken]
        if self._lagging and not self._closed:
            return await self._catch_up(limit)
        return []

    async def _catch_up(self, limit: int) -> list[turnlog.TurnEvent]:
        hub, out = self._hub, []
        while self._lagging and not self._closed:
            end = hub.position(self.partition)
            if self.next_offset >= end:
                # No await between reading the tail's position and clearing the flag: every
                # record below ``end`` was read here, every one from ``end`` on reaches _push.
                self._lagging = False
                break
            stop = min(end, self.next_offset + CATCH_UP_CHUNK)
            records = await hub.log.read_range(TURN_EVENTS, self.partition, self.next_offset, stop)
            for record in records:
                out += _decode(record, self._wanted)
            self.next_offset = stop
            if len(out) >= limit:
                break
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._buffer.clear()
            self._hub._unsubscribe(self)
            # Wakes a consumer blocked on notify so it sees the subscription is gone.
            self.notify.set()


class TurnHub(AsyncStartStop):
    """Shared tails of the turn-event partitions. Use ``async with`` or ``start``/``stop``."""

    def __init__(self, log: EventLog, *, partitions: int, capacity: int = 2048) -> None:
        if partitions < 1 or capacity < 1:
            raise ValueError("partitions and capacity must be >= 1")
        self.log = log
        self.partitions = partitions
        self.capacity = capacity
        self._positions = [0] * partitions
        self._subs: list[dict[str, list[Subscription]]] = [{} for _ in range(partitions)]
        self._tasks: list[asyncio.Task[None]] = []
        # Watched turns whose TurnCancelled the tails dispatched, or whose TurnFinished a stream
        # took: a cancel of one of them has nothing left to do (``GatewayCore.cancel``).
        self._ended: OrderedDict[str, None] = OrderedDict()

    async def start(self) -> None:
        if self._tasks:
            return
        for partition in range(self.partitions):
            self._positions[partition] = await self.log.end_offset(TURN_EVENTS, partition)
        self._tasks = [
            asyncio.create_task(self._tail(partition), name=f"gateway-hub-tail-{partition}")
            for partition in range(self.partitions)
        ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            # Cancel until done: on Python 3.11 a wait_for deep in a driver can swallow one
            # cancellation when its inner future completes at the same moment.
            while not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=0.5)
            if not task.cancelled() and task.exception() is not None:
                _log.warning("tail task ended with %r", task.exception())
        for subs in self._subs:
            for group in list(subs.values()):
                for sub in list(group):
                    sub.close()

    def position(self, partition: int) -> int:
        """Offset of the next record the partition's tail will dispatch."""
        return self._positions[partition]

    def note_ended(self, turn_id: str) -> None:
        """Remember that the turn finished or was cancelled (the most recent ENDED_MEMORY)."""
        ended = self._ended
        ended[turn_id] = None
        ended.move_to_end(turn_id)
        while len(ended) > ENDED_MEMORY:
            ended.popitem(last=False)

    def has_ended(self, turn_id: str) -> bool:
        """Whether this hub saw the turn finish or be cancelled (recently; False is "unknown")."""
        return turn_id in self._ended

    def subscriber_count(self) -> int:
        return sum(len(group) for subs in self._subs for group in subs.values())

    def subscribe(
        self,
        turn_id: str,
        partition: int,
        from_offset: int,
        notify: asyncio.Event | None = None,
    ) -> Subscription:
        """Watch ``turn_id``'s events from ``from_offset`` on (behind the tail: replayed first)."""
        if not 0 <= partition < self.partitions:
            raise ValueError(f"partition {partition} out of range")
        sub = Subscription(
            self, turn_id, partition, from_offset, self.capacity, notify or asyncio.Event()
        )
        self._subs[partition].setdefault(turn_id, []).append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs[sub.partition]
        group = subs.get(sub.turn_id)
        if group is None:
            return
        with contextlib.suppress(ValueError):
            group.remove(sub)
        if not group:
            del subs[sub.turn_id]

    async def _tail(self, partition: int) -> None:
        subs = self._subs[partition]
        positions = self._positions
        backoff = Backoff(0.1, max_s=5.0)
        while True:
            try:
                async for record in self.log.read(TURN_EVENTS, partition, positions[partition]):
                    if subs:
                        for event in _decode(record, subs):
                            # A TurnFinished may be a zombie's: its stream, which applies the
                            # fencing rule, reports the end (``Subscription.note_ended``).
                            if isinstance(event, turnlog.TurnCancelled):
                                self.note_ended(event.turn_id)
                            for sub in subs.get(event.turn_id, ()):
                                sub._push(record.offset, event)
                    # Advanced after the pushes: catch-up relies on "position moved" meaning
                    # "a record was dispatched that I may have missed".
                    positions[partition] = record.offset + 1
                    backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception(
                    "tail of %s/%d failed at offset %d; retrying in %.1fs",
                    TURN_EVENTS,
                    partition,
                    positions[partition],
                    backoff.delay,
                )
                await backoff.wait()

"""The log interface: partitioned, append-only topics with consumer groups.

Every driver (embedded SQLite, Kafka) implements ``EventLog`` with the same semantics, checked by
one conformance suite (tests/conformance/test_log.py):

- A topic has a fixed number of partitions; offsets in a partition start at 0 and grow by 1.
- ``append`` never blocks on the broker: it returns a future that resolves to the record's
  offset once the record is durable. Callers that need durability (a turn request before it is
  acknowledged, the end of a turn) await it or ``flush()``; token appends are not awaited one by
  one.
- Records in one partition are read in offset order by ``read`` (a tail that waits for new
  records) and by group consumers.
- A consumer group spreads a topic's partitions over its live members. A member sees records of
  its partitions from the group's committed offset; records it did not commit are redelivered to
  whichever member owns the partition next (after a crash, for example).
- The caller picks the partition (``partition_for``), so every driver places a key identically
  and the gateway can know where a turn's events will land before they exist.
- Fencing: a group member's hold on a partition is a ``Claim`` with an epoch that grows each
  time the partition changes hands. An append may carry a claim (``fence``); it is refused with
  ``Fenced`` once the claim is stale, so a member that lost its partition (a zombie back from a
  pause, a member the group rebalanced away from) cannot write for it any more. The embedded
  driver checks the claim in the append's own transaction; see docs/reliability.md for Kafka.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, Self

# Topic names. Requests are keyed by conversation id; turn events by conversation id as well, so a
# turn's events share one partition and keep their order.
TURN_REQUESTS = "chat.turn-requests.v1"
TURN_EVENTS = "chat.turn-events.v1"
# Consumer groups: the agents on the requests; the persister on both topics.
AGENTS_GROUP = "agents"
PERSISTER_GROUP = "persister"


# Record headers: (name, value) pairs, in order. Values are text: every header we write is.
Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Record:
    """One record read from a log."""

    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    timestamp_ms: int
    # Metadata beside the payload, e.g. the W3C trace context of whoever appended the record
    # (``traceparent``). Kafka keeps them as record headers, the embedded log in a column.
    headers: Headers = ()


@dataclass(frozen=True, slots=True)
class Claim:
    """A group member's hold on one partition, as ``GroupConsumer.claim`` hands it out.

    ``epoch`` grows every time the partition changes hands (and when a member comes back from a
    pause longer than its session), so an older claim on the same partition is stale.
    """

    topic: str
    group: str
    partition: int
    member_id: str
    epoch: int


def partition_for(key: bytes, partitions: int) -> int:
    """Stable partition of ``key``; identical across drivers, processes and restarts."""
    if partitions <= 0:
        raise ValueError("partitions must be positive")
    return zlib.crc32(key) % partitions


class GroupConsumer(Protocol):
    """A member of a consumer group. Iterate to receive records; commit what you finished."""

    def __aiter__(self) -> AsyncIterator[Record]: ...

    async def commit(self, record: Record) -> None:
        """Mark ``record`` and everything before it in its partition as done for the group."""
        ...

    def assignment(self) -> frozenset[int]:
        """Partitions this member owns right now."""
        ...

    def claim(self, partition: int) -> Claim | None:
        """This member's current claim on ``partition`` (None unless it owns it): pass it as
        ``fence`` to appends that only its owner may make."""
        ...

    async def close(self) -> None:
        """Leave the group; its partitions move to the remaining members."""
        ...


class EventLog(Protocol):
    """A partitioned durable log. Use ``async with`` or ``start``/``stop``."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def ensure_topic(self, topic: str, partitions: int) -> None:
        """Create ``topic`` with ``partitions`` partitions if it does not exist yet."""
        ...

    async def partition_count(self, topic: str) -> int:
        """Number of partitions of an existing topic."""
        ...

    def append(
        self,
        topic: str,
        partition: int,
        key: bytes,
        value: bytes,
        headers: Headers = (),
        *,
        fence: Claim | None = None,
    ) -> asyncio.Future[int]:
        """Queue a record; the future resolves to its offset once it is durable.

        With ``fence``, the record is written only while that claim is current; otherwise the
        future fails with ``Fenced`` and nothing is written.
        """
        ...

    async def check_writable(self, topic: str) -> None:
        """Return if an append to ``topic`` could be made durable now; LogError otherwise.

        A readiness probe: it writes no record.
        """
        ...

    async def live_partitions(self, topic: str, group: str) -> frozenset[int]:
        """Partitions of ``topic`` that a live member of ``group`` owns now."""
        ...

    async def flush(self) -> None:
        """Wait until every record appended so far is durable (or raise)."""
        ...

    async def end_offset(self, topic: str, partition: int) -> int:
        """Offset the next record appended to the partition will get."""
        ...

    def read(self, topic: str, partition: int, start_offset: int) -> AsyncIterator[Record]:
        """Records of one partition from ``start_offset`` on, waiting for new ones forever."""
        ...

    async def read_range(
        self, topic: str, partition: int, start_offset: int, end_offset: int
    ) -> list[Record]:
        """Records with ``start_offset <= offset < end_offset`` (already written ones only)."""
        ...

    def consumer(self, topic: str, group: str, member_id: str) -> GroupConsumer:
        """Join ``group`` on ``topic`` as ``member_id`` (unique per process)."""
        ...

    async def committed(self, topic: str, group: str, partition: int) -> int:
        """The group's committed offset for a partition (0 when nothing was committed)."""
        ...


class LogError(RuntimeError):
    """The log failed (broker unreachable, disk error); callers treat it as UNAVAILABLE."""


class Fenced(LogError):
    """An append carried a claim that is no longer current: another member owns the partition."""


async def await_appends(pending: list[asyncio.Future[int]]) -> None:
    """Wait for appends in flight (a driver's ``flush``); LogError if any of them failed."""
    if not pending:
        return
    # asyncio.wait, not gather: cancelling a flush must not cancel the appends themselves.
    await asyncio.wait(pending)
    for future in pending:
        if not future.cancelled() and future.exception() is not None:
            error = future.exception()
            if isinstance(error, Fenced):
                raise Fenced(str(error))
            raise LogError(f"append failed: {error}")

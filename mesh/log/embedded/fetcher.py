"""Reading the embedded log: the tail that waits for new records, ranges and end offsets.

A tail reads what is there, then sleeps on its partition's change counter until the producer of
this process or the poller (for other processes' commits) reports that the partition grew.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import AsyncIterator

from mesh.log.base import LogError, Record
from mesh.log.embedded.store import Store, decode_headers

READ_BATCH = 500


def fetch(
    topic: str, partition: int, start: int, end: int | None, limit: int, conn: sqlite3.Connection
) -> list[Record]:
    if end is None:
        rows = conn.execute(
            "SELECT pos, key, value, ts_ms, headers FROM records"
            " WHERE topic = ? AND part = ? AND pos >= ? ORDER BY pos LIMIT ?",
            (topic, partition, start, limit),
        ).fetchall()
    else:
        rows = conn.execute(
            "SELECT pos, key, value, ts_ms, headers FROM records"
            " WHERE topic = ? AND part = ? AND pos >= ? AND pos < ? ORDER BY pos LIMIT ?",
            (topic, partition, start, end, limit),
        ).fetchall()
    return [
        Record(topic, partition, pos, bytes(k), bytes(v), ts, decode_headers(h))
        for pos, k, v, ts, h in rows
    ]


def fetch_many(
    topic: str, positions: dict[int, int], conn: sqlite3.Connection
) -> list[list[Record]]:
    return [fetch(topic, p, pos, None, READ_BATCH, conn) for p, pos in positions.items()]


class Fetcher:
    """``read``, ``read_range`` and ``end_offset`` of an ``EmbeddedLog``."""

    def __init__(self, store: Store) -> None:
        self._store = store
        # Set when the log starts stopping: open tails end with LogError at their next look.
        self.stopping = False

    async def end_offset(self, topic: str, partition: int) -> int:
        await self._store.partitions.check(topic, partition)
        reader = self._store.require().reader
        row = await reader.call(
            lambda conn: conn.execute(
                "SELECT next_pos FROM heads WHERE topic = ? AND part = ?", (topic, partition)
            ).fetchone()
        )
        return 0 if row is None else int(row[0])

    async def read(self, topic: str, partition: int, start_offset: int) -> AsyncIterator[Record]:
        await self._store.partitions.check(topic, partition)
        running = self._store.require()
        key = (topic, partition)
        position = start_offset
        while True:
            if self.stopping:
                raise LogError("embedded log stopped while a tail was open")
            seen = running.changes.versions([key])
            records = await running.reader.call(
                functools.partial(fetch, topic, partition, position, None, READ_BATCH)
            )
            for record in records:
                position = record.offset + 1
                yield record
            if not records:
                # The timeout only matters if a wake-up was lost; tails are woken by commits.
                await running.changes.wait(seen, within_s=1.0)

    async def read_range(
        self, topic: str, partition: int, start_offset: int, end_offset: int
    ) -> list[Record]:
        await self._store.partitions.check(topic, partition)
        reader = self._store.require().reader
        if end_offset <= start_offset:
            return []
        return await reader.call(
            lambda conn: fetch(
                topic, partition, start_offset, end_offset, end_offset - start_offset, conn
            )
        )

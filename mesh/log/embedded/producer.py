"""``append`` for the embedded log: queued records go to the file in one transaction per batch.

Offsets are handed out inside ``BEGIN IMMEDIATE``, which takes the database's write lock first,
so two processes never give out the same offset and a partition never has gaps. An append's
future resolves once its transaction committed (durable across a crash of any process).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
from dataclasses import dataclass, field

from mesh.log.base import Claim, Fenced, Headers, LogError
from mesh.log.driver import Inflight
from mesh.log.embedded.changes import Key
from mesh.log.embedded.store import Store, Tx, encode_headers, now_ms


@dataclass(slots=True)
class _Append:
    topic: str
    partition: int
    key: bytes
    value: bytes
    timestamp_ms: int
    headers: Headers
    future: asyncio.Future[int] = field(repr=False)
    fence: Claim | None = None


def _current(fence: Claim, conn: sqlite3.Connection) -> bool:
    row = conn.execute(
        "SELECT member_id, epoch FROM claims WHERE grp = ? AND topic = ? AND part = ?",
        (fence.group, fence.topic, fence.partition),
    ).fetchone()
    return row is not None and (str(row[0]), int(row[1])) == (fence.member_id, fence.epoch)


def _write_batch(batch: list[_Append], conn: sqlite3.Connection) -> list[int | LogError]:
    """Append a batch in one transaction; per-record errors for unknown partitions and for
    records whose fence is stale (checked in the same transaction, so no other member can take
    the partition between the check and the write)."""
    results: list[int | LogError] = []
    with Tx(conn):
        fences: dict[Claim, bool] = {}
        for item in batch:
            if item.fence is not None and item.fence not in fences:
                fences[item.fence] = _current(item.fence, conn)
        heads: dict[Key, int | None] = {}
        for item in batch:
            key = (item.topic, item.partition)
            if key not in heads:
                row = conn.execute(
                    "SELECT next_pos FROM heads WHERE topic = ? AND part = ?", key
                ).fetchone()
                heads[key] = None if row is None else int(row[0])
        rows: list[tuple[str, int, int, bytes, bytes, int, str | None]] = []
        for item in batch:
            key = (item.topic, item.partition)
            head = heads[key]
            if head is None:
                results.append(LogError(f"topic {item.topic!r} has no partition {item.partition}"))
                continue
            if item.fence is not None and not fences[item.fence]:
                results.append(_fenced(item.fence))
                continue
            rows.append(
                (
                    item.topic,
                    item.partition,
                    head,
                    item.key,
                    item.value,
                    item.timestamp_ms,
                    encode_headers(item.headers),
                )
            )
            results.append(head)
            heads[key] = head + 1
        conn.executemany(
            "INSERT INTO records (topic, part, pos, key, value, ts_ms, headers)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.executemany(
            "UPDATE heads SET next_pos = ? WHERE topic = ? AND part = ?",
            [(head, topic, part) for (topic, part), head in heads.items() if head is not None],
        )
    return results


def _fenced(fence: Claim) -> Fenced:
    return Fenced(
        f"member {fence.member_id} no longer holds {fence.group}/{fence.topic}/{fence.partition}"
        f" at epoch {fence.epoch}"
    )


class Producer:
    """Queues appends and writes them from one task, so a commit carries whatever piled up."""

    def __init__(self, store: Store, *, max_batch: int) -> None:
        self._store = store
        self._max_batch = max_batch
        self._pending: list[_Append] = []
        self._inflight = Inflight()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._write_loop(), name="mesh-log-writer")

    async def stop(self) -> None:
        """Stop writing; appends not written yet fail (``flush`` first to keep them)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(LogError("embedded log stopped"))
        self._pending.clear()
        self._task = None

    def append(
        self,
        topic: str,
        partition: int,
        key: bytes,
        value: bytes,
        headers: Headers = (),
        fence: Claim | None = None,
    ) -> asyncio.Future[int]:
        self._store.require()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append(
            _Append(topic, partition, key, value, now_ms(), headers, future, fence)
        )
        self._inflight.add(future)
        self._wake.set()
        return future

    async def flush(self) -> None:
        await self._inflight.flush()

    async def _write_loop(self) -> None:
        running = self._store.require()
        while True:
            await self._wake.wait()
            self._wake.clear()
            # Appends made while a batch commits pile up and go in the next transaction: under
            # load, one commit carries many tokens.
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    results: list[int | LogError] = await running.writer.call(
                        functools.partial(_write_batch, batch)
                    )
                except LogError as error:
                    results = [error] * len(batch)
                for item, result in zip(batch, results, strict=True):
                    if item.future.done():
                        continue
                    if isinstance(result, LogError):
                        item.future.set_exception(result)
                    else:
                        item.future.set_result(result)
                running.changes.wake({(item.topic, item.partition) for item in batch})

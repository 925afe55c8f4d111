"""``EmbeddedLog``: starts the embedded driver's parts, wires them together and stops them.

The parts: ``store`` (the SQLite file and its threads), ``producer``, ``fetcher``, ``group``
and the ``poller`` thread; see the package's docstring for the threads and the durability.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from mesh.log.base import Claim, Headers, LogError, Record
from mesh.log.driver import LogDriver, call_soon
from mesh.log.embedded.changes import Changes, Key
from mesh.log.embedded.fetcher import Fetcher
from mesh.log.embedded.group import EmbeddedConsumer, committed, live_member_count
from mesh.log.embedded.poller import Poller
from mesh.log.embedded.producer import Producer
from mesh.log.embedded.retention import Pruned, prune
from mesh.log.embedded.store import (
    DbThread,
    Running,
    Store,
    Tx,
    create_schema,
    now_ms,
    partition_row,
)


class EmbeddedLog(LogDriver[EmbeddedConsumer]):
    """``EventLog`` on one SQLite file; several processes may open the same file at once."""

    def __init__(
        self,
        path: Path,
        *,
        poll_interval_s: float = 0.002,
        session_timeout_s: float = 3.0,
        heartbeat_interval_s: float = 0.5,
        busy_timeout_s: float = 30.0,
        max_batch: int = 2000,
        watch_writes: bool = True,
    ) -> None:
        if heartbeat_interval_s >= session_timeout_s:
            raise ValueError("heartbeat_interval_s must be shorter than session_timeout_s")
        super().__init__(
            session_timeout_s=session_timeout_s, heartbeat_interval_s=heartbeat_interval_s
        )
        self.path = path
        self.poll_interval_s = poll_interval_s
        # Check for other processes' commits when inotify reports a write (else poll).
        self.watch_writes = watch_writes
        self._store = Store(path, busy_timeout_s)
        self._producer = Producer(self._store, max_batch=max_batch)
        self._fetcher = Fetcher(self._store)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: Poller | None = None
        self._threads: tuple[DbThread, ...] = ()
        self._retention: DbThread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._fetcher.stopping = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        busy_timeout_s = self._store.busy_timeout_s
        writer = DbThread(self.path, "mesh-log-write", busy_timeout_s)
        reader = DbThread(self.path, "mesh-log-read", busy_timeout_s)
        self._threads = (writer, reader)
        await writer.call(create_schema)
        self._poller = await asyncio.to_thread(
            functools.partial(
                Poller,
                self.path,
                self.poll_interval_s,
                busy_timeout_s,
                self._report_grown,
                use_inotify=self.watch_writes,
            )
        )
        # From here on the parts may run: Store.require() answers.
        self._store.running = Running(writer, reader, Changes(self._set_polling))
        self._poller.start()
        self._producer.start()

    async def stop(self) -> None:
        if self._loop is None:
            return
        self._fetcher.stopping = True
        await self._consumers.close_all()
        with contextlib.suppress(LogError):
            await self.flush()
        await self._producer.stop()
        if self._store.running is not None:
            self._store.running.changes.wake_all()  # tails notice the fetcher stopping and raise
        if self._poller is not None:
            self._poller.stop()
            await asyncio.to_thread(self._poller.join, 5.0)
        for thread in self._threads:
            await thread.close()
        if self._retention is not None:
            await self._retention.close()
            self._retention = None
        self._loop = None
        self._store.running = None
        self._poller = None
        self._threads = ()

    # -- plumbing ----------------------------------------------------------------------------

    def _set_polling(self, on: bool) -> None:
        if self._poller is not None:
            if on:
                self._poller.active.set()
            else:
                self._poller.active.clear()

    def _report_grown(self, keys: list[Key]) -> None:
        # Called from the poller thread.
        loop = self._loop
        if loop is None:
            return
        call_soon(loop, self._wake, keys)

    def _wake(self, keys: Iterable[Key]) -> None:
        if self._store.running is not None:
            self._store.running.changes.wake(keys)

    async def enforce_retention(
        self, *, max_age_s: float | None, max_bytes: int | None = None
    ) -> Pruned:
        """Delete records past the age or per-partition size limit that every group has
        committed (``retention.prune``). Runs on a connection of its own: a long checkpoint
        never holds up this process's appends and commits."""
        self._store.require()
        if self._retention is None:
            self._retention = DbThread(self.path, "mesh-log-retention", self._store.busy_timeout_s)
        max_age_ms = None if max_age_s is None else int(max_age_s * 1000)
        return await self._retention.call(
            functools.partial(prune, now_ms=now_ms(), max_age_ms=max_age_ms, max_bytes=max_bytes)
        )

    # -- EventLog ----------------------------------------------------------------------------

    async def ensure_topic(self, topic: str, partitions: int) -> None:
        if partitions <= 0:
            raise ValueError("partitions must be positive")
        writer = self._store.require().writer

        def create(conn: sqlite3.Connection) -> None:
            with Tx(conn):
                if partition_row(topic, conn) is not None:
                    return  # like Kafka: an existing topic keeps its partition count
                conn.execute(
                    "INSERT INTO topics (name, partitions) VALUES (?, ?)", (topic, partitions)
                )
                conn.executemany(
                    "INSERT INTO heads (topic, part, next_pos) VALUES (?, ?, 0)",
                    [(topic, p) for p in range(partitions)],
                )

        await writer.call(create)

    async def partition_count(self, topic: str) -> int:
        return await self._store.partitions.get(topic)

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
        return self._producer.append(topic, partition, key, value, headers, fence)

    async def check_writable(self, topic: str) -> None:
        await self._store.partitions.get(topic)
        writer = self._store.require().writer

        def touch(conn: sqlite3.Connection) -> None:
            # A committed write that changes nothing: it needs the write lock, room in the WAL
            # and a writable file, as an append does.
            with Tx(conn):
                conn.execute("UPDATE topics SET partitions = partitions WHERE name = ?", (topic,))

        await writer.call(touch)

    async def live_partitions(self, topic: str, group: str) -> frozenset[int]:
        count = await self._store.partitions.get(topic)
        reader = self._store.require().reader
        timeout_ms = int(self.session_timeout_s * 1000)
        live = await reader.call(functools.partial(live_member_count, group, topic, timeout_ms))
        # Live members share every partition between them (``group.assign``).
        return frozenset(range(count)) if live else frozenset()

    async def flush(self) -> None:
        await self._producer.flush()

    async def end_offset(self, topic: str, partition: int) -> int:
        return await self._fetcher.end_offset(topic, partition)

    def read(self, topic: str, partition: int, start_offset: int) -> AsyncIterator[Record]:
        return self._fetcher.read(topic, partition, start_offset)

    async def read_range(
        self, topic: str, partition: int, start_offset: int, end_offset: int
    ) -> list[Record]:
        return await self._fetcher.read_range(topic, partition, start_offset, end_offset)

    def consumer(self, topic: str, group: str, member_id: str) -> EmbeddedConsumer:
        self._store.require()
        member = self._membership(topic, group, member_id)
        return self._consumers.add(EmbeddedConsumer(self._store, member, self._consumers.discard))

    async def committed(self, topic: str, group: str, partition: int) -> int:
        await self._store.partitions.check(topic, partition)
        reader = self._store.require().reader
        return await reader.call(functools.partial(committed, group, topic, partition))

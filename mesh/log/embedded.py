"""The embedded log driver: one SQLite file shared by every process of a single-machine mesh.

Why SQLite: it is in the standard library, durable on local disk, and in WAL mode many processes
(gateway, agents, persister) can read while one writes. Offsets are allocated inside ``BEGIN
IMMEDIATE`` transactions, which take the database's write lock first, so two processes can never
hand out the same offset and a partition never has gaps.

Threads: sqlite3 calls block, so they never run on the event loop. Writes (appends, heartbeats,
commits) go through one writer thread with its own connection; reads through one reader thread;
a third thread notices other processes' commits through ``PRAGMA data_version`` (a counter
that changes whenever another connection commits; checking it costs microseconds) and only then
looks at the partitions' next offsets to wake the tails of the partitions that grew. It checks
as soon as inotify reports a write in the log's directory (``mesh.log.fs_watch``), with a slow
re-check in case a report is lost; without inotify it polls every ``poll_interval_s``.

Durability: ``synchronous=NORMAL`` in WAL mode keeps every commit across a crash of any process;
only an OS crash or power loss can drop the last commits before a checkpoint. That is the
trade-off the embedded profile makes for token streams; Kafka with ``acks=all`` is the
replicated option.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self, TypeVar

from mesh.log.base import LogError, Record, await_appends
from mesh.log.fs_watch import DirectoryWatch

_log = logging.getLogger(__name__)

_T = TypeVar("_T")
_Key = tuple[str, int]

# Column names avoid SQL keywords (OFFSET, PARTITION).
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS topics ( name TEXT PRIMARY KEY, partitions INTEGER NOT NULL)",
    # One row per partition: the offset the next record gets. Updated in the same transaction as
    # the records, so it doubles as the cheap "did this partition grow?" probe for tails.
    "CREATE TABLE IF NOT EXISTS heads ("
    " topic TEXT NOT NULL, part INTEGER NOT NULL, next_pos INTEGER NOT NULL,"
    " PRIMARY KEY (topic, part)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS records ("
    " topic TEXT NOT NULL, part INTEGER NOT NULL, pos INTEGER NOT NULL,"
    " key BLOB NOT NULL, value BLOB NOT NULL, ts_ms INTEGER NOT NULL,"
    " PRIMARY KEY (topic, part, pos)) WITHOUT ROWID",
    # Group members are leases: a member is live while its heartbeat is younger than the session
    # timeout, so a process that dies without closing loses its partitions on its own.
    "CREATE TABLE IF NOT EXISTS members ("
    " grp TEXT NOT NULL, topic TEXT NOT NULL, member_id TEXT NOT NULL,"
    " heartbeat_ms INTEGER NOT NULL, PRIMARY KEY (grp, topic, member_id)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS offsets ("
    " grp TEXT NOT NULL, topic TEXT NOT NULL, part INTEGER NOT NULL, committed INTEGER NOT NULL,"
    " PRIMARY KEY (grp, topic, part)) WITHOUT ROWID",
)

_READ_BATCH = 500
# With inotify, commits are checked when reported and also this often, to catch a lost report.
_WATCH_RECHECK_S = 0.1


def _now_ms() -> int:
    # Wall clock, not monotonic: heartbeats are compared across processes.
    return int(time.time() * 1000)


def _connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
    conn = sqlite3.connect(
        str(path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
    )
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class _Tx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on error."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self._conn.execute("COMMIT")
        else:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")


class _DbThread:
    """One thread owning one connection; callables run there in submission order."""

    def __init__(self, path: Path, name: str, busy_timeout_s: float) -> None:
        self._path = path
        self._busy_timeout_s = busy_timeout_s
        self._conn: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def _invoke(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._conn is None:
            self._conn = _connect(self._path, self._busy_timeout_s)
        return fn(self._conn)

    async def call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._invoke, fn)
        except sqlite3.Error as error:
            raise LogError(f"embedded log {self._path}: {error}") from error
        except RuntimeError as error:  # the executor was shut down by stop()
            raise LogError(f"embedded log {self._path} is stopped") from error

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close)
        self._executor.shutdown(wait=False)


class _Changes:
    """Per-partition change counters that tasks wait on (loop thread only)."""

    def __init__(self, on_waiting: Callable[[bool], None]) -> None:
        self._versions: dict[_Key, int] = {}
        self._waiters: dict[_Key, set[asyncio.Future[None]]] = {}
        self._waiting = 0
        self._on_waiting = on_waiting

    def versions(self, keys: Iterable[_Key]) -> dict[_Key, int]:
        return {key: self._versions.get(key, 0) for key in keys}

    def wake_all(self) -> None:
        self.wake(list(self._waiters))

    def wake(self, keys: Iterable[_Key]) -> None:
        for key in keys:
            self._versions[key] = self._versions.get(key, 0) + 1
            for waiter in self._waiters.pop(key, ()):
                if not waiter.done():
                    waiter.set_result(None)

    async def wait(self, seen: dict[_Key, int], within_s: float) -> None:
        """Return once any key moved past ``seen`` (taken before the caller looked), or timeout."""
        if any(self._versions.get(key, 0) != version for key, version in seen.items()):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for key in seen:
            self._waiters.setdefault(key, set()).add(waiter)
        self._waiting += 1
        if self._waiting == 1:
            self._on_waiting(True)
        try:
            # asyncio.wait, not wait_for: on 3.11 wait_for can swallow a cancellation that races
            # the waiter's completion, which hangs whoever is stopping the reading task.
            await asyncio.wait({waiter}, timeout=within_s)
        finally:
            self._waiting -= 1
            if self._waiting == 0:
                self._on_waiting(False)
            for key in seen:
                waiters = self._waiters.get(key)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waiters[key]


class _Poller:
    """Thread that notices commits made by other connections and reports grown partitions."""

    def __init__(
        self,
        path: Path,
        interval_s: float,
        busy_timeout_s: float,
        report: Callable[[list[_Key]], None],
        *,
        use_inotify: bool = True,
    ) -> None:
        self._path = path
        self._interval_s = interval_s
        self._watch = DirectoryWatch.open(path.parent) if use_inotify else None
        self._busy_timeout_s = busy_timeout_s
        self._report = report
        # Set while some task waits for records: polling costs nothing when nobody listens.
        self.active = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mesh-log-poll", daemon=True)
        self._conn = _connect(path, busy_timeout_s)
        self._data_version = -1
        self._heads = self._read_heads()

    def start(self) -> None:
        self._thread.start()

    def _read_heads(self) -> dict[_Key, int]:
        self._data_version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        rows = self._conn.execute("SELECT topic, part, next_pos FROM heads").fetchall()
        return {(topic, part): next_pos for topic, part, next_pos in rows}

    @property
    def watching(self) -> bool:
        """Whether inotify drives the checks (else they run every ``interval_s``)."""
        return self._watch is not None

    def _poll(self) -> bool:
        """Report grown partitions; True if anything was committed since the last check."""
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self._data_version:
            return False
        heads = self._read_heads()
        grown = [key for key, head in heads.items() if self._heads.get(key) != head]
        self._heads = heads
        if grown:
            self._report(grown)
        return True

    def _wait(self) -> bool:
        """Wait for the next check; True if inotify reported a write."""
        if self._watch is None:
            time.sleep(self._interval_s)
            return False
        return self._watch.wait(_WATCH_RECHECK_S)

    def _missed(self) -> None:
        """A commit came without a report: this filesystem's inotify is not to be trusted."""
        if self._watch is None or self._watch.wait(0):
            return  # the report was merely racing the re-check
        _log.warning(
            "inotify missed a commit to %s; the embedded log polls every %.1f ms from now on",
            self._path,
            self._interval_s * 1000,
        )
        self._watch.close()
        self._watch = None

    def _run(self) -> None:
        try:
            while not self._stopping:
                if not self.active.wait(timeout=0.5):
                    continue
                reported = self._wait()
                try:
                    if self._poll() and not reported:
                        self._missed()
                except sqlite3.Error as error:
                    # A locked or busy file is transient; tails also re-check on a timeout.
                    _log.warning("embedded log poll failed: %s", error)
                    time.sleep(0.1)
        finally:
            self._conn.close()
            if self._watch is not None:
                self._watch.close()

    def stop(self) -> None:
        self._stopping = True
        self.active.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@dataclass(slots=True)
class _Append:
    topic: str
    partition: int
    key: bytes
    value: bytes
    timestamp_ms: int
    future: asyncio.Future[int] = field(repr=False)


def _write_batch(batch: list[_Append], conn: sqlite3.Connection) -> list[int | LogError]:
    """Append a batch in one transaction; per-record errors for unknown partitions."""
    results: list[int | LogError] = []
    with _Tx(conn):
        heads: dict[_Key, int | None] = {}
        for item in batch:
            key = (item.topic, item.partition)
            if key not in heads:
                row = conn.execute(
                    "SELECT next_pos FROM heads WHERE topic = ? AND part = ?", key
                ).fetchone()
                heads[key] = None if row is None else int(row[0])
        rows: list[tuple[str, int, int, bytes, bytes, int]] = []
        for item in batch:
            key = (item.topic, item.partition)
            head = heads[key]
            if head is None:
                results.append(LogError(f"topic {item.topic!r} has no partition {item.partition}"))
                continue
            rows.append((item.topic, item.partition, head, item.key, item.value, item.timestamp_ms))
            results.append(head)
            heads[key] = head + 1
        conn.executemany(
            "INSERT INTO records (topic, part, pos, key, value, ts_ms) VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.executemany(
            "UPDATE heads SET next_pos = ? WHERE topic = ? AND part = ?",
            [(head, topic, part) for (topic, part), head in heads.items() if head is not None],
        )
    return results


def _fetch(
    topic: str, partition: int, start: int, end: int | None, limit: int, conn: sqlite3.Connection
) -> list[Record]:
    if end is None:
        rows = conn.execute(
            "SELECT pos, key, value, ts_ms FROM records WHERE topic = ? AND part = ? AND pos >= ?"
            " ORDER BY pos LIMIT ?",
            (topic, partition, start, limit),
        ).fetchall()
    else:
        rows = conn.execute(
            "SELECT pos, key, value, ts_ms FROM records"
            " WHERE topic = ? AND part = ? AND pos >= ? AND pos < ? ORDER BY pos LIMIT ?",
            (topic, partition, start, end, limit),
        ).fetchall()
    return [Record(topic, partition, pos, bytes(k), bytes(v), ts) for pos, k, v, ts in rows]


def _fetch_many(
    topic: str, positions: dict[int, int], conn: sqlite3.Connection
) -> list[list[Record]]:
    return [_fetch(topic, p, pos, None, _READ_BATCH, conn) for p, pos in positions.items()]


def _live_members(
    conn: sqlite3.Connection, group: str, topic: str, now_ms: int, timeout_ms: int
) -> list[str]:
    rows = conn.execute(
        "SELECT member_id FROM members WHERE grp = ? AND topic = ? AND heartbeat_ms >= ?"
        " ORDER BY member_id",
        (group, topic, now_ms - timeout_ms),
    ).fetchall()
    return [str(row[0]) for row in rows]


def assign(members: list[str], member_id: str, partitions: int) -> frozenset[int]:
    """Partitions of ``member_id`` when ``members`` (sorted) share ``partitions`` partitions."""
    if member_id not in members:
        return frozenset()
    index = members.index(member_id)
    return frozenset(p for p in range(partitions) if p % len(members) == index)


class EmbeddedLog:
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
        self.path = path
        self.poll_interval_s = poll_interval_s
        # Check for other processes' commits when inotify reports a write (else poll).
        self.watch_writes = watch_writes
        self.session_timeout_s = session_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self._busy_timeout_s = busy_timeout_s
        self._max_batch = max_batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: _DbThread | None = None
        self._reader: _DbThread | None = None
        self._poller: _Poller | None = None
        self._changes: _Changes | None = None
        self._pending: list[_Append] = []
        self._inflight: set[asyncio.Future[int]] = set()
        self._writer_wake = asyncio.Event()
        self._writer_task: asyncio.Task[None] | None = None
        self._partition_counts: dict[str, int] = {}
        self._consumers: set[_EmbeddedConsumer] = set()
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = _DbThread(self.path, "mesh-log-write", self._busy_timeout_s)
        self._reader = _DbThread(self.path, "mesh-log-read", self._busy_timeout_s)

        def create_schema(conn: sqlite3.Connection) -> None:
            with _Tx(conn):
                for statement in _SCHEMA:
                    conn.execute(statement)

        await self._writer.call(create_schema)
        self._poller = await asyncio.to_thread(
            functools.partial(
                _Poller,
                self.path,
                self.poll_interval_s,
                self._busy_timeout_s,
                self._report_grown,
                use_inotify=self.watch_writes,
            )
        )
        self._changes = _Changes(self._set_polling)
        self._poller.start()
        self._writer_wake = asyncio.Event()
        self._writer_task = asyncio.create_task(self._write_loop(), name="mesh-log-writer")

    async def stop(self) -> None:
        if self._loop is None:
            return
        self._stopping = True
        for consumer in list(self._consumers):
            await consumer.close()
        with contextlib.suppress(LogError):
            await self.flush()
        if self._writer_task is not None:
            self._writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(LogError("embedded log stopped"))
        self._pending.clear()
        if self._changes is not None:
            self._changes.wake_all()  # tails notice _stopping and raise
        if self._poller is not None:
            self._poller.stop()
            await asyncio.to_thread(self._poller.join, 5.0)
        if self._writer is not None:
            await self._writer.close()
        if self._reader is not None:
            await self._reader.close()
        self._loop = None
        self._writer = self._reader = None
        self._poller = None
        self._changes = None
        self._writer_task = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- plumbing ----------------------------------------------------------------------------

    def _require(self) -> tuple[_DbThread, _DbThread, _Changes]:
        if self._writer is None or self._reader is None or self._changes is None:
            raise LogError("embedded log is not started")
        return self._writer, self._reader, self._changes

    def _set_polling(self, on: bool) -> None:
        if self._poller is not None:
            if on:
                self._poller.active.set()
            else:
                self._poller.active.clear()

    def _report_grown(self, keys: list[_Key]) -> None:
        # Called from the poller thread.
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us: nobody waits
            loop.call_soon_threadsafe(self._wake, keys)

    def _wake(self, keys: Iterable[_Key]) -> None:
        if self._changes is not None:
            self._changes.wake(keys)

    async def _write_loop(self) -> None:
        writer, _, _ = self._require()
        while True:
            await self._writer_wake.wait()
            self._writer_wake.clear()
            # Appends made while a batch commits pile up and go in the next transaction: under
            # load, one commit carries many tokens.
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    results: list[int | LogError] = await writer.call(
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
                self._wake({(item.topic, item.partition) for item in batch})

    async def _partitions(self, topic: str) -> int:
        count = self._partition_counts.get(topic)
        if count is None:
            _, reader, _ = self._require()
            row = await reader.call(
                lambda conn: conn.execute(
                    "SELECT partitions FROM topics WHERE name = ?", (topic,)
                ).fetchone()
            )
            if row is None:
                raise LogError(f"topic {topic!r} does not exist")
            # Partition counts never change once created, so caching them is safe.
            count = self._partition_counts[topic] = int(row[0])
        return count

    async def _check_partition(self, topic: str, partition: int) -> None:
        count = await self._partitions(topic)
        if not 0 <= partition < count:
            raise LogError(f"topic {topic!r} has {count} partitions, not partition {partition}")

    # -- EventLog ----------------------------------------------------------------------------

    async def ensure_topic(self, topic: str, partitions: int) -> None:
        if partitions <= 0:
            raise ValueError("partitions must be positive")
        writer, _, _ = self._require()

        def create(conn: sqlite3.Connection) -> None:
            with _Tx(conn):
                row = conn.execute(
                    "SELECT partitions FROM topics WHERE name = ?", (topic,)
                ).fetchone()
                if row is not None:
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
        return await self._partitions(topic)

    def append(self, topic: str, partition: int, key: bytes, value: bytes) -> asyncio.Future[int]:
        self._require()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append(_Append(topic, partition, key, value, _now_ms(), future))
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)
        self._writer_wake.set()
        return future

    async def flush(self) -> None:
        await await_appends(list(self._inflight))

    async def end_offset(self, topic: str, partition: int) -> int:
        await self._check_partition(topic, partition)
        _, reader, _ = self._require()
        row = await reader.call(
            lambda conn: conn.execute(
                "SELECT next_pos FROM heads WHERE topic = ? AND part = ?", (topic, partition)
            ).fetchone()
        )
        return 0 if row is None else int(row[0])

    async def read(self, topic: str, partition: int, start_offset: int) -> AsyncIterator[Record]:
        await self._check_partition(topic, partition)
        _, reader, changes = self._require()
        key = (topic, partition)
        position = start_offset
        while True:
            if self._stopping:
                raise LogError("embedded log stopped while a tail was open")
            seen = changes.versions([key])
            records = await reader.call(
                functools.partial(_fetch, topic, partition, position, None, _READ_BATCH)
            )
            for record in records:
                position = record.offset + 1
                yield record
            if not records:
                # The timeout only matters if a wake-up was lost; tails are woken by commits.
                await changes.wait(seen, within_s=1.0)

    async def read_range(
        self, topic: str, partition: int, start_offset: int, end_offset: int
    ) -> list[Record]:
        await self._check_partition(topic, partition)
        _, reader, _ = self._require()
        if end_offset <= start_offset:
            return []
        return await reader.call(
            lambda conn: _fetch(
                topic, partition, start_offset, end_offset, end_offset - start_offset, conn
            )
        )

    def consumer(self, topic: str, group: str, member_id: str) -> _EmbeddedConsumer:
        self._require()
        consumer = _EmbeddedConsumer(self, topic, group, member_id)
        self._consumers.add(consumer)
        return consumer

    async def committed(self, topic: str, group: str, partition: int) -> int:
        await self._check_partition(topic, partition)
        _, reader, _ = self._require()
        return await reader.call(functools.partial(_committed, group, topic, partition))


def _committed(group: str, topic: str, partition: int, conn: sqlite3.Connection) -> int:
    row = conn.execute(
        "SELECT committed FROM offsets WHERE grp = ? AND topic = ? AND part = ?",
        (group, topic, partition),
    ).fetchone()
    return 0 if row is None else int(row[0])


class _EmbeddedConsumer:
    """A group member. Membership is a heartbeat lease; assignment is computed, not negotiated.

    Every member sorts the live members of (group, topic) and takes partitions ``p`` with
    ``p % n == its index``. Members see each other's joins and leaves at their next heartbeat, so
    views can disagree for up to one heartbeat interval; to keep two members from working the same
    partition during that window, a joining member waits a little over one interval before it
    yields anything, and every member stops yielding as soon as its own view drops a partition or
    its own lease may have expired.
    """

    def __init__(self, log: EmbeddedLog, topic: str, group: str, member_id: str) -> None:
        self._log = log
        self._topic = topic
        self._group = group
        self._member_id = member_id
        self._owned: frozenset[int] = frozenset()
        self._positions: dict[int, int] = {}
        # Partitions whose position must be (re)loaded from the committed offset.
        self._reload: set[int] = set()
        self._last_heartbeat = 0.0  # time.monotonic() of the last successful heartbeat
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._iterating = False
        self._closed = False
        self._wake_key: _Key = (f"#member:{id(self)}", 0)
        self._partitions = 0
        # The loop and the iterator both heartbeat; one at a time keeps the view consistent.
        self._heartbeat_lock = asyncio.Lock()

    def assignment(self) -> frozenset[int]:
        return self._owned

    def _timeout_ms(self) -> int:
        return int(self._log.session_timeout_s * 1000)

    async def _heartbeat(self) -> None:
        writer, _, changes = self._log._require()
        group, topic, me, timeout_ms = self._group, self._topic, self._member_id, self._timeout_ms()

        def beat(conn: sqlite3.Connection) -> tuple[list[str], bool]:
            now = _now_ms()
            with _Tx(conn):
                row = conn.execute(
                    "SELECT heartbeat_ms FROM members"
                    " WHERE grp = ? AND topic = ? AND member_id = ?",
                    (group, topic, me),
                ).fetchone()
                was_live = row is not None and int(row[0]) >= now - timeout_ms
                conn.execute(
                    "INSERT INTO members (grp, topic, member_id, heartbeat_ms) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (grp, topic, member_id) DO UPDATE SET heartbeat_ms = ?",
                    (group, topic, me, now, now),
                )
                # Expired leases are dead members; dropping them keeps the table small.
                conn.execute(
                    "DELETE FROM members WHERE grp = ? AND topic = ? AND heartbeat_ms < ?",
                    (group, topic, now - timeout_ms),
                )
                return _live_members(conn, group, topic, now, timeout_ms), was_live

        async with self._heartbeat_lock:
            sent = time.monotonic()
            members, was_live = await writer.call(beat)
            if not self._closed:
                self._apply(members, was_live, sent)
                changes.wake([self._wake_key])

    def _apply(self, members: list[str], was_live: bool, sent: float) -> None:
        me, group, topic = self._member_id, self._group, self._topic
        owned = assign(members, me, self._partitions)
        if not was_live:
            # We were out of the group (first join, or a pause longer than the session): another
            # member may have owned and committed our partitions meanwhile.
            self._reload = set(owned)
        else:
            self._reload |= owned - self._owned
        if owned != self._owned:
            _log.info("member %s of %s/%s now owns %s", me, group, topic, sorted(owned))
        self._owned = owned
        self._positions = {p: pos for p, pos in self._positions.items() if p in owned}
        self._last_heartbeat = sent

    async def _heartbeat_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._log.heartbeat_interval_s)
            try:
                await self._heartbeat()
            except LogError as error:
                _log.warning("heartbeat of %s failed: %s", self._member_id, error)

    def _lease_fresh(self) -> bool:
        # Stop before the lease could have expired in other members' eyes, with a margin.
        age = time.monotonic() - self._last_heartbeat
        return age < self._log.session_timeout_s - self._log.heartbeat_interval_s

    async def __aiter__(self) -> AsyncIterator[Record]:
        if self._iterating:
            raise LogError("a group consumer can be iterated only once")
        self._iterating = True
        if self._closed:
            return
        self._partitions = await self._log._partitions(self._topic)
        _, reader, changes = self._log._require()
        await self._heartbeat()
        self._heartbeat_task = asyncio.create_task(
            self._heartbeat_loop(), name=f"mesh-log-heartbeat-{self._member_id}"
        )
        await asyncio.sleep(self._log.heartbeat_interval_s * 1.5)
        if self._closed:
            return
        await self._heartbeat()
        group, topic = self._group, self._topic
        while not self._closed:
            if not self._lease_fresh():
                await self._heartbeat()
                continue
            for partition in sorted(self._reload):
                self._positions[partition] = await reader.call(
                    functools.partial(_committed, group, topic, partition)
                )
            self._reload.clear()
            owned = sorted(self._owned)
            keys = [(topic, p) for p in owned] + [self._wake_key]
            seen = changes.versions(keys)
            positions = {p: self._positions[p] for p in owned if p in self._positions}
            batches = await reader.call(functools.partial(_fetch_many, topic, positions))
            got_any = False
            for records in batches:
                for record in records:
                    # The view may have changed while the caller handled the previous record.
                    if (
                        self._closed
                        or record.partition not in self._owned
                        or record.partition in self._reload
                        or not self._lease_fresh()
                    ):
                        break
                    got_any = True
                    self._positions[record.partition] = record.offset + 1
                    yield record
            if not got_any and not self._closed:
                await changes.wait(seen, within_s=self._log.heartbeat_interval_s)

    async def commit(self, record: Record) -> None:
        writer, _, _ = self._log._require()
        group, topic, me = self._group, self._topic, self._member_id
        partitions, timeout_ms = self._partitions, self._timeout_ms()

        def store(conn: sqlite3.Connection) -> bool:
            with _Tx(conn):
                members = _live_members(conn, group, topic, _now_ms(), timeout_ms)
                if record.partition not in assign(members, me, partitions or 1):
                    return False
                conn.execute(
                    "INSERT INTO offsets (grp, topic, part, committed) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (grp, topic, part)"
                    " DO UPDATE SET committed = max(committed, excluded.committed)",
                    (group, topic, record.partition, record.offset + 1),
                )
                return True

        if not await writer.call(store):
            # Like Kafka refusing a commit from a stale generation: the partition's new owner
            # will see the record again, and consumers are idempotent.
            _log.warning(
                "member %s no longer owns %s/%d; commit of offset %d dropped",
                me,
                topic,
                record.partition,
                record.offset,
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._owned = frozenset()
        self._log._consumers.discard(self)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
        writer, _, changes = self._log._require()
        group, topic, me = self._group, self._topic, self._member_id
        changes.wake([self._wake_key])

        def leave(conn: sqlite3.Connection) -> None:
            with _Tx(conn):
                conn.execute(
                    "DELETE FROM members WHERE grp = ? AND topic = ? AND member_id = ?",
                    (group, topic, me),
                )

        await writer.call(leave)

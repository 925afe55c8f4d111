"""The embedded log's SQLite file: schema, connections, transactions and the database threads.

sqlite3 calls block, so statements run on threads that each own one connection; the event loop
only awaits them. ``Store`` is what the other parts of the driver share: the file, the threads
of a started log, and the cached partition counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mesh.log.base import Headers, LogError
from mesh.log.driver import PartitionCounts
from mesh.log.embedded.changes import Changes

_T = TypeVar("_T")

# Column names avoid SQL keywords (OFFSET, PARTITION).
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS topics ( name TEXT PRIMARY KEY, partitions INTEGER NOT NULL)",
    # One row per partition: the offset the next record gets. Updated in the same transaction as
    # the records, so it doubles as the cheap "did this partition grow?" probe for tails.
    "CREATE TABLE IF NOT EXISTS heads ("
    " topic TEXT NOT NULL, part INTEGER NOT NULL, next_pos INTEGER NOT NULL,"
    " PRIMARY KEY (topic, part)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS records ("
    " topic TEXT NOT NULL, part INTEGER NOT NULL, pos INTEGER NOT NULL,"
    " key BLOB NOT NULL, value BLOB NOT NULL, ts_ms INTEGER NOT NULL, headers TEXT,"
    " PRIMARY KEY (topic, part, pos)) WITHOUT ROWID",
    # Group members are leases: a member is live while its heartbeat is younger than the session
    # timeout, so a process that dies without closing loses its partitions on its own.
    "CREATE TABLE IF NOT EXISTS members ("
    " grp TEXT NOT NULL, topic TEXT NOT NULL, member_id TEXT NOT NULL,"
    " heartbeat_ms INTEGER NOT NULL, PRIMARY KEY (grp, topic, member_id)) WITHOUT ROWID",
    # Who holds each partition of a group, and since which epoch: the epoch grows whenever the
    # partition changes hands, and an append fenced by an older claim is refused in its own
    # transaction (``producer._write_batch``).
    "CREATE TABLE IF NOT EXISTS claims ("
    " grp TEXT NOT NULL, topic TEXT NOT NULL, part INTEGER NOT NULL, member_id TEXT NOT NULL,"
    " epoch INTEGER NOT NULL, PRIMARY KEY (grp, topic, part)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS offsets ("
    " grp TEXT NOT NULL, topic TEXT NOT NULL, part INTEGER NOT NULL, committed INTEGER NOT NULL,"
    " PRIMARY KEY (grp, topic, part)) WITHOUT ROWID",
)


def encode_headers(headers: Headers) -> str | None:
    """Record headers as stored: a JSON list of [name, value] pairs, NULL when there are none."""
    return json.dumps(headers, separators=(",", ":")) if headers else None


def decode_headers(stored: str | None) -> Headers:
    if not stored:
        return ()
    return tuple((str(name), str(value)) for name, value in json.loads(stored))


def now_ms() -> int:
    # Wall clock, not monotonic: heartbeats are compared across processes.
    return int(time.time() * 1000)


def connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
    conn = sqlite3.connect(
        str(path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
    )
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class Tx:
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


def create_schema(conn: sqlite3.Connection) -> None:
    with Tx(conn):
        for statement in SCHEMA:
            conn.execute(statement)
        # Logs written before records had headers: add the column (NULL: no headers).
        columns = {row[1] for row in conn.execute("PRAGMA table_info(records)")}
        if "headers" not in columns:
            conn.execute("ALTER TABLE records ADD COLUMN headers TEXT")


def partition_row(topic: str, conn: sqlite3.Connection) -> tuple[int] | None:
    row: tuple[int] | None = conn.execute(
        "SELECT partitions FROM topics WHERE name = ?", (topic,)
    ).fetchone()
    return row


class DbThread:
    """One thread owning one connection; callables run there in submission order."""

    def __init__(self, path: Path, name: str, busy_timeout_s: float) -> None:
        self._path = path
        self._busy_timeout_s = busy_timeout_s
        self._conn: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def _invoke(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._conn is None:
            self._conn = connect(self._path, self._busy_timeout_s)
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


@dataclass(frozen=True, slots=True)
class Running:
    """What a started log runs on; replaced by the next ``start``."""

    writer: DbThread  # appends, heartbeats, commits, topic creation: one writer per process
    reader: DbThread  # tails, ranges, offsets
    changes: Changes


class Store:
    """The log's SQLite file, shared by the producer, the fetcher and the group members."""

    def __init__(self, path: Path, busy_timeout_s: float) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        # Set by EmbeddedLog.start once everything runs, cleared when stop is done.
        self.running: Running | None = None
        self.partitions = PartitionCounts(self._lookup_partitions)

    def require(self) -> Running:
        if self.running is None:
            raise LogError("embedded log is not started")
        return self.running

    async def _lookup_partitions(self, topic: str) -> int | None:
        row = await self.require().reader.call(lambda conn: partition_row(topic, conn))
        return None if row is None else int(row[0])

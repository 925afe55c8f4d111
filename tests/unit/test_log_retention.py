"""Retention of the embedded log: age and size limits, never past a group's commit, bytes gone.

Runs on a real SQLite log file. Offsets and record times are set with SQL so that the limits
are tested exactly, without waiting hours.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mesh.log.embedded import EmbeddedLog
from mesh.log.factory import LogSettings
from services.persister.retention import retention_pass

HOUR_MS = 3_600_000


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[EmbeddedLog]:
    async with EmbeddedLog(
        tmp_path / "log.sqlite3", session_timeout_s=1.0, heartbeat_interval_s=0.1
    ) as opened:
        await opened.ensure_topic("t", 2)
        yield opened


def sql(log: EmbeddedLog, statement: str, *params: object) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(str(log.path), timeout=30)
    try:
        with conn:
            return conn.execute(statement, params).fetchall()
    finally:
        conn.close()


async def append(log: EmbeddedLog, count: int, *, partition: int = 0, size: int = 10) -> None:
    for i in range(count):
        await log.append("t", partition, b"k", bytes([65 + i % 26]) * size)
    await log.flush()


def age(log: EmbeddedLog, below: int, hours: float, partition: int = 0) -> None:
    """Make the partition's records before offset ``below`` ``hours`` old."""
    old = int(time.time() * 1000 - hours * HOUR_MS)
    sql(log, "UPDATE records SET ts_ms = ? WHERE part = ? AND pos < ?", old, partition, below)


def commit(log: EmbeddedLog, group: str, offset: int, partition: int = 0) -> None:
    sql(
        log,
        "INSERT OR REPLACE INTO offsets (grp, topic, part, committed) VALUES (?, 't', ?, ?)",
        group,
        partition,
        offset,
    )


async def offsets(log: EmbeddedLog, partition: int = 0) -> list[int]:
    return [r.offset for r in await log.read_range("t", partition, 0, 1_000)]


async def test_old_records_go_only_below_every_groups_commit(log: EmbeddedLog) -> None:
    await append(log, 10)
    age(log, below=8, hours=2)
    commit(log, "persister", 6)
    commit(log, "agents", 9)

    pruned = await log.enforce_retention(max_age_s=3600)

    # 0..5 are old and committed by both; 6 and 7 are old but "persister" has not committed them.
    assert pruned.records == 6 and pruned.bytes == 6 * (1 + 10)
    assert await offsets(log) == [6, 7, 8, 9]
    assert await log.end_offset("t", 0) == 10
    # Appends go on from the end, and reading from a deleted offset starts at the first kept.
    assert await log.append("t", 0, b"k", b"new") == 10
    assert [r.offset for r in await log.read_range("t", 0, 2, 11)] == [6, 7, 8, 9, 10]

    commit(log, "persister", 10)
    assert (await log.enforce_retention(max_age_s=3600)).records == 2
    assert await offsets(log) == [8, 9, 10]


async def test_a_group_without_a_commit_holds_the_whole_partition(log: EmbeddedLog) -> None:
    await append(log, 5)
    await append(log, 5, partition=1)
    age(log, below=5, hours=2)
    age(log, below=5, hours=2, partition=1)
    # Nobody consumes the topic yet: nothing may go.
    assert (await log.enforce_retention(max_age_s=3600)).records == 0
    # "persister" committed partition 1 only, and "agents" has a live member but no commit.
    commit(log, "persister", 5, partition=1)
    sql(
        log,
        "INSERT INTO members (grp, topic, member_id, heartbeat_ms) VALUES ('agents', 't', 'a', ?)",
        int(time.time() * 1000),
    )
    assert (await log.enforce_retention(max_age_s=3600)).records == 0
    commit(log, "agents", 3, partition=1)
    commit(log, "agents", 5, partition=0)
    pruned = await log.enforce_retention(max_age_s=3600)
    assert pruned.records == 3  # partition 1 up to min(5, 3); partition 0 still held by persister
    assert await offsets(log) == [0, 1, 2, 3, 4]
    assert await offsets(log, 1) == [3, 4]


async def test_young_records_stay_and_the_age_limit_stops_at_the_first_young_one(
    log: EmbeddedLog,
) -> None:
    await append(log, 6)
    age(log, below=2, hours=2)
    sql(log, "UPDATE records SET ts_ms = ? WHERE pos = 4", int(time.time() * 1000 - 2 * HOUR_MS))
    commit(log, "persister", 6)
    assert (await log.enforce_retention(max_age_s=3600)).records == 2
    # Offset 4 is old too, but 2 and 3 are not: what is left stays contiguous.
    assert await offsets(log) == [2, 3, 4, 5]
    assert (await log.enforce_retention(max_age_s=10 * 3600)).records == 0


async def test_size_limit_per_partition_keeps_the_newest(log: EmbeddedLog) -> None:
    await append(log, 10, size=99)  # 100 bytes each with the key
    await append(log, 3, partition=1, size=99)
    commit(log, "persister", 8)
    commit(log, "persister", 3, partition=1)
    pruned = await log.enforce_retention(max_age_s=3600, max_bytes=350)
    # Partition 0 has 1000 bytes: 7 must go for 300 to remain, but only 8 are committed anyway;
    # partition 1's 300 bytes are within the limit.
    assert pruned.records == 7
    assert await offsets(log) == [7, 8, 9]
    assert await offsets(log, 1) == [0, 1, 2]
    # The limit never passes a commit: at 100 bytes partition 0 can lose only offset 7.
    pruned = await log.enforce_retention(max_age_s=3600, max_bytes=100)
    assert pruned.records == 1 + 2
    assert await offsets(log) == [8, 9]
    assert await offsets(log, 1) == [2]


def raw(log: EmbeddedLog) -> bytes:
    data = b""
    for suffix in ("", "-wal", "-shm"):
        path = Path(str(log.path) + suffix)
        if path.exists():
            data += path.read_bytes()
    return data


async def test_retention_removes_the_bytes_from_the_file_and_the_wal(log: EmbeddedLog) -> None:
    marker = b"ERASURE-MARKER-5f2c"
    for _ in range(50):
        await log.append("t", 0, b"conv-x", b"user text " + marker + b" " * 200)
    await log.append("t", 0, b"conv-y", b"kept record")
    await log.flush()
    commit(log, "persister", 51)
    assert marker in raw(log)  # the scan can see it: the test below can fail

    age(log, below=50, hours=200)
    settings = LogSettings.from_env({})
    assert settings.retention_hours == 168.0 and settings.retention_bytes == 0
    deleted = await retention_pass(
        log, None, max_age_s=settings.retention_s, max_bytes=settings.retention_bytes
    )
    assert deleted == 50
    assert marker not in raw(log)
    assert [r.value for r in await log.read_range("t", 0, 0, 100)] == [b"kept record"]


def test_kafka_topics_get_the_same_retention() -> None:
    settings = LogSettings.from_env({"MESH_LOG_RETENTION_HOURS": "1.5"})
    assert settings.topic_config() == {
        "retention.ms": "5400000",
        "retention.bytes": "-1",
        "segment.ms": str(24 * HOUR_MS),
    }
    settings = LogSettings.from_env(
        {"MESH_LOG_RETENTION_BYTES": "1048576", "MESH_LOG_SEGMENT_HOURS": "0.5"}
    )
    assert settings.topic_config() == {
        "retention.ms": str(168 * HOUR_MS),
        "retention.bytes": "1048576",
        "segment.ms": str(HOUR_MS // 2),
    }

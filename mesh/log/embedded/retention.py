"""Retention of the embedded log: old records go, records a group still needs never do.

Per partition, the oldest records are deleted while they are older than the age limit or the
partition holds more than the size limit (key, value and headers; per partition, as Kafka's
``retention.bytes``), but only below the lowest offset every consumer group of the topic has
committed. A group that has not committed on a partition holds all of it. Deletion takes a
prefix, so what is left of a partition is contiguous from its new first offset.

Deleted records are overwritten with zeros in the file (``secure_delete``) and the WAL is
checkpointed and truncated afterwards, so their bytes leave the disk, not only the table: this
is what erasure relies on for the log's copies of an erased conversation.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from mesh.log.embedded.store import Tx

# Records looked at (and deleted) per transaction, so appends are never held up for long.
CHUNK = 2000

_SIZE = "length(key) + length(value) + coalesce(length(headers), 0)"


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one pass deleted."""

    records: int = 0
    bytes: int = 0


def group_floor(conn: sqlite3.Connection, topic: str, partition: int) -> int:
    """The lowest offset committed on the partition by every group that consumes the topic.

    The groups are those with a committed offset or a member on the topic; one without a
    commit on this partition counts as 0. No group at all: 0 (nothing may go).
    """
    groups = {
        row[0]
        for row in conn.execute(
            "SELECT grp FROM offsets WHERE topic = ? UNION SELECT grp FROM members WHERE topic = ?",
            (topic, topic),
        )
    }
    if not groups:
        return 0
    floor: int | None = None
    for group in groups:
        row = conn.execute(
            "SELECT committed FROM offsets WHERE grp = ? AND topic = ? AND part = ?",
            (group, topic, partition),
        ).fetchone()
        committed = int(row[0]) if row is not None else 0
        floor = committed if floor is None else min(floor, committed)
    return floor or 0


def _partition_bytes(conn: sqlite3.Connection, topic: str, partition: int) -> int:
    row = conn.execute(
        f"SELECT coalesce(sum({_SIZE}), 0) FROM records WHERE topic = ? AND part = ?",
        (topic, partition),
    ).fetchone()
    return int(row[0]) if row else 0


def prune_partition(
    conn: sqlite3.Connection,
    topic: str,
    partition: int,
    *,
    cutoff_ms: int | None,
    max_bytes: int | None,
) -> Pruned:
    """Delete the partition's oldest records past the limits and below every group's commit.

    ``cutoff_ms``: records logged before this time are past the age limit (None: no age
    limit). ``max_bytes``: the most the partition may keep (None: no size limit).
    """
    records = freed = 0
    excess = 0
    if max_bytes is not None:
        excess = max(_partition_bytes(conn, topic, partition) - max_bytes, 0)
    while True:
        with Tx(conn):
            floor = group_floor(conn, topic, partition)
            rows = conn.execute(
                f"SELECT pos, ts_ms, {_SIZE} FROM records"
                " WHERE topic = ? AND part = ? AND pos < ? ORDER BY pos LIMIT ?",
                (topic, partition, floor, CHUNK),
            ).fetchall()
            last = None
            for pos, ts_ms, size in rows:
                too_old = cutoff_ms is not None and ts_ms < cutoff_ms
                if not (too_old or freed < excess):
                    break
                last = pos
                records += 1
                freed += int(size)
            if last is not None:
                conn.execute(
                    "DELETE FROM records WHERE topic = ? AND part = ? AND pos <= ?",
                    (topic, partition, last),
                )
        if last is None or len(rows) < CHUNK or last != rows[-1][0]:
            return Pruned(records, freed)


def prune(
    conn: sqlite3.Connection, *, now_ms: int, max_age_ms: int | None, max_bytes: int | None
) -> Pruned:
    """One retention pass over every partition of every topic; then the WAL is truncated."""
    # Deleted cells and freed pages are overwritten with zeros, not just unlinked.
    conn.execute("PRAGMA secure_delete = ON")
    cutoff_ms = None if max_age_ms is None else now_ms - max_age_ms
    parts = conn.execute("SELECT topic, part FROM heads ORDER BY topic, part").fetchall()
    total = Pruned()
    for topic, partition in parts:
        done = prune_partition(conn, topic, partition, cutoff_ms=cutoff_ms, max_bytes=max_bytes)
        total = Pruned(total.records + done.records, total.bytes + done.bytes)
    # The deleted records' old pages also sit in the WAL until it is checkpointed and truncated.
    # A reader holding an old snapshot makes this a partial checkpoint; the next pass goes on.
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    return total


__all__ = ["CHUNK", "Pruned", "group_floor", "prune", "prune_partition"]

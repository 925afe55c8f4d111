"""Consumer groups of the embedded log: heartbeat leases, computed assignment and commits.

There is no coordinator: members write their leases to the file, and each computes the same
assignment from the live leases (``assign``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from typing import Self

from mesh.log.base import Claim, LogError, Record
from mesh.log.driver import GroupMember, Membership
from mesh.log.embedded.changes import Key
from mesh.log.embedded.fetcher import fetch_many
from mesh.log.embedded.store import Store, Tx, now_ms

_log = logging.getLogger(__name__)


def committed(group: str, topic: str, partition: int, conn: sqlite3.Connection) -> int:
    row = conn.execute(
        "SELECT committed FROM offsets WHERE grp = ? AND topic = ? AND part = ?",
        (group, topic, partition),
    ).fetchone()
    return 0 if row is None else int(row[0])


def _live_members(
    conn: sqlite3.Connection, group: str, topic: str, now_ms: int, timeout_ms: int
) -> list[str]:
    rows = conn.execute(
        "SELECT member_id FROM members WHERE grp = ? AND topic = ? AND heartbeat_ms >= ?"
        " ORDER BY member_id",
        (group, topic, now_ms - timeout_ms),
    ).fetchall()
    return [str(row[0]) for row in rows]


def live_member_count(group: str, topic: str, timeout_ms: int, conn: sqlite3.Connection) -> int:
    """Members of (group, topic) whose lease has not expired."""
    return len(_live_members(conn, group, topic, now_ms(), timeout_ms))


def _take_claims(
    conn: sqlite3.Connection,
    group: str,
    topic: str,
    member_id: str,
    owned: frozenset[int],
    rejoined: bool,
) -> dict[int, int]:
    """Claim ``owned`` for ``member_id`` (in the heartbeat's transaction); the epochs held.

    A partition gets a new epoch when it changes hands, and also when its holder comes back
    into the group (``rejoined``): what it was doing before its pause belongs to the past.
    """
    epochs: dict[int, int] = {}
    for partition in sorted(owned):
        row = conn.execute(
            "SELECT member_id, epoch FROM claims WHERE grp = ? AND topic = ? AND part = ?",
            (group, topic, partition),
        ).fetchone()
        if row is not None and str(row[0]) == member_id and not rejoined:
            epochs[partition] = int(row[1])
            continue
        epoch = (0 if row is None else int(row[1])) + 1
        conn.execute(
            "INSERT INTO claims (grp, topic, part, member_id, epoch) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (grp, topic, part)"
            " DO UPDATE SET member_id = excluded.member_id, epoch = excluded.epoch",
            (group, topic, partition, member_id, epoch),
        )
        epochs[partition] = epoch
    return epochs


def assign(members: list[str], member_id: str, partitions: int) -> frozenset[int]:
    """Partitions of ``member_id`` when ``members`` (sorted) share ``partitions`` partitions."""
    if member_id not in members:
        return frozenset()
    index = members.index(member_id)
    return frozenset(p for p in range(partitions) if p % len(members) == index)


class EmbeddedConsumer(GroupMember):
    """A group member. Membership is a heartbeat lease; assignment is computed, not negotiated.

    Every member sorts the live members of (group, topic) and takes partitions ``p`` with
    ``p % n == its index``. Members see each other's joins and leaves at their next heartbeat, so
    views can disagree for up to one heartbeat interval; to keep two members from working the same
    partition during that window, a joining member waits a little over one interval before it
    yields anything, and every member stops yielding as soon as its own view drops a partition or
    its own lease may have expired.
    """

    def __init__(
        self, store: Store, membership: Membership, on_close: Callable[[Self], None]
    ) -> None:
        super().__init__(membership, on_close)
        self._store = store
        self._owned: frozenset[int] = frozenset()
        # Epoch of this member's claim on each owned partition (see ``claim``).
        self._epochs: dict[int, int] = {}
        self._positions: dict[int, int] = {}
        # Partitions whose position must be (re)loaded from the committed offset.
        self._reload: set[int] = set()
        self._last_heartbeat = 0.0  # time.monotonic() of the last successful heartbeat
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._wake_key: Key = (f"#member:{id(self)}", 0)
        self._partitions = 0
        # The loop and the iterator both heartbeat; one at a time keeps the view consistent.
        self._heartbeat_lock = asyncio.Lock()

    def assignment(self) -> frozenset[int]:
        return self._owned

    def claim(self, partition: int) -> Claim | None:
        epoch = self._epochs.get(partition)
        if self._closed or partition not in self._owned or epoch is None:
            return None
        return Claim(self._topic, self._group, partition, self._member_id, epoch)

    def _timeout_ms(self) -> int:
        return int(self._session_timeout_s * 1000)

    async def _heartbeat(self) -> None:
        running = self._store.require()
        group, topic, me, timeout_ms = self._group, self._topic, self._member_id, self._timeout_ms()
        partitions = self._partitions

        def beat(conn: sqlite3.Connection) -> tuple[list[str], bool, dict[int, int]]:
            now = now_ms()
            with Tx(conn):
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
                members = _live_members(conn, group, topic, now, timeout_ms)
                owned = assign(members, me, partitions)
                epochs = _take_claims(conn, group, topic, me, owned, rejoined=not was_live)
                return members, was_live, epochs

        async with self._heartbeat_lock:
            sent = time.monotonic()
            members, was_live, epochs = await running.writer.call(beat)
            if not self._closed:
                self._apply(members, was_live, sent)
                self._epochs = epochs
                running.changes.wake([self._wake_key])

    def _apply(self, members: list[str], was_live: bool, sent: float) -> None:
        owned = assign(members, self._member_id, self._partitions)
        if not was_live:
            # We were out of the group (first join, or a pause longer than the session): another
            # member may have owned and committed our partitions meanwhile.
            self._reload = set(owned)
        else:
            self._reload |= owned - self._owned
        if owned != self._owned:
            self._log_owned(_log, owned)
        self._owned = owned
        self._positions = {p: pos for p, pos in self._positions.items() if p in owned}
        self._last_heartbeat = sent

    async def _heartbeat_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._heartbeat_interval_s)
            try:
                await self._heartbeat()
            except LogError as error:
                _log.warning("heartbeat of %s failed: %s", self._member_id, error)

    def _lease_fresh(self) -> bool:
        # Stop before the lease could have expired in other members' eyes, with a margin.
        age = time.monotonic() - self._last_heartbeat
        return age < self._session_timeout_s - self._heartbeat_interval_s

    async def __aiter__(self) -> AsyncIterator[Record]:
        if not self._begin_iteration():
            return
        self._partitions = await self._store.partitions.get(self._topic)
        running = self._store.require()
        await self._heartbeat()
        self._heartbeat_task = asyncio.create_task(
            self._heartbeat_loop(), name=f"mesh-log-heartbeat-{self._member_id}"
        )
        await asyncio.sleep(self._heartbeat_interval_s * 1.5)
        if self._closed:
            return
        await self._heartbeat()
        group, topic = self._group, self._topic
        while not self._closed:
            if not self._lease_fresh():
                await self._heartbeat()
                continue
            for partition in sorted(self._reload):
                self._positions[partition] = await running.reader.call(
                    functools.partial(committed, group, topic, partition)
                )
            self._reload.clear()
            owned = sorted(self._owned)
            keys = [(topic, p) for p in owned] + [self._wake_key]
            seen = running.changes.versions(keys)
            positions = {p: self._positions[p] for p in owned if p in self._positions}
            batches = await running.reader.call(functools.partial(fetch_many, topic, positions))
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
                await running.changes.wait(seen, within_s=self._heartbeat_interval_s)

    async def commit(self, record: Record) -> None:
        writer = self._store.require().writer
        group, topic, me = self._group, self._topic, self._member_id
        partitions, timeout_ms = self._partitions, self._timeout_ms()

        def store(conn: sqlite3.Connection) -> bool:
            with Tx(conn):
                members = _live_members(conn, group, topic, now_ms(), timeout_ms)
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
            self._log_commit_dropped(_log, record)

    async def close(self) -> None:
        if not self._begin_close():
            return
        self._owned = frozenset()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
        running = self._store.require()
        group, topic, me = self._group, self._topic, self._member_id
        running.changes.wake([self._wake_key])

        def leave(conn: sqlite3.Connection) -> None:
            with Tx(conn):
                conn.execute(
                    "DELETE FROM members WHERE grp = ? AND topic = ? AND member_id = ?",
                    (group, topic, me),
                )

        await running.writer.call(leave)

"""A member of a Kafka consumer group: its consumer, and the thread that keeps it in the group.

The thread keeps polling even while the caller works on a record for minutes, so rebalances
complete and heartbeats flow; records are prefetched a little and the partitions are paused when
the caller falls behind. Commits run on that thread too.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any, Self

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from mesh.log.base import Claim, LogError, Record
from mesh.log.driver import GroupMember, Membership, call_soon
from mesh.log.kafka.admin import Admin
from mesh.log.kafka.client import RDKAFKA_LOGGER, Client, poll_batch, to_record

_log = logging.getLogger(__name__)

# Commit failures that mean "this member's view of the group is stale": the partition's next
# owner gets the record again, so they are dropped like the embedded driver drops them.
_STALE_GENERATION = {
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError._ASSIGNMENT_LOST,
    KafkaError._STATE,
}


class KafkaGroupConsumer(GroupMember):
    """A member of a Kafka consumer group (classic protocol, cooperative-sticky assignment)."""

    def __init__(
        self,
        client: Client,
        admin: Admin,
        loop: asyncio.AbstractEventLoop,
        membership: Membership,
        on_close: Callable[[Self], None],
        *,
        prefetch: int,
        max_loop_stall_s: float = 60.0,
    ) -> None:
        super().__init__(membership, on_close)
        self._client = client
        self._admin = admin
        self._loop = loop
        self._prefetch = prefetch
        self._consumer: Consumer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._queue: asyncio.Queue[tuple[int, Record] | None] = asyncio.Queue()
        # Written by the consumer thread (in rebalance callbacks), read by the loop.
        self._assignment: frozenset[int] = frozenset()
        # Bumped when a partition is revoked or lost, so prefetched records from before are
        # dropped instead of yielded by a member that no longer owns them.
        self._epochs: dict[int, int] = {}
        self._delivered = 0  # written by the thread
        self._taken = 0  # written by the loop
        self._paused = False
        # When the member's thread last went round its loop (time.monotonic()). A gap longer
        # than the session means the process was stopped or starved: the broker has expired the
        # member, so its claims are stale even before librdkafka reports the loss.
        self._last_round = time.monotonic()
        # When the event loop last ran a callback of this member's thread: a loop stuck for
        # longer than ``max_loop_stall_s`` (a hung agent) makes the member leave its group, as
        # max.poll.interval.ms would if polls came from the loop.
        self._max_loop_stall_s = max_loop_stall_s
        self._loop_seen = time.monotonic()
        self._loop_pinged = 0.0  # written by the thread
        self._last_commit: dict[int, int] = {}
        # Commits run on the member's own thread: a synchronous commit from another thread
        # hangs while this one sits in consume() (seen with confluent-kafka 2.16).
        self._commits: queue.SimpleQueue[tuple[TopicPartition, Future[None]]] = queue.SimpleQueue()

    def assignment(self) -> frozenset[int]:
        return self._assignment

    def claim(self, partition: int) -> Claim | None:
        # The epoch is this member's count of losing the partition: enough to tell its current
        # claim from one it held before a revoke (the only claims it can compare).
        if self._closed or partition not in self._assignment or self._stale():
            return None
        epoch = self._epochs.get(partition, 0)
        return Claim(self._topic, self._group, partition, self._member_id, epoch)

    def _config(self) -> dict[str, Any]:
        return self._client.settings(
            {
                "group.id": self._group,
                "client.id": f"{self._client.client_id}-{self._member_id}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "partition.assignment.strategy": "cooperative-sticky",
                "session.timeout.ms": int(self._session_timeout_s * 1000),
                "heartbeat.interval.ms": int(self._heartbeat_interval_s * 1000),
                # Liveness is the heartbeat's job (a background thread); handling one record
                # (a whole turn) may take minutes, and our thread polls anyway.
                "max.poll.interval.ms": 86_400_000,
                "fetch.wait.max.ms": 20,
                "enable.partition.eof": False,
                "logger": logging.getLogger(RDKAFKA_LOGGER),
            }
        )

    def _loop_ran(self) -> None:
        self._loop_seen = time.monotonic()

    def _stale(self) -> bool:
        """True while the thread has not gone round its loop for a whole session (the loop may
        run first after a SIGCONT: its claims must not look current meanwhile)."""
        return time.monotonic() - self._last_round > self._session_timeout_s

    def _after_gap(self, consumer: Consumer) -> None:
        """The thread was stopped past the session: every claim it held is void.

        Usually the broker has expired the member too, and the partitions come back through a
        rebalance. If it has not (this thread was only starved: librdkafka heartbeats from its
        own thread), the partitions are rewound to the group's committed offsets, so what was
        handed out under the void claims is handed out again under the new ones.
        """
        _log.warning(
            "group member %s was paused past its session; its claims are void", self._member_id
        )
        voided = set(self._assignment)
        for partition in voided:
            self._epochs[partition] = self._epochs.get(partition, 0) + 1
        try:
            assigned = [tp for tp in consumer.assignment() if tp.partition in voided]
            if not assigned:
                return
            for tp in consumer.committed(assigned, timeout=self._session_timeout_s):
                offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
                consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
        except KafkaException as error:
            # The partitions are being taken away: the rebalance redelivers them.
            _log.warning("rewinding %s after its pause failed: %s", self._member_id, error)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assignment = self._assignment | {tp.partition for tp in partitions}
        self._paused = False  # new partitions start unpaused; the loop re-evaluates
        self._log_owned(_log, self._assignment)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {tp.partition for tp in partitions}
        for partition in revoked:
            self._epochs[partition] = self._epochs.get(partition, 0) + 1
            self._last_commit.pop(partition, None)
        self._assignment = self._assignment - revoked

    def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        loop = self._loop
        # The clocks start with the thread, not with the object (made perhaps long before).
        self._last_round = self._loop_seen = time.monotonic()
        try:
            consumer.subscribe(
                [self._topic],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_revoke,
            )
            while not self._stopping:
                if self._stale():
                    self._after_gap(consumer)
                now = time.monotonic()
                self._last_round = now
                if now - self._loop_seen > self._max_loop_stall_s:
                    _log.error(
                        "the event loop of group member %s has not run for %.0fs; leaving the "
                        "group so its partitions move on",
                        self._member_id,
                        now - self._loop_seen,
                    )
                    # Its turns are the next owner's now: void the claims before leaving.
                    self._on_revoke(consumer, consumer.assignment())
                    break
                if now - self._loop_pinged > 0.25:
                    self._loop_pinged = now
                    call_soon(loop, self._loop_ran)
                self._run_commits(consumer)
                room = self._prefetch - (self._delivered - self._taken)
                full = room <= 0
                if full != self._paused:
                    assigned = consumer.assignment()
                    if assigned:
                        if full:
                            consumer.pause(assigned)
                        else:
                            consumer.resume(assigned)
                    self._paused = full
                # Polling goes on while paused: that is what serves rebalances.
                # A short timeout: commits wait for the next turn of this loop.
                messages = poll_batch(consumer, max(room, 1), 0.01)
                for message in messages:
                    error = message.error()
                    if error is not None:
                        _log.warning("group %s fetch error: %s", self._group, error.str())
                        continue
                    record = to_record(message)
                    self._delivered += 1
                    epoch = self._epochs.get(record.partition, 0)
                    call_soon(loop, self._queue.put_nowait, (epoch, record))
        except KafkaException as error:
            _log.error("group member %s failed: %s", self._member_id, error)
        finally:
            self._run_commits(None)
            # Leaves the group at once, so the others take the partitions without waiting for
            # the session to time out.
            consumer.close()
            call_soon(loop, self._queue.put_nowait, None)

    def _run_commits(self, consumer: Consumer | None) -> None:
        while True:
            try:
                offset, done = self._commits.get_nowait()
            except queue.Empty:
                return
            if consumer is None:
                done.set_exception(LogError("the group member is closed"))
                continue
            try:
                consumer.commit(offsets=[offset], asynchronous=False)
            except KafkaException as error:
                done.set_exception(error)
            else:
                done.set_result(None)

    async def __aiter__(self) -> AsyncIterator[Record]:
        if not self._begin_iteration():
            return
        await self._admin.partitions.check(self._topic, 0)
        self._consumer = Consumer(self._config())
        self._thread = threading.Thread(
            target=self._run, name=f"mesh-kafka-group-{self._member_id}", daemon=True
        )
        self._thread.start()
        while True:
            item = await self._queue.get()
            if item is None or self._closed:
                return
            self._taken += 1
            epoch, record = item
            if (
                record.partition in self._assignment
                and self._epochs.get(record.partition, 0) == epoch
            ):
                yield record

    async def commit(self, record: Record) -> None:
        partition, offset = record.partition, record.offset + 1
        if self._thread is None or self._closed or partition not in self._assignment:
            self._log_commit_dropped(_log, record)
            return
        if self._last_commit.get(partition, -1) >= offset:
            return  # commits only move forward, as in the embedded driver
        done: Future[None] = Future()
        self._commits.put((TopicPartition(self._topic, partition, offset), done))
        try:
            await asyncio.wrap_future(done)
        except LogError:
            if self._closed:
                # close() raced this commit: like a lost partition, the records are redelivered
                # to the next owner, which the protocol's dedupe absorbs.
                _log.warning("commit by %s dropped: the member closed first", self._member_id)
                return
            raise
        except KafkaException as error:
            if error.args[0].code() in _STALE_GENERATION:
                _log.warning("commit by %s dropped: %s", self._member_id, error.args[0])
                return
            raise LogError(f"commit of {self._topic}/{partition}: {error.args[0]}") from error
        self._last_commit[partition] = max(self._last_commit.get(partition, -1), offset)

    async def close(self) -> None:
        if not self._begin_close():
            return
        self._stopping = True
        self._assignment = frozenset()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self._queue.put_nowait(None)

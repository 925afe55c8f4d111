"""The Kafka log driver (confluent-kafka / librdkafka), for meshes that outgrow one machine.

librdkafka calls block or call back on their own threads, so nothing here runs on the event loop
except ``produce`` (it only queues). Threads, and why:

- one producer thread polls the producer so delivery reports arrive as soon as the broker acks;
  each report completes the ``append`` future on the loop. Appends are never awaited one by one.
- one tail thread owns one assigned (group-less) consumer shared by every ``read`` and
  ``read_range`` of this ``KafkaLog``: a gateway tailing hundreds of turns costs one consumer,
  not hundreds. A new reader that starts before the shared position of its partition rewinds
  it; readers ignore records below their own position.
- each group member owns a consumer and a thread that keeps polling even while the caller works
  on a record for minutes, so rebalances complete and heartbeats flow; records are prefetched a
  little and the partitions are paused when the caller falls behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Self

from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from confluent_kafka.admin._listoffsets import OffsetSpec

from mesh.log.base import LogError, Record, await_appends

_log = logging.getLogger(__name__)

_Key = tuple[str, int]

# Commit failures that mean "this member's view of the group is stale": the partition's next
# owner gets the record again, so they are dropped like the embedded driver drops them.
_STALE_GENERATION = {
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError._ASSIGNMENT_LOST,
    KafkaError._STATE,
}


def _to_record(message: Message) -> Record:
    topic = message.topic()
    partition = message.partition()
    offset = message.offset()
    assert topic is not None and partition is not None and offset is not None
    key = message.key()
    value = message.value()
    _, timestamp_ms = message.timestamp()
    return Record(
        topic,
        partition,
        offset,
        key if isinstance(key, bytes) else b"",
        value if isinstance(value, bytes) else b"",
        timestamp_ms,
    )


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
        loop.call_soon_threadsafe(callback, *args)


async def _wait_future(future: Any, what: str) -> Any:
    """Await a librdkafka admin future, turning its errors into LogError."""
    try:
        return await asyncio.wrap_future(future)
    except KafkaException as error:
        raise LogError(f"{what}: {error.args[0]}") from error


class KafkaLog:
    """``EventLog`` on an Apache Kafka cluster."""

    def __init__(
        self,
        bootstrap: str,
        *,
        session_timeout_s: float = 6.0,
        heartbeat_interval_s: float = 0.5,
        client_id: str = "llm-mesh",
        request_timeout_s: float = 30.0,
        prefetch: int = 500,
        config: Mapping[str, str] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.session_timeout_s = session_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.client_id = client_id
        self.request_timeout_s = request_timeout_s
        self.prefetch = prefetch
        # Extra librdkafka settings for every client (security.protocol, sasl.*, ...).
        self.config = dict(config or {})
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer: Producer | None = None
        self._admin: AdminClient | None = None
        self._producer_thread: threading.Thread | None = None
        self._tail: _Tail | None = None
        self._stopping = threading.Event()
        self._inflight: set[asyncio.Future[int]] = set()
        self._partition_counts: dict[str, int] = {}
        self._consumers: set[_KafkaGroupConsumer] = set()

    def client_config(self, extra: Mapping[str, object] | None = None) -> dict[str, Any]:
        """librdkafka settings shared by every client of this log, plus ``extra``."""
        return {
            "bootstrap.servers": self.bootstrap,
            "client.id": self.client_id,
            "socket.nagle.disable": True,
            # librdkafka's errors (broker down, ...) go to our logging, not raw to stderr. Only
            # clients that are polled deliver them, so the admin client keeps librdkafka's own.
            "log_level": 3,
            **self.config,
            **(extra or {}),
        }

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping.clear()
        self._admin = AdminClient(self.client_config())
        rdkafka_log = logging.getLogger("mesh.log.kafka.librdkafka")
        self._producer = Producer(
            self.client_config(
                {
                    "enable.idempotence": True,  # no duplicates or reordering on retries
                    "acks": "all",
                    # Tokens go out at once; librdkafka still batches whatever queued meanwhile.
                    "linger.ms": 0,
                    "delivery.timeout.ms": int(self.request_timeout_s * 1000),
                    "queue.buffering.max.messages": 1_000_000,
                    "logger": rdkafka_log,
                }
            )
        )
        self._producer_thread = threading.Thread(
            target=self._poll_producer, name="mesh-kafka-producer", daemon=True
        )
        self._producer_thread.start()
        self._tail = _Tail(self)
        self._tail.start()
        # Fail at start, not at the first append, when the cluster is unreachable.
        try:
            await asyncio.to_thread(self._admin.list_topics, timeout=self.request_timeout_s)
        except KafkaException as error:
            await self.stop()
            raise LogError(f"Kafka at {self.bootstrap} is unreachable: {error.args[0]}") from error

    async def stop(self) -> None:
        if self._loop is None:
            return
        for consumer in list(self._consumers):
            await consumer.close()
        with contextlib.suppress(LogError):
            await asyncio.wait_for(self.flush(), self.request_timeout_s)
        self._stopping.set()
        if self._tail is not None:
            await self._tail.stop()
        if self._producer_thread is not None:
            await asyncio.to_thread(self._producer_thread.join, 10)
        for future in list(self._inflight):
            if not future.done():
                future.set_exception(LogError("Kafka log stopped before the record was acked"))
        self._loop = None
        self._producer = None
        self._admin = None
        self._producer_thread = None
        self._tail = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _require(self) -> tuple[asyncio.AbstractEventLoop, Producer, AdminClient, _Tail]:
        if (
            self._loop is None
            or self._producer is None
            or self._admin is None
            or self._tail is None
        ):
            raise LogError("Kafka log is not started")
        return self._loop, self._producer, self._admin, self._tail

    # -- producing ---------------------------------------------------------------------------

    def _poll_producer(self) -> None:
        producer = self._producer
        assert producer is not None
        while not self._stopping.is_set():
            producer.poll(0.05)  # runs delivery callbacks on this thread
        producer.flush(5)

    def _delivered(
        self, future: asyncio.Future[int], error: KafkaError | None, message: Message
    ) -> None:
        # librdkafka's thread: hand the outcome to the loop.
        loop = self._loop
        if loop is None:
            return
        if error is not None:
            _call_soon(loop, _fail, future, LogError(f"append failed: {error.str()}"))
        else:
            _call_soon(loop, _resolve, future, message.offset())

    def append(self, topic: str, partition: int, key: bytes, value: bytes) -> asyncio.Future[int]:
        loop, producer, _, _ = self._require()
        future: asyncio.Future[int] = loop.create_future()
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)
        try:
            producer.produce(
                topic,
                value,
                key,
                partition=partition,
                on_delivery=functools.partial(self._delivered, future),
            )
        except (BufferError, KafkaException) as error:
            future.set_exception(LogError(f"append to {topic}/{partition} refused: {error}"))
        return future

    async def flush(self) -> None:
        await await_appends(list(self._inflight))

    # -- topics and offsets ------------------------------------------------------------------

    async def ensure_topic(self, topic: str, partitions: int) -> None:
        if partitions <= 0:
            raise ValueError("partitions must be positive")
        _, _, admin, _ = self._require()
        futures = admin.create_topics(
            [NewTopic(topic, num_partitions=partitions)],
            request_timeout=self.request_timeout_s,
        )
        try:
            await asyncio.wrap_future(futures[topic])
        except KafkaException as error:
            if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise LogError(f"creating topic {topic!r} failed: {error.args[0]}") from error
        # The controller answers before every broker knows the topic; wait until metadata shows
        # all partitions with a leader, so the first append or read does not race it.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout_s
        while True:
            count = await self._fetch_partition_count(topic)
            if count is not None:
                self._partition_counts[topic] = count
                return
            if loop.time() > deadline:
                raise LogError(f"topic {topic!r} did not become available")
            await asyncio.sleep(0.05)

    async def _fetch_partition_count(self, topic: str) -> int | None:
        _, _, admin, _ = self._require()
        try:
            metadata = await asyncio.to_thread(
                admin.list_topics, topic, timeout=self.request_timeout_s
            )
        except KafkaException as error:
            raise LogError(f"metadata of {topic!r}: {error.args[0]}") from error
        found = metadata.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            return None
        if any(p.leader < 0 for p in found.partitions.values()):
            return None
        return len(found.partitions)

    async def partition_count(self, topic: str) -> int:
        count = self._partition_counts.get(topic)
        if count is None:
            count = await self._fetch_partition_count(topic)
            if count is None:
                raise LogError(f"topic {topic!r} does not exist")
            self._partition_counts[topic] = count
        return count

    async def _check_partition(self, topic: str, partition: int) -> None:
        count = await self.partition_count(topic)
        if not 0 <= partition < count:
            raise LogError(f"topic {topic!r} has {count} partitions, not partition {partition}")

    async def end_offset(self, topic: str, partition: int) -> int:
        await self._check_partition(topic, partition)
        _, _, admin, _ = self._require()
        tp = TopicPartition(topic, partition)
        futures = admin.list_offsets(
            {tp: OffsetSpec.latest()},  # type: ignore[no-untyped-call]
            request_timeout=self.request_timeout_s,
        )
        result = await _wait_future(futures[tp], f"end offset of {topic}/{partition}")
        return int(result.offset)

    async def committed(self, topic: str, group: str, partition: int) -> int:
        await self._check_partition(topic, partition)
        _, _, admin, _ = self._require()
        request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, partition)])
        futures = admin.list_consumer_group_offsets(
            [request], request_timeout=self.request_timeout_s
        )
        result = await _wait_future(futures[group], f"committed offset of {group}")
        for tp in result.topic_partitions or []:
            if tp.topic == topic and tp.partition == partition and tp.offset >= 0:
                return int(tp.offset)
        return 0  # nothing committed (librdkafka reports OFFSET_INVALID, -1001)

    # -- reading -----------------------------------------------------------------------------

    async def read(self, topic: str, partition: int, start_offset: int) -> AsyncIterator[Record]:
        await self._check_partition(topic, partition)
        _, _, _, tail = self._require()
        reader = tail.subscribe((topic, partition), start_offset)
        try:
            while True:
                record = await reader.records.get()
                if record is None:
                    raise LogError("Kafka log stopped while a tail was open")
                yield record
        finally:
            tail.unsubscribe(reader)

    async def read_range(
        self, topic: str, partition: int, start_offset: int, end_offset: int
    ) -> list[Record]:
        end = min(end_offset, await self.end_offset(topic, partition))
        if end <= start_offset:
            return []
        _, _, _, tail = self._require()
        reader = tail.subscribe((topic, partition), start_offset)
        records: list[Record] = []
        try:
            async with asyncio.timeout(self.request_timeout_s):
                while not records or records[-1].offset < end - 1:
                    record = await reader.records.get()
                    if record is None:
                        raise LogError("Kafka log stopped during read_range")
                    if record.offset < end:
                        records.append(record)
                    else:
                        break
        except TimeoutError:
            raise LogError(
                f"reading {topic}/{partition} [{start_offset}, {end}) timed out"
            ) from None
        finally:
            tail.unsubscribe(reader)
        return records

    # -- groups ------------------------------------------------------------------------------

    def consumer(self, topic: str, group: str, member_id: str) -> _KafkaGroupConsumer:
        self._require()
        consumer = _KafkaGroupConsumer(self, topic, group, member_id)
        self._consumers.add(consumer)
        return consumer


def _poll_batch(consumer: Consumer, limit: int, wait_s: float) -> list[Message]:
    # consume(n, timeout) waits until n messages are there or the timeout passes, which would
    # add the whole timeout to a lone token's latency; poll() returns as soon as one arrives,
    # and whatever arrived with it is then taken without waiting.
    first = consumer.poll(wait_s)
    if first is None:
        return []
    if limit <= 1:
        return [first]
    return [first, *consumer.consume(num_messages=limit - 1, timeout=0)]


def _resolve(future: asyncio.Future[int], offset: int) -> None:
    if not future.done():
        future.set_result(offset)


def _fail(future: asyncio.Future[int], error: LogError) -> None:
    if not future.done():
        future.set_exception(error)


@dataclass(eq=False)
class _Reader:
    key: _Key
    position: int
    # None: the log stopped.
    records: asyncio.Queue[Record | None] = field(default_factory=asyncio.Queue)
    # False until the tail thread has placed its fetch position at or before ``position``:
    # records delivered before that may skip some of ours, so they are ignored.
    synced: bool = False


class _Tail:
    """One assigned consumer serving every reader of a ``KafkaLog``."""

    def __init__(self, log: KafkaLog) -> None:
        self._log = log
        assert log._loop is not None
        self._loop = log._loop
        self._consumer = Consumer(
            log.client_config(
                {
                    # Never joins or commits: readers are positioned by assign() alone. librdkafka
                    # still wants a group id for a consumer.
                    "group.id": f"mesh-tail-{uuid.uuid4().hex}",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "auto.offset.reset": "earliest",
                    # The broker answers a fetch as soon as one byte is there; this only bounds how
                    # long a newly assigned partition waits for the fetch in flight to return.
                    "fetch.wait.max.ms": 20,
                    "enable.partition.eof": False,
                    "logger": logging.getLogger("mesh.log.kafka.librdkafka"),
                }
            )
        )
        self._commands: queue.SimpleQueue[tuple[str, _Reader]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._readers: dict[_Key, set[_Reader]] = {}
        self._thread = threading.Thread(target=self._run, name="mesh-kafka-tail", daemon=True)
        self._stopping = False
        # Thread-side state: readers per partition and the offset the next message will have.
        self._counts: dict[_Key, int] = {}
        self._next: dict[_Key, int] = {}

    def start(self) -> None:
        self._thread.start()

    async def stop(self) -> None:
        for readers in self._readers.values():
            for reader in readers:
                reader.records.put_nowait(None)
        self._stopping = True
        self._wakeup.set()
        await asyncio.to_thread(self._thread.join, 10)

    def subscribe(self, key: _Key, position: int) -> _Reader:
        reader = _Reader(key, position)
        self._readers.setdefault(key, set()).add(reader)
        self._commands.put(("add", reader))
        self._wakeup.set()
        return reader

    def unsubscribe(self, reader: _Reader) -> None:
        readers = self._readers.get(reader.key)
        if readers is not None:
            readers.discard(reader)
            if not readers:
                del self._readers[reader.key]
        self._commands.put(("remove", reader))
        self._wakeup.set()

    # Loop side.

    def _synced(self, reader: _Reader) -> None:
        reader.synced = True

    def _deliver(self, records: list[Record]) -> None:
        for record in records:
            for reader in self._readers.get((record.topic, record.partition), ()):
                if reader.synced and record.offset >= reader.position:
                    reader.records.put_nowait(record)
                    reader.position = record.offset + 1

    # Thread side.

    def _apply(self, command: str, reader: _Reader) -> None:
        key = reader.key
        tp = TopicPartition(key[0], key[1], reader.position)
        if command == "add":
            self._counts[key] = self._counts.get(key, 0) + 1
            if key not in self._next:
                self._consumer.incremental_assign([tp])
                self._next[key] = reader.position
            elif self._next[key] > reader.position:
                # Re-assigning (rather than seek) also works before the first fetch, and it
                # drops messages of this partition already queued at the old position.
                self._consumer.incremental_unassign([TopicPartition(key[0], key[1])])
                self._consumer.incremental_assign([tp])
                self._next[key] = reader.position
            _call_soon(self._loop, self._synced, reader)
        else:
            self._counts[key] -= 1
            if self._counts[key] == 0:
                del self._counts[key]
                del self._next[key]
                self._consumer.incremental_unassign([TopicPartition(key[0], key[1])])

    def _run(self) -> None:
        try:
            while not self._stopping:
                while True:
                    try:
                        command, reader = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        self._apply(command, reader)
                    except KafkaException as error:
                        _log.error("tail %s %s failed: %s", command, reader.key, error)
                if not self._next:
                    self._wakeup.wait(0.5)
                    self._wakeup.clear()
                    continue
                messages = _poll_batch(self._consumer, 1000, 0.02)
                batch = []
                for message in messages:
                    failure = message.error()
                    if failure is not None:
                        _log.warning("tail fetch error: %s", failure.str())
                        continue
                    record = _to_record(message)
                    key = (record.topic, record.partition)
                    if key in self._next:
                        self._next[key] = record.offset + 1
                        batch.append(record)
                if batch:
                    _call_soon(self._loop, self._deliver, batch)
        finally:
            self._consumer.close()


class _KafkaGroupConsumer:
    """A member of a Kafka consumer group (classic protocol, cooperative-sticky assignment)."""

    def __init__(self, log: KafkaLog, topic: str, group: str, member_id: str) -> None:
        self._log = log
        self._topic = topic
        self._group = group
        self._member_id = member_id
        self._consumer: Consumer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._iterating = False
        self._queue: asyncio.Queue[tuple[int, Record] | None] = asyncio.Queue()
        # Written by the consumer thread (in rebalance callbacks), read by the loop.
        self._assignment: frozenset[int] = frozenset()
        # Bumped when a partition is revoked or lost, so prefetched records from before are
        # dropped instead of yielded by a member that no longer owns them.
        self._epochs: dict[int, int] = {}
        self._delivered = 0  # written by the thread
        self._taken = 0  # written by the loop
        self._paused = False
        self._last_commit: dict[int, int] = {}
        # Commits run on the member's own thread: a synchronous commit from another thread
        # hangs while this one sits in consume() (seen with confluent-kafka 2.16).
        self._commits: queue.SimpleQueue[tuple[TopicPartition, Future[None]]] = queue.SimpleQueue()

    def assignment(self) -> frozenset[int]:
        return self._assignment

    def _config(self) -> dict[str, Any]:
        log = self._log
        return log.client_config(
            {
                "group.id": self._group,
                "client.id": f"{log.client_id}-{self._member_id}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "partition.assignment.strategy": "cooperative-sticky",
                "session.timeout.ms": int(log.session_timeout_s * 1000),
                "heartbeat.interval.ms": int(log.heartbeat_interval_s * 1000),
                # Liveness is the heartbeat's job (a background thread); handling one record
                # (a whole turn) may take minutes, and our thread polls anyway.
                "max.poll.interval.ms": 86_400_000,
                "fetch.wait.max.ms": 20,
                "enable.partition.eof": False,
                "logger": logging.getLogger("mesh.log.kafka.librdkafka"),
            }
        )

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assignment = self._assignment | {tp.partition for tp in partitions}
        self._paused = False  # new partitions start unpaused; the loop re-evaluates
        _log.info(
            "member %s of %s/%s now owns %s",
            self._member_id,
            self._group,
            self._topic,
            sorted(self._assignment),
        )

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {tp.partition for tp in partitions}
        for partition in revoked:
            self._epochs[partition] = self._epochs.get(partition, 0) + 1
            self._last_commit.pop(partition, None)
        self._assignment = self._assignment - revoked

    def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        loop = self._log._loop
        assert loop is not None
        try:
            consumer.subscribe(
                [self._topic],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_revoke,
            )
            while not self._stopping:
                self._run_commits(consumer)
                room = self._log.prefetch - (self._delivered - self._taken)
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
                messages = _poll_batch(consumer, max(room, 1), 0.01)
                for message in messages:
                    error = message.error()
                    if error is not None:
                        _log.warning("group %s fetch error: %s", self._group, error.str())
                        continue
                    record = _to_record(message)
                    self._delivered += 1
                    epoch = self._epochs.get(record.partition, 0)
                    _call_soon(loop, self._queue.put_nowait, (epoch, record))
        except KafkaException as error:
            _log.error("group member %s failed: %s", self._member_id, error)
        finally:
            self._run_commits(None)
            # Leaves the group at once, so the others take the partitions without waiting for
            # the session to time out.
            consumer.close()
            _call_soon(loop, self._queue.put_nowait, None)

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
        if self._iterating:
            raise LogError("a group consumer can be iterated only once")
        self._iterating = True
        if self._closed:
            return
        await self._log._check_partition(self._topic, 0)
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
            _log.warning(
                "member %s no longer owns %s/%d; commit of offset %d dropped",
                self._member_id,
                self._topic,
                partition,
                record.offset,
            )
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
        if self._closed:
            return
        self._closed = True
        self._log._consumers.discard(self)
        self._stopping = True
        self._assignment = frozenset()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self._queue.put_nowait(None)

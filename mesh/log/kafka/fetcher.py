"""Reading the Kafka log: ``read`` and ``read_range`` on one shared, group-less tail consumer.

One tail thread owns one assigned consumer shared by every reader of a ``KafkaLog``: a gateway
tailing hundreds of turns costs one consumer, not hundreds. A new reader that starts before the
shared position of its partition rewinds it; readers ignore records below their own position.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaException, TopicPartition

from mesh.log.base import LogError, Record
from mesh.log.driver import call_soon
from mesh.log.kafka.admin import Admin
from mesh.log.kafka.client import RDKAFKA_LOGGER, Client, poll_batch, to_record

_log = logging.getLogger(__name__)

_Key = tuple[str, int]


@dataclass(eq=False)
class _Reader:
    key: _Key
    position: int
    # None: the log stopped.
    records: asyncio.Queue[Record | None] = field(default_factory=asyncio.Queue)
    # False until the tail thread has placed its fetch position at or before ``position``:
    # records delivered before that may skip some of ours, so they are ignored.
    synced: bool = False


class Tail:
    """One assigned consumer serving every reader of a ``KafkaLog``."""

    def __init__(self, client: Client, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._consumer = Consumer(
            client.settings(
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
                    "logger": logging.getLogger(RDKAFKA_LOGGER),
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
            call_soon(self._loop, self._synced, reader)
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
                messages = poll_batch(self._consumer, 1000, 0.02)
                batch = []
                for message in messages:
                    failure = message.error()
                    if failure is not None:
                        _log.warning("tail fetch error: %s", failure.str())
                        continue
                    record = to_record(message)
                    key = (record.topic, record.partition)
                    if key in self._next:
                        self._next[key] = record.offset + 1
                        batch.append(record)
                if batch:
                    call_soon(self._loop, self._deliver, batch)
        finally:
            self._consumer.close()


class Fetcher:
    """``read`` and ``read_range`` of a ``KafkaLog``, served by its ``Tail``."""

    def __init__(self, client: Client, admin: Admin, *, request_timeout_s: float) -> None:
        self._client = client
        self._admin = admin
        self._request_timeout_s = request_timeout_s

    async def read(self, topic: str, partition: int, start_offset: int) -> AsyncIterator[Record]:
        await self._admin.partitions.check(topic, partition)
        tail = self._client.require().tail
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
        end = min(end_offset, await self._admin.end_offset(topic, partition))
        if end <= start_offset:
            return []
        tail = self._client.require().tail
        reader = tail.subscribe((topic, partition), start_offset)
        records: list[Record] = []
        try:
            async with asyncio.timeout(self._request_timeout_s):
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

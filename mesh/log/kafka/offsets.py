"""A consumer group's committed offsets, read by a consumer of that group that never joins it.

The admin client's ``list_consumer_group_offsets`` is not used: when the coordinator answers
NOT_COORDINATOR (it moved, or ``__consumer_offsets`` is still loading after a broker restart),
librdkafka 2.16 hands the retry to the admin client's consumer group, which an admin client does
not have, and the process dies with SIGSEGV in ``rd_kafka_cgrp_op`` (confluent-kafka-javascript
issue 374; the persister's lag reporter met it every few seconds).

A consumer created with the group's ``group.id`` has that group handle, so the same retry just
looks the coordinator up again. It never calls ``subscribe`` or ``assign``: librdkafka sends
JoinGroup only for a subscription, so it is no member, takes no partitions and triggers no
rebalance; ``committed()`` is an OffsetFetch to the coordinator and nothing else. It never
commits (auto commit off, nothing assigned to commit). One such consumer per group, kept until
the log stops: a consumer per call would cost a coordinator lookup and a TLS handshake each time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from mesh.log.base import LogError
from mesh.log.kafka.client import RDKAFKA_LOGGER, Client


class _Reader:
    """One group's offset reader: a consumer, and the calls in flight on it."""

    def __init__(self, client: Client, group: str) -> None:
        self._consumer = Consumer(
            client.settings(
                {
                    "group.id": group,
                    "client.id": f"{client.client_id}-offsets",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "logger": logging.getLogger(RDKAFKA_LOGGER),
                }
            )
        )
        # close() must not free the consumer under a call still running in a thread (an
        # awaiting task that is cancelled does not stop its thread).
        self._idle = threading.Condition()
        self._calls = 0
        self._closed = False
        self._polling = threading.Lock()

    def committed(self, topic: str, partition: int, timeout_s: float) -> list[Any]:
        with self._idle:
            if self._closed:
                raise LogError("Kafka log is not started")
            self._calls += 1
        try:
            # Nothing is assigned, so a poll only serves queued log lines and errors (the broker
            # was down, ...): without it they would pile up for as long as the log runs.
            if self._polling.acquire(blocking=False):
                try:
                    self._consumer.poll(0)
                finally:
                    self._polling.release()
            return self._consumer.committed([TopicPartition(topic, partition)], timeout=timeout_s)
        finally:
            with self._idle:
                self._calls -= 1
                self._idle.notify_all()

    def close(self, timeout_s: float) -> None:
        with self._idle:
            self._closed = True
            self._idle.wait_for(lambda: self._calls == 0, timeout=timeout_s)
            if self._calls:
                return  # a call outlived its own timeout: leaking the consumer beats a crash
        self._consumer.close()


class GroupOffsets:
    """``committed`` of a ``KafkaLog``: per group, one never-joining consumer of that group."""

    def __init__(self, client: Client, *, request_timeout_s: float) -> None:
        self._client = client
        self._request_timeout_s = request_timeout_s
        self._readers: dict[str, _Reader] = {}
        self._closed = False

    def open(self) -> None:
        """Serve again after ``close`` (the log was started again)."""
        self._closed = False

    async def committed(self, topic: str, group: str, partition: int) -> int:
        self._client.require()
        if self._closed:  # a reader made now would never be closed
            raise LogError(f"committed offset of {group}: the log is closed")
        reader = self._readers.get(group)
        if reader is None:
            reader = self._readers[group] = _Reader(self._client, group)
        try:
            (found,) = await asyncio.to_thread(
                reader.committed, topic, partition, self._request_timeout_s
            )
        except KafkaException as error:
            raise LogError(f"committed offset of {group}: {error.args[0]}") from error
        if found.error is not None:
            raise LogError(f"committed offset of {group} on {topic}/{partition}: {found.error}")
        # Nothing committed reads as OFFSET_INVALID (-1001).
        return int(found.offset) if found.offset >= 0 else 0

    async def close(self) -> None:
        self._closed = True
        readers = list(self._readers.values())
        self._readers.clear()
        for reader in readers:
            await asyncio.to_thread(reader.close, self._request_timeout_s)

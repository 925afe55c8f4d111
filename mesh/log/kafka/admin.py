"""Topics and offsets of the Kafka log, asked of the cluster through the admin client."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]
from confluent_kafka.admin._listoffsets import OffsetSpec

from mesh.log.base import LogError
from mesh.log.driver import PartitionCounts
from mesh.log.kafka.client import Client, wait_future


class Admin:
    """``ensure_topic``, partition counts and ``end_offset`` of a ``KafkaLog`` (``committed``:
    ``offsets``, not the admin client, whose offset fetch can crash the process)."""

    def __init__(
        self,
        client: Client,
        *,
        request_timeout_s: float,
        topic_config: Mapping[str, str] | None = None,
    ) -> None:
        self._client = client
        self._request_timeout_s = request_timeout_s
        # Given to topics this creates (retention.ms, retention.bytes); an existing topic keeps
        # its own, as it keeps its partition count.
        self._topic_config = dict(topic_config or {})
        self.partitions = PartitionCounts(self._fetch_partition_count)

    async def ensure_topic(self, topic: str, partitions: int) -> None:
        if partitions <= 0:
            raise ValueError("partitions must be positive")
        admin = self._client.require().admin
        futures = admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, config=self._topic_config)],
            request_timeout=self._request_timeout_s,
        )
        try:
            await asyncio.wrap_future(futures[topic])
        except KafkaException as error:
            if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise LogError(f"creating topic {topic!r} failed: {error.args[0]}") from error
        # The controller answers before every broker knows the topic; wait until metadata shows
        # all partitions with a leader, so the first append or read does not race it.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._request_timeout_s
        while True:
            count = await self._fetch_partition_count(topic)
            if count is not None:
                self.partitions.remember(topic, count)
                return
            if loop.time() > deadline:
                raise LogError(f"topic {topic!r} did not become available")
            await asyncio.sleep(0.05)

    async def _fetch_partition_count(self, topic: str) -> int | None:
        admin = self._client.require().admin
        try:
            metadata = await asyncio.to_thread(
                admin.list_topics, topic, timeout=self._request_timeout_s
            )
        except KafkaException as error:
            raise LogError(f"metadata of {topic!r}: {error.args[0]}") from error
        found = metadata.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            return None
        if any(p.leader < 0 for p in found.partitions.values()):
            return None
        return len(found.partitions)

    async def end_offset(self, topic: str, partition: int) -> int:
        await self.partitions.check(topic, partition)
        admin = self._client.require().admin
        tp = TopicPartition(topic, partition)
        futures = admin.list_offsets(
            {tp: OffsetSpec.latest()},  # type: ignore[no-untyped-call]
            request_timeout=self._request_timeout_s,
        )
        result = await wait_future(futures[tp], f"end offset of {topic}/{partition}")
        return int(result.offset)

    async def check_writable(self, topic: str) -> None:
        """LogError unless the cluster answers and every partition of ``topic`` has a leader."""
        if await self._fetch_partition_count(topic) is None:
            raise LogError(f"topic {topic!r} has a partition without a leader (or is missing)")

    async def live_partitions(self, topic: str, group: str) -> frozenset[int]:
        """Partitions of ``topic`` assigned to a member of ``group`` that the broker sees."""
        admin = self._client.require().admin
        futures = admin.describe_consumer_groups([group], request_timeout=self._request_timeout_s)
        described = await wait_future(futures[group], f"members of {group}")
        owned: set[int] = set()
        for member in described.members or []:
            assignment = member.assignment
            for tp in assignment.topic_partitions if assignment is not None else []:
                if tp.topic == topic:
                    owned.add(int(tp.partition))
        return frozenset(owned)

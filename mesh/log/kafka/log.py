"""``KafkaLog``: starts the Kafka driver's clients, wires its parts together and stops them.

The parts: ``client`` (settings and the clients of a started log), ``admin``, ``producer``,
``fetcher`` and ``group``; see the package's docstring for the threads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from mesh.log.base import Claim, Fenced, Headers, LogError, Record
from mesh.log.driver import LogDriver
from mesh.log.kafka.admin import Admin
from mesh.log.kafka.client import Client, Running
from mesh.log.kafka.fetcher import Fetcher, Tail
from mesh.log.kafka.group import KafkaGroupConsumer
from mesh.log.kafka.offsets import GroupOffsets
from mesh.log.kafka.producer import Producer

# librdkafka's error codes for a failed TLS handshake and a failed SASL authentication.
_REFUSALS = frozenset({KafkaError._SSL, KafkaError._AUTHENTICATION})


def _note_refusal(refusals: list[str], error: KafkaError) -> None:
    if error.code() in _REFUSALS and not refusals:
        refusals.append(error.str())


class KafkaLog(LogDriver[KafkaGroupConsumer]):
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
        topic_config: Mapping[str, str] | None = None,
        max_loop_stall_s: float | None = None,
    ) -> None:
        super().__init__(
            session_timeout_s=session_timeout_s, heartbeat_interval_s=heartbeat_interval_s
        )
        self.bootstrap = bootstrap
        self.client_id = client_id
        self.request_timeout_s = request_timeout_s
        self.prefetch = prefetch
        # A group member leaves its group when the event loop that takes its records has not
        # run for this long (librdkafka would keep heartbeating for a hung loop for ever).
        self.max_loop_stall_s = (
            max(30.0, 10 * session_timeout_s) if max_loop_stall_s is None else max_loop_stall_s
        )
        # Extra librdkafka settings for every client (security.protocol, sasl.*, ...).
        self.config = dict(config or {})
        self._client = Client(bootstrap, client_id, self.config)
        self._admin = Admin(
            self._client, request_timeout_s=request_timeout_s, topic_config=topic_config
        )
        self._producer = Producer(self._client, request_timeout_s=request_timeout_s)
        self._fetcher = Fetcher(self._client, self._admin, request_timeout_s=request_timeout_s)
        self._offsets = GroupOffsets(self._client, request_timeout_s=request_timeout_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tail: Tail | None = None

    def client_config(self, extra: Mapping[str, object] | None = None) -> dict[str, Any]:
        """librdkafka settings shared by every client of this log, plus ``extra``."""
        return self._client.settings(extra)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._offsets.open()
        refusals: list[str] = []
        admin = AdminClient(
            self.client_config({"error_cb": lambda error: _note_refusal(refusals, error)})
        )
        producer = self._producer.start()
        self._tail = Tail(self._client, self._loop)
        # From here on the parts may run: Client.require() answers.
        self._client.running = Running(self._loop, producer, admin, self._tail)
        self._tail.start()
        # Fail at start, not at the first append, when the cluster is unreachable.
        try:
            await asyncio.to_thread(admin.list_topics, timeout=self.request_timeout_s)
        except KafkaException as error:
            # Error callbacks of an admin client run only when it is polled.
            await asyncio.to_thread(admin.poll, 0)
            await self.stop()
            if refusals:
                # A TLS or SASL failure says more than "transport failure": the fix is in it.
                raise LogError(f"Kafka at {self.bootstrap} refused us: {refusals[0]}") from error
            raise LogError(f"Kafka at {self.bootstrap} is unreachable: {error.args[0]}") from error

    async def stop(self) -> None:
        if self._loop is None:
            return
        await self._consumers.close_all()
        await self._offsets.close()
        with contextlib.suppress(LogError):
            await asyncio.wait_for(self.flush(), self.request_timeout_s)
        self._producer.close()
        if self._tail is not None:
            await self._tail.stop()
        await self._producer.wait_closed()
        self._loop = None
        self._client.running = None
        self._tail = None

    # -- EventLog ----------------------------------------------------------------------------

    def append(
        self,
        topic: str,
        partition: int,
        key: bytes,
        value: bytes,
        headers: Headers = (),
        *,
        fence: Claim | None = None,
    ) -> asyncio.Future[int]:
        if fence is not None and not self._holds(fence):
            # The member's own view of its group (rebalance callbacks bump the epoch): the broker
            # is not asked, see docs/reliability.md for what that leaves open.
            future: asyncio.Future[int] = self._client.require().loop.create_future()
            future.set_exception(
                Fenced(
                    f"member {fence.member_id} no longer holds "
                    f"{fence.group}/{fence.topic}/{fence.partition} at epoch {fence.epoch}"
                )
            )
            return future
        return self._producer.append(topic, partition, key, value, headers)

    def _holds(self, fence: Claim) -> bool:
        return any(member.claim(fence.partition) == fence for member in self._consumers)

    async def check_writable(self, topic: str) -> None:
        await self._admin.check_writable(topic)

    async def live_partitions(self, topic: str, group: str) -> frozenset[int]:
        return await self._admin.live_partitions(topic, group)

    async def flush(self) -> None:
        await self._producer.flush()

    async def ensure_topic(self, topic: str, partitions: int) -> None:
        await self._admin.ensure_topic(topic, partitions)

    async def partition_count(self, topic: str) -> int:
        return await self._admin.partitions.get(topic)

    async def end_offset(self, topic: str, partition: int) -> int:
        return await self._admin.end_offset(topic, partition)

    async def committed(self, topic: str, group: str, partition: int) -> int:
        await self._admin.partitions.check(topic, partition)
        return await self._offsets.committed(topic, group, partition)

    def read(self, topic: str, partition: int, start_offset: int) -> AsyncIterator[Record]:
        return self._fetcher.read(topic, partition, start_offset)

    async def read_range(
        self, topic: str, partition: int, start_offset: int, end_offset: int
    ) -> list[Record]:
        return await self._fetcher.read_range(topic, partition, start_offset, end_offset)

    def consumer(self, topic: str, group: str, member_id: str) -> KafkaGroupConsumer:
        loop = self._client.require().loop
        member = self._membership(topic, group, member_id)
        return self._consumers.add(
            KafkaGroupConsumer(
                self._client,
                self._admin,
                loop,
                member,
                self._consumers.discard,
                prefetch=self.prefetch,
                max_loop_stall_s=self.max_loop_stall_s,
            )
        )

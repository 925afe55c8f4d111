"""``append`` for the Kafka log: an idempotent ``acks=all`` producer and the thread that polls it.

The thread polls the producer so delivery reports arrive as soon as the broker acks; each report
completes the ``append`` future on the loop. A record is durable once its future resolves.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException, Message

from mesh.log.base import Headers, LogError
from mesh.log.driver import Inflight, call_soon
from mesh.log.kafka.client import RDKAFKA_LOGGER, Client


def _resolve(future: asyncio.Future[int], offset: int) -> None:
    if not future.done():
        future.set_result(offset)


def _fail(future: asyncio.Future[int], error: LogError) -> None:
    if not future.done():
        future.set_exception(error)


class Producer:
    """Appends of a ``KafkaLog``: the librdkafka producer's thread and the futures in flight."""

    def __init__(self, client: Client, *, request_timeout_s: float) -> None:
        self._client = client
        self._request_timeout_s = request_timeout_s
        self._inflight = Inflight()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> confluent_kafka.Producer:
        """A new producer, polled by a new thread until ``close``."""
        self._stopping.clear()
        producer = confluent_kafka.Producer(
            self._client.settings(
                {
                    "enable.idempotence": True,  # no duplicates or reordering on retries
                    "acks": "all",
                    # Tokens go out at once; librdkafka still batches whatever queued meanwhile.
                    "linger.ms": 0,
                    "delivery.timeout.ms": int(self._request_timeout_s * 1000),
                    "queue.buffering.max.messages": 1_000_000,
                    "logger": logging.getLogger(RDKAFKA_LOGGER),
                }
            )
        )
        self._thread = threading.Thread(
            target=self._poll, args=(producer,), name="mesh-kafka-producer", daemon=True
        )
        self._thread.start()
        return producer

    def close(self) -> None:
        """Tell the thread to deliver what is queued (for a few seconds at most) and end."""
        self._stopping.set()

    async def wait_closed(self) -> None:
        """Wait for the thread; appends still not acknowledged then fail."""
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        self._inflight.fail(LogError("Kafka log stopped before the record was acked"))
        self._thread = None

    def _poll(self, producer: confluent_kafka.Producer) -> None:
        while not self._stopping.is_set():
            producer.poll(0.05)  # runs delivery callbacks on this thread
        producer.flush(5)

    def _delivered(
        self, future: asyncio.Future[int], error: KafkaError | None, message: Message
    ) -> None:
        # librdkafka's thread: hand the outcome to the loop.
        running = self._client.running
        if running is None:
            return
        if error is not None:
            call_soon(running.loop, _fail, future, LogError(f"append failed: {error.str()}"))
        else:
            call_soon(running.loop, _resolve, future, message.offset())

    def append(
        self, topic: str, partition: int, key: bytes, value: bytes, headers: Headers = ()
    ) -> asyncio.Future[int]:
        running = self._client.require()
        future: asyncio.Future[int] = running.loop.create_future()
        self._inflight.add(future)
        try:
            running.producer.produce(
                topic,
                value,
                key,
                partition=partition,
                headers=[(name, text.encode()) for name, text in headers] or None,
                on_delivery=functools.partial(self._delivered, future),
            )
        except (BufferError, KafkaException) as error:
            future.set_exception(LogError(f"append to {topic}/{partition} refused: {error}"))
        return future

    async def flush(self) -> None:
        await self._inflight.flush()

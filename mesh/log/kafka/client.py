"""What every librdkafka client of a ``KafkaLog`` shares.

The settings each client starts from, the clients of a started log (``Client.require``), and
the small conversions between librdkafka and the log's types.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient

from mesh.log.base import LogError, Record

if TYPE_CHECKING:
    from mesh.log.kafka.fetcher import Tail

# librdkafka's own log lines (broker down, ...) go to this logger.
RDKAFKA_LOGGER = "mesh.log.kafka.librdkafka"


@dataclass(frozen=True, slots=True)
class Running:
    """The clients of a started log; replaced by the next ``start``."""

    loop: asyncio.AbstractEventLoop
    producer: Producer
    admin: AdminClient
    tail: Tail


class Client:
    """How this log's librdkafka clients connect, and the ones that run while it is started."""

    def __init__(self, bootstrap: str, client_id: str, config: Mapping[str, str]) -> None:
        self._bootstrap = bootstrap
        self.client_id = client_id
        self._config = config
        # Set by KafkaLog.start once every client runs, cleared when stop is done.
        self.running: Running | None = None

    def settings(self, extra: Mapping[str, object] | None = None) -> dict[str, Any]:
        """librdkafka settings shared by every client of this log, plus ``extra``."""
        return {
            "bootstrap.servers": self._bootstrap,
            "client.id": self.client_id,
            "socket.nagle.disable": True,
            # librdkafka's errors (broker down, ...) go to our logging, not raw to stderr. Only
            # clients that are polled deliver them, so the admin client keeps librdkafka's own.
            "log_level": 3,
            **self._config,
            **(extra or {}),
        }

    def require(self) -> Running:
        if self.running is None:
            raise LogError("Kafka log is not started")
        return self.running


def to_record(message: Message) -> Record:
    topic = message.topic()
    partition = message.partition()
    offset = message.offset()
    assert topic is not None and partition is not None and offset is not None
    key = message.key()
    value = message.value()
    _, timestamp_ms = message.timestamp()
    pairs: list[tuple[str, bytes | None]] = list(message.headers() or ())  # type: ignore[arg-type]
    headers = tuple(
        (name, raw.decode(errors="replace") if isinstance(raw, bytes) else "")
        for name, raw in pairs
    )
    return Record(
        topic,
        partition,
        offset,
        key if isinstance(key, bytes) else b"",
        value if isinstance(value, bytes) else b"",
        timestamp_ms,
        headers,
    )


def poll_batch(consumer: Consumer, limit: int, wait_s: float) -> list[Message]:
    # consume(n, timeout) waits until n messages are there or the timeout passes, which would
    # add the whole timeout to a lone token's latency; poll() returns as soon as one arrives,
    # and whatever arrived with it is then taken without waiting.
    first = consumer.poll(wait_s)
    if first is None:
        return []
    if limit <= 1:
        return [first]
    return [first, *consumer.consume(num_messages=limit - 1, timeout=0)]


async def wait_future(future: Any, what: str) -> Any:
    """Await a librdkafka admin future, turning its errors into LogError."""
    try:
        return await asyncio.wrap_future(future)
    except KafkaException as error:
        raise LogError(f"{what}: {error.args[0]}") from error

"""Child process of test_kafka_offsets: reads a group's committed offset in a loop.

Run apart from pytest so that a crash inside librdkafka (SIGSEGV) shows as this process's exit
status instead of killing the test run. Prints one line per read: ``ok OFFSET`` or
``error MESSAGE``; stops when its stdin closes, or after ``seconds``.

    python -m tests.integration.kafka_offsets_probe BOOTSTRAP GROUP TOPIC SECONDS
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time

from mesh.log.base import LogError
from mesh.log.kafka import KafkaLog


async def probe(bootstrap: str, group: str, topic: str, seconds: float) -> None:
    # A short request timeout: reads while the broker is down fail fast and the loop goes on.
    closed = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), closed.set()), daemon=True).start()
    async with KafkaLog(bootstrap, request_timeout_s=3.0) as log:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not closed.is_set():
            try:
                offset = await log.committed(topic, group, 0)
            except LogError as error:
                print("error", str(error).replace("\n", " "), flush=True)
            else:
                print("ok", offset, flush=True)
            await asyncio.sleep(0.02)


if __name__ == "__main__":
    bootstrap, group, topic, seconds = sys.argv[1:5]
    asyncio.run(probe(bootstrap, group, topic, float(seconds)))

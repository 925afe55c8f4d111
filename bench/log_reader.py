"""The reading end of the log row, in its own process.

    python -m bench.log_reader embedded LOG_PATH TOPIC COUNT
    python -m bench.log_reader kafka BOOTSTRAP TOPIC COUNT
    python -m bench.log_reader pipe - - COUNT

Log modes tail partition 0 of ``TOPIC`` from its end; the writer first appends ``ping`` records
until this process answers ``{"ready": true}`` (so the tail is known to be live), then ``COUNT``
records whose value is ``time.monotonic_ns()`` at the append. Pipe mode reads the same stamps as
lines on stdin. Either way the answer is one JSON line of latencies in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from mesh.log.base import EventLog


def _ready() -> None:
    print(json.dumps({"ready": True}), flush=True)


async def read_log(log: EventLog, topic: str, count: int) -> list[float]:
    latencies: list[float] = []
    async with log:
        start = await log.end_offset(topic, 0)
        ready = False
        async for record in log.read(topic, 0, start):
            now = time.monotonic_ns()
            if record.value == b"ping":
                if not ready:
                    ready = True
                    _ready()
                continue
            latencies.append((now - int(record.value)) / 1e6)
            if len(latencies) >= count:
                break
    return latencies


async def read_pipe(count: int) -> list[float]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _ready()
    latencies: list[float] = []
    while len(latencies) < count:
        line = await reader.readline()
        now = time.monotonic_ns()
        if not line:
            break
        latencies.append((now - int(line)) / 1e6)
    return latencies


async def main_async(mode: str, target: str, topic: str, count: int) -> None:
    if mode == "pipe":
        latencies = await read_pipe(count)
    elif mode == "kafka":
        from mesh.log.kafka import KafkaLog

        latencies = await read_log(KafkaLog(target), topic, count)
    else:
        from pathlib import Path

        from mesh.log.embedded import EmbeddedLog

        latencies = await read_log(EmbeddedLog(Path(target)), topic, count)
    print(json.dumps({"latencies_ms": latencies}), flush=True)


def main() -> None:
    mode, target, topic, count = sys.argv[1:5]
    asyncio.run(main_async(mode, target, topic, int(count)))


if __name__ == "__main__":
    main()

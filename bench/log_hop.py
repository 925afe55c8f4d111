"""Row ``log``: one record's trip from ``append`` in this process to a tail in another.

The reader is ``bench.log_reader`` (its own process). Records are appended one at a time every
few milliseconds, not awaited, as the agent appends tokens; each value is
``time.monotonic_ns()`` at the append and the reader subtracts it from its own clock on receipt.
The baseline is the floor for any cross-process hop on this machine: the same stamps written as
lines into an OS pipe to the same kind of reader process.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from bench.common import NOT_APPLICABLE, ChildProcess, Context, Row, child_env, p50_p99
from mesh.log.base import EventLog

TOPIC = "bench.log-hop.v1"
INTERVAL_S = 0.005


async def _reader(ctx: Context, mode: str, target: str, count: int) -> ChildProcess:
    return await ChildProcess.start(
        f"log reader ({mode})",
        [sys.executable, "-m", "bench.log_reader", mode, target, TOPIC, str(count)],
        child_env(),
        ctx.path("log-hop") / f"reader-{mode}.log",
        pipes=True,
    )


async def hop_log(ctx: Context, log: EventLog, mode: str, target: str, count: int) -> list[float]:
    await log.ensure_topic(TOPIC, 1)
    reader = await _reader(ctx, mode, target, count)
    try:
        ready = asyncio.create_task(reader.request(None, 120))
        deadline = time.monotonic() + 120
        # Pings until the reader has seen one: its tail is live before anything is timed.
        while not ready.done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {mode} log reader never saw a record")
            log.append(TOPIC, 0, b"hop", b"ping")
            await asyncio.wait([ready], timeout=0.1)
        await ready
        for _ in range(count):
            log.append(TOPIC, 0, b"hop", str(time.monotonic_ns()).encode())
            await asyncio.sleep(INTERVAL_S)
        await log.flush()
        answer = await reader.request(None, 120)
    finally:
        await reader.stop()
    latencies: list[float] = answer["latencies_ms"]
    return latencies


async def hop_pipe(ctx: Context, count: int) -> list[float]:
    reader = await _reader(ctx, "pipe", "-", count)
    try:
        await reader.request(None, 60)
        for _ in range(count):
            await reader.write_line(f"{time.monotonic_ns()}\n".encode())
            await asyncio.sleep(INTERVAL_S)
        answer = await reader.request(None, 60)
    finally:
        await reader.stop()
    latencies: list[float] = answer["latencies_ms"]
    return latencies


async def run(ctx: Context, *, kafka: bool) -> list[Row]:
    from mesh.log.embedded import EmbeddedLog

    count = 50 if ctx.quick else 1000
    rows: list[Row] = []
    drivers = ["embedded", "kafka"] if kafka else ["embedded"]
    for driver in drivers:
        ctx.progress(f"log: {count} records through the {driver} log and through a pipe")
        log: EventLog
        if driver == "kafka":
            from mesh.log.kafka import KafkaLog

            target = await ctx.kafka_bootstrap()
            log = KafkaLog(target)
        else:
            target = str(ctx.path("log-hop") / "hop.sqlite3")
            log = EmbeddedLog(Path(target))
        async with log:
            through_log = await hop_log(ctx, log, driver, target, count)
        # The pipe runs right after, so both see the same machine load.
        through_pipe = await hop_pipe(ctx, count)
        l50, l99 = p50_p99(through_log)
        b50, b99 = p50_p99(through_pipe)
        rows.append(
            Row(
                row="log",
                variant=f"{driver} log",
                baseline=f"pipe p50 {b50:.2f} / p99 {b99:.2f} ms",
                subject=f"{driver} p50 {l50:.2f} / p99 {l99:.2f} ms",
                comparison=f"{l50 - b50:+.2f} ms p50, {l99 - b99:+.2f} ms p99",
                target="none (informational)",
                verdict=NOT_APPLICABLE,
                metrics={
                    "records": len(through_log),
                    "log_p50_ms": l50,
                    "log_p99_ms": l99,
                    "pipe_p50_ms": b50,
                    "pipe_p99_ms": b99,
                },
                note=f"one record every {INTERVAL_S * 1000:.0f} ms, appends not awaited",
            )
        )
    return rows


__all__ = ["run"]

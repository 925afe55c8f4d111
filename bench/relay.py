"""Row ``relay``: how many tokens a gateway forwards, and how late, vs a bare gRPC stream.

No model: a gateway process runs on a fresh embedded log with no agent, and
``bench.agent_player`` (its own process) plays the agent for every turn the gateway accepted,
appending ``TurnStarted``, tokens and ``TurnFinished`` with coalesced, non-awaited appends. This
process is the client: it opens 1, 100 and 1000 concurrent ``StreamTurn`` streams (grpc.aio,
asking the gateway to coalesce tokens that are ready together into ``TokenRun`` frames) and reads
them to the end. The baseline is ``bench.echo_server``, a grpc.aio server-streaming
server with nothing behind it, read by the same client code at the same concurrency.

Two phases per concurrency and side:

- saturated: every stream gets its tokens as fast as the source can produce them. Gives
  delivered tokens/s (first append to last receipt) and tokens per CPU-second of the server
  process ("tokens/s per core").
- paced: the source emits a fixed rate in all (50 tokens/s per stream, at most 5,000 tokens/s
  and at most half of the gateway's saturated rate, the same rate for both sides) for a few
  seconds. Gives per-token
  latency from the append (or, for the echo, the hand-off to gRPC) to the client's receipt:
  both stamps are CLOCK_MONOTONIC on this machine. The relay's "added" latency is its latency
  minus the echo's at the same rate. The first half second is left out (``SETTLE_S``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from chat.gateway.v1 import gateway_pb2, gateway_service_pb2_grpc
from grpc import aio

from bench.common import (
    ChildProcess,
    Context,
    Row,
    child_env,
    cpu_seconds,
    free_port,
    p50_p99,
    verdict,
)
from mesh.auth import add_key_to_file
from mesh.launcher import wait_healthy
from mesh.log import TURN_EVENTS, TURN_REQUESTS, LogSettings
from mesh.log.embedded import EmbeddedLog
from services.gateway.settings import GatewaySettings

PER_STREAM_RATE = 50.0  # tokens/s of one stream in the paced phase: a fast CPU model
PACED_SHARE = 0.5  # paced load as a share of the gateway's saturated rate, at most
# Paced load in all, at most: a fixed ceiling keeps runs comparable when the saturated rate moves.
PACED_MAX_RATE = 5_000.0
PARTITIONS = 4
STREAMS_PER_CHANNEL = 250
TARGET_TOKENS_PER_CPU_S = 10_000.0
TARGET_ADDED_P99_MS = 1.0
PHASE_TIMEOUT_S = 180.0
# Paced latencies count from this long after the phase began: every stream starting in the same
# instant (a burst real traffic does not have) delays the first tokens; see docs/performance.md.
SETTLE_S = 0.5

Call = Any  # grpc.aio UnaryStreamCall; its generic parameters do not help here


@dataclass
class Phase:
    tokens: int
    seconds: float
    cpu_s: float
    latencies_ms: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_cpu_s(self) -> float:
        # /proc counts CPU time in clock ticks; a phase shorter than one tick still used one.
        return self.tokens / max(self.cpu_s, 1 / os.sysconf("SC_CLK_TCK"))


def _channels(addr: str, streams: int) -> list[aio.Channel]:
    # Separate connections (a local subchannel pool each), as many clients would have.
    count = max(1, -(-streams // STREAMS_PER_CHANNEL))
    return [
        aio.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(count)
    ]


async def _read(call: Call, samples: list[tuple[int, int]]) -> tuple[int, int]:
    """Read one stream to its end, appending (stamp, receipt) in monotonic ns per token;
    returns the stream's token count and the receipt of its last token."""
    count = last = 0
    while True:
        frame = await call.read()
        if frame is aio.EOF:
            break
        kind = frame.WhichOneof("frame")
        if kind == "token":
            last = time.monotonic_ns()
            samples.append((int(frame.token.text), last))
            count += 1
        elif kind == "token_run":
            last = time.monotonic_ns()
            samples.extend((int(text), last) for text in frame.token_run.texts)
            count += len(frame.token_run.texts)
        elif kind == "finished":
            break
    return count, last


async def _measure(
    calls: Sequence[Call], pid: int, start: Callable[[], Awaitable[None]], settle_s: float = 0.0
) -> Phase:
    """Run one phase; latencies of tokens stamped in its first ``settle_s`` are left out."""
    samples: list[tuple[int, int]] = []
    readers = [asyncio.create_task(_read(call, samples)) for call in calls]
    cpu_before = cpu_seconds(pid)
    began = time.monotonic_ns()
    try:
        await asyncio.wait_for(start(), PHASE_TIMEOUT_S)
        results = await asyncio.wait_for(asyncio.gather(*readers), PHASE_TIMEOUT_S)
    finally:
        for reader in readers:
            reader.cancel()
        for call in calls:
            call.cancel()
    cpu = cpu_seconds(pid) - cpu_before
    tokens = sum(count for count, _ in results)
    last = max((at for _, at in results), default=began)
    settled = began + int(settle_s * 1e9)
    latencies = [(got - stamp) / 1e6 for stamp, got in samples if stamp >= settled]
    return Phase(tokens, (last - began) / 1e9, cpu, latencies)


class RelaySide:
    """The gateway under test, its agent player and a client for them."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.work = ctx.path("relay")
        self.log_path = self.work / "log" / "mesh-log.sqlite3"
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.gateway: ChildProcess | None = None
        self.player: ChildProcess | None = None
        self.api_key = ""

    async def start(self) -> None:
        keys = self.work / "api-keys.json"
        self.api_key = add_key_to_file(keys, "bench", rate_per_s=1e6, burst=1_000_000)
        # Topics first, so the player and the gateway agree on them whoever starts first.
        async with EmbeddedLog(self.log_path) as log:
            await log.ensure_topic(TURN_REQUESTS, PARTITIONS)
            await log.ensure_topic(TURN_EVENTS, PARTITIONS)
        gateway = GatewaySettings(
            host="127.0.0.1",
            port=self.port,
            metrics_port=-1,
            api_keys_file=keys,
            log_level="WARNING",
            max_streams=5000,
            http_port=-1,  # the row measures gRPC; no HTTP listener on a fixed port
            # Nothing listens there: new conversations never ask the persister.
            persister_addr=f"127.0.0.1:{free_port()}",
            # ...and the row has no persister and plays the agents itself: starts need neither.
            require_persister=False,
            require_agent=False,
            log=LogSettings(driver="embedded", path=self.log_path, partitions=PARTITIONS),
        )
        # Every gateway variable, so none of the caller's MESH_GATEWAY_* leak into the row.
        env = {**child_env(), **gateway.to_env()}
        log_file = self.work / "gateway.log"
        self.gateway = await ChildProcess.start(
            "gateway", [sys.executable, "-m", "services.gateway"], env, log_file, pipes=False
        )
        await asyncio.to_thread(
            wait_healthy, self.addr, timeout_s=90.0, log_path=log_file, name="relay gateway"
        )
        self.player = await ChildProcess.start(
            "agent player",
            [sys.executable, "-m", "bench.agent_player", str(self.log_path)],
            env,
            self.work / "player.log",
            pipes=True,
        )
        await self.player.request(None, 60)

    async def stop(self) -> None:
        if self.player is not None:
            await self.player.stop()
        if self.gateway is not None:
            await self.gateway.stop()

    @property
    def pid(self) -> int:
        assert self.gateway is not None
        return self.gateway.process.pid

    async def _open(
        self, channels: list[aio.Channel], streams: int
    ) -> tuple[list[Call], list[list[str]]]:
        stubs = [gateway_service_pb2_grpc.GatewayServiceStub(ch) for ch in channels]  # type: ignore[no-untyped-call]
        metadata = (("x-api-key", self.api_key),)

        async def one(index: int) -> tuple[Call, list[str]]:
            call = stubs[index % len(stubs)].StreamTurn(
                gateway_pb2.StreamTurnRequest(
                    start=gateway_pb2.StartTurn(text=f"relay {index}", coalesce_tokens=True)
                ),
                metadata=metadata,
            )
            frame = await call.read()
            if frame is aio.EOF or frame.WhichOneof("frame") != "accepted":
                raise RuntimeError(f"the gateway did not accept stream {index}: {frame}")
            return call, [frame.accepted.turn_id, frame.accepted.conversation_id]

        opened = await asyncio.wait_for(
            asyncio.gather(*(one(i) for i in range(streams))), PHASE_TIMEOUT_S
        )
        return [c for c, _ in opened], [t for _, t in opened]

    async def phase(self, streams: int, command: dict[str, Any], settle_s: float = 0.0) -> Phase:
        assert self.player is not None
        player = self.player
        channels = _channels(self.addr, streams)
        try:
            calls, turns = await self._open(channels, streams)

            async def start() -> None:
                await player.request({**command, "turns": turns}, PHASE_TIMEOUT_S)

            return await _measure(calls, self.pid, start, settle_s)
        finally:
            for channel in channels:
                await channel.close()


class EchoSide:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.server: ChildProcess | None = None

    async def start(self) -> None:
        work = self.ctx.path("relay")
        self.server = await ChildProcess.start(
            "echo server",
            [sys.executable, "-m", "bench.echo_server", str(self.port)],
            child_env(),
            work / "echo.log",
            pipes=True,
        )
        await self.server.request(None, 60)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()

    async def phase(
        self,
        streams: int,
        go: dict[str, Any],
        stream_request: dict[str, Any],
        settle_s: float = 0.0,
    ) -> Phase:
        assert self.server is not None
        channels = _channels(self.addr, streams)
        control = aio.insecure_channel(self.addr)
        try:
            body = json.dumps(stream_request).encode()
            # Raw bytes out (no request serializer), the gateway's frame type back.
            methods: list[Any] = [
                channel.unary_stream(
                    "/bench.Echo/Stream",
                    response_deserializer=gateway_pb2.StreamTurnResponse.FromString,
                )
                for channel in channels
            ]
            calls: list[Call] = [methods[i % len(methods)](body) for i in range(streams)]
            go_rpc: Any = control.unary_unary("/bench.Echo/Go")

            async def start() -> None:
                await go_rpc(
                    json.dumps({**go, "streams": streams}).encode(), timeout=PHASE_TIMEOUT_S
                )

            return await _measure(calls, self.server.process.pid, start, settle_s)
        finally:
            await control.close()
            for channel in channels:
                await channel.close()


def _sizes(quick: bool, concurrency: Sequence[int] | None) -> tuple[list[int], int, float, float]:
    levels = list(concurrency or ((1, 10) if quick else (1, 100, 1000)))
    total = 400 if quick else 20_000
    paced_s, settle_s = (0.6, 0.1) if quick else (4.5, SETTLE_S)
    return levels, total, paced_s, settle_s


async def run(ctx: Context, *, concurrency: Sequence[int] | None = None) -> list[Row]:
    levels, total, paced_s, settle_s = _sizes(ctx.quick, concurrency)
    relay, echo = RelaySide(ctx), EchoSide(ctx)
    rows: list[Row] = []
    try:
        ctx.progress("relay: starting a gateway, the agent player and the echo server")
        await relay.start()
        await echo.start()
        # Warm-up, not recorded.
        await relay.phase(1, {"cmd": "saturate", "tokens": 200, "burst": 50})
        await echo.phase(1, {}, {"tokens": 200})
        for streams in levels:
            per_stream = max(20, total // streams)
            ctx.progress(f"relay: {streams} streams, saturated ({per_stream} tokens each)")
            burst = min(50, per_stream)
            relay_sat = await relay.phase(
                streams, {"cmd": "saturate", "tokens": per_stream, "burst": burst}
            )
            echo_sat = await echo.phase(streams, {}, {"tokens": per_stream})
            rate = min(
                streams * PER_STREAM_RATE, PACED_MAX_RATE, PACED_SHARE * relay_sat.tokens_per_s
            )
            ctx.progress(f"relay: {streams} streams, paced at {rate:.0f} tokens/s for {paced_s}s")
            relay_paced = await relay.phase(
                streams, {"cmd": "paced", "rate": rate, "duration_s": paced_s}, settle_s
            )
            echo_paced = await echo.phase(
                streams, {"rate": rate, "duration_s": paced_s}, {"paced": True}, settle_s
            )
            rows.append(
                _row(streams, per_stream, rate, relay_sat, echo_sat, relay_paced, echo_paced)
            )
    finally:
        await relay.stop()
        await echo.stop()
    return rows


def _row(
    streams: int,
    per_stream: int,
    rate: float,
    relay_sat: Phase,
    echo_sat: Phase,
    relay_paced: Phase,
    echo_paced: Phase,
) -> Row:
    r50, r99 = p50_p99(relay_paced.latencies_ms)
    e50, e99 = p50_p99(echo_paced.latencies_ms)
    rs50, rs99 = p50_p99(relay_sat.latencies_ms)
    added50, added99 = r50 - e50, r99 - e99
    per_cpu = relay_sat.tokens_per_cpu_s
    ratio = relay_sat.tokens_per_s / echo_sat.tokens_per_s if echo_sat.tokens_per_s else 0.0
    return Row(
        row="relay",
        variant=f"{streams} stream{'s' if streams > 1 else ''}",
        baseline=(
            f"echo {echo_sat.tokens_per_s:,.0f} tok/s ({echo_sat.tokens_per_cpu_s:,.0f}/cpu-s); "
            f"paced p50 {e50:.2f} / p99 {e99:.2f} ms"
        ),
        subject=(
            f"gateway {relay_sat.tokens_per_s:,.0f} tok/s ({per_cpu:,.0f}/cpu-s); "
            f"paced p50 {r50:.2f} / p99 {r99:.2f} ms"
        ),
        comparison=f"{ratio:.2f}x echo tok/s; added {added50:+.2f} ms p50, {added99:+.2f} ms p99",
        target=(
            f">= {TARGET_TOKENS_PER_CPU_S:,.0f} tok per gateway cpu-s; "
            f"<= +{TARGET_ADDED_P99_MS:.0f} ms p99"
        ),
        verdict=verdict(per_cpu >= TARGET_TOKENS_PER_CPU_S and added99 <= TARGET_ADDED_P99_MS),
        metrics={
            "streams": streams,
            "tokens_per_stream_saturated": per_stream,
            "relay_tokens": relay_sat.tokens,
            "relay_tokens_per_s": relay_sat.tokens_per_s,
            "relay_tokens_per_cpu_s": per_cpu,
            "relay_gateway_cpu_s": relay_sat.cpu_s,
            "echo_tokens": echo_sat.tokens,
            "echo_tokens_per_s": echo_sat.tokens_per_s,
            "echo_tokens_per_cpu_s": echo_sat.tokens_per_cpu_s,
            "throughput_ratio": ratio,
            "paced_rate_tokens_per_s": rate,
            "relay_paced_tokens": relay_paced.tokens,
            # Near 1.0: the gateway had no CPU to spare at the paced rate (latency is queueing).
            "relay_paced_gateway_cpu_share": relay_paced.cpu_s / max(relay_paced.seconds, 1e-9),
            "echo_paced_tokens": echo_paced.tokens,
            "relay_latency_p50_ms": r50,
            "relay_latency_p99_ms": r99,
            "echo_latency_p50_ms": e50,
            "echo_latency_p99_ms": e99,
            "added_latency_p50_ms": added50,
            "added_latency_p99_ms": added99,
            "relay_saturated_latency_p50_ms": rs50,
            "relay_saturated_latency_p99_ms": rs99,
        },
        note=(
            f"gateway streams coalesce (TokenRun frames), the echo sends a frame per token; "
            f"paced at {rate:,.0f} tok/s in all; saturated latency p50 {rs50:.1f} / "
            f"p99 {rs99:.1f} ms"
        ),
    )


__all__ = ["run"]

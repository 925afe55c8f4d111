"""Relay capacity of one gateway process: tokens forwarded per second of gateway CPU.

    python -m services.gateway.bench_relay [--streams 20] [--tokens 2000] [--rpc stream|chat]

Starts ``python -m services.gateway`` on a fresh embedded log, opens ``--streams`` turns, plays
the agent for all of them at once (appending tokens in bursts, as a fast model would), and
reads every stream to its end. Reports tokens/s of wall time and tokens per CPU-second of the
gateway process (user + system time from /proc), which is what "tokens/s per core" means.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from chat.common.v1 import common_pb2
from chat.events.v1 import events_pb2
from chat.gateway.v1 import gateway_pb2, gateway_service_pb2_grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.auth import add_key_to_file
from mesh.log import TURN_EVENTS
from mesh.log.embedded import EmbeddedLog
from mesh.turn_ids import parse_turn_id

_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


async def _wait_serving(addr: str) -> None:
    async with aio.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(300):
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"gateway at {addr} did not start")


async def _play(log: EmbeddedLog, turn_id: str, conversation_id: str, tokens: int) -> None:
    partition = parse_turn_id(turn_id).partition
    key = conversation_id.encode()
    burst = 50
    for first in range(1, tokens + 1, burst):
        for seq in range(first, min(first + burst, tokens + 1)):
            event = events_pb2.TurnEvent(
                token=events_pb2.TokenEmitted(turn_id=turn_id, seq=seq, text=" tok")
            )
            log.append(TURN_EVENTS, partition, key, event.SerializeToString())
        await log.flush()
    done = events_pb2.TurnEvent(
        finished=events_pb2.TurnFinished(
            turn_id=turn_id, finish_reason=common_pb2.FINISH_REASON_STOP, last_seq=tokens
        )
    )
    await log.append(TURN_EVENTS, partition, key, done.SerializeToString())


async def _read_stream(call: Any) -> int:
    count = 0
    while True:
        response = await call.read()
        if response is aio.EOF:
            return count
        kind = response.WhichOneof("frame")
        if kind == "token":
            count += 1
        elif kind == "finished":
            return count


async def run(streams: int, tokens: int, rpc: str) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="mesh-bench-gateway-"))
    keys = workdir / "keys.json"
    api_key = add_key_to_file(keys, "bench", rate_per_s=1e6, burst=1_000_000)
    log_path = workdir / "log.sqlite3"
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(_ROOT), str(_ROOT / "gen" / "python")]),
        "MESH_STATE_DIR": str(workdir),
        "MESH_LOG_PATH": str(log_path),
        "MESH_GATEWAY_PORT": str(port),
        "MESH_GATEWAY_METRICS_PORT": "-1",
        "MESH_GATEWAY_API_KEYS_FILE": str(keys),
        "MESH_GATEWAY_LOG_LEVEL": "WARNING",
        "MESH_PERSISTER_ADDR": f"127.0.0.1:{_free_port()}",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.gateway", cwd=_ROOT, env=env
    )
    addr = f"127.0.0.1:{port}"
    metadata = (("x-api-key", api_key),)
    try:
        await _wait_serving(addr)
        async with EmbeddedLog(log_path) as log, aio.insecure_channel(addr) as channel:
            stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)  # type: ignore[no-untyped-call]
            calls = []
            accepted = []
            for index in range(streams):
                start = gateway_pb2.StartTurn(text=f"bench {index}")
                if rpc == "chat":
                    call = stub.Chat(metadata=metadata)
                    await call.write(gateway_pb2.ChatRequest(start=start))
                    await call.write(
                        gateway_pb2.ChatRequest(credit=gateway_pb2.FlowCredit(tokens=tokens))
                    )
                else:
                    call = stub.StreamTurn(
                        gateway_pb2.StreamTurnRequest(start=start), metadata=metadata
                    )
                first = await call.read()
                calls.append(call)
                accepted.append(first.accepted)
            cpu_before = _cpu_seconds(process.pid)
            began = time.perf_counter()
            readers = [asyncio.create_task(_read_stream(call)) for call in calls]
            await asyncio.gather(
                *(_play(log, a.turn_id, a.conversation_id, tokens) for a in accepted)
            )
            counts = await asyncio.gather(*readers)
            wall = time.perf_counter() - began
            cpu = _cpu_seconds(process.pid) - cpu_before
            for call in calls:
                call.cancel()
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await process.wait()
    total = float(sum(counts))
    if total != streams * tokens:
        raise RuntimeError(f"expected {streams * tokens} tokens, got {total}")
    return {
        "tokens": total,
        "wall_s": wall,
        "gateway_cpu_s": cpu,
        "tokens_per_s": total / wall,
        "tokens_per_cpu_s": total / cpu if cpu else float("inf"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--rpc", choices=["stream", "chat"], default="stream")
    args = parser.parse_args()
    result = asyncio.run(run(args.streams, args.tokens, args.rpc))
    print(f"{'rpc':<10}{'streams':>8}{'tokens':>10}{'wall s':>9}{'tok/s':>10}{'tok/cpu-s':>11}")
    print(
        f"{args.rpc:<10}{args.streams:>8}{int(result['tokens']):>10}{result['wall_s']:>9.2f}"
        f"{result['tokens_per_s']:>10.0f}{result['tokens_per_cpu_s']:>11.0f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

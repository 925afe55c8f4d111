"""The soak of bench/faults.py: many concurrent streams for a while, each a client starting one
turn after another, with the resident memory and the open file descriptors of every process of
the mesh sampled from /proc. Memory or descriptors that keep growing under a steady load are a
leak; the soak reports each process's first, last and largest sample and whether it stayed flat."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from chat.common.v1 import common_pb2
from chat.gateway.v1 import gateway_pb2, gateway_service_pb2_grpc

from bench.fault_mesh import Followed, Launched, Outcome, cmdline, count_tokens

SOAK_MAX_TOKENS = 40  # short turns: many of them start and end during the soak
SAMPLE_EVERY_S = 10.0
END_GRACE_S = 60.0  # how long the turns in flight at the end may take to finish
# Growth a process may show between the first sample taken under full load and the last one
# and still count as flat (allocator and cache warm-up, a few more connections).
RSS_SLACK = 1.15
FDS_SLACK = 1.15


@dataclass
class Samples:
    """One process's samples: (RSS MiB, open fds)."""

    values: list[tuple[float, int]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        rss = [v[0] for v in self.values]
        fds = [v[1] for v in self.values]
        flat = rss[-1] <= rss[0] * RSS_SLACK and fds[-1] <= fds[0] * FDS_SLACK + 8
        return {"rss_mib": (round(rss[0]), round(rss[-1]), round(max(rss))),
                "fds": (fds[0], fds[-1], max(fds)), "flat": flat}  # fmt: skip


@dataclass
class Tally:
    turns: int = 0
    unfinished: int = 0  # accepted, but the stream broke before TurnFinished
    lost: int = 0
    duplicated: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    cut: int = 0  # clients whose turn was still queued or streaming at the end, cancelled


def soak(mesh: Launched, streams: int, duration_s: float) -> tuple[Outcome, dict[str, Any]]:
    """``streams`` clients for ``duration_s``; sampling starts once every stream has been
    started and a quarter of the time has passed (the load is steady from then on)."""
    tally = Tally()
    samples: dict[str, Samples] = {}
    asyncio.run(_soak(mesh, streams, duration_s, tally, samples))
    outcome = Outcome(finished=tally.unfinished == 0, lost=tally.lost)
    outcome.duplicated = tally.duplicated
    refused = dict(tally.refused) or "none"
    outcome.note = (
        f"{streams} streams for {duration_s:.0f} s: {tally.turns} turns, "
        f"{tally.unfinished} unfinished, {tally.cut} cut at the end, refused: {refused}"
    )
    summary = {name: s.summary() for name, s in samples.items() if s.values}
    if not all(s["flat"] for s in summary.values()):
        outcome.failed_calls += 1
        outcome.note += "; not flat: " + ", ".join(n for n, s in summary.items() if not s["flat"])
    return outcome, summary


async def _soak(
    mesh: Launched, streams: int, duration_s: float, tally: Tally, samples: dict[str, Samples]
) -> None:
    stop_at = time.monotonic() + duration_s
    channels = [grpc.aio.insecure_channel(addr) for addr in mesh.gateways()]
    stubs = [gateway_service_pb2_grpc.GatewayServiceStub(c) for c in channels]  # type: ignore[no-untyped-call]
    clients = [
        asyncio.create_task(_client(stubs[i % len(stubs)], mesh.key, stop_at, tally))
        for i in range(streams)
    ]
    await asyncio.sleep(duration_s / 4)
    while time.monotonic() < stop_at:
        _sample(mesh, samples)
        await asyncio.sleep(min(SAMPLE_EVERY_S, max(0.0, stop_at - time.monotonic())))
    _sample(mesh, samples)
    # Bounded: turns still queued or streaming a while after the end are cut (not judged).
    _, late = await asyncio.wait(clients, timeout=END_GRACE_S)
    for client in late:
        client.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    tally.cut = len(late)
    for channel in channels:
        await channel.close()


async def _client(
    stub: gateway_service_pb2_grpc.GatewayServiceStub, key: str, stop_at: float, tally: Tally
) -> None:
    """Turn after turn until ``stop_at``; a refused start waits a second and tries again."""
    while time.monotonic() < stop_at:
        followed = Followed()
        start = gateway_pb2.StartTurn(
            text=f"soak {uuid.uuid4()}",
            request_id=str(uuid.uuid4()),
            options=common_pb2.GenerationOptions(max_tokens=SOAK_MAX_TOKENS, temperature=0.0),
        )
        try:
            call = stub.StreamTurn(
                gateway_pb2.StreamTurnRequest(start=start),
                metadata=(("x-api-key", key),),
                timeout=max(1.0, stop_at - time.monotonic() + 120),
            )
            async for frame in call:
                followed.take(frame)
        except grpc.aio.AioRpcError as error:
            if not followed.turn_id:
                tally.refused[error.code().name] += 1
                await asyncio.sleep(1.0)
                continue
        outcome = count_tokens(followed, Outcome())
        tally.turns += 1
        tally.unfinished += not outcome.finished
        tally.lost += outcome.lost
        tally.duplicated += outcome.duplicated


def _sample(mesh: Launched, samples: dict[str, Samples]) -> None:
    """RSS and open fds of every service and server process of the mesh, keyed by name."""
    pids = {name: mesh.service(name)["pid"] for name in mesh.names()}
    pids["launcher"] = mesh.process.pid
    for pid in mesh.infra_pids(children=False):
        pids.setdefault(_infra_name(pid), pid)
    for name, pid in pids.items():
        got = _rss_fds(pid)
        if got is not None:
            samples.setdefault(name, Samples()).values.append(got)


def _infra_name(pid: int) -> str:
    argv = cmdline(pid)
    for kind in ("kafka.Kafka", "elasticsearch", "postgres"):
        if any(kind in part for part in argv):
            return f"{kind.split('.')[0]} ({pid})"
    return f"pid {pid}"


def _rss_fds(pid: int) -> tuple[float, int] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    kib = next(
        (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0
    )
    return kib / 1024, fds

"""Running the Go/TS clients and the browser driver, and checking what they report."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chat.common.v1 import common_pb2
from chat.gateway.v1 import gateway_pb2, gateway_service_pb2_grpc
from grpc import aio

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        out, err = self.stdout[-3000:], self.stderr[-3000:]
        return f"exit {self.returncode}\nstdout:\n{out}\nstderr:\n{err}"


async def run(
    command: list[str],
    *,
    cwd: Path = REPO,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
) -> Finished:
    """Run a command without blocking the event loop (the fake gateway is served on it)."""
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        stdout, stderr = await process.communicate()
        raise AssertionError(
            f"{command[:3]} still running after {timeout_s:.0f}s\n"
            f"stdout:\n{stdout.decode()[-3000:]}\nstderr:\n{stderr.decode()[-3000:]}"
        ) from None
    assert process.returncode is not None
    return Finished(process.returncode, stdout.decode(), stderr.decode())


def json_events(result: Finished) -> list[dict[str, Any]]:
    """The ``--json`` lines a client printed (one object per frame)."""
    events = []
    for line in result.stdout.splitlines():
        if line.strip():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise AssertionError(f"not a JSON line: {line!r}\n{result.describe()}") from error
    return events


def tokens_of(events: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(int(e["seq"]), str(e["text"])) for e in events if e["event"] == "token"]


def assert_contiguous(tokens: list[tuple[int, str]], first_seq: int) -> None:
    """Seqs run first_seq, first_seq+1, ... with no gap and no repeat."""
    seqs = [seq for seq, _ in tokens]
    assert seqs == list(range(first_seq, first_seq + len(seqs))), f"seqs not contiguous: {seqs}"


@dataclass(frozen=True)
class Replay:
    tokens: list[tuple[int, str]]
    finish_reason: str

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.tokens)


async def replay_turn(addr: str, api_key: str, turn_id: str, *, timeout_s: float = 120.0) -> Replay:
    """The whole turn as the gateway tells it: ResumeTurn(after_seq=0) over native gRPC."""
    async with aio.insecure_channel(addr) as channel:
        stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        call = stub.ResumeTurn(
            gateway_pb2.ResumeTurnRequest(turn_id=turn_id, after_seq=0),
            metadata=(("x-api-key", api_key),),
            timeout=timeout_s,
        )
        tokens: list[tuple[int, str]] = []
        async for response in call:
            frame = response.WhichOneof("frame")
            if frame == "token":
                tokens.append((response.token.seq, response.token.text))
            elif frame == "finished":
                reason = common_pb2.FinishReason.Name(response.finished.finish_reason)
                return Replay(tokens, reason)
    raise AssertionError(f"ResumeTurn({turn_id}) ended without TurnFinished")


def scripted_text(count: int) -> str:
    """What the fake gateway generates for ``count`` tokens."""
    return "".join(f"word{i} " for i in range(1, count + 1))

"""The relay row's baseline: a bare grpc.aio server-streaming server, nothing behind it.

    python -m bench.echo_server PORT

It sends the gateway's own frame type (``StreamTurnResponse`` with a ``Token``) so messages cost
the same to encode and decode, and stamps each token's text with ``time.monotonic_ns()`` when it
hands the frame to gRPC, as the agent player stamps its log appends. Requests are raw JSON (no
proto needed for a benchmark). Streams join a session and wait; ``Go`` starts the session once
all its streams are open, so stream setup stays out of the measured time, as it does for the
gateway:

- ``/bench.Echo/Stream`` ``{"tokens": T}``: after ``Go``, ``T`` tokens as fast as gRPC takes them.
- ``/bench.Echo/Stream`` ``{"paced": true}``: tokens from the session's pacer until it ends.
- ``/bench.Echo/Go`` ``{"streams": N}``: start once ``N`` streams joined; with ``"rate": R,
  "duration_s": D`` also pace: ``R`` tokens/s in all, round-robin, for ``D`` seconds, then end
  the paced streams. Answers how many tokens the pacer sent.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from chat.gateway.v1 import gateway_pb2
from grpc import aio

_END = -1


class Echo:
    def __init__(self) -> None:
        self._go = asyncio.Event()
        self._queues: list[asyncio.Queue[int]] = []
        self._joined = 0
        self._joined_changed = asyncio.Event()

    def _join(self) -> asyncio.Event:
        self._joined += 1
        self._joined_changed.set()
        return self._go

    async def stream(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        params: dict[str, Any] = json.loads(request)
        if params.get("paced"):
            queue: asyncio.Queue[int] = asyncio.Queue()
            self._queues.append(queue)
            self._join()
            while (seq := await queue.get()) != _END:
                yield _frame(seq)
            return
        go = self._join()
        await go.wait()
        for seq in range(1, int(params["tokens"]) + 1):
            yield _frame(seq)

    async def go(self, request: bytes, context: Any) -> bytes:
        params: dict[str, Any] = json.loads(request)
        deadline = time.monotonic() + 60
        while self._joined < int(params["streams"]):
            self._joined_changed.clear()
            await asyncio.wait_for(self._joined_changed.wait(), deadline - time.monotonic())
        # A fresh session for the next round; this one's streams hold the old event.
        go, self._go = self._go, asyncio.Event()
        queues, self._queues = self._queues, []
        self._joined = 0
        go.set()
        sent = 0
        if "rate" in params:
            sent = await _pace(queues, float(params["rate"]), float(params["duration_s"]))
        return json.dumps({"sent": sent}).encode()


async def _pace(queues: list[asyncio.Queue[int]], rate: float, duration_s: float) -> int:
    seqs = [0] * len(queues)
    started = time.monotonic()
    sent = index = 0
    while (elapsed := time.monotonic() - started) < duration_s:
        due = int(rate * elapsed) - sent
        for _ in range(due):
            seqs[index] += 1
            queues[index].put_nowait(seqs[index])
            index = (index + 1) % len(queues)
        sent += due
        await asyncio.sleep(0.0005)
    for queue in queues:
        queue.put_nowait(_END)
    return sent


def _frame(seq: int) -> bytes:
    return gateway_pb2.StreamTurnResponse(
        token=gateway_pb2.Token(turn_id="echo", seq=seq, text=str(time.monotonic_ns()))
    ).SerializeToString()


async def serve(port: int) -> None:
    echo = Echo()
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Stream": grpc.unary_stream_rpc_method_handler(echo.stream),
            "Go": grpc.unary_unary_rpc_method_handler(echo.go),
        },
    )
    server = aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(json.dumps({"ready": True}), flush=True)
    await server.wait_for_termination()


def main() -> None:
    asyncio.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()

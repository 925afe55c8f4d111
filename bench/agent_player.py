"""Plays the agent for the relay row: appends turn events for turns a gateway accepted.

    python -m bench.agent_player LOG_PATH

Runs in its own process, so the gateway's client (the benchmark) and the token source do not
share an event loop. Reads one JSON command per line on stdin and answers one JSON line on
stdout:

- ``{"cmd": "saturate", "turns": [[turn_id, conversation_id], ...], "tokens": T, "burst": B}``:
  ``TurnStarted`` for every turn, then ``T`` tokens per turn as fast as the log takes them (``B``
  per turn per round, appends not awaited one by one, one ``flush`` per round as backpressure),
  then ``TurnFinished``.
- ``{"cmd": "paced", "turns": [...], "rate": R, "duration_s": D}``: ``R`` tokens/s in all,
  spread round-robin over the turns, for ``D`` seconds, then ``TurnFinished``.
- ``{"cmd": "quit"}``.

Each token's text is ``time.monotonic_ns()`` at its append, so a client on this machine computes
the token's latency from the log append to its own receipt.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from chat.common.v1 import common_pb2
from chat.events.v1 import events_pb2

from mesh.log import TURN_EVENTS
from mesh.log.embedded import EmbeddedLog
from mesh.turn_ids import parse_turn_id

TENANT = "bench"
_MAX_INFLIGHT = 20_000


class _Turn:
    __slots__ = ("turn_id", "conversation_id", "partition", "key", "seq")

    def __init__(self, turn_id: str, conversation_id: str) -> None:
        self.turn_id = turn_id
        self.conversation_id = conversation_id
        self.partition = parse_turn_id(turn_id).partition
        self.key = conversation_id.encode()
        self.seq = 0


class Player:
    def __init__(self, log: EmbeddedLog) -> None:
        self.log = log
        self._inflight = 0

    def _append(self, turn: _Turn, event: events_pb2.TurnEvent) -> None:
        self.log.append(TURN_EVENTS, turn.partition, turn.key, event.SerializeToString())

    def token(self, turn: _Turn) -> None:
        turn.seq += 1
        self._append(
            turn,
            events_pb2.TurnEvent(
                token=events_pb2.TokenEmitted(
                    turn_id=turn.turn_id,
                    seq=turn.seq,
                    text=str(time.monotonic_ns()),
                    conversation_id=turn.conversation_id,
                    tenant_id=TENANT,
                )
            ),
        )

    async def begin(self, turns: list[_Turn]) -> None:
        for turn in turns:
            self._append(
                turn,
                events_pb2.TurnEvent(
                    started=events_pb2.TurnStarted(
                        turn_id=turn.turn_id,
                        conversation_id=turn.conversation_id,
                        tenant_id=TENANT,
                        agent_id="bench-player",
                    )
                ),
            )
        await self.log.flush()

    async def end(self, turns: list[_Turn]) -> None:
        for turn in turns:
            self._append(
                turn,
                events_pb2.TurnEvent(
                    finished=events_pb2.TurnFinished(
                        turn_id=turn.turn_id,
                        finish_reason=common_pb2.FINISH_REASON_STOP,
                        conversation_id=turn.conversation_id,
                        tenant_id=TENANT,
                        last_seq=turn.seq,
                        model="bench-player",
                    )
                ),
            )
        await self.log.flush()

    async def saturate(self, turns: list[_Turn], tokens: int, burst: int) -> int:
        sent = 0
        while any(turn.seq < tokens for turn in turns):
            for turn in turns:
                for _ in range(min(burst, tokens - turn.seq)):
                    self.token(turn)
                    sent += 1
            await self.log.flush()
        return sent

    async def paced(self, turns: list[_Turn], rate: float, duration_s: float) -> int:
        started = time.monotonic()
        sent = 0
        index = 0
        since_flush = 0
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= duration_s:
                break
            due = int(rate * elapsed) - sent
            for _ in range(due):
                self.token(turns[index])
                index = (index + 1) % len(turns)
            sent += due
            since_flush += due
            if since_flush >= _MAX_INFLIGHT:
                # The log fell behind the requested rate: wait rather than queue without bound.
                await self.log.flush()
                since_flush = 0
            await asyncio.sleep(0.0005)
        await self.log.flush()
        return sent


async def serve(log_path: Path) -> None:
    loop = asyncio.get_running_loop()
    async with EmbeddedLog(log_path) as log:
        player = Player(log)
        print(json.dumps({"ready": True}), flush=True)
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            command: dict[str, Any] = json.loads(line)
            if command["cmd"] == "quit":
                return
            turns = [_Turn(t, c) for t, c in command["turns"]]
            began = time.monotonic()
            await player.begin(turns)
            if command["cmd"] == "saturate":
                sent = await player.saturate(turns, int(command["tokens"]), int(command["burst"]))
            else:
                sent = await player.paced(
                    turns, float(command["rate"]), float(command["duration_s"])
                )
            await player.end(turns)
            print(json.dumps({"sent": sent, "seconds": time.monotonic() - began}), flush=True)


def main() -> None:
    asyncio.run(serve(Path(sys.argv[1])))


if __name__ == "__main__":
    main()

"""Grouping a turn's tokens into records while the log is busy with the previous one."""

from __future__ import annotations

import asyncio

from mesh import turnlog
from services.agent.worker import TokenAppender

TURN = turnlog.TurnRequested(turn_id="t", conversation_id="c", tenant_id="acme", user_text="x")


async def test_tokens_are_grouped_only_while_an_append_is_in_flight() -> None:
    loop = asyncio.get_running_loop()
    records: list[list[turnlog.TurnEvent]] = []
    futures: list[asyncio.Future[int]] = []

    def append(value: bytes) -> asyncio.Future[int]:
        records.append(turnlog.decode_events(value))
        futures.append(loop.create_future())
        return futures[-1]

    tokens = TokenAppender(TURN, append)
    tokens.add(1, "a")
    assert [[e.seq for e in r] for r in records] == [[1]]  # a lone token leaves at once
    tokens.add(2, "b")
    tokens.add(3, "c")
    assert len(records) == 1  # held while seq 1 is in flight
    futures[0].set_result(0)
    await asyncio.sleep(0)
    assert [[e.seq for e in r] for r in records] == [[1], [2, 3]]
    assert [e.text for e in records[1] if isinstance(e, turnlog.TokenEmitted)] == ["b", "c"]
    tokens.add(4, "d")
    tokens.flush()  # before TurnFinished: nothing stays behind
    assert [[e.seq for e in r] for r in records] == [[1], [2, 3], [4]]
    futures[1].set_result(1)
    await asyncio.sleep(0)
    assert len(records) == 3

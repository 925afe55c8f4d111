"""The gateway's use of the persister's LookupTurn, with a stand-in persister (the real one is in
tests/integration/test_turn_lookup.py), and the slicing of a stored text back into tokens."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mesh.errors import NotFound, Unavailable
from mesh.log import TURN_REQUESTS
from mesh.log.embedded import EmbeddedLog
from services.gateway.core import GatewayCore
from services.gateway.model import StartRequest
from services.gateway.turn_lookup import StoredState, StoredTurn
from services.persister.turn_lookup import tokens_after
from tests.unit.test_gateway_core import ACME, Agent, KnownConversations, collect, make_settings
from tests.unit.test_gateway_core import log as log  # noqa: F401 - fixture


def test_tokens_after_slices_the_text_by_code_points() -> None:
    texts = ["a", "🙂b", "", "çé"]
    lengths = tuple(len(t) for t in texts)
    text = "".join(texts)
    assert tokens_after(text, lengths, 0) == texts
    assert tokens_after(text, lengths, 2) == ["", "çé"]
    assert tokens_after(text, lengths, 4) == []
    assert tokens_after(text, lengths, 9) == []


class Directory:
    """A persister's LookupTurn that answers ``answer`` or raises it."""

    def __init__(self, answer: StoredTurn | Exception) -> None:
        self.answer = answer
        self.calls = 0

    async def lookup_turn(self, tenant_id: str, turn_id: str, after_seq: int) -> StoredTurn:
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.fixture
async def reads(log: EmbeddedLog) -> AsyncIterator[Counter[str]]:  # noqa: F811
    counted: Counter[str] = Counter()
    read_range = log.read_range

    async def counting(topic: str, *args: Any) -> Any:
        counted[topic] += 1
        return await read_range(topic, *args)

    log.read_range = counting  # type: ignore[method-assign]
    yield counted


async def test_an_id_below_what_the_persister_applied_costs_no_log_read(
    tmp_path: Path,
    log: EmbeddedLog,  # noqa: F811
    reads: Counter[str],
) -> None:
    directory = Directory(StoredTurn(StoredState.UNKNOWN, applied_request_offset=20_000))
    async with GatewayCore(
        make_settings(tmp_path), log=log, conversations=KnownConversations(), turns=directory
    ) as core:
        with pytest.raises(NotFound):
            await core.resume_turn(ACME, "t0.0.0.0123456789abcdef", 0)
    assert directory.calls == 1 and reads[TURN_REQUESTS] == 0


async def test_without_the_persister_resume_reads_the_log_as_before(
    tmp_path: Path,
    log: EmbeddedLog,  # noqa: F811
) -> None:
    directory = Directory(Unavailable("persister down", reason="PERSISTER_UNAVAILABLE"))
    async with GatewayCore(
        make_settings(tmp_path), log=log, conversations=KnownConversations(), turns=directory
    ) as core:
        turn = await core.start_turn(ACME, StartRequest("", "hi"))
        agent = Agent(log, turn)
        await agent.tokens(range(1, 3))
        await agent.finished(last_seq=2)
        await collect(core.follow(turn))
        core._known = type(core._known)(10)  # forget it: the scan must find it
        outputs = await collect(core.follow(await core.resume_turn(ACME, turn.turn_id, 1)))
        await core.cancel_turn(ACME, turn.turn_id)  # ended: its tail saw the finish
    assert directory.calls == 1  # the resume asked, and read the log when refused
    assert [o.seq for o in outputs if hasattr(o, "seq")] == [2]

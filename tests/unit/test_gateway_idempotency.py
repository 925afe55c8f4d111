"""Request ids across gateways: two gateway cores on one real embedded log, sharing a claim
store that behaves like the persister's (services/persister/claims.py, tested on PostgreSQL in
test_request_claims.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from mesh import turnlog
from mesh.errors import FailedPrecondition, Unavailable
from mesh.log import TURN_REQUESTS
from mesh.log.embedded import EmbeddedLog
from services.gateway.core import GatewayCore
from services.gateway.http.errors import ApiError
from services.gateway.http.parsing import idempotency
from services.gateway.idempotency import Claim, fingerprint
from services.gateway.model import StartRequest
from tests.unit.test_gateway_core import (
    ACME,
    GLOBEX,
    Agent,
    KnownConversations,
    collect,
    make_settings,
    tokens,
)


class FakeClaims:
    """In memory, with the persister's rules: first claim wins, a takeover names the turn."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], tuple[Claim, float]] = {}
        self.calls = 0
        self.down = False

    async def claim_request_id(
        self,
        *,
        tenant_id: str,
        request_id: str,
        turn_id: str,
        conversation_id: str,
        fingerprint: str,
        replace_turn_id: str,
        timeout_s: float,
    ) -> Claim:
        self.calls += 1
        assert 0 < timeout_s <= 5.0  # half the takeover time at most
        await asyncio.sleep(0)  # a round trip: let concurrent starts interleave
        if self.down:
            raise Unavailable("persister down", reason="PERSISTER_UNAVAILABLE", retry_after_s=1.0)
        key = (tenant_id, request_id)
        held = self.rows.get(key)
        if held is None or (replace_turn_id and held[0].turn_id == replace_turn_id):
            won = Claim(True, turn_id, conversation_id, fingerprint, 0.0)
            self.rows[key] = (won, time.monotonic())
            return won
        claim, at = held
        return Claim(
            False, claim.turn_id, claim.conversation_id, claim.fingerprint, time.monotonic() - at
        )

    def abandoned(self, request: StartRequest, turn_id: str, *, age_s: float) -> None:
        """A claim whose gateway died before appending its turn."""
        claim = Claim(True, turn_id, "c-lost", fingerprint(request), 0.0)
        self.rows[(ACME.tenant_id, request.request_id)] = (claim, time.monotonic() - age_s)


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[EmbeddedLog]:
    async with EmbeddedLog(tmp_path / "log.sqlite3") as opened:
        yield opened


@pytest.fixture
def claims() -> FakeClaims:
    return FakeClaims()


@pytest.fixture
async def gateways(
    tmp_path: Path, log: EmbeddedLog, claims: FakeClaims
) -> AsyncIterator[tuple[GatewayCore, GatewayCore]]:
    settings = make_settings(tmp_path, idempotency_takeover_s=0.5)
    async with AsyncExitStack() as stack:
        pair = [
            await stack.enter_async_context(
                GatewayCore(
                    settings, log=log, conversations=KnownConversations(), request_claims=claims
                )
            )
            for _ in range(2)
        ]
        yield pair[0], pair[1]


async def requests_logged(log: EmbeddedLog, request_id: str) -> list[str]:
    """Turn ids of every TurnRequested on the log with this request id."""
    found = []
    for partition in range(await log.partition_count(TURN_REQUESTS)):
        end = await log.end_offset(TURN_REQUESTS, partition)
        for record in await log.read_range(TURN_REQUESTS, partition, 0, end):
            request = turnlog.decode_request(record.value)
            if request.request_id == request_id:
                found.append(request.turn_id)
    return found


HELLO = StartRequest("", "hello", request_id="r-1")


async def test_a_retry_on_another_gateway_gets_the_same_turn_and_tokens(
    gateways: tuple[GatewayCore, GatewayCore], log: EmbeddedLog
) -> None:
    a, b = gateways
    first = await a.start_turn(ACME, HELLO)
    again = await b.start_turn(ACME, HELLO)
    assert again.turn_id == first.turn_id and first.owner and not again.owner
    agent = Agent(log, first)
    await agent.started()
    await agent.tokens(range(1, 4))
    await agent.finished(last_seq=3)
    streamed = await asyncio.gather(collect(a.follow(first)), collect(b.follow(again)))
    assert tokens(streamed[0]) == tokens(streamed[1]) == [(1, "1 "), (2, "2 "), (3, "3 ")]
    assert await requests_logged(log, "r-1") == [first.turn_id]


async def test_a_restarted_gateway_returns_the_same_turn(
    tmp_path: Path, log: EmbeddedLog, claims: FakeClaims
) -> None:
    settings = make_settings(tmp_path)
    async with GatewayCore(
        settings, log=log, conversations=KnownConversations(), request_claims=claims
    ) as before:
        first = await before.start_turn(ACME, HELLO)
        first.close()
    async with GatewayCore(
        settings, log=log, conversations=KnownConversations(), request_claims=claims
    ) as after:
        again = await after.start_turn(ACME, HELLO)
        again.close()
    assert again.turn_id == first.turn_id
    assert await requests_logged(log, "r-1") == [first.turn_id]


async def test_a_retry_asking_for_something_else_is_refused(
    gateways: tuple[GatewayCore, GatewayCore],
) -> None:
    a, b = gateways
    first = await a.start_turn(ACME, HELLO)
    for gateway in (a, b):
        with pytest.raises(FailedPrecondition) as refused:
            await gateway.start_turn(ACME, StartRequest("", "something else", request_id="r-1"))
        assert refused.value.reason == "REQUEST_ID_REUSED"
        assert "'r-1'" in refused.value.message and first.turn_id in refused.value.message
    # Another tenant's request id of the same name is its own.
    other = await b.start_turn(GLOBEX, StartRequest("", "something else", request_id="r-1"))
    assert other.turn_id != first.turn_id
    # How the tokens are delivered is not part of the request.
    coalesced = await b.start_turn(ACME, StartRequest("", "hello", request_id="r-1",
                                                      coalesce_tokens=True))  # fmt: skip
    assert coalesced.turn_id == first.turn_id
    for turn in (first, other, coalesced):
        turn.close()


def claims_counted(outcome: str) -> float:
    return (
        REGISTRY.get_sample_value("mesh_gateway_request_id_claims_total", {"outcome": outcome})
        or 0.0
    )


async def test_concurrent_retries_on_two_gateways_make_one_turn(
    gateways: tuple[GatewayCore, GatewayCore], log: EmbeddedLog
) -> None:
    a, b = gateways
    won, attached = claims_counted("won"), claims_counted("attached")
    turns = await asyncio.gather(*(g.start_turn(ACME, HELLO) for g in (a, b, a, b)))
    assert claims_counted("won") == won + 1
    # The other gateway's starts attach after losing their claim; this gateway's second start
    # may find its first one in its own cache instead.
    assert attached + 1 <= claims_counted("attached") <= attached + 3
    assert len({turn.turn_id for turn in turns}) == 1
    assert sum(turn.owner for turn in turns) == 1
    assert await requests_logged(log, "r-1") == [turns[0].turn_id]
    for turn in turns:
        turn.close()


async def test_a_claim_whose_turn_never_reached_the_log_is_taken_over(
    gateways: tuple[GatewayCore, GatewayCore], log: EmbeddedLog, claims: FakeClaims
) -> None:
    _, b = gateways
    lost = "t0.0.0.00112233445566ff"
    claims.abandoned(HELLO, lost, age_s=60)
    turn = await b.start_turn(ACME, HELLO)
    turn.close()
    assert turn.owner and turn.turn_id != lost
    assert claims.rows[(ACME.tenant_id, "r-1")][0].turn_id == turn.turn_id
    assert await requests_logged(log, "r-1") == [turn.turn_id]


async def test_a_fresh_claim_is_waited_for_before_it_is_taken_over(
    gateways: tuple[GatewayCore, GatewayCore], log: EmbeddedLog, claims: FakeClaims
) -> None:
    _, b = gateways
    claims.abandoned(HELLO, "t0.0.0.00112233445566ff", age_s=0)
    began = time.monotonic()
    turn = await b.start_turn(ACME, HELLO)
    turn.close()
    # Taken over only once the claim is older than the takeover time (0.5 s here).
    assert time.monotonic() - began >= 0.45
    assert await requests_logged(log, "r-1") == [turn.turn_id]


async def test_without_the_claim_store_a_request_id_start_fails_fast(
    gateways: tuple[GatewayCore, GatewayCore], log: EmbeddedLog, claims: FakeClaims
) -> None:
    a, _ = gateways
    claims.down = True
    with pytest.raises(Unavailable) as refused:
        await a.start_turn(ACME, HELLO)
    assert refused.value.reason == "PERSISTER_UNAVAILABLE" and refused.value.retry_after_s
    assert await requests_logged(log, "r-1") == []
    calls = claims.calls
    # Without a request id nothing is claimed, so nothing changes.
    plain = await a.start_turn(ACME, StartRequest("", "hello"))
    plain.close()
    assert claims.calls == calls
    claims.down = False
    retried = await a.start_turn(ACME, HELLO)
    retried.close()
    assert await requests_logged(log, "r-1") == [retried.turn_id]


def test_an_http_digest_is_of_the_route_and_the_parsed_body() -> None:
    key, digest = idempotency("k-1", "chat.completions", {"model": "m", "messages": [1, 2]})
    assert key == "k-1"
    assert digest == idempotency("k-1", "chat.completions", {"messages": [1, 2], "model": "m"})[1]
    assert digest != idempotency("k-1", "responses", {"model": "m", "messages": [1, 2]})[1]
    assert digest != idempotency("k-1", "chat.completions", {"model": "m", "messages": [2]})[1]
    assert idempotency(None, "responses", {}) == ("", "")
    # The HTTP API's digest stands for the start it derives from the body.
    assert fingerprint(StartRequest("c", "x", request_id="k-1", fingerprint=digest)) == digest


@pytest.mark.parametrize("header", [" k", "k\n", "x" * 129])
def test_a_malformed_idempotency_key_is_a_400_naming_the_header(header: str) -> None:
    with pytest.raises(ApiError) as refused:
        idempotency(header, "responses", {})
    assert refused.value.status == 400 and refused.value.param == "Idempotency-Key"
    assert refused.value.code == "invalid_idempotency_key"


async def test_a_gateway_that_does_not_require_the_persister_starts_without_a_claim(
    tmp_path: Path, log: EmbeddedLog, claims: FakeClaims
) -> None:
    settings = make_settings(tmp_path, require_persister=False)
    async with GatewayCore(
        settings, log=log, conversations=KnownConversations(), request_claims=claims
    ) as gateway:
        claims.down = True
        turn = await gateway.start_turn(ACME, HELLO)
        turn.close()
        assert await requests_logged(log, "r-1") == [turn.turn_id]
        # Its own memory still answers a retry to it with the same turn.
        again = await gateway.start_turn(ACME, HELLO)
        again.close()
        assert again.turn_id == turn.turn_id
        assert await requests_logged(log, "r-1") == [turn.turn_id]

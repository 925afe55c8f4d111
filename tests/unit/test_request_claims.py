"""Request-id claims (services/persister/claims.py) against a real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import psycopg
import pytest

from mesh.errors import InvalidArgument
from services.persister import store as store_module
from services.persister.claims import Claim, ClaimStore
from services.persister.store import PgStore


@pytest.fixture
async def pg(pg_dsn: str) -> AsyncIterator[PgStore]:
    async with PgStore(pg_dsn, pool_size=12) as store:
        yield store


def claims_of(store: PgStore, ttl_s: float = 600.0) -> ClaimStore:
    return ClaimStore(store, ttl_s=ttl_s)


async def claim(
    claims: ClaimStore,
    turn_id: str,
    *,
    tenant: str = "acme",
    request_id: str = "r-1",
    conversation_id: str = "c-1",
    fingerprint: str = "f-1",
    replace: str = "",
) -> Claim:
    return await claims.claim(
        tenant_id=tenant,
        request_id=request_id,
        turn_id=turn_id,
        conversation_id=conversation_id,
        fingerprint=fingerprint,
        replace_turn_id=replace,
    )


async def test_the_first_claim_wins_and_later_ones_are_answered_with_it(pg: PgStore) -> None:
    claims = claims_of(pg)
    first = await claim(claims, "t-a")
    assert first.won and first.turn_id == "t-a" and first.age_s == 0
    second = await claim(claims, "t-b", conversation_id="c-2", fingerprint="f-2")
    assert not second.won
    assert (second.turn_id, second.conversation_id, second.fingerprint) == ("t-a", "c-1", "f-1")
    assert 0 <= second.age_s < 60


async def test_request_ids_are_per_tenant(pg: PgStore) -> None:
    claims = claims_of(pg)
    assert (await claim(claims, "t-a", tenant="acme")).won
    assert (await claim(claims, "t-b", tenant="globex")).won


async def test_a_takeover_must_name_the_turn_that_holds(pg: PgStore) -> None:
    claims = claims_of(pg)
    await claim(claims, "t-a")
    stale = await claim(claims, "t-c", replace="t-other")
    assert not stale.won and stale.turn_id == "t-a"
    taken = await claim(claims, "t-b", replace="t-a")
    assert taken.won and taken.turn_id == "t-b"
    # A second retry that saw the same abandoned claim is answered with the takeover.
    late = await claim(claims, "t-c", replace="t-a")
    assert not late.won and late.turn_id == "t-b"


async def test_concurrent_claims_and_takeovers_have_one_winner(pg: PgStore) -> None:
    claims = claims_of(pg)
    results = await asyncio.gather(*(claim(claims, f"t-{i}") for i in range(10)))
    winners = [r for r in results if r.won]
    assert len(winners) == 1
    assert {r.turn_id for r in results} == {winners[0].turn_id}
    held = winners[0].turn_id
    takeovers = await asyncio.gather(
        *(claim(claims, f"t-new-{i}", replace=held) for i in range(10))
    )
    taken = [r for r in takeovers if r.won]
    assert len(taken) == 1
    assert {r.turn_id for r in takeovers} == {taken[0].turn_id}


async def test_an_expired_claim_is_renewed_and_pruned(pg: PgStore) -> None:
    short = claims_of(pg, ttl_s=0.2)
    assert (await claim(short, "t-a")).won
    assert not (await claim(short, "t-b")).won
    await asyncio.sleep(0.4)
    renewed = await claim(short, "t-b")
    assert renewed.won and renewed.turn_id == "t-b"
    await claim(short, "t-x", request_id="r-2")
    await asyncio.sleep(0.4)
    assert await short.prune() == 2
    assert await claims_of(pg).prune() == 0


async def test_missing_or_oversized_ids_are_invalid(pg: PgStore) -> None:
    claims = claims_of(pg)
    with pytest.raises(InvalidArgument) as missing:
        await claim(claims, "t-a", request_id="")
    assert missing.value.reason == "REQUEST_ID_MISSING"
    with pytest.raises(InvalidArgument) as long:
        await claim(claims, "t-a", request_id="x" * 257)
    assert long.value.reason == "REQUEST_ID_INVALID"


async def rows(pg: PgStore) -> list[tuple[str, str]]:
    async with pg.connection() as conn, conn.cursor() as cur:
        await cur.execute("SELECT tenant_id, request_id FROM request_claims ORDER BY 1, 2")
        return [(t, r) for t, r in await cur.fetchall()]


async def test_erasure_deletes_the_claims_of_the_conversation_or_tenant(pg: PgStore) -> None:
    claims = claims_of(pg)
    await claim(claims, "t-1", request_id="r-1", conversation_id="c-1")
    await claim(claims, "t-2", request_id="r-2", conversation_id="c-2")
    await claim(claims, "t-3", request_id="r-3", conversation_id="c-1", tenant="globex")
    async with pg.connection() as conn:
        # A stored conversation to delete (erasing an unknown one is NOT_FOUND).
        await conn.execute(
            "INSERT INTO conversations VALUES ('acme', 'c-1', 'x', now(), now()),"
            " ('globex', 'c-1', 'x', now(), now())"
        )
    await pg.erase("acme", "c-1", force=True)
    assert await rows(pg) == [("acme", "r-2"), ("globex", "r-3")]
    await pg.erase("acme", "", force=True)
    assert await rows(pg) == [("globex", "r-3")]


async def test_an_existing_database_gets_the_table(pg_dsn: str) -> None:
    # A database made by a persister from before claims existed: only the old schema.
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute(store_module.SCHEMA)
    async with PgStore(pg_dsn) as store:
        assert (await claim(claims_of(store), "t-a")).won

"""Request-id claims: which turn each idempotent start became, shared by every gateway.

A gateway that starts a turn with a ``request_id`` claims ``(tenant_id, request_id)`` for the
turn id it is about to log, before it appends the request. The first claim wins; a retry on any
gateway (or on the same one after a restart) is answered with the winner and attaches to that
turn. A claim whose turn never reached the log (its gateway died between claim and append) can
be taken over by naming it (``replace_turn_id``: compare-and-swap on the turn id), which the
gateway does only once the claim is older than its append could take (docs/protocol.md).

Claims expire after ``ttl_s`` (never later than the log's retention: past it the turn a claim
names is gone from the log); an expired claim is renewed by the next start that claims it, and
the retention task deletes old rows. Erasing a conversation or a tenant deletes its claims
(``store.erase_on``).
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

import psycopg
from psycopg.rows import TupleRow

from mesh.errors import InvalidArgument

Conn = psycopg.AsyncConnection[TupleRow]

# Run with the store's schema (``store.create_schema``), under its advisory lock. A new table, so
# ``IF NOT EXISTS`` is the whole migration of an existing database.
SCHEMA = """
CREATE TABLE IF NOT EXISTS request_claims (
    tenant_id       text        NOT NULL,
    request_id      text        NOT NULL,
    turn_id         text        NOT NULL,
    conversation_id text        NOT NULL,
    fingerprint     text        NOT NULL,
    claimed_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, request_id)
);
CREATE INDEX IF NOT EXISTS request_claims_by_age ON request_claims (claimed_at);
"""

# A fresh claim, an expired one renewed, or a takeover of the named turn: the row comes back.
_CLAIM = """
INSERT INTO request_claims AS c
    (tenant_id, request_id, turn_id, conversation_id, fingerprint, claimed_at)
VALUES (%(tenant)s, %(request)s, %(turn)s, %(conv)s, %(fp)s, now())
ON CONFLICT (tenant_id, request_id) DO UPDATE SET
    turn_id = EXCLUDED.turn_id,
    conversation_id = EXCLUDED.conversation_id,
    fingerprint = EXCLUDED.fingerprint,
    claimed_at = EXCLUDED.claimed_at
WHERE c.claimed_at < now() - make_interval(secs => %(ttl)s)
   OR (%(replace)s <> '' AND c.turn_id = %(replace)s)
RETURNING turn_id, conversation_id, fingerprint
"""

# The claim that holds, read by its own statement: a claim or takeover another transaction
# committed while the insert above waited for it is invisible to the insert's snapshot (READ
# COMMITTED), so reading it there could answer with a turn that no longer holds.
_HELD = """
SELECT turn_id, conversation_id, fingerprint, extract(epoch FROM now() - claimed_at)::float8
FROM request_claims WHERE tenant_id = %(tenant)s AND request_id = %(request)s
"""

# Request ids are the gateway's to validate; these bounds only keep junk out of the table.
_MAX_ID_CHARS = 256


@dataclass(frozen=True, slots=True)
class Claim:
    """The claim that holds for a request id."""

    won: bool
    turn_id: str
    conversation_id: str
    fingerprint: str
    # Seconds since it was made, by the database's clock (so gateways' clocks do not matter).
    age_s: float


def _require(value: str, name: str) -> None:
    if not value:
        raise InvalidArgument(f"{name} is required", field=name, reason=f"{name.upper()}_MISSING")
    if len(value) > _MAX_ID_CHARS:
        raise InvalidArgument(
            f"{name} is longer than {_MAX_ID_CHARS} characters",
            field=name,
            reason=f"{name.upper()}_INVALID",
        )


async def claim_on(
    conn: Conn,
    *,
    tenant_id: str,
    request_id: str,
    turn_id: str,
    conversation_id: str,
    fingerprint: str,
    replace_turn_id: str = "",
    ttl_s: float,
) -> Claim:
    """Claim ``(tenant_id, request_id)`` for ``turn_id``; the claim that holds afterwards."""
    for name, value in (
        ("tenant_id", tenant_id),
        ("request_id", request_id),
        ("turn_id", turn_id),
        ("conversation_id", conversation_id),
    ):
        _require(value, name)
    params = {
        "tenant": tenant_id,
        "request": request_id,
        "turn": turn_id,
        "conv": conversation_id,
        "fp": fingerprint,
        "replace": replace_turn_id,
        "ttl": ttl_s,
    }
    # Between the two statements the row may be pruned or erased: then claim again.
    for _ in range(3):
        async with conn.cursor() as cur:
            await cur.execute(_CLAIM, params)
            won = await cur.fetchone()
            if won is not None:
                return Claim(True, won[0], won[1], won[2], 0.0)
            await cur.execute(_HELD, params)
            held = await cur.fetchone()
        if held is not None:
            return Claim(False, held[0], held[1], held[2], max(float(held[3]), 0.0))
    raise RuntimeError(f"no claim for request id {request_id!r} after three tries")


async def prune_on(conn: Conn, *, ttl_s: float) -> int:
    """Delete expired claims; returns how many."""
    cur = await conn.execute(
        "DELETE FROM request_claims WHERE claimed_at < now() - make_interval(secs => %s)",
        (ttl_s,),
    )
    return max(cur.rowcount, 0)


class Pooled(Protocol):
    """What ``ClaimStore`` needs of the store: a pooled connection (``PgStore.connection``)."""

    def connection(self) -> AbstractAsyncContextManager[Conn]: ...


class ClaimStore:
    """Claims on the persister's PostgreSQL pool (the store owns the pool and the table)."""

    def __init__(self, store: Pooled, *, ttl_s: float) -> None:
        self._store = store
        self.ttl_s = ttl_s

    async def claim(
        self,
        *,
        tenant_id: str,
        request_id: str,
        turn_id: str,
        conversation_id: str,
        fingerprint: str,
        replace_turn_id: str = "",
    ) -> Claim:
        async with self._store.connection() as conn:
            return await claim_on(
                conn,
                tenant_id=tenant_id,
                request_id=request_id,
                turn_id=turn_id,
                conversation_id=conversation_id,
                fingerprint=fingerprint,
                replace_turn_id=replace_turn_id,
                ttl_s=self.ttl_s,
            )

    async def prune(self) -> int:
        async with self._store.connection() as conn:
            return await prune_on(conn, ttl_s=self.ttl_s)

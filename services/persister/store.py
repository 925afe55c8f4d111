"""PostgreSQL storage of conversations, messages and tokens.

Every write is ``ON CONFLICT DO NOTHING`` on a natural key (``(turn_id, role)``, ``(turn_id,
seq)``), so replaying a batch changes nothing and the first writer wins. A batch is one
transaction: tokens go through ``COPY`` into a session temp table and one ``INSERT ... SELECT``,
messages and conversations through one ``unnest`` statement each.

``write_tokens_batched`` is the token path on its own, for the benchmark (``python -m
bench.token_writes``), which compares it with one INSERT per row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, fields
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from mesh import turnlog
from mesh.errors import FailedPrecondition, NotFound
from mesh.generation import FinishReason
from mesh.lifecycle import AsyncStartStop
from services.persister import claims
from services.persister.batch import conversation_rows
from services.persister.model import (
    BatchPlan,
    BatchResult,
    Conversation,
    ConversationCursor,
    Erasure,
    ErasureCounts,
    FinishedTurn,
    Message,
    MessageCursor,
    Role,
    StoredTurn,
    TokenEvent,
)
from services.persister.turn_lookup import read_turn

Conn = psycopg.AsyncConnection[TupleRow]

# Held while creating the schema so two persisters starting together do not race on the catalog.
_SCHEMA_LOCK = 0x7065727369737400  # "persist\0"

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    tenant_id       text        NOT NULL,
    conversation_id text        NOT NULL,
    title           text        NOT NULL,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, conversation_id)
);
CREATE INDEX IF NOT EXISTS conversations_by_recency
    ON conversations (tenant_id, updated_at DESC, conversation_id DESC);

CREATE TABLE IF NOT EXISTS messages (
    turn_id         text        NOT NULL,
    role            smallint    NOT NULL,
    conversation_id text        NOT NULL,
    tenant_id       text        NOT NULL,
    text            text        NOT NULL,
    finish_reason   smallint    NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL,
    accepted_at     timestamptz NOT NULL,
    PRIMARY KEY (turn_id, role)
);
CREATE INDEX IF NOT EXISTS messages_in_order
    ON messages (tenant_id, conversation_id, accepted_at, turn_id, role);

CREATE TABLE IF NOT EXISTS tokens (
    turn_id text   NOT NULL,
    seq     bigint NOT NULL,
    text    text   NOT NULL,
    PRIMARY KEY (turn_id, seq)
);

-- The newest takeover attempt (2 or more) of each unfinished turn that was taken over: a token
-- or finish of an older attempt in a later batch is a zombie's and is not stored
-- (turnlog.Attempts). Deleted when the turn's message is assembled.
CREATE TABLE IF NOT EXISTS turn_attempts (
    turn_id text    PRIMARY KEY,
    attempt integer NOT NULL
);

-- Finished turns not yet indexed into memory: written in the batch's transaction, drained by
-- the persister's outbox task (services/persister/outbox.py), so memory being down never holds
-- up the batches.
CREATE TABLE IF NOT EXISTS memory_outbox (
    turn_id   text        PRIMARY KEY,
    queued_at timestamptz NOT NULL DEFAULT now()
);

-- Tombstones of erased conversations ('' erases the whole tenant). The logs still hold their
-- records until retention removes them, and a persister may consume those again (a replay, a
-- new consumer group member); the batch writer drops every record of a turn accepted up to
-- erased_at, so an erased conversation is never re-created from the log. Ids only, no text.
CREATE TABLE IF NOT EXISTS erasures (
    tenant_id       text        NOT NULL,
    conversation_id text        NOT NULL,
    erased_at       timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, conversation_id)
);

-- Turns of erased conversations: their tokens and finishes carry no accept time (and tokens no
-- conversation), so they are dropped by turn id. Rows older than the log's retention can go.
CREATE TABLE IF NOT EXISTS erased_turns (
    turn_id   text        PRIMARY KEY,
    erased_at timestamptz NOT NULL DEFAULT now()
);

-- The audit trail of erasures: who was erased, when and how much (ids and counts, no text).
-- Append-only: a trigger refuses UPDATE, DELETE and TRUNCATE, so not even this code can edit it.
CREATE TABLE IF NOT EXISTS audit_events (
    id              bigserial   PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    action          text        NOT NULL,
    tenant_id       text        NOT NULL,
    conversation_id text        NOT NULL,
    detail          jsonb       NOT NULL
);
CREATE OR REPLACE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % refused', TG_OP;
END $$;
CREATE OR REPLACE TRIGGER audit_events_no_change BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE OR REPLACE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();

-- Added after the first release: ADD COLUMN IF NOT EXISTS migrates a database created before
-- (its old rows keep NULLs, which every reader handles). docs/protocol.md, "Token rows".
-- request_offset (user rows): where the TurnRequested lies on the request log.
DO $migrate$ BEGIN
    -- Checked first: ALTER TABLE locks the table even when the column is already there.
    IF NOT EXISTS (
        SELECT 1 FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = 'messages'
          AND column_name = 'finish_event'
    ) THEN
        ALTER TABLE messages ADD COLUMN IF NOT EXISTS request_offset bigint;
        -- token_lengths (assistant rows): the length of each token seq 1..n of the text;
        -- once it is set the turn's rows in tokens are deleted. NULL: a turn stored before,
        -- or one whose seqs had a gap or ended short of last_seq (its token rows are kept).
        ALTER TABLE messages ADD COLUMN IF NOT EXISTS token_lengths integer[];
        -- finish_event (assistant rows): the TurnFinished record as logged.
        ALTER TABLE messages ADD COLUMN IF NOT EXISTS finish_event bytea;
    END IF;
END $migrate$;
"""

# Batches take this lock shared, an erasure exclusive: a batch that read no tombstone commits
# before the erasure deletes, or reads the erasure's tombstone.
_ERASE_LOCK = 0x6572617365000000  # "erase\0\0\0"

_TEMP_TOKENS = """
CREATE TEMP TABLE IF NOT EXISTS persister_tokens_in (
    turn_id text NOT NULL, seq bigint NOT NULL, text text NOT NULL, attempt integer NOT NULL
) ON COMMIT DELETE ROWS
"""

# A turn whose assistant message is stored is assembled, its token rows deleted: a replayed or
# late token of it (a zombie agent's) is not stored again. Nor is a token of an attempt older
# than one an earlier batch saw start (turn_attempts).
_INSERT_TOKENS = """
INSERT INTO tokens (turn_id, seq, text)
SELECT p.turn_id, p.seq, p.text FROM persister_tokens_in p
WHERE p.turn_id NOT IN (
    SELECT m.turn_id FROM messages m
    WHERE m.role = 2 AND m.turn_id IN (SELECT DISTINCT turn_id FROM persister_tokens_in)
) AND p.attempt >= COALESCE(
    (SELECT a.attempt FROM turn_attempts a WHERE a.turn_id = p.turn_id), 0
)
ON CONFLICT (turn_id, seq) DO NOTHING
"""

# The earliest turn names the conversation; GREATEST/LEAST make a replay a no-op.
_UPSERT_CONVERSATIONS = """
INSERT INTO conversations AS c (tenant_id, conversation_id, title, created_at, updated_at)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[])
ON CONFLICT (tenant_id, conversation_id) DO UPDATE SET
    title = CASE WHEN EXCLUDED.created_at < c.created_at THEN EXCLUDED.title ELSE c.title END,
    created_at = LEAST(c.created_at, EXCLUDED.created_at),
    updated_at = GREATEST(c.updated_at, EXCLUDED.updated_at)
WHERE EXCLUDED.created_at < c.created_at OR EXCLUDED.updated_at > c.updated_at
"""

# An assistant message stored before its user message (the two topics are consumed
# independently) sorts by its finish time until the user message arrives with the turn's
# acceptance time; ``fix`` then moves it next to its user message.
_INSERT_USER_MESSAGES = """
WITH input AS (
    SELECT * FROM unnest(
        %s::text[], %s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::bigint[]
    ) AS i(turn_id, conversation_id, tenant_id, text, accepted_at, request_offset)
), ins AS (
    INSERT INTO messages (
        turn_id, role, conversation_id, tenant_id, text, finish_reason, created_at, accepted_at,
        request_offset
    )
    SELECT turn_id, 1, conversation_id, tenant_id, text, 0, accepted_at, accepted_at,
        request_offset
    FROM input
    ON CONFLICT (turn_id, role) DO NOTHING
    RETURNING turn_id, accepted_at
), fix AS (
    UPDATE messages a SET accepted_at = ins.accepted_at
    FROM ins
    WHERE a.turn_id = ins.turn_id AND a.role = 2 AND a.accepted_at <> ins.accepted_at
    RETURNING 1
)
SELECT (SELECT count(*) FROM ins)
"""

# Tokens of this batch were inserted by an earlier statement of the same transaction, so the
# join sees them. Tokens past last_seq (a zombie agent's late output) are not part of the turn.
# The message keeps each token's length (seqs 1..n without a gap: a resume slices the text by
# seq), and the turn's token rows go in the same statement; with a gap they stay.
_INSERT_ASSISTANT_MESSAGES = """
WITH input AS (
    SELECT * FROM unnest(
        %s::text[], %s::text[], %s::text[], %s::smallint[], %s::bigint[], %s::timestamptz[],
        %s::bytea[], %s::integer[]
    ) AS f(
        turn_id, conversation_id, tenant_id, finish_reason, last_seq, finished_at, event, attempt
    )
), ins AS (
    INSERT INTO messages (
        turn_id, role, conversation_id, tenant_id, text, finish_reason, created_at, accepted_at,
        token_lengths, finish_event
    )
    SELECT
        f.turn_id, 2, f.conversation_id, f.tenant_id, COALESCE(t.text, ''),
        f.finish_reason, f.finished_at,
        COALESCE((
            SELECT u.accepted_at FROM messages u WHERE u.turn_id = f.turn_id AND u.role = 1
        ), f.finished_at),
        CASE
            WHEN t.n = 0 AND f.last_seq = 0 THEN '{}'::integer[]
            WHEN t.n = t.top AND t.top = f.last_seq THEN t.lengths
        END,
        NULLIF(f.event, ''::bytea)
    FROM input f
    CROSS JOIN LATERAL (
        SELECT string_agg(x.text, '' ORDER BY x.seq) AS text,
               array_agg(char_length(x.text) ORDER BY x.seq) AS lengths,
               count(*) AS n, max(x.seq) AS top
        FROM tokens x WHERE x.turn_id = f.turn_id AND x.seq BETWEEN 1 AND f.last_seq
    ) t
    WHERE f.attempt >= COALESCE(
        (SELECT a.attempt FROM turn_attempts a WHERE a.turn_id = f.turn_id), 0
    )
    ON CONFLICT (turn_id, role) DO NOTHING
    RETURNING turn_id, tenant_id, conversation_id, created_at, token_lengths IS NOT NULL AS sliced
), assembled AS (
    DELETE FROM tokens x USING ins WHERE x.turn_id = ins.turn_id AND ins.sliced
    RETURNING 1
), settled AS (
    DELETE FROM turn_attempts a USING ins WHERE a.turn_id = ins.turn_id
), bump AS (
    UPDATE conversations c SET updated_at = x.ts
    FROM (
        SELECT tenant_id, conversation_id, max(created_at) AS ts FROM ins GROUP BY 1, 2
    ) x
    WHERE c.tenant_id = x.tenant_id AND c.conversation_id = x.conversation_id
      AND c.updated_at < x.ts
    RETURNING 1
)
SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM assembled)
"""

_SELECT_FINISHED = """
SELECT a.turn_id, a.tenant_id, a.conversation_id, u.text, a.text, a.finish_reason
FROM messages a
LEFT JOIN messages u ON u.turn_id = a.turn_id AND u.role = 1
WHERE a.role = 2 AND a.turn_id = ANY(%s::text[])
"""


# After the batch's tokens and finishes were checked against the attempts of earlier batches;
# an assembled turn needs no row.
_UPSERT_ATTEMPTS = """
INSERT INTO turn_attempts AS a (turn_id, attempt)
SELECT i.turn_id, i.attempt FROM unnest(%s::text[], %s::integer[]) AS i(turn_id, attempt)
WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.turn_id = i.turn_id AND m.role = 2)
ON CONFLICT (turn_id) DO UPDATE SET attempt = GREATEST(a.attempt, EXCLUDED.attempt)
"""

_QUEUE_FOR_MEMORY = """
INSERT INTO memory_outbox (turn_id) SELECT unnest(%s::text[]) ON CONFLICT (turn_id) DO NOTHING
"""

_OLDEST_FOR_MEMORY = "SELECT turn_id FROM memory_outbox ORDER BY queued_at, turn_id LIMIT %s"


async def create_schema(conn: Conn) -> None:
    """Create the tables and indexes if they do not exist (safe to run concurrently)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        await conn.execute(SCHEMA)
        await conn.execute(claims.SCHEMA)


async def _copy_tokens(conn: Conn, rows: Sequence[TokenEvent]) -> int:
    # First in input order wins. Deduplicating here is cheaper than making the database sort,
    # and leaves no two rows with one key in the statement below.
    unique: turnlog.FirstWins[tuple[str, int], TokenEvent] = turnlog.FirstWins()
    for row in rows:
        unique.offer((row.turn_id, row.seq), row)
    async with conn.cursor() as cur:
        await cur.execute(_TEMP_TOKENS)
        # A caller may run several batches in one outer transaction; start from empty.
        await cur.execute("TRUNCATE persister_tokens_in")
        copy = "COPY persister_tokens_in (turn_id, seq, text, attempt) FROM STDIN"
        async with cur.copy(copy) as cp:
            for row in unique.values():
                await cp.write_row((row.turn_id, row.seq, row.text, row.attempt))
        await cur.execute(_INSERT_TOKENS)
        return max(cur.rowcount, 0)


async def write_tokens_batched(conn: Conn, rows: Sequence[TokenEvent]) -> int:
    """Insert token rows with COPY + one INSERT ... SELECT in one transaction; returns inserted."""
    if not rows:
        return 0
    async with conn.transaction():
        return await _copy_tokens(conn, rows)


def _columns(rows: Sequence[Any]) -> tuple[list[Any], ...]:
    """One array per field of the rows' dataclass, in field order: what the statements UNNEST
    (their column lists follow the dataclasses' field order)."""
    return tuple([getattr(row, name) for row in rows] for name in (f.name for f in fields(rows[0])))


async def _count(conn: Conn, query: str, params: Sequence[Any] | Mapping[str, Any]) -> int:
    async with conn.cursor() as cur:
        await cur.execute(query, params)
        row = await cur.fetchone()
        return int(row[0]) if row is not None else 0


async def _drop_erased(conn: Conn, plan: BatchPlan) -> BatchPlan:
    """``plan`` without the rows of erased turns (``plan`` itself is left as it is: a retried
    batch must find the same turns to drop).

    A turn is erased when its conversation (or tenant) has a tombstone at or after the turn's
    accept time (a finish: its finish time), or when its id is in ``erased_turns``. Rows such a
    turn already has from the other topic's records are deleted, and the turn joins
    ``erased_turns`` so its later records are dropped too.
    """
    tenants = sorted(
        {u.tenant_id for u in plan.user_messages} | {f.tenant_id for f in plan.finishes}
    )
    turn_ids = sorted(
        {u.turn_id for u in plan.user_messages}
        | {t.turn_id for t in plan.tokens}
        | {f.turn_id for f in plan.finishes}
    )
    if not turn_ids:
        return plan
    async with conn.cursor() as cur:
        await cur.execute(
            "SELECT tenant_id, conversation_id, erased_at FROM erasures "
            "WHERE tenant_id = ANY(%s::text[])",
            (tenants,),
        )
        tombstones = {(t, c): at for t, c, at in await cur.fetchall()}
        await cur.execute(
            "SELECT turn_id FROM erased_turns WHERE turn_id = ANY(%s::text[])", (turn_ids,)
        )
        erased = {row[0] for row in await cur.fetchall()}
    if not tombstones and not erased:
        return plan

    def covered(tenant_id: str, conversation_id: str, at: datetime) -> bool:
        return any(
            stamp is not None and at <= stamp
            for stamp in (
                tombstones.get((tenant_id, conversation_id)),
                tombstones.get((tenant_id, "")),
            )
        )

    newly = {
        u.turn_id
        for u in plan.user_messages
        if u.turn_id not in erased and covered(u.tenant_id, u.conversation_id, u.accepted_at)
    } | {
        f.turn_id
        for f in plan.finishes
        if f.turn_id not in erased and covered(f.tenant_id, f.conversation_id, f.finished_at)
    }
    gone = erased | newly
    users = [u for u in plan.user_messages if u.turn_id not in gone]
    kept = BatchPlan(
        conversations=conversation_rows(users),
        user_messages=users,
        tokens=[t for t in plan.tokens if t.turn_id not in gone],
        finishes=[f for f in plan.finishes if f.turn_id not in gone],
        turn_attempts={t: a for t, a in plan.turn_attempts.items() if t not in gone},
        last_records=plan.last_records,
        events=plan.events,
        in_batch_duplicates=plan.in_batch_duplicates,
        zombie_records=plan.zombie_records,
    )
    if newly:
        ids = sorted(newly)
        await conn.execute(
            "INSERT INTO erased_turns (turn_id) SELECT unnest(%s::text[]) "
            "ON CONFLICT (turn_id) DO NOTHING",
            (ids,),
        )
        for table in ("tokens", "turn_attempts", "memory_outbox", "messages"):
            await conn.execute(f"DELETE FROM {table} WHERE turn_id = ANY(%s::text[])", (ids,))
    return kept


async def write_batch_on(conn: Conn, plan: BatchPlan) -> BatchResult:
    """Write one batch in one transaction on ``conn``, leaving out erased turns."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (_ERASE_LOCK,))
        attempted = plan.row_attempts
        plan = await _drop_erased(conn, plan)
        dropped = attempted - plan.row_attempts
        if plan.conversations:
            await conn.execute(_UPSERT_CONVERSATIONS, _columns(plan.conversations))
        users = 0
        if plan.user_messages:
            users = await _count(conn, _INSERT_USER_MESSAGES, _columns(plan.user_messages))
        tokens = await _copy_tokens(conn, plan.tokens) if plan.tokens else 0
        assistants = 0
        finished: list[FinishedTurn] = []
        if plan.finishes:
            f = plan.finishes
            assistants = await _count(conn, _INSERT_ASSISTANT_MESSAGES, _columns(f))
            finished = await _finished_turns(conn, [r.turn_id for r in f])
            # An error turn has no answer worth recalling later.
            wanted = [t.turn_id for t in finished if t.finish_reason != FinishReason.ERROR]
            if wanted:
                await conn.execute(_QUEUE_FOR_MEMORY, (wanted,))
        if plan.turn_attempts:
            attempts = plan.turn_attempts
            await conn.execute(_UPSERT_ATTEMPTS, (list(attempts), list(attempts.values())))
    return BatchResult(users, tokens, assistants, finished, dropped)


# Turns of the conversation (or tenant) whose request is stored but whose finish is not.
_UNFINISHED = """
SELECT u.turn_id FROM messages u
WHERE u.tenant_id = %(tenant)s AND (%(conv)s = '' OR u.conversation_id = %(conv)s)
  AND u.role = 1
  AND NOT EXISTS (SELECT 1 FROM messages a WHERE a.turn_id = u.turn_id AND a.role = 2)
ORDER BY u.accepted_at LIMIT 1
"""

_SCOPE = "tenant_id = %(tenant)s AND (%(conv)s = '' OR conversation_id = %(conv)s)"


async def erase_on(conn: Conn, tenant_id: str, conversation_id: str, *, force: bool) -> Erasure:
    """Delete a conversation's rows ('' : the tenant's) in one transaction, with a tombstone."""
    scope = {"tenant": tenant_id, "conv": conversation_id}
    async with conn.transaction(), conn.cursor() as cur:
        await cur.execute("SELECT pg_advisory_xact_lock(%s)", (_ERASE_LOCK,))
        await cur.execute(f"SELECT count(*) FROM conversations WHERE {_SCOPE}", scope)
        row = await cur.fetchone()
        conversations = int(row[0]) if row else 0
        await cur.execute(
            "SELECT 1 FROM erasures WHERE tenant_id = %(tenant)s AND conversation_id = %(conv)s",
            scope,
        )
        tombstoned = await cur.fetchone() is not None
        if conversation_id and not conversations and not tombstoned:
            # The same answer whether the id is unknown or another tenant's.
            raise NotFound(
                f"conversation {conversation_id[:128]!r} was not found",
                reason="CONVERSATION_NOT_FOUND",
            )
        if not force:
            await cur.execute(_UNFINISHED, scope)
            running = await cur.fetchone()
            if running is not None:
                raise FailedPrecondition(
                    f"turn {running[0]} of this conversation has not finished; cancel it "
                    "(CancelTurn) or wait for it to finish, then delete again",
                    reason="TURN_IN_PROGRESS",
                )
        await cur.execute(
            "INSERT INTO erasures (tenant_id, conversation_id, erased_at) "
            "VALUES (%(tenant)s, %(conv)s, now()) ON CONFLICT (tenant_id, conversation_id) "
            "DO UPDATE SET erased_at = GREATEST(erasures.erased_at, EXCLUDED.erased_at)",
            scope,
        )
        turns = f"SELECT turn_id FROM messages WHERE {_SCOPE}"
        await cur.execute(
            f"INSERT INTO erased_turns (turn_id) {turns} ON CONFLICT (turn_id) DO NOTHING", scope
        )
        await cur.execute(f"DELETE FROM tokens WHERE turn_id IN ({turns})", scope)
        tokens = max(cur.rowcount, 0)
        # Tokens of assembled turns live on as their messages' token_lengths: counted as tokens.
        tokens += await _count(
            conn,
            "SELECT coalesce(sum(cardinality(token_lengths)), 0) FROM messages "
            f"WHERE {_SCOPE} AND role = 2",
            scope,
        )
        await cur.execute(f"DELETE FROM memory_outbox WHERE turn_id IN ({turns})", scope)
        await cur.execute(f"DELETE FROM turn_attempts WHERE turn_id IN ({turns})", scope)
        await cur.execute(f"DELETE FROM messages WHERE {_SCOPE}", scope)
        messages = max(cur.rowcount, 0)
        await cur.execute(f"DELETE FROM conversations WHERE {_SCOPE}", scope)
        # A retry of an erased start must not attach to (or be refused for) an erased turn.
        await cur.execute(f"DELETE FROM request_claims WHERE {_SCOPE}", scope)
        counts = ErasureCounts(conversations=conversations, messages=messages, tokens=tokens)
        already = tombstoned and not conversations
        detail = {**asdict(counts), "forced": force, "already_deleted": already}
        await cur.execute(
            "INSERT INTO audit_events (action, tenant_id, conversation_id, detail) "
            "VALUES (%s, %s, %s, %s)",
            (
                "conversation-erased" if conversation_id else "tenant-erased",
                tenant_id,
                conversation_id,
                Jsonb(detail),
            ),
        )
    return Erasure(counts, already_deleted=already)


async def _finished_turns(conn: Conn, turn_ids: Sequence[str]) -> list[FinishedTurn]:
    async with conn.cursor() as cur:
        await cur.execute(_SELECT_FINISHED, (list(turn_ids),))
        return [
            FinishedTurn(turn_id, tenant_id, conv_id, user_text, text, int(reason))
            for turn_id, tenant_id, conv_id, user_text, text, reason in await cur.fetchall()
        ]


class PgStore(AsyncStartStop):
    """The persister's PostgreSQL store: a small pool, schema created on ``start``."""

    def __init__(self, dsn: str, *, pool_size: int = 4, connect_timeout_s: float = 30.0) -> None:
        self._dsn = dsn
        self._pool_size = pool_size
        self._connect_timeout_s = connect_timeout_s
        self._pool: AsyncConnectionPool[Conn] | None = None

    async def start(self) -> None:
        if self._pool is not None:
            return
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            self._dsn,
            min_size=1,
            max_size=self._pool_size,
            kwargs={"autocommit": True, "options": "-c timezone=UTC"},
            check=AsyncConnectionPool.check_connection,
            open=False,
            name="persister",
        )
        await pool.open(wait=True, timeout=self._connect_timeout_s)
        try:
            async with pool.connection() as conn:
                await create_schema(conn)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def stop(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def _require_pool(self) -> AsyncConnectionPool[Conn]:
        if self._pool is None:
            raise RuntimeError("PgStore is not started")
        return self._pool

    def connection(self) -> AbstractAsyncContextManager[Conn]:
        """A connection from the pool, for the persister's other tables (``claims``)."""
        return self._require_pool().connection()

    async def ping(self) -> None:
        """One round trip to PostgreSQL (the readiness probe); raises when it cannot."""
        async with self._require_pool().connection() as conn:
            await conn.execute("SELECT 1")

    async def write_batch(self, plan: BatchPlan) -> BatchResult:
        async with self._require_pool().connection() as conn:
            return await write_batch_on(conn, plan)

    async def pending_memory(self, limit: int) -> list[FinishedTurn]:
        """The oldest finished turns still to be indexed into memory."""
        async with self._require_pool().connection() as conn:
            async with conn.cursor() as cur:
                await cur.execute(_OLDEST_FOR_MEMORY, (limit,))
                turn_ids = [row[0] for row in await cur.fetchall()]
            return await _finished_turns(conn, turn_ids) if turn_ids else []

    async def memory_indexed(self, turn_ids: Sequence[str]) -> None:
        async with self._require_pool().connection() as conn:
            await conn.execute(
                "DELETE FROM memory_outbox WHERE turn_id = ANY(%s)", (list(turn_ids),)
            )

    async def erase(self, tenant_id: str, conversation_id: str, *, force: bool) -> Erasure:
        async with self._require_pool().connection() as conn:
            return await erase_on(conn, tenant_id, conversation_id, force=force)

    async def prune_erased_turns(self, older_than_s: float) -> int:
        """Forget erased turn ids older than this: the logs no longer hold their records."""
        async with self._require_pool().connection() as conn:
            cur = await conn.execute(
                "DELETE FROM erased_turns WHERE erased_at < now() - make_interval(secs => %s)",
                (older_than_s,),
            )
            return max(cur.rowcount, 0)

    async def get_conversation(self, tenant_id: str, conversation_id: str) -> Conversation | None:
        async with self._require_pool().connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT conversation_id, title, created_at, updated_at FROM conversations "
                "WHERE tenant_id = %s AND conversation_id = %s",
                (tenant_id, conversation_id),
            )
            row = await cur.fetchone()
        if row is None:
            return None
        return Conversation(row[0], row[1], row[2], row[3])

    async def list_messages(
        self,
        tenant_id: str,
        conversation_id: str,
        *,
        after: MessageCursor | None,
        limit: int,
    ) -> list[Message]:
        query = (
            "SELECT turn_id, role, text, created_at, finish_reason, accepted_at FROM messages "
            "WHERE tenant_id = %s AND conversation_id = %s "
        )
        params: list[Any] = [tenant_id, conversation_id]
        if after is not None:
            query += "AND (accepted_at, turn_id, role) > (%s, %s, %s) "
            params += [after.accepted_at, after.turn_id, after.role]
        query += "ORDER BY accepted_at, turn_id, role LIMIT %s"
        params.append(limit)
        async with self._require_pool().connection() as conn, conn.cursor() as cur:
            await cur.execute(query, params)
            rows = await cur.fetchall()
        return [
            Message(turn_id, Role(role), text, created_at, int(reason), accepted_at)
            for turn_id, role, text, created_at, reason, accepted_at in rows
        ]

    async def last_messages(
        self, tenant_id: str, conversation_id: str, limit: int
    ) -> list[Message]:
        async with self._require_pool().connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT turn_id, role, text, created_at, finish_reason, accepted_at FROM messages "
                "WHERE tenant_id = %s AND conversation_id = %s "
                "ORDER BY accepted_at DESC, turn_id DESC, role DESC LIMIT %s",
                (tenant_id, conversation_id, limit),
            )
            rows = await cur.fetchall()
        return [
            Message(turn_id, Role(role), text, created_at, int(reason), accepted_at)
            for turn_id, role, text, created_at, reason, accepted_at in reversed(rows)
        ]

    async def list_conversations(
        self, tenant_id: str, *, after: ConversationCursor | None, limit: int
    ) -> list[Conversation]:
        query = (
            "SELECT conversation_id, title, created_at, updated_at FROM conversations "
            "WHERE tenant_id = %s "
        )
        params: list[Any] = [tenant_id]
        if after is not None:
            query += "AND (updated_at, conversation_id) < (%s, %s) "
            params += [after.updated_at, after.conversation_id]
        query += "ORDER BY updated_at DESC, conversation_id DESC LIMIT %s"
        params.append(limit)
        async with self._require_pool().connection() as conn, conn.cursor() as cur:
            await cur.execute(query, params)
            rows = await cur.fetchall()
        return [Conversation(r[0], r[1], r[2], r[3]) for r in rows]

    async def lookup_turn(self, turn_id: str) -> StoredTurn | None:
        """The turn's stored rows (one primary-key read), or None when none is stored."""
        async with self._require_pool().connection() as conn:
            return await read_turn(conn, turn_id)

    async def count_rows(self) -> dict[str, int]:
        """Row counts per table (tests and operators' sanity checks). "tokens" counts every
        stored token once: the rows of turns not yet assembled, and the token lengths kept on
        assembled messages (whose rows are deleted)."""
        counts: dict[str, int] = {}
        async with self._require_pool().connection() as conn, conn.cursor() as cur:
            for table in ("conversations", "messages", "tokens"):
                await cur.execute(f"SELECT count(*) FROM {table}")
                row = await cur.fetchone()
                counts[table] = int(row[0]) if row is not None else 0
            await cur.execute("SELECT coalesce(sum(cardinality(token_lengths)), 0) FROM messages")
            row = await cur.fetchone()
            counts["tokens"] += int(row[0]) if row is not None else 0
        return counts

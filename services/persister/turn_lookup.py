"""``LookupTurn``: a turn found by id in PostgreSQL, so a gateway resumes or cancels it without
reading the logs.

One primary-key read of the turn's message rows answers where the turn is, whether it finished
and, for a finished turn, its tokens after a seq: an assembled turn keeps its tokens' lengths on
its assistant message (``store``), so the text is sliced back into the very tokens the log
holds. For a turn with no stored row the answer says how far the persister has applied the id's
request partition: a request below that offset would be stored, so an id that points there
names no turn, and the gateway needs no log scan to say so (docs/protocol.md, "Resume").
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import TupleRow

from mesh.errors import InvalidArgument
from mesh.turn_ids import parse_turn_id
from services.persister.model import Role, Store, StoredTurn

Conn = psycopg.AsyncConnection[TupleRow]

_SELECT_TURN = """
SELECT role, tenant_id, conversation_id, request_offset, text, token_lengths, finish_event
FROM messages WHERE turn_id = %s
"""


async def read_turn(conn: Conn, turn_id: str) -> StoredTurn | None:
    """The turn's message rows as one value; None when neither is stored."""
    async with conn.cursor() as cur:
        await cur.execute(_SELECT_TURN, (turn_id,))
        rows = await cur.fetchall()
    if not rows:
        return None
    by_role: dict[int, tuple[Any, ...]] = {int(row[0]): row for row in rows}
    user, assistant = by_role.get(Role.USER), by_role.get(Role.ASSISTANT)
    first = assistant or user
    assert first is not None  # rows is not empty and holds only these two roles
    request_offset = -1
    if user is not None and user[3] is not None:
        request_offset = int(user[3])
    if assistant is None:
        return StoredTurn(first[1], first[2], request_offset, finished=False)
    lengths = assistant[5]
    return StoredTurn(
        assistant[1],
        assistant[2],
        request_offset,
        finished=True,
        text=assistant[4],
        token_lengths=None if lengths is None else tuple(int(n) for n in lengths),
        finish_event=None if assistant[6] is None else bytes(assistant[6]),
    )


class TurnState(enum.IntEnum):
    """Values match ``chat.persister.v1.StoredTurnState``."""

    UNKNOWN = 1
    RUNNING = 2
    FINISHED = 3


@dataclass(frozen=True, slots=True)
class TurnAnswer:
    """What ``LookupTurn`` returns (see its message in proto/chat/persister/v1)."""

    state: TurnState
    conversation_id: str = ""
    request_offset: int = -1
    applied_request_offset: int = 0
    finish_event: bytes = b""
    first_seq: int = 0
    token_texts: list[str] = field(default_factory=list)
    tokens_complete: bool = False


def tokens_after(text: str, lengths: tuple[int, ...], after_seq: int) -> list[str]:
    """The tokens with a seq above ``after_seq`` of a text made of tokens of these lengths."""
    start = sum(lengths[:after_seq])
    out: list[str] = []
    for length in lengths[after_seq:]:
        out.append(text[start : start + length])
        start += length
    return out


class TurnLookup:
    """Answers ``LookupTurn`` from ``store``; ``applied(partition)`` is the request offset below
    which that partition is stored (the persister group's progress)."""

    def __init__(self, *, store: Store, applied: Callable[[int], Awaitable[int]]) -> None:
        self._store = store
        self._applied = applied

    async def lookup(self, tenant_id: str, turn_id: str, after_seq: int) -> TurnAnswer:
        if not tenant_id:
            raise InvalidArgument(
                "tenant_id is required", field="tenant_id", reason="TENANT_ID_MISSING"
            )
        if after_seq < 0:
            raise InvalidArgument(
                f"after_seq={after_seq} must be >= 0", field="after_seq", reason="AFTER_SEQ_INVALID"
            )
        ref = parse_turn_id(turn_id)
        stored = await self._store.lookup_turn(turn_id)
        # Another tenant's turn reads exactly like a missing one: ids must not leak existence.
        if stored is None or stored.tenant_id != tenant_id:
            return TurnAnswer(
                TurnState.UNKNOWN, applied_request_offset=await self._applied(ref.partition)
            )
        if not stored.finished:
            return TurnAnswer(TurnState.RUNNING, stored.conversation_id, stored.request_offset)
        complete = stored.token_lengths is not None and stored.finish_event is not None
        texts: list[str] = []
        if complete and stored.token_lengths is not None:
            texts = tokens_after(stored.text, stored.token_lengths, after_seq)
        return TurnAnswer(
            TurnState.FINISHED,
            stored.conversation_id,
            stored.request_offset,
            finish_event=stored.finish_event or b"",
            first_seq=after_seq + 1,
            token_texts=texts,
            tokens_complete=complete,
        )

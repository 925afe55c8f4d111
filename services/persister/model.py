"""The persister's plain values and the two interfaces it writes through.

Decoded log events (what ``codec.decode`` returns), the rows one batch writes and what it changed,
the values reads return, and the ``Store`` (PostgreSQL) and ``Rememberer`` (memory indexing)
protocols. No protobuf and no database code here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from mesh.log import Record

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def utc_from_ms(ms: int) -> datetime:
    """Exact (no float rounding), so a replayed record yields the very same timestamp."""
    return EPOCH + timedelta(milliseconds=ms)


class Role(enum.IntEnum):
    """Message author; values match ``chat.common.v1.Role``."""

    UNSPECIFIED = 0
    USER = 1
    ASSISTANT = 2


# ---------------------------------------------------------------------------------------------
# Decoded log events. Each is written as one row, and the store passes the fields in the order
# declared here as the columns of its statements (``store._columns``): keep them in step.


@dataclass(frozen=True, slots=True)
class UserTurn:
    """A ``TurnRequested``: the user's message of a turn."""

    turn_id: str
    conversation_id: str
    tenant_id: str
    text: str
    accepted_at: datetime


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A ``TokenEmitted``."""

    turn_id: str
    seq: int
    text: str


@dataclass(frozen=True, slots=True)
class TurnEnd:
    """A ``TurnFinished``; ``finished_at`` is the record's log timestamp (stable on replay)."""

    turn_id: str
    conversation_id: str
    tenant_id: str
    finish_reason: int
    last_seq: int
    finished_at: datetime


Event = UserTurn | TokenEvent | TurnEnd
# Decodes a record; None for records the persister does not store (started, cancelled, garbage).
Decoder = Callable[[Record], list[Event]]


# ---------------------------------------------------------------------------------------------
# Rows a batch writes, and what reads return


@dataclass(frozen=True, slots=True)
class ConversationRow:
    """A conversation's row; field order is the column order of the upsert (``store._columns``)."""

    tenant_id: str
    conversation_id: str
    title: str
    created_at: datetime
    updated_at: datetime


@dataclass(slots=True)
class BatchPlan:
    """The rows one batch writes, and the last record of each partition it covers."""

    conversations: list[ConversationRow] = field(default_factory=list)
    # Each decoded event is written as one row.
    user_messages: list[UserTurn] = field(default_factory=list)
    tokens: list[TokenEvent] = field(default_factory=list)
    finishes: list[TurnEnd] = field(default_factory=list)
    last_records: dict[tuple[str, int], Record] = field(default_factory=dict)
    events: int = 0
    # Records that repeated an earlier record of the same batch (same turn and seq, say).
    in_batch_duplicates: int = 0

    @property
    def row_attempts(self) -> int:
        return len(self.user_messages) + len(self.tokens) + len(self.finishes)


@dataclass(frozen=True, slots=True)
class FinishedTurn:
    """A finished turn as stored, for memory indexing."""

    turn_id: str
    tenant_id: str
    conversation_id: str
    user_text: str | None
    assistant_text: str
    finish_reason: int


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What a committed batch changed."""

    user_messages_inserted: int
    tokens_inserted: int
    assistant_messages_inserted: int
    finished: list[FinishedTurn]

    @property
    def messages_inserted(self) -> int:
        return self.user_messages_inserted + self.assistant_messages_inserted

    @property
    def rows_inserted(self) -> int:
        return self.messages_inserted + self.tokens_inserted


@dataclass(frozen=True, slots=True)
class Message:
    turn_id: str
    role: Role
    text: str
    created_at: datetime
    finish_reason: int
    # The turn's acceptance time: messages sort by it, then turn id, then role.
    accepted_at: datetime


@dataclass(frozen=True, slots=True)
class Conversation:
    conversation_id: str
    title: str
    created_at: datetime
    updated_at: datetime
    messages: tuple[Message, ...] = ()


@dataclass(frozen=True, slots=True)
class MessageCursor:
    """Position after a message in conversation order."""

    accepted_at: datetime
    turn_id: str
    role: int


@dataclass(frozen=True, slots=True)
class ConversationCursor:
    """Position after a conversation in newest-first order."""

    updated_at: datetime
    conversation_id: str


@dataclass(frozen=True, slots=True)
class Stats:
    events_consumed: int
    batches_committed: int
    tokens_written: int
    messages_written: int
    duplicates_ignored: int
    pending_events: int


@dataclass(frozen=True, slots=True)
class Page:
    conversations: list[Conversation]
    next_page_token: str


# ---------------------------------------------------------------------------------------------
# The database and memory indexing behind the persister


class Store(Protocol):
    """PostgreSQL behind the persister (``store.PgStore``)."""

    async def write_batch(self, plan: BatchPlan) -> BatchResult:
        """Write a batch in one transaction; raise on failure (nothing is then written).

        Finished turns other than errors are queued for memory in the same transaction."""
        ...

    async def pending_memory(self, limit: int) -> list[FinishedTurn]:
        """Up to ``limit`` of the oldest turns queued for memory and not yet indexed."""
        ...

    async def memory_indexed(self, turn_ids: Sequence[str]) -> None:
        """Take these turns off the memory queue."""
        ...

    async def get_conversation(self, tenant_id: str, conversation_id: str) -> Conversation | None:
        """The tenant's conversation without messages, or None."""
        ...

    async def list_messages(
        self,
        tenant_id: str,
        conversation_id: str,
        *,
        after: MessageCursor | None,
        limit: int,
    ) -> list[Message]:
        """Up to ``limit`` messages of a conversation after ``after``, oldest first."""
        ...

    async def last_messages(
        self, tenant_id: str, conversation_id: str, limit: int
    ) -> list[Message]:
        """The newest ``limit`` messages of a conversation, oldest first."""
        ...

    async def list_conversations(
        self, tenant_id: str, *, after: ConversationCursor | None, limit: int
    ) -> list[Conversation]:
        """Up to ``limit`` of the tenant's conversations after ``after``, newest first."""
        ...


class Rememberer(Protocol):
    """Memory indexing of finished turns (``memory_client.MemoryIndexer``)."""

    async def remember(
        self, *, tenant_id: str, conversation_id: str, text: str, request_id: str
    ) -> None:
        """Index ``text``; idempotent by ``request_id``. Raises when memory did not take it."""
        ...

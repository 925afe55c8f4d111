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
    # Where the TurnRequested lies on the request log: a gateway's lookup of the turn reports it.
    request_offset: int = -1


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A ``TokenEmitted``."""

    turn_id: str
    seq: int
    text: str
    attempt: int = 0  # of the TurnStarted it belongs to (``turnlog.Attempts``)


@dataclass(frozen=True, slots=True)
class AttemptStarted:
    """A ``TurnStarted`` with an attempt: older attempts' later records of the turn no longer
    count (``turnlog.Attempts``). Only a takeover (attempt 2 or more) needs a row for later
    batches."""

    turn_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class TurnEnd:
    """A ``TurnFinished``; ``finished_at`` is the record's log timestamp (stable on replay)."""

    turn_id: str
    conversation_id: str
    tenant_id: str
    finish_reason: int
    last_seq: int
    finished_at: datetime
    # The TurnFinished record as logged (``turnlog.encode``), stored so a resume served from
    # PostgreSQL ends with exactly the frame the log would give (usage, timings, error).
    event: bytes = b""
    attempt: int = 0  # of the TurnStarted it belongs to (``turnlog.Attempts``)


Event = UserTurn | TokenEvent | TurnEnd | AttemptStarted
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
    # The newest takeover attempt per turn seen in the batch: later batches fence by it.
    turn_attempts: dict[str, int] = field(default_factory=dict)
    last_records: dict[tuple[str, int], Record] = field(default_factory=dict)
    events: int = 0
    # Records that repeated an earlier record of the same batch (same turn and seq, say).
    in_batch_duplicates: int = 0
    # Tokens and finishes of an older attempt after a newer one started, in this batch.
    zombie_records: int = 0

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
    # Rows left out because their turn was erased (``store._drop_erased``).
    erased_rows_dropped: int = 0

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
class ErasureCounts:
    """What one erasure deleted."""

    conversations: int = 0
    messages: int = 0
    tokens: int = 0
    chunks: int = 0


@dataclass(frozen=True, slots=True)
class Erasure:
    """The outcome of erasing a conversation or a tenant."""

    counts: ErasureCounts
    # An earlier erasure had already deleted it (a repeated call succeeds, changing nothing).
    already_deleted: bool = False


@dataclass(frozen=True, slots=True)
class StoredTurn:
    """A turn's stored rows, as ``LookupTurn`` reads them (``turn_lookup``)."""

    tenant_id: str
    conversation_id: str
    # Offset of its TurnRequested on the request log; -1 while its user message is not stored
    # (the topics are consumed independently) or when it was stored before the column existed.
    request_offset: int
    finished: bool
    # The assistant message's text, its tokens' lengths (seq 1..n; None when not sliceable) and
    # the TurnFinished record as logged (None for a turn stored before it was kept).
    text: str = ""
    token_lengths: tuple[int, ...] | None = None
    finish_event: bytes | None = None


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

    async def lookup_turn(self, turn_id: str) -> StoredTurn | None:
        """The turn's stored rows (one primary-key read), or None when none is stored."""
        ...

    async def erase(self, tenant_id: str, conversation_id: str, *, force: bool) -> Erasure:
        """Delete a conversation's rows ('' : the whole tenant's) and leave a tombstone.

        Raises ``NotFound`` for a conversation the tenant never had, and (unless ``force``)
        ``FailedPrecondition`` while one of its turns has no stored finish."""
        ...


class Forgetter(Protocol):
    """Memory's ``Forget`` (``memory_client.MemoryIndexer``)."""

    async def forget(self, *, tenant_id: str, conversation_id: str) -> int:
        """Delete the conversation's chunks ('' : the tenant's); returns how many."""
        ...


class Rememberer(Protocol):
    """Memory indexing of finished turns (``memory_client.MemoryIndexer``)."""

    async def remember(
        self, *, tenant_id: str, conversation_id: str, text: str, request_id: str
    ) -> None:
        """Index ``text``; idempotent by ``request_id``. Raises when memory did not take it."""
        ...

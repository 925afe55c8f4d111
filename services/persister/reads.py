"""History reads: a conversation with its messages, its messages alone, a tenant's conversations.

A read that must see everything already on the log (``consistent``, or ``before`` a turn) waits on
the flush barrier first; a plain read serves what PostgreSQL has.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from mesh.errors import InvalidArgument, NotFound
from mesh.paging import DEFAULT_PAGE_SIZE, validate_page_size
from mesh.turn_ids import TurnRef
from services.persister.barrier import FlushBarrier
from services.persister.model import (
    Conversation,
    ConversationCursor,
    Message,
    MessageCursor,
    Page,
    Store,
)
from services.persister.page_tokens import decode_page_token, encode_page_token


class HistoryReader:
    """Reads conversations from ``store``; messages are fetched ``message_page_size`` at a time."""

    def __init__(self, *, store: Store, barrier: FlushBarrier, message_page_size: int) -> None:
        self._store = store
        self._barrier = barrier
        self._message_page_size = message_page_size

    async def get_conversation(
        self,
        tenant_id: str,
        conversation_id: str,
        *,
        consistent: bool = False,
        before: TurnRef | None = None,
        last_messages: int = 0,
    ) -> Conversation:
        """The conversation; ``consistent`` first waits for the log (``before``: see barrier);
        ``last_messages`` > 0 keeps only that many of the newest messages."""
        _require(tenant_id, "tenant_id")
        _require(conversation_id, "conversation_id")
        if last_messages < 0:
            raise InvalidArgument(
                f"last_messages={last_messages} must be >= 0 (0: every message)",
                field="last_messages",
                reason="LAST_MESSAGES_INVALID",
            )
        if consistent or before is not None:
            await self._barrier.wait(before=before)
        found = await self._store.get_conversation(tenant_id, conversation_id)
        if found is None:
            raise _not_found(conversation_id)
        if last_messages:
            messages = await self._store.last_messages(tenant_id, conversation_id, last_messages)
        else:
            messages = [m async for m in self._iter_messages(tenant_id, conversation_id)]
        return Conversation(
            found.conversation_id, found.title, found.created_at, found.updated_at, tuple(messages)
        )

    async def list_messages(self, tenant_id: str, conversation_id: str) -> AsyncIterator[Message]:
        """A conversation's messages, oldest first, fetched page by page."""
        _require(tenant_id, "tenant_id")
        _require(conversation_id, "conversation_id")
        if await self._store.get_conversation(tenant_id, conversation_id) is None:
            raise _not_found(conversation_id)
        async for message in self._iter_messages(tenant_id, conversation_id):
            yield message

    async def _iter_messages(self, tenant_id: str, conversation_id: str) -> AsyncIterator[Message]:
        after: MessageCursor | None = None
        while True:
            page = await self._store.list_messages(
                tenant_id, conversation_id, after=after, limit=self._message_page_size
            )
            for message in page:
                yield message
            if len(page) < self._message_page_size:
                return
            last = page[-1]
            after = MessageCursor(last.accepted_at, last.turn_id, int(last.role))

    async def list_conversations(self, tenant_id: str, page_size: int, page_token: str) -> Page:
        """One page of the tenant's conversations, newest first, and the next page's token."""
        _require(tenant_id, "tenant_id")
        validate_page_size(page_size)
        limit = page_size or DEFAULT_PAGE_SIZE
        after = decode_page_token(page_token) if page_token else None
        rows = await self._store.list_conversations(tenant_id, after=after, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        token = ""
        if more and rows:
            token = encode_page_token(
                ConversationCursor(rows[-1].updated_at, rows[-1].conversation_id)
            )
        return Page(rows, token)


def _require(value: str, name: str) -> None:
    if not value:
        raise InvalidArgument(f"{name} is required", field=name, reason=f"{name.upper()}_MISSING")


def _not_found(conversation_id: str) -> NotFound:
    # The same answer whether the id is unknown or owned by another tenant.
    return NotFound(
        f"conversation {conversation_id[:128]!r} was not found",
        reason="CONVERSATION_NOT_FOUND",
    )

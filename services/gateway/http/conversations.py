"""How stateless requests (a full message list each time) map onto the mesh's conversations.

The mesh keeps history itself: an agent reads a conversation's stored messages and appends the
new user text. Sending the client's whole list as the new text would count the history twice,
so a request takes one of two paths (docs/openai.md):

- **Continue.** The history before the last user message is exactly what a conversation of
  this tenant holds (its previous turn ended on this gateway with that reply, and nothing was
  added since): the new user text alone is a turn of that conversation. The agent's KV cache
  still holds the conversation's prompt, so only the new text is read.
- **Start.** Otherwise a new conversation starts, and its first turn's text carries the system
  messages and the earlier messages as a transcript, followed by the new user text.

The index is keyed by a hash of (tenant, the conversation's messages) and kept per gateway; a
miss (another gateway served the previous turn, the index forgot it) only costs KV reuse, never
correctness. An entry is taken, not read, so two requests with the same history cannot both
continue one conversation; before continuing, the conversation's stored message count is
checked against the index (a gRPC client could have added turns).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from services.gateway.caches import BoundedLru
from services.gateway.http.parsing import ChatMessage

_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}


def compose(messages: Sequence[ChatMessage]) -> str:
    """The text of a turn that starts a conversation from ``messages`` (the last is the user's).

    A lone user message is sent as it is; anything before it becomes a transcript, so the model
    sees the whole exchange in one user turn.
    """
    *before, last = messages
    if not before:
        return last.text
    instructions = [m.text for m in before if m.role == "system"]
    earlier = [m for m in before if m.role != "system"]
    parts = []
    if instructions:
        parts.append("Instructions:\n" + "\n\n".join(instructions))
    if earlier:
        parts.append(
            "Earlier messages:\n" + "\n".join(f"{_LABELS[m.role]}: {m.text}" for m in earlier)
        )
    parts.append("Message:\n" + last.text)
    return "\n\n".join(parts)


def history_key(tenant_id: str, messages: Sequence[ChatMessage]) -> str:
    """A digest of a tenant's conversation as the client sees it."""
    canonical = json.dumps(
        [tenant_id, [[m.role, m.text] for m in messages]], ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Known:
    """A conversation whose stored history matches a client's message list."""

    conversation_id: str
    # Messages the persister holds for it (one user and one assistant message per turn).
    stored_messages: int


class ConversationIndex:
    """history digest -> conversation, for the turns this gateway finished."""

    def __init__(self, capacity: int = 50_000) -> None:
        self._entries: BoundedLru[str, Known] = BoundedLru(capacity)

    def take(self, key: str) -> Known | None:
        known = self._entries.get(key)
        if known is not None:
            self._entries.pop(key)
        return known

    def put(self, key: str, known: Known) -> None:
        self._entries.put(key, known)

    def __len__(self) -> int:
        return len(self._entries)


__all__ = ["ConversationIndex", "Known", "compose", "history_key"]

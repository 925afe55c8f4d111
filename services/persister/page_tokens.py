"""ListConversations page tokens: an opaque, URL-safe encoding of a ``ConversationCursor``."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import timedelta

from mesh.errors import InvalidArgument
from services.persister.model import EPOCH, ConversationCursor


def encode_page_token(cursor: ConversationCursor) -> str:
    micros = (cursor.updated_at - EPOCH) // timedelta(microseconds=1)
    raw = json.dumps([micros, cursor.conversation_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> ConversationCursor:
    """Parse a token from ``encode_page_token``; anything else is INVALID_ARGUMENT."""
    bad = InvalidArgument(
        "page_token is not a token returned by ListConversations; "
        "send the next_page_token of the previous page, or an empty token for the first page",
        reason="PAGE_TOKEN_INVALID",
        field="page_token",
    )
    if len(token) > 2048:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError):
        raise bad from None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], int)
        or isinstance(value[0], bool)
        or not isinstance(value[1], str)
        # PostgreSQL refuses NUL in text: it would come back as an unavailable database.
        or "\x00" in value[1]
    ):
        raise bad
    micros, conversation_id = value
    try:
        updated_at = EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise bad from None
    return ConversationCursor(updated_at, conversation_id)

"""Checks on what a client sends the gateway, before anything is logged.

Each failure is an ``InvalidArgument`` naming the offending field. The page-size check is shared
with the persister and lives in ``mesh.paging``.
"""

from __future__ import annotations

from mesh.errors import InvalidArgument
from mesh.generation import validate_options
from services.gateway.model import StartRequest

MAX_STOP_SEQUENCES = 8
MAX_STOP_SEQUENCE_CHARS = 64
MAX_ID_CHARS = 128


def _check_id(value: str, field: str, reason: str) -> None:
    if len(value) > MAX_ID_CHARS or not value.isprintable() or value != value.strip():
        raise InvalidArgument(
            f"{field} must be at most {MAX_ID_CHARS} printable characters without surrounding "
            "spaces",
            reason=reason,
            field=field,
        )


def validate_start(request: StartRequest, *, max_text_chars: int, max_tokens_limit: int) -> None:
    """Raise INVALID_ARGUMENT (with the offending field) for a start the mesh cannot serve."""
    if not request.text.strip():
        raise InvalidArgument(
            "start.text is empty: send the user's message", reason="TEXT_EMPTY", field="start.text"
        )
    if len(request.text) > max_text_chars:
        raise InvalidArgument(
            f"start.text has {len(request.text)} characters; the limit is {max_text_chars}",
            reason="TEXT_TOO_LONG",
            field="start.text",
        )
    if request.conversation_id:
        _check_id(request.conversation_id, "start.conversation_id", "CONVERSATION_ID_INVALID")
    if request.request_id:
        _check_id(request.request_id, "start.request_id", "REQUEST_ID_INVALID")
    validate_options(
        request.options,
        max_tokens_limit=max_tokens_limit,
        max_stop_sequences=MAX_STOP_SEQUENCES,
        max_stop_sequence_chars=MAX_STOP_SEQUENCE_CHARS,
        field_prefix="start.options",
    )


def validate_conversation_id(conversation_id: str) -> None:
    if not conversation_id:
        raise InvalidArgument(
            "conversation_id is required",
            reason="CONVERSATION_ID_MISSING",
            field="conversation_id",
        )
    _check_id(conversation_id, "conversation_id", "CONVERSATION_ID_INVALID")

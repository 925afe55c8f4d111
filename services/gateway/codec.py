"""Log records <-> gateway values: the only gateway module besides the servicer that knows pb2."""

from __future__ import annotations

import logging
from collections.abc import Container

from chat.events.v1 import events_pb2
from google.protobuf.message import DecodeError

from mesh.codec import finish_reason_from_proto, options_to_proto
from mesh.generation import GenerationOptions
from services.gateway.model import EventKind, Timings, TurnEventView, Usage

_log = logging.getLogger(__name__)


def encode_turn_requested(
    *,
    turn_id: str,
    conversation_id: str,
    tenant_id: str,
    text: str,
    options: GenerationOptions,
    request_id: str,
    events_partition: int,
    events_start: int,
    accepted_at_ns: int,
) -> bytes:
    message = events_pb2.TurnRequested(
        turn_id=turn_id,
        conversation_id=conversation_id,
        tenant_id=tenant_id,
        user_text=text,
        options=options_to_proto(options),
        request_id=request_id,
        events_start_offset=events_start,
        events_partition=events_partition,
    )
    message.accepted_at.FromNanoseconds(accepted_at_ns)
    return message.SerializeToString()


def decode_turn_requested(value: bytes) -> tuple[str, str, str] | None:
    """``(turn_id, conversation_id, tenant_id)`` of a TurnRequested record; None if unreadable."""
    message = events_pb2.TurnRequested()
    try:
        message.ParseFromString(value)
    except DecodeError:
        return None
    return message.turn_id, message.conversation_id, message.tenant_id


def encode_turn_cancelled(turn_id: str, conversation_id: str, tenant_id: str) -> bytes:
    event = events_pb2.TurnEvent(
        cancelled=events_pb2.TurnCancelled(
            turn_id=turn_id, conversation_id=conversation_id, tenant_id=tenant_id
        )
    )
    return event.SerializeToString()


def decode_turn_event(
    value: bytes, offset: int, wanted: Container[str] | None = None
) -> TurnEventView | None:
    """The view of a turn-event record, or None for records we cannot use.

    With ``wanted``, records of other turns return None before any view is built: the hub's tail
    decodes every record of a partition and most belong to turns nobody here watches.
    """
    event = events_pb2.TurnEvent()
    try:
        event.ParseFromString(value)
    except DecodeError:
        _log.warning("undecodable turn event at offset %d skipped", offset)
        return None
    which = event.WhichOneof("event")
    if which == "token":
        token = event.token
        if wanted is not None and token.turn_id not in wanted:
            return None
        return TurnEventView(EventKind.TOKEN, token.turn_id, offset, token.seq, token.text)
    if which is None:
        return None
    body = getattr(event, which)
    if wanted is not None and body.turn_id not in wanted:
        return None
    if which == "started":
        return TurnEventView(EventKind.STARTED, body.turn_id, offset)
    if which == "cancelled":
        return TurnEventView(EventKind.CANCELLED, body.turn_id, offset)
    timings = body.timings
    return TurnEventView(
        EventKind.FINISHED,
        body.turn_id,
        offset,
        finish_reason=finish_reason_from_proto(body.finish_reason),
        usage=Usage(body.usage.prompt_tokens, body.usage.completion_tokens),
        timings=Timings(
            timings.queued_ms,
            timings.retrieval_ms,
            timings.time_to_first_token_ms,
            timings.total_ms,
        ),
        last_seq=body.last_seq,
        model=body.model,
        error_status=body.error.SerializeToString() if body.HasField("error") else b"",
    )

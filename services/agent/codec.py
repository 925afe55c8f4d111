"""Log records <-> agent values: besides the servicer, the only agent module that knows pb2."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from chat.common.v1 import common_pb2
from chat.events.v1 import events_pb2
from google.protobuf.message import DecodeError

from mesh.codec import finish_reason_to_proto, options_from_proto
from mesh.errors import MeshError, to_status_proto
from mesh.generation import FinishReason, GenerationOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TurnRequest:
    """A ``TurnRequested`` record."""

    turn_id: str
    conversation_id: str
    tenant_id: str
    user_text: str
    options: GenerationOptions
    request_id: str
    accepted_at_s: float | None  # wall clock; None when the gateway did not set it
    events_partition: int
    events_start: int


@dataclass(frozen=True, slots=True)
class TurnEventView:
    """The fields of a ``TurnEvent`` the agent cares about."""

    kind: str  # "started", "token", "finished" or "cancelled"
    turn_id: str
    seq: int = 0
    text: str = ""


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Timings:
    queued_ms: float
    retrieval_ms: float
    time_to_first_token_ms: float
    total_ms: float


def decode_turn_requested(value: bytes) -> TurnRequest | None:
    """The request in a record; None (and a log line) if it is not a readable TurnRequested."""
    message = events_pb2.TurnRequested()
    try:
        message.ParseFromString(value)
    except DecodeError:
        log.error("unreadable TurnRequested record (%d bytes); skipping it", len(value))
        return None
    if not message.turn_id or not message.conversation_id:
        log.error("TurnRequested without turn or conversation id; skipping it")
        return None
    accepted = message.accepted_at.ToNanoseconds() / 1e9 if message.HasField("accepted_at") else 0
    return TurnRequest(
        turn_id=message.turn_id,
        conversation_id=message.conversation_id,
        tenant_id=message.tenant_id,
        user_text=message.user_text,
        options=options_from_proto(message.options),
        request_id=message.request_id,
        accepted_at_s=accepted or None,
        events_partition=message.events_partition,
        events_start=message.events_start_offset,
    )


def decode_turn_event(value: bytes) -> TurnEventView | None:
    event = events_pb2.TurnEvent()
    try:
        event.ParseFromString(value)
    except DecodeError:
        return None
    kind = event.WhichOneof("event")
    if kind == "token":
        return TurnEventView("token", event.token.turn_id, event.token.seq, event.token.text)
    if kind == "started":
        return TurnEventView("started", event.started.turn_id)
    if kind == "finished":
        return TurnEventView("finished", event.finished.turn_id, event.finished.last_seq)
    if kind == "cancelled":
        return TurnEventView("cancelled", event.cancelled.turn_id)
    return None


def encode_started(
    turn: TurnRequest,
    *,
    agent_id: str,
    request_partition: int,
    request_offset: int,
    resumed_after_seq: int,
) -> bytes:
    return events_pb2.TurnEvent(
        started=events_pb2.TurnStarted(
            turn_id=turn.turn_id,
            conversation_id=turn.conversation_id,
            tenant_id=turn.tenant_id,
            agent_id=agent_id,
            request_partition=request_partition,
            request_offset=request_offset,
            resumed_after_seq=resumed_after_seq,
        )
    ).SerializeToString()


def encode_token(turn: TurnRequest, seq: int, text: str) -> bytes:
    return events_pb2.TurnEvent(
        token=events_pb2.TokenEmitted(
            turn_id=turn.turn_id,
            seq=seq,
            text=text,
            conversation_id=turn.conversation_id,
            tenant_id=turn.tenant_id,
        )
    ).SerializeToString()


def encode_finished(
    turn: TurnRequest,
    *,
    reason: FinishReason,
    usage: Usage,
    timings: Timings,
    last_seq: int,
    model: str,
    error: MeshError | None = None,
    cancel_seen_at_seq: int = 0,
) -> bytes:
    finished = events_pb2.TurnFinished(
        turn_id=turn.turn_id,
        finish_reason=finish_reason_to_proto(reason),
        usage=common_pb2.TokenUsage(
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens
        ),
        timings=common_pb2.TurnTimings(
            queued_ms=timings.queued_ms,
            retrieval_ms=timings.retrieval_ms,
            time_to_first_token_ms=timings.time_to_first_token_ms,
            total_ms=timings.total_ms,
        ),
        conversation_id=turn.conversation_id,
        tenant_id=turn.tenant_id,
        last_seq=last_seq,
        model=model,
        cancel_seen_at_seq=cancel_seen_at_seq,
    )
    if error is not None:
        finished.error.CopyFrom(to_status_proto(error))
    return events_pb2.TurnEvent(finished=finished).SerializeToString()

"""Turn-log records (``chat.events.v1`` protobuf bytes) <-> the dataclasses of ``_events``.

The only module that knows the wire format of the turn log; every service reads and writes its
records through here.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import asdict, fields
from typing import TypeVar

from chat.common.v1 import common_pb2
from chat.events.v1 import events_pb2
from google.protobuf.message import DecodeError, Message

from mesh.codec import (
    options_from_proto,
    options_to_proto,
    timings_from_proto,
    timings_to_proto,
    usage_from_proto,
    usage_to_proto,
)
from mesh.turnlog._events import (
    ClientAttached,
    ClientDetached,
    TokenEmitted,
    TurnCancelled,
    TurnEvent,
    TurnFinished,
    TurnRequested,
    TurnStarted,
)

_Flat = TypeVar("_Flat", TurnStarted, TurnCancelled, ClientAttached, ClientDetached)


class UndecodableRecord(ValueError):
    """A record value that is not the protobuf message its topic holds."""


def encode(event: TurnRequested | TurnEvent) -> bytes:
    """The record value for ``event``: a bare ``TurnRequested`` for the request log, every other
    event inside the ``TurnEvent`` envelope of the turn-event log."""
    if isinstance(event, TurnRequested):
        return _requested_to_proto(event).SerializeToString()
    if isinstance(event, TokenEmitted):
        envelope = events_pb2.TurnEvent(
            token=events_pb2.TokenEmitted(
                turn_id=event.turn_id,
                seq=event.seq,
                text=event.text,
                conversation_id=event.conversation_id,
                tenant_id=event.tenant_id,
                more_texts=event.more,
                attempt=event.attempt,
            )
        )
    elif isinstance(event, TurnStarted):
        envelope = events_pb2.TurnEvent(started=events_pb2.TurnStarted(**asdict(event)))
    elif isinstance(event, TurnFinished):
        envelope = events_pb2.TurnEvent(finished=_finished_to_proto(event))
    elif isinstance(event, ClientAttached):
        envelope = events_pb2.TurnEvent(attached=events_pb2.ClientAttached(**asdict(event)))
    elif isinstance(event, ClientDetached):
        envelope = events_pb2.TurnEvent(detached=events_pb2.ClientDetached(**asdict(event)))
    else:
        envelope = events_pb2.TurnEvent(cancelled=events_pb2.TurnCancelled(**asdict(event)))
    return envelope.SerializeToString()


def decode_request(value: bytes) -> TurnRequested:
    """The ``TurnRequested`` of a request-log record.

    Raises:
        UndecodableRecord: ``value`` is not a ``TurnRequested``.
    """
    message = _parse(events_pb2.TurnRequested(), value)
    return TurnRequested(
        turn_id=message.turn_id,
        conversation_id=message.conversation_id,
        tenant_id=message.tenant_id,
        user_text=message.user_text,
        options=options_from_proto(message.options),
        request_id=message.request_id,
        accepted_at_ns=(
            message.accepted_at.ToNanoseconds() if message.HasField("accepted_at") else None
        ),
        events_start_offset=message.events_start_offset,
        events_partition=message.events_partition,
        background=message.background,
        key_id=message.key_id,
    )


def decode_events(value: bytes, *, turns: Container[str] | None = None) -> list[TurnEvent]:
    """The events of a turn-event-log record: one, or one per token of a record that carries
    several; none for an empty envelope (an event newer than this code) and, given ``turns``,
    for events of any other turn.

    ``turns`` skips building events nobody wants: a reader that follows a few turns still has
    to parse every record of the partition they share with many others.

    Raises:
        UndecodableRecord: ``value`` is not a ``TurnEvent``.
    """
    envelope = _parse(events_pb2.TurnEvent(), value)
    which = envelope.WhichOneof("event")
    if which == "token":
        token = envelope.token
        if turns is not None and token.turn_id not in turns:
            return []
        texts = [token.text, *token.more_texts]
        return [
            TokenEmitted(
                token.turn_id,
                token.seq + i,
                text,
                token.conversation_id,
                token.tenant_id,
                attempt=token.attempt,
            )
            for i, text in enumerate(texts)
        ]
    event = _other_event(envelope, which, turns)
    return [] if event is None else [event]


def _other_event(
    envelope: events_pb2.TurnEvent, which: str | None, turns: Container[str] | None
) -> TurnEvent | None:
    if which is None:
        return None
    body = getattr(envelope, which)
    if turns is not None and body.turn_id not in turns:
        return None
    if which == "started":
        return _flat_from_proto(TurnStarted, body)
    if which == "cancelled":
        return _flat_from_proto(TurnCancelled, body)
    if which == "attached":
        return _flat_from_proto(ClientAttached, body)
    if which == "detached":
        return _flat_from_proto(ClientDetached, body)
    return TurnFinished(
        turn_id=body.turn_id,
        finish_reason=body.finish_reason,
        usage=usage_from_proto(body.usage),
        timings=timings_from_proto(body.timings),
        error_status=body.error.SerializeToString() if body.HasField("error") else b"",
        conversation_id=body.conversation_id,
        tenant_id=body.tenant_id,
        last_seq=body.last_seq,
        model=body.model,
        cancel_seen_at_seq=body.cancel_seen_at_seq,
        context_skipped=tuple((s.source, s.reason) for s in body.context_skipped),
        attempt=body.attempt,
    )


_M = TypeVar("_M", bound=Message)


def _parse(message: _M, value: bytes) -> _M:
    try:
        message.ParseFromString(value)
    except DecodeError as error:
        raise UndecodableRecord(str(error)) from error
    return message


def _flat_from_proto(cls: type[_Flat], message: Message) -> _Flat:
    """An event whose fields are scalars named as in its message: TurnStarted, TurnCancelled."""
    return cls(**{field.name: getattr(message, field.name) for field in fields(cls)})


def _requested_to_proto(event: TurnRequested) -> events_pb2.TurnRequested:
    message = events_pb2.TurnRequested(
        turn_id=event.turn_id,
        conversation_id=event.conversation_id,
        tenant_id=event.tenant_id,
        user_text=event.user_text,
        options=options_to_proto(event.options),
        request_id=event.request_id,
        events_start_offset=event.events_start_offset,
        events_partition=event.events_partition,
        background=event.background,
        key_id=event.key_id,
    )
    if event.accepted_at_ns is not None:
        message.accepted_at.FromNanoseconds(event.accepted_at_ns)
    return message


def _finished_to_proto(event: TurnFinished) -> events_pb2.TurnFinished:
    # usage and timings are always written, zero or not: readers have always found them set.
    message = events_pb2.TurnFinished(
        turn_id=event.turn_id,
        finish_reason=int(event.finish_reason),  # type: ignore[arg-type]
        usage=usage_to_proto(event.usage),
        timings=timings_to_proto(event.timings),
        conversation_id=event.conversation_id,
        tenant_id=event.tenant_id,
        last_seq=event.last_seq,
        model=event.model,
        cancel_seen_at_seq=event.cancel_seen_at_seq,
        context_skipped=[
            common_pb2.ContextSkipped(source=source, reason=reason)
            for source, reason in event.context_skipped
        ],
        attempt=event.attempt,
    )
    if event.error_status:
        message.error.ParseFromString(event.error_status)
    return message

"""Log records (``chat.events.v1`` protobufs) to the persister's plain events."""

from __future__ import annotations

import logging
from datetime import UTC

from chat.events.v1 import events_pb2
from google.protobuf.message import DecodeError

from mesh.log import TURN_EVENTS, TURN_REQUESTS, Record
from services.persister.core import Event, TokenEvent, TurnEnd, UserTurn, utc_from_ms

log = logging.getLogger(__name__)


def _clean(text: str) -> str:
    # PostgreSQL text cannot hold NUL; one such token must not wedge every later batch.
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def decode(record: Record) -> Event | None:
    """The event a record carries, or None for records the persister does not store.

    A record that does not parse, or lacks the ids every stored row needs, is logged and
    skipped: it can never be written, and stopping on it would stop the whole pipeline.
    """
    try:
        if record.topic == TURN_REQUESTS:
            return _request(record)
        if record.topic == TURN_EVENTS:
            return _event(record)
    except DecodeError as error:
        log.warning(
            "skipping %s[%d]@%d: not a valid protobuf record (%s)",
            record.topic,
            record.partition,
            record.offset,
            error,
        )
        return None
    return None


def _skip(record: Record, what: str) -> None:
    log.warning("skipping %s[%d]@%d: %s", record.topic, record.partition, record.offset, what)


def _request(record: Record) -> Event | None:
    req = events_pb2.TurnRequested.FromString(record.value)
    if not (req.turn_id and req.conversation_id and req.tenant_id):
        _skip(record, "TurnRequested without turn, conversation or tenant id")
        return None
    accepted_at = (
        req.accepted_at.ToDatetime(tzinfo=UTC)
        if req.HasField("accepted_at")
        else utc_from_ms(record.timestamp_ms)
    )
    return UserTurn(
        req.turn_id, req.conversation_id, req.tenant_id, _clean(req.user_text), accepted_at
    )


def _event(record: Record) -> Event | None:
    event = events_pb2.TurnEvent.FromString(record.value)
    kind = event.WhichOneof("event")
    if kind == "token":
        token = event.token
        if not token.turn_id or token.seq < 1:
            _skip(record, "TokenEmitted without turn id or with seq < 1")
            return None
        return TokenEvent(token.turn_id, token.seq, _clean(token.text))
    if kind == "finished":
        done = event.finished
        if not (done.turn_id and done.conversation_id and done.tenant_id):
            _skip(record, "TurnFinished without turn, conversation or tenant id")
            return None
        return TurnEnd(
            done.turn_id,
            done.conversation_id,
            done.tenant_id,
            int(done.finish_reason),
            max(done.last_seq, 0),
            utc_from_ms(record.timestamp_ms),
        )
    # TurnStarted and TurnCancelled change nothing stored: a cancel ends in a TurnFinished.
    return None

"""Log records to the persister's plain events, read through ``mesh.turnlog``."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from mesh import turnlog
from mesh.log import TURN_EVENTS, TURN_REQUESTS, Record
from services.persister.model import (
    EPOCH,
    AttemptStarted,
    Event,
    TokenEvent,
    TurnEnd,
    UserTurn,
    utc_from_ms,
)

log = logging.getLogger(__name__)


def _clean(text: str) -> str:
    # PostgreSQL text cannot hold NUL; one such token must not wedge every later batch.
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def decode(record: Record) -> list[Event]:
    """The events a record carries (one per token of a record with several); none for records
    the persister does not store.

    A record that does not parse, or lacks the ids every stored row needs, is logged and
    skipped: it can never be written, and stopping on it would stop the whole pipeline.
    """
    try:
        if record.topic == TURN_REQUESTS:
            user = _request(record)
            return [] if user is None else [user]
        if record.topic == TURN_EVENTS:
            return [
                e
                for e in (_event(x, record) for x in turnlog.decode_events(record.value))
                if e is not None
            ]
    except turnlog.UndecodableRecord as error:
        log.warning(
            "skipping %s[%d]@%d: not a valid protobuf record (%s)",
            record.topic,
            record.partition,
            record.offset,
            error,
        )
        return []
    return []


def _utc_from_ns(ns: int) -> datetime:
    # Nanoseconds are cut to microseconds, as protobuf's Timestamp.ToDatetime does.
    return EPOCH + timedelta(microseconds=ns // 1000)


def _skip(record: Record, what: str) -> None:
    log.warning("skipping %s[%d]@%d: %s", record.topic, record.partition, record.offset, what)


def _request(record: Record) -> Event | None:
    req = turnlog.decode_request(record.value)
    if not (req.turn_id and req.conversation_id and req.tenant_id):
        _skip(record, "TurnRequested without turn, conversation or tenant id")
        return None
    accepted_at = (
        _utc_from_ns(req.accepted_at_ns)
        if req.accepted_at_ns is not None
        else utc_from_ms(record.timestamp_ms)
    )
    return UserTurn(
        req.turn_id,
        req.conversation_id,
        req.tenant_id,
        _clean(req.user_text),
        accepted_at,
        record.offset,
    )


def _event(event: turnlog.TurnEvent, record: Record) -> Event | None:
    if isinstance(event, turnlog.TokenEmitted):
        if not event.turn_id or event.seq < 1:
            _skip(record, "TokenEmitted without turn id or with seq < 1")
            return None
        return TokenEvent(event.turn_id, event.seq, _clean(event.text), event.attempt)
    if isinstance(event, turnlog.TurnFinished):
        if not (event.turn_id and event.conversation_id and event.tenant_id):
            _skip(record, "TurnFinished without turn, conversation or tenant id")
            return None
        return TurnEnd(
            event.turn_id,
            event.conversation_id,
            event.tenant_id,
            int(event.finish_reason),
            max(event.last_seq, 0),
            utc_from_ms(record.timestamp_ms),
            turnlog.encode(event),
            event.attempt,
        )
    if isinstance(event, turnlog.TurnStarted) and event.attempt > 0 and event.turn_id:
        return AttemptStarted(event.turn_id, event.attempt)
    # Other TurnStarted records, TurnCancelled and who follows the turn change nothing stored:
    # a cancel ends in a TurnFinished.
    return None

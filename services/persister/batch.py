"""One batch's rows from the records consumed: the pure step of the write pipeline."""

from __future__ import annotations

from collections.abc import Iterable

from mesh import turnlog
from mesh.log import Record
from services.persister.model import (
    AttemptStarted,
    BatchPlan,
    ConversationRow,
    Decoder,
    Event,
    TokenEvent,
    TurnEnd,
    UserTurn,
)

TITLE_CHARS = 60


def make_title(text: str) -> str:
    """A short one-line title from the first user message."""
    flat = " ".join(text.split())
    if len(flat) <= TITLE_CHARS:
        return flat
    cut = flat[:TITLE_CHARS]
    # Prefer ending on a word boundary when one is reasonably close.
    space = cut.rfind(" ")
    if space >= TITLE_CHARS * 2 // 3:
        cut = cut[:space]
    return cut.rstrip() + "…"


def assemble(records: Iterable[Record], decode: Decoder) -> BatchPlan:
    """Turn records (in the order they were consumed) into the rows of one batch.

    Within a batch the first record in log order wins: a repeated token seq or a second
    ``TurnFinished`` of a turn is dropped here, and the database's ``ON CONFLICT DO NOTHING``
    does the same against earlier batches. Before that, a token or finish of an older attempt
    after a takeover's ``TurnStarted`` is dropped (``turnlog.Attempts``); the store applies the
    attempts of earlier batches. Records of one partition arrive in offset order, and
    a turn's records share a partition, so consumption order is log order for each turn.
    """
    plan = BatchPlan()
    seen_users: turnlog.FirstWins[str, UserTurn] = turnlog.FirstWins()
    seen_tokens: turnlog.FirstWins[tuple[str, int], TokenEvent] = turnlog.FirstWins()
    seen_finishes: turnlog.FirstWins[str, TurnEnd] = turnlog.FirstWins()
    events: list[Event] = []
    for record in records:
        plan.events += 1
        plan.last_records[(record.topic, record.partition)] = record
        events.extend(decode(record))
    attempts = _started_before(events)
    for event in events:
        if isinstance(event, AttemptStarted):
            attempts.started(event.turn_id, event.attempt)
            if event.attempt > 1:  # a takeover: later batches must know it too
                plan.turn_attempts[event.turn_id] = attempts[event.turn_id]
            continue
        if isinstance(event, TokenEvent | TurnEnd) and not attempts.counts(
            event.turn_id, event.attempt
        ):
            plan.zombie_records += 1
            continue
        if isinstance(event, TokenEvent):
            if not seen_tokens.offer((event.turn_id, event.seq), event):
                plan.in_batch_duplicates += 1
                continue
            plan.tokens.append(event)
        elif isinstance(event, UserTurn):
            if not seen_users.offer(event.turn_id, event):
                plan.in_batch_duplicates += 1
                continue
            plan.user_messages.append(event)
        elif isinstance(event, TurnEnd):
            if not seen_finishes.offer(event.turn_id, event):
                plan.in_batch_duplicates += 1
                continue
            plan.finishes.append(event)
    plan.conversations = conversation_rows(plan.user_messages)
    return plan


def _started_before(events: list[Event]) -> turnlog.Attempts:
    """The attempts that started before this batch, as far as its own records show: a token or
    finish of attempt N whose TurnStarted is not in the batch had it earlier in the log."""
    here = {(e.turn_id, e.attempt) for e in events if isinstance(e, AttemptStarted)}
    attempts = turnlog.Attempts()
    for event in events:
        if isinstance(event, TokenEvent | TurnEnd) and (event.turn_id, event.attempt) not in here:
            attempts.started(event.turn_id, event.attempt)
    return attempts


def conversation_rows(user_messages: Iterable[UserTurn]) -> list[ConversationRow]:
    """One row per conversation of these user messages: titled by its earliest one."""
    conversations: dict[tuple[str, str], ConversationRow] = {}
    for event in user_messages:
        ckey = (event.tenant_id, event.conversation_id)
        current = conversations.get(ckey)
        if current is None:
            conversations[ckey] = ConversationRow(
                event.tenant_id,
                event.conversation_id,
                make_title(event.text),
                event.accepted_at,
                event.accepted_at,
            )
        else:
            earliest = event.accepted_at < current.created_at
            conversations[ckey] = ConversationRow(
                current.tenant_id,
                current.conversation_id,
                make_title(event.text) if earliest else current.title,
                min(current.created_at, event.accepted_at),
                max(current.updated_at, event.accepted_at),
            )
    return list(conversations.values())

"""Responses API objects, event numbering, and a turn's state read back from the log.

A response is a turn: its id is ``resp_`` + the turn id, so any gateway finds it in the log.
Every streamed event has a ``sequence_number`` that depends only on the turn's log records, so
a client resuming ``starting_after=N`` on another gateway gets exactly the events after ``N``:

====================  ==========================================
sequence_number       event
====================  ==========================================
0                     ``response.created``
1                     ``response.in_progress``
2                     ``response.output_item.added``
3                     ``response.content_part.added``
3 + k                 ``response.output_text.delta`` of token k
4 + L .. 6 + L        text, part and item ``.done`` (L: last token)
7 + L                 ``response.completed`` / ``.incomplete`` / ``.failed``
====================  ==========================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh import turnlog
from mesh.codec import finish_reason_from_proto
from mesh.errors import NotFound
from mesh.generation import FinishReason, TokenUsage
from mesh.log import TURN_EVENTS, EventLog
from services.gateway.model import TurnInfo

RESPONSE_PREFIX = "resp_"
# Marks the id of a response created with store=false: it cannot be read back or continued.
UNSTORED = "u."
HEADER_EVENTS = 4  # created, in_progress, item added, part added
READ_CHUNK = 1000


def response_id(turn_id: str, *, store: bool = True) -> str:
    return RESPONSE_PREFIX + ("" if store else UNSTORED) + turn_id


def parse_response_id(value: str) -> tuple[str, bool]:
    """(turn id, stored) of a response id; NotFound for anything that is not one."""
    if not value.startswith(RESPONSE_PREFIX) or len(value) > 200:
        raise NotFound(f"response {value[:200]!r} not found", reason="RESPONSE_NOT_FOUND")
    rest = value[len(RESPONSE_PREFIX) :]
    if rest.startswith(UNSTORED):
        return rest[len(UNSTORED) :], False
    return rest, True


def message_id(turn_id: str) -> str:
    return "msg_" + turn_id


def status_of(reason: FinishReason | None, started: bool, cancelled: bool) -> str:
    if reason is None:
        if cancelled and not started:
            return "cancelled"
        return "in_progress" if started else "queued"
    return {
        FinishReason.STOP: "completed",
        FinishReason.STOP_SEQUENCE: "completed",
        FinishReason.LENGTH: "incomplete",
        FinishReason.CANCELLED: "cancelled",
    }.get(reason, "failed")


@dataclass
class ResponseState:
    """What a response object says: built from a live stream or from the log."""

    turn_id: str
    model: str
    created_at: int
    store: bool = True
    background: bool = False
    status: str = "queued"
    texts: list[str] = field(default_factory=list)
    usage: TokenUsage | None = None
    error_message: str = ""
    previous_response_id: str | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def id(self) -> str:
        return response_id(self.turn_id, store=self.store)

    def item(self, *, done: bool) -> dict[str, Any]:
        content = [self.part(done=True)] if done else []
        if self.status in ("queued", "in_progress"):
            status = "in_progress"
        else:
            status = "completed" if self.status == "completed" else "incomplete"
        return {
            "id": message_id(self.turn_id),
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def part(self, *, done: bool) -> dict[str, Any]:
        return {"type": "output_text", "text": self.text if done else "", "annotations": []}

    def to_json(self) -> dict[str, Any]:
        finished = self.status not in ("queued", "in_progress")
        usage = None
        if self.usage is not None:
            usage = {
                "input_tokens": self.usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.usage.prompt_tokens + self.usage.completion_tokens,
            }
        error = None
        if self.status == "failed":
            error = {"code": "server_error", "message": self.error_message or "generation failed"}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "background": self.background,
            "error": error,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if self.status == "incomplete" else None
            ),
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata,
            "model": self.model,
            "output": [self.item(done=True)] if finished or self.texts else [],
            "parallel_tool_calls": False,
            "previous_response_id": self.previous_response_id,
            "reasoning": None,
            "store": self.store,
            "temperature": self.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": "none",
            "tools": [],
            "top_p": self.top_p,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
        }


def header_events(state: ResponseState) -> list[dict[str, Any]]:
    """Events 0 to 3, in order."""
    item_id = message_id(state.turn_id)
    return [
        {"type": "response.created", "response": state.to_json()},
        {"type": "response.in_progress", "response": state.to_json()},
        {"type": "response.output_item.added", "output_index": 0, "item": state.item(done=False)},
        {
            "type": "response.content_part.added",
            "item_id": item_id,
            "output_index": 0,
            "content_index": 0,
            "part": state.part(done=False),
        },
    ]


def delta_event(state: ResponseState, text: str) -> dict[str, Any]:
    return {
        "type": "response.output_text.delta",
        "item_id": message_id(state.turn_id),
        "output_index": 0,
        "content_index": 0,
        "delta": text,
        "logprobs": [],
    }


def closing_events(state: ResponseState) -> list[dict[str, Any]]:
    """The four events after the last token."""
    item_id = message_id(state.turn_id)
    final = {
        "completed": "response.completed",
        "incomplete": "response.incomplete",
        # There is no response.cancelled event: a cancelled response ends like an incomplete
        # one, with status "cancelled".
        "cancelled": "response.incomplete",
    }.get(state.status, "response.failed")
    return [
        {
            "type": "response.output_text.done",
            "item_id": item_id,
            "output_index": 0,
            "content_index": 0,
            "text": state.text,
            "logprobs": [],
        },
        {
            "type": "response.content_part.done",
            "item_id": item_id,
            "output_index": 0,
            "content_index": 0,
            "part": state.part(done=True),
        },
        {"type": "response.output_item.done", "output_index": 0, "item": state.item(done=True)},
        {"type": final, "response": state.to_json()},
    ]


async def read_state(log: EventLog, info: TurnInfo, state: ResponseState) -> ResponseState:
    """Fill ``state`` from the turn's records now on the log (any gateway can do this)."""
    end = await log.end_offset(TURN_EVENTS, info.partition)
    wanted = {info.turn_id}
    tokens: turnlog.FirstWins[int, str] = turnlog.FirstWins()
    attempts = turnlog.Attempts()
    finished: turnlog.TurnFinished | None = None
    started = cancelled = False
    position = info.events_start
    while position < end and finished is None:
        stop = min(end, position + READ_CHUNK)
        for record in await log.read_range(TURN_EVENTS, info.partition, position, stop):
            try:
                events = turnlog.decode_events(record.value, turns=wanted)
            except turnlog.UndecodableRecord:
                continue
            for event in events:
                if not attempts.admit(event):
                    continue  # a zombie's record
                if isinstance(event, turnlog.TokenEmitted):
                    tokens.offer(event.seq, event.text)
                elif isinstance(event, turnlog.TurnStarted):
                    started = True
                elif isinstance(event, turnlog.TurnCancelled):
                    cancelled = True
                elif isinstance(event, turnlog.TurnFinished) and finished is None:
                    finished = event
        position = stop
    last = finished.last_seq if finished is not None else 0
    texts: list[str] = []
    seq = 1
    while seq in tokens and (finished is None or seq <= last):
        texts.append(tokens[seq])
        seq += 1
    state.texts = texts
    reason = finish_reason_from_proto(finished.finish_reason) if finished is not None else None
    state.status = status_of(reason, started or bool(texts), cancelled)
    if finished is not None:
        state.usage = finished.usage
        state.model = finished.model or state.model
    return state


def stored_state(
    finished: turnlog.TurnFinished, texts: Sequence[str], state: ResponseState
) -> ResponseState:
    """Fill ``state`` from a finished turn the persister returned (``GatewayCore.stored_turn``):
    what ``read_state`` reads from the log for that turn, without reading it."""
    state.texts = list(texts)
    state.status = status_of(finish_reason_from_proto(finished.finish_reason), True, False)
    state.usage = finished.usage
    state.model = finished.model or state.model
    return state


__all__ = [
    "HEADER_EVENTS",
    "ResponseState",
    "closing_events",
    "delta_event",
    "header_events",
    "parse_response_id",
    "read_state",
    "stored_state",
    "response_id",
    "status_of",
]

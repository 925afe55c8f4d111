"""Turns found through the persister (``LookupTurn``) instead of the logs.

A resume or cancel names a turn by id. The persister answers with one primary-key read: where the
turn is, whether it finished and, for a finished turn, its tokens after the client's seq. So:

- a finished turn whose tokens are in PostgreSQL is replayed from the answer (``replay``): the
  same ``TurnStream`` orders the same events into the same frames as a log read would, and no
  hub subscription or log read happens;
- a running turn is followed on the log as before;
- an id the persister does not know is looked for on the request log only past the offset the
  persister has applied (``scan_from``): a forged id pointing at old offsets costs the one read.

When the persister cannot answer (down, slow, an older persister without the RPC) the gateway
falls back to the log, as it did before: resume never depends on PostgreSQL being up.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mesh import turnlog
from services.gateway.model import TurnInfo
from services.gateway.queue_position import QueueTracker
from services.gateway.turn_stream import TurnStream


class StoredState(enum.IntEnum):
    """Values match ``chat.persister.v1.StoredTurnState``."""

    UNSPECIFIED = 0
    UNKNOWN = 1
    RUNNING = 2
    FINISHED = 3


@dataclass(frozen=True, slots=True)
class StoredTurn:
    """The persister's answer about one turn of the caller's tenant."""

    state: StoredState
    conversation_id: str = ""
    # -1 while the turn's request is not stored.
    request_offset: int = -1
    # Requests of the id's partition below this offset are all stored.
    applied_request_offset: int = 0
    finished: turnlog.TurnFinished | None = None
    # Token texts from seq first_seq on (FINISHED with tokens_complete only).
    first_seq: int = 1
    token_texts: tuple[str, ...] = ()
    tokens_complete: bool = False

    @property
    def replayable(self) -> bool:
        """Finished, and PostgreSQL holds all the frames a log read would give."""
        return (
            self.state is StoredState.FINISHED
            and self.tokens_complete
            and self.finished is not None
        )


class TurnDirectory(Protocol):
    """Where the gateway looks turns up (the persister's ``LookupTurn``)."""

    async def lookup_turn(self, tenant_id: str, turn_id: str, after_seq: int) -> StoredTurn:
        """The turn as stored for the tenant; raises a MeshError when the persister cannot say."""
        ...


def located(
    turn_id: str,
    tenant_id: str,
    ref_partition: int,
    events_start: int,
    request_start: int,
    stored: StoredTurn,
) -> TurnInfo | None:
    """The TurnInfo of a turn the persister knows; None when it does not know it."""
    if stored.state not in (StoredState.RUNNING, StoredState.FINISHED):
        return None
    # An assistant message stored before its user message: the id's offset is where the request
    # was appended at the earliest, close enough for a queue position.
    offset = stored.request_offset if stored.request_offset >= 0 else request_start
    return TurnInfo(turn_id, stored.conversation_id, tenant_id, ref_partition, offset, events_start)


def scan_from(request_start: int, stored: StoredTurn | None) -> int:
    """Where a scan for an unknown turn's request starts: past what the persister applied."""
    if stored is None or stored.state is not StoredState.UNKNOWN:
        return request_start
    return max(request_start, stored.applied_request_offset)


class StoredEvents:
    """A finished turn's events from the persister's answer, handed out like a hub
    subscription's (``TurnStream`` reads either), with no log behind them."""

    def __init__(self, events: Sequence[turnlog.TurnEvent], notify: asyncio.Event) -> None:
        self._events: deque[turnlog.TurnEvent] = deque(events)
        self.notify = notify
        self._closed = False
        notify.set()

    @property
    def closed(self) -> bool:
        return self._closed

    def ready(self) -> bool:
        return not self._closed and bool(self._events)

    async def take(self, limit: int = 1024) -> list[turnlog.TurnEvent]:
        events = self._events
        return [events.popleft() for _ in range(min(limit, len(events)))]

    def note_ended(self) -> None:
        """Nothing to tell: the turn is finished and stored."""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._events.clear()
            self.notify.set()


def replay(
    info: TurnInfo,
    stored: StoredTurn,
    *,
    queue: QueueTracker,
    notify: asyncio.Event | None,
    coalesce: bool,
) -> TurnStream:
    """A stream of a finished turn from the persister's answer: tokens after the client's seq,
    then the TurnFinished, in the frames following it on the log would give."""
    finished = stored.finished
    if not stored.replayable or finished is None:
        raise ValueError(f"turn {info.turn_id} cannot be replayed from the store")
    events: list[turnlog.TurnEvent] = [
        turnlog.TokenEmitted(info.turn_id, stored.first_seq + i, text)
        for i, text in enumerate(stored.token_texts)
    ]
    events.append(finished)
    return TurnStream(
        info=info,
        sub=StoredEvents(events, notify or asyncio.Event()),
        queue=queue,
        after_seq=stored.first_seq - 1,
        # A finished turn waits behind nobody: a log read of its queue gives 0 as well.
        position=0,
        owner=False,
        coalesce=coalesce,
    )

"""One turn as one stream sees it: log events in, ordered outputs out, under flow-control credit."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from mesh import metrics, turnlog
from mesh.codec import finish_reason_from_proto
from mesh.errors import Unavailable
from mesh.generation import FinishReason, TurnTimings
from services.gateway.model import (
    Accepted,
    FinishedOut,
    Output,
    TokenOut,
    TokenRunOut,
    TurnError,
    TurnInfo,
)
from services.gateway.queue_position import QueueTracker
from services.gateway.token_budget import Reservation

SERVICE = "gateway"
# Credit is additive; a cap keeps a buggy client from overflowing anything downstream.
MAX_CREDIT = 2**31 - 1
UNLIMITED = MAX_CREDIT
# Tokens that arrive ahead of seq last+1 (only possible if an agent's appends were reordered) are
# held until the gap fills; a bound keeps a broken agent from growing this without limit.
MAX_EARLY_TOKENS = 4096
# Events moved from a subscription to a stream per step: large enough to coalesce bursts.
TAKE_BATCH = 1024
# Most tokens in one TokenRun frame, which keeps a replayed turn's frames small.
MAX_TOKENS_PER_RUN = 256


class EventSource(Protocol):
    """Where a stream's events come from: a hub ``Subscription`` (the log), or a finished turn's
    stored events (``turn_lookup.StoredEvents``)."""

    notify: asyncio.Event

    @property
    def closed(self) -> bool: ...

    def ready(self) -> bool: ...

    async def take(self, limit: int = ...) -> list[turnlog.TurnEvent]: ...

    def note_ended(self) -> None:
        """The stream took the turn's (admitted) TurnFinished."""

    def close(self) -> None: ...


class TurnStream:
    """Orders one turn's events for one stream: tokens with seq == last + 1 only, then finish.

    ``drain`` is synchronous and turns everything ready into outputs at once, so a burst of
    tokens is written back-to-back without a trip through the event loop per token.
    """

    def __init__(
        self,
        *,
        info: TurnInfo,
        sub: EventSource,
        queue: QueueTracker,
        after_seq: int,
        position: int,
        owner: bool,
        accepted_at: float | None = None,
        coalesce: bool = False,
        on_detach: Callable[[TurnInfo], None] | None = None,
    ) -> None:
        self.info = info
        # The tenant's tokens this turn holds (services/gateway/token_budget.py), settled when
        # the stream sees it end.
        self._reservation: Reservation | None = None
        # Called when the stream closes before the turn ended: its client went away.
        self._on_detach = on_detach
        self.coalesce = coalesce
        self.sub = sub
        self.last_seq = after_seq
        self.owner = owner
        self.started = False
        self.done = False
        self._queue = queue
        self._pending: deque[turnlog.TurnEvent] = deque()
        self._early: turnlog.FirstWins[int, turnlog.TokenEmitted] = turnlog.FirstWins()
        self._attempts = turnlog.Attempts()  # fences off a zombie agent's records
        self._outbox: list[Output] = [
            Accepted(info.turn_id, info.conversation_id, max(position, 0))
        ]
        self._position = max(position, 0)
        self._waiting = True
        metrics.QUEUE_DEPTH.labels(SERVICE).inc()
        self._accepted_at = accepted_at
        self._first_token_at: float | None = None
        self._last_token_at = 0.0
        self._gaps: list[float] = []
        self._observed = False
        self._closed = False

    def hold(self, reservation: Reservation | None) -> None:
        self._reservation = reservation

    @property
    def turn_id(self) -> str:
        return self.info.turn_id

    @property
    def waiting(self) -> bool:
        """Accepted but not generating yet: the stream refreshes its queue position."""
        return self._waiting and not self.done

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def ready(self, credit: int) -> bool:
        """Whether ``drain`` or ``fill`` would make progress now."""
        if self._outbox:
            return True
        if self._pending:
            head = self._pending[0]
            return type(head) is not turnlog.TokenEmitted or credit > 0 or head.seq <= self.last_seq
        if credit > 0 and (self.last_seq + 1) in self._early:
            return True
        return self.sub.ready()

    async def fill(self) -> None:
        if not self._pending:
            self._pending.extend(await self.sub.take(TAKE_BATCH))

    def drain(self, credit: int) -> tuple[list[Output], int]:
        """Outputs ready now, sending at most ``credit`` tokens; returns them and tokens used."""
        out: list[Output] = self._outbox
        if out:
            self._outbox = []
        else:
            out = []
        used = 0
        pending = self._pending
        early = self._early
        while not self.done:
            if early:
                next_token = early.get(self.last_seq + 1)
                if next_token is not None:
                    if used >= credit:
                        break
                    del early[next_token.seq]
                    self._emit(next_token, out)
                    used += 1
                    continue
            if not pending:
                break
            event = pending[0]
            if not self._attempts.admit(event):
                pending.popleft()  # a zombie's record: a newer attempt started before it
                continue
            if type(event) is turnlog.TokenEmitted:
                seq = event.seq
                if seq <= self.last_seq:
                    # A replay, or a zombie agent's copy: the first record in log order won.
                    pending.popleft()
                    continue
                if seq == self.last_seq + 1:
                    if used >= credit:
                        break
                    pending.popleft()
                    self._emit(event, out)
                    used += 1
                    continue
                pending.popleft()
                if len(early) < MAX_EARLY_TOKENS:
                    early.offer(seq, event)
                continue
            pending.popleft()
            if isinstance(event, turnlog.TurnStarted):
                self._on_started(out)
            elif isinstance(event, turnlog.TurnCancelled):
                if not self.started:
                    # Cancelled while queued: no agent will generate it (the one that claims it
                    # finds the cancel first), so the stream ends now instead of waiting for one.
                    self._finish(FinishReason.CANCELLED, out)
            elif isinstance(event, turnlog.TurnFinished):
                self.sub.note_ended()
                self._finish(finish_reason_from_proto(event.finish_reason), out, event)
        return out, used

    def _emit(self, event: turnlog.TokenEmitted, out: list[Output]) -> None:
        now = time.perf_counter()
        if self._first_token_at is None:
            self._first_token_at = now
            if self._waiting:
                self._on_started(out)
        elif self.owner:
            self._gaps.append(now - self._last_token_at)
        self._last_token_at = now
        self.last_seq = event.seq
        if not self.coalesce:
            out.append(TokenOut(self.info.turn_id, event.seq, event.text))
            return
        # Tokens drained together leave together; drain never waits for more to arrive.
        run = out[-1] if out else None
        if type(run) is TokenRunOut and len(run.texts) < MAX_TOKENS_PER_RUN:
            run.texts.append(event.text)
        else:
            out.append(TokenRunOut(self.info.turn_id, event.seq, [event.text]))

    def _on_started(self, out: list[Output]) -> None:
        self.started = True
        if self._waiting:
            self._waiting = False
            metrics.QUEUE_DEPTH.labels(SERVICE).dec()
            if self._position != 0:
                self._position = 0
                out.append(Accepted(self.info.turn_id, self.info.conversation_id, 0))

    def _finish(
        self, reason: FinishReason, out: list[Output], event: turnlog.TurnFinished | None = None
    ) -> None:
        timings = event.timings if event is not None else None
        if self.owner and self._accepted_at is not None:
            # What the client saw from this gateway, rather than what the agent measured.
            now = time.perf_counter()
            base = timings or TurnTimings()
            ttft = base.time_to_first_token_ms
            if self._first_token_at is not None:
                ttft = (self._first_token_at - self._accepted_at) * 1000
            timings = TurnTimings(
                base.queued_ms, base.retrieval_ms, ttft, (now - self._accepted_at) * 1000
            )
        error_status = event.error_status if event is not None else b""
        if self._reservation is not None and event is not None:
            self._reservation.settle(event.usage.completion_tokens)
        if reason is FinishReason.ERROR and error_status:
            out.append(TurnError(error_status, self.info.turn_id))
        out.append(
            FinishedOut(
                self.info.turn_id,
                reason,
                self.last_seq,
                event.usage if event is not None else None,
                timings,
                error_status,
                event.context_skipped if event is not None else (),
            )
        )
        self.done = True
        self._observe(event.model if event is not None and event.model else "unknown")
        if self.owner:
            metrics.TURNS.labels(SERVICE, reason.name.lower()).inc()
        self.close()

    def _observe(self, model: str) -> None:
        if self._observed or not self.owner:
            return
        self._observed = True
        if self._first_token_at is not None and self._accepted_at is not None:
            metrics.TIME_TO_FIRST_TOKEN.labels(SERVICE, model).observe(
                self._first_token_at - self._accepted_at
            )
        if self._gaps:
            histogram = metrics.INTER_TOKEN_LATENCY.labels(SERVICE, model)
            for gap in self._gaps:
                histogram.observe(gap)
            self._gaps = []

    async def refresh_position(self) -> Accepted | None:
        """A new TurnAccepted when the waiting turn's queue position changed."""
        if not self.waiting:
            return None
        position = await self._queue.position(
            self.info.partition, self.info.request_offset, self.info.tenant_id
        )
        if position < 0 or not self.waiting or position == self._position:
            return None
        self._position = position
        return Accepted(self.info.turn_id, self.info.conversation_id, position)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.sub.close()
        if not self.done and self._on_detach is not None:
            self._on_detach(self.info)
        if self._waiting:
            self._waiting = False
            metrics.QUEUE_DEPTH.labels(SERVICE).dec()
        self._observe("unknown")


def gateway_stopping() -> Unavailable:
    """The error a stream ends with when the hub closed its subscription (the gateway stops)."""
    return Unavailable(
        "this gateway is stopping; resume the turn on another gateway",
        reason="GATEWAY_STOPPING",
        retry_after_s=0.5,
    )

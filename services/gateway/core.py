"""The gateway's logic: validation, accepting turns, resume, cancel, and the Chat session.

No protobuf here: the servicer converts messages to the plain values of ``model`` and back, and
log records are read and written as ``mesh.turnlog`` events. See docs/protocol.md for the life of
a turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Protocol

from mesh import metrics, turnlog
from mesh.auth import Principal, RateLimiter
from mesh.codec import finish_reason_from_proto
from mesh.errors import (
    FailedPrecondition,
    InvalidArgument,
    MeshError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from mesh.generation import FinishReason, TurnTimings, validate_options
from mesh.lifecycle import AsyncStartStop
from mesh.log import TURN_EVENTS, TURN_REQUESTS, EventLog, LogError, partition_for
from mesh.turn_ids import new_turn_ref, parse_turn_id
from services.gateway.hub import Subscription, TurnHub
from services.gateway.model import (
    Accepted,
    CancelFrame,
    CreditFrame,
    FinishedOut,
    Frame,
    FrameError,
    Output,
    ResumeFrame,
    StartFrame,
    StartRequest,
    TokenOut,
    TokenRunOut,
    TurnError,
    TurnInfo,
)
from services.gateway.settings import GatewaySettings

_log = logging.getLogger(__name__)

SERVICE = "gateway"
MAX_STOP_SEQUENCES = 8
MAX_STOP_SEQUENCE_CHARS = 64
MAX_ID_CHARS = 128
MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 20
# Credit is additive; a cap keeps a buggy client from overflowing anything downstream.
MAX_CREDIT = 2**31 - 1
# Tokens that arrive ahead of seq last+1 (only possible if an agent's appends were reordered) are
# held until the gap fills; a bound keeps a broken agent from growing this without limit.
MAX_EARLY_TOKENS = 4096
# Events moved from a subscription to a stream per step: large enough to coalesce bursts.
TAKE_BATCH = 1024
# Most tokens in one TokenRun frame, which keeps a replayed turn's frames small.
MAX_TOKENS_PER_RUN = 256
UNLIMITED = MAX_CREDIT
# Chat frames read ahead of the session; beyond that, gRPC flow control pushes back on the client.
CONTROL_QUEUE = 64


class Conversations(Protocol):
    """Where the gateway checks that a conversation exists for a tenant (the persister)."""

    async def require_conversation(self, tenant_id: str, conversation_id: str) -> None:
        """Return if the tenant owns the conversation; raise NotFound/Unavailable otherwise."""
        ...


# -- validation ----------------------------------------------------------------------------------


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


def validate_page_size(page_size: int) -> None:
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(
            f"page_size must be between 0 and {MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE}); "
            f"got {page_size}",
            reason="PAGE_SIZE_OUT_OF_RANGE",
            field="page_size",
        )


# -- small bounded state -------------------------------------------------------------------------


class QueueTracker:
    """Queue positions: ``request offset - committed offset of group agents``, per partition.

    Every waiting stream asks for its position periodically; the committed offset of a partition
    is read once per ``poll_s`` however many streams wait on it.
    """

    def __init__(
        self, log: EventLog, *, poll_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = log
        self._poll_s = poll_s
        self._clock = clock
        self._cache: dict[int, tuple[float, int]] = {}
        self._inflight: dict[int, asyncio.Future[int]] = {}

    async def committed(self, partition: int) -> int:
        cached = self._cache.get(partition)
        if cached is not None and self._clock() - cached[0] < self._poll_s:
            return cached[1]
        inflight = self._inflight.get(partition)
        if inflight is not None:
            return await asyncio.shield(inflight)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._inflight[partition] = future
        try:
            value = await self._log.committed(TURN_REQUESTS, "agents", partition)
        except BaseException as error:
            future.set_exception(error if isinstance(error, Exception) else LogError("cancelled"))
            future.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._inflight[partition]
        self._cache[partition] = (self._clock(), value)
        future.set_result(value)
        return value

    async def position(self, partition: int, request_offset: int) -> int:
        try:
            committed = await self.committed(partition)
        except LogError:
            # A position is advisory; a log hiccup must not fail the stream.
            return -1
        return max(0, request_offset - committed)


class IdempotencyCache:
    """Recent ``(tenant, request_id) -> accepted turn`` on this gateway.

    Bounded in time and size and local to the process: a retry that lands on another gateway
    starts a new turn. Deduplicating across gateways would need the log (scan or a compacted
    request-id topic); the window here covers the common case of a client retrying the same
    gateway after a dropped connection.
    """

    def __init__(
        self, *, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, asyncio.Future[TurnInfo | None]]]
        self._entries = OrderedDict()

    def get(self, key: tuple[str, str]) -> asyncio.Future[TurnInfo | None] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() - entry[0] > self._ttl_s:
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: tuple[str, str], future: asyncio.Future[TurnInfo | None]) -> None:
        self._entries[key] = (self._clock(), future)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def discard(self, key: tuple[str, str], future: asyncio.Future[TurnInfo | None]) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[1] is future:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


class _Lru:
    """Turns this gateway has accepted or looked up, so resume and cancel skip the log scan."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[str, TurnInfo] = OrderedDict()

    def get(self, turn_id: str) -> TurnInfo | None:
        info = self._items.get(turn_id)
        if info is not None:
            self._items.move_to_end(turn_id)
        return info

    def put(self, info: TurnInfo) -> None:
        self._items[info.turn_id] = info
        self._items.move_to_end(info.turn_id)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


class _Seen:
    """Conversations known to exist, per tenant: the persister is asked once per conversation.

    Conversations are never deleted, so a positive answer stays true; a conversation this
    gateway minted exists once its first request is on the log.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[tuple[str, str], None] = OrderedDict()

    def __contains__(self, item: tuple[str, str]) -> bool:
        if item in self._items:
            self._items.move_to_end(item)
            return True
        return False

    def add(self, item: tuple[str, str]) -> None:
        self._items[item] = None
        self._items.move_to_end(item)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


# -- one turn as seen by one stream -------------------------------------------------------------


class TurnStream:
    """Orders one turn's events for one stream: tokens with seq == last + 1 only, then finish.

    ``drain`` is synchronous and turns everything ready into outputs at once, so a burst of
    tokens is written back-to-back without a trip through the event loop per token.
    """

    def __init__(
        self,
        *,
        info: TurnInfo,
        sub: Subscription,
        queue: QueueTracker,
        after_seq: int,
        position: int,
        owner: bool,
        accepted_at: float | None = None,
        coalesce: bool = False,
    ) -> None:
        self.info = info
        self.coalesce = coalesce
        self.sub = sub
        self.last_seq = after_seq
        self.owner = owner
        self.started = False
        self.done = False
        self._queue = queue
        self._pending: deque[turnlog.TurnEvent] = deque()
        self._early: turnlog.FirstWins[int, turnlog.TokenEmitted] = turnlog.FirstWins()
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
        position = await self._queue.position(self.info.partition, self.info.request_offset)
        if position < 0 or not self.waiting or position == self._position:
            return None
        self._position = position
        return Accepted(self.info.turn_id, self.info.conversation_id, position)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.sub.close()
        if self._waiting:
            self._waiting = False
            metrics.QUEUE_DEPTH.labels(SERVICE).dec()
        self._observe("unknown")


# -- the core ------------------------------------------------------------------------------------


class GatewayCore(AsyncStartStop):
    """Accepts, resumes and cancels turns and streams them. ``async with`` or start/stop."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        log: EventLog,
        conversations: Conversations,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.settings = settings
        self.log = log
        self._conversations = conversations
        self.limiter = limiter or RateLimiter(settings.rate_per_s, settings.rate_burst)
        self.queue = QueueTracker(log, poll_s=settings.queue_poll_s)
        self.idempotency = IdempotencyCache(
            ttl_s=settings.idempotency_ttl_s, max_entries=settings.idempotency_max
        )
        self._known = _Lru(10_000)
        self._seen = _Seen(50_000)
        self._hub: TurnHub | None = None
        self.partitions = 0
        self.draining = False
        self._streams = 0

    async def start(self) -> None:
        if self._hub is not None:
            return
        wanted = self.settings.log.partitions
        await self.log.ensure_topic(TURN_REQUESTS, wanted)
        await self.log.ensure_topic(TURN_EVENTS, wanted)
        requests = await self.log.partition_count(TURN_REQUESTS)
        events = await self.log.partition_count(TURN_EVENTS)
        if requests != events:
            raise RuntimeError(
                f"{TURN_REQUESTS} has {requests} partitions but {TURN_EVENTS} has {events}; "
                "both topics must have the same count (docs/protocol.md)"
            )
        self.partitions = events
        hub = TurnHub(self.log, partitions=events, capacity=self.settings.subscriber_buffer)
        await hub.start()
        self._hub = hub

    async def stop(self) -> None:
        hub, self._hub = self._hub, None
        if hub is not None:
            await hub.stop()

    @property
    def hub(self) -> TurnHub:
        if self._hub is None:
            raise Unavailable("gateway is not started", reason="NOT_STARTED")
        return self._hub

    def begin_drain(self) -> None:
        """Refuse new turns from now on; open streams keep going until the grace period ends."""
        self.draining = True

    @contextlib.contextmanager
    def stream_slot(self) -> Iterator[None]:
        """Hold one of the gateway's ``max_streams`` stream slots for the block."""
        if self._streams >= self.settings.max_streams:
            raise ResourceExhausted(
                f"this gateway already serves {self._streams} streams; retry shortly or use "
                "another gateway",
                reason="TOO_MANY_STREAMS",
                retry_after_s=1.0,
            )
        self._streams += 1
        try:
            yield
        finally:
            self._streams -= 1

    @property
    def open_streams(self) -> int:
        return self._streams

    # -- starting ------------------------------------------------------------------------------

    async def start_turn(
        self,
        principal: Principal,
        request: StartRequest,
        *,
        notify: asyncio.Event | None = None,
    ) -> TurnStream:
        """Validate, rate-limit and log a new turn; return its stream (TurnAccepted first)."""
        if self.draining:
            raise Unavailable(
                "this gateway is shutting down; start the turn on another gateway",
                reason="DRAINING",
                retry_after_s=1.0,
            )
        settings = self.settings
        validate_start(
            request,
            max_text_chars=settings.max_text_chars,
            max_tokens_limit=settings.max_tokens_limit,
        )
        key = (principal.tenant_id, request.request_id) if request.request_id else None
        if key is not None:
            earlier = self.idempotency.get(key)
            if earlier is not None:
                info = await asyncio.shield(earlier)
                if info is not None:
                    return await self._attach(
                        info, after_seq=0, notify=notify, coalesce=request.coalesce_tokens
                    )
        self.limiter.acquire(principal)
        conversation_id = request.conversation_id
        if not conversation_id:
            conversation_id = str(uuid.uuid4())
        elif (principal.tenant_id, conversation_id) not in self._seen:
            await self._conversations.require_conversation(principal.tenant_id, conversation_id)
            self._seen.add((principal.tenant_id, conversation_id))
        decided: asyncio.Future[TurnInfo | None] = asyncio.get_running_loop().create_future()
        if key is not None:
            self.idempotency.put(key, decided)
        try:
            return await self._append_request(principal, request, conversation_id, decided, notify)
        finally:
            if key is not None:
                # A failed start must not pin its request_id; one whose append is still in flight
                # decides when the log answers.
                decided.add_done_callback(
                    lambda done: (
                        None if done.result() is not None else self.idempotency.discard(key, done)
                    )
                )

    async def _append_request(
        self,
        principal: Principal,
        request: StartRequest,
        conversation_id: str,
        decided: asyncio.Future[TurnInfo | None],
        notify: asyncio.Event | None,
    ) -> TurnStream:
        log = self.log
        key = conversation_id.encode()
        partition = partition_for(key, self.partitions)
        sub: Subscription | None = None
        try:
            # Both at once: on Kafka each is a broker round trip on the way to TurnAccepted.
            request_start, events_start = await asyncio.gather(
                log.end_offset(TURN_REQUESTS, partition), log.end_offset(TURN_EVENTS, partition)
            )
            turn_id = str(new_turn_ref(partition, request_start, events_start))
            # Subscribed before the request exists, so no event of this turn can slip past us.
            sub = self.hub.subscribe(turn_id, partition, events_start, notify)
            value = turnlog.encode(
                turnlog.TurnRequested(
                    turn_id=turn_id,
                    conversation_id=conversation_id,
                    tenant_id=principal.tenant_id,
                    user_text=request.text,
                    options=request.options,
                    request_id=request.request_id,
                    accepted_at_ns=time.time_ns(),
                    events_start_offset=events_start,
                    events_partition=partition,
                )
            )
            appended = log.append(TURN_REQUESTS, partition, key, value)
        except BaseException as error:
            # Nothing was logged: a retry with the same request_id must start afresh.
            if sub is not None:
                sub.close()
            if not decided.done():
                decided.set_result(None)
            if isinstance(error, LogError):
                raise _log_unavailable(error) from error
            raise

        def on_durable(future: asyncio.Future[int]) -> None:
            # Runs even if the client went away meanwhile: a retry with the same request_id then
            # finds the turn that was, after all, logged.
            if decided.done():
                return
            if future.cancelled() or future.exception() is not None:
                decided.set_result(None)
                return
            info = TurnInfo(
                turn_id,
                conversation_id,
                principal.tenant_id,
                partition,
                future.result(),
                events_start,
            )
            self._known.put(info)
            self._seen.add((principal.tenant_id, conversation_id))
            decided.set_result(info)

        appended.add_done_callback(on_durable)
        try:
            request_offset = await asyncio.shield(appended)
        except LogError as error:
            sub.close()
            raise _log_unavailable(error) from error
        except BaseException:
            sub.close()
            raise
        accepted_at = time.perf_counter()
        info = decided.result() if decided.done() else None
        if info is None:
            info = TurnInfo(
                turn_id,
                conversation_id,
                principal.tenant_id,
                partition,
                request_offset,
                events_start,
            )
        try:
            position = await self.queue.position(partition, request_offset)
        except BaseException:
            sub.close()
            raise
        _log.debug(
            "turn %s accepted (tenant %s, position %d)", turn_id, principal.tenant_id, position
        )
        return TurnStream(
            info=info,
            sub=sub,
            queue=self.queue,
            after_seq=0,
            position=position,
            owner=True,
            accepted_at=accepted_at,
            coalesce=request.coalesce_tokens,
        )

    # -- resume and cancel ---------------------------------------------------------------------

    async def find_turn(self, principal: Principal, turn_id: str) -> TurnInfo:
        """The turn's TurnRequested, if it exists and belongs to the caller's tenant."""
        ref = parse_turn_id(turn_id)
        not_found = NotFound(f"turn {turn_id} not found", reason="TURN_NOT_FOUND")
        info = self._known.get(turn_id)
        if info is None:
            if ref.partition >= self.partitions:
                raise not_found
            info = await self._scan_for_request(
                turn_id, ref.partition, ref.request_start, ref.events_start
            )
            if info is None:
                raise not_found
            self._known.put(info)
        # Another tenant's turn reads exactly like a missing one: ids must not leak existence.
        if info.tenant_id != principal.tenant_id:
            raise not_found
        return info

    async def _scan_for_request(
        self, turn_id: str, partition: int, request_start: int, events_start: int
    ) -> TurnInfo | None:
        try:
            end = await self.log.end_offset(TURN_REQUESTS, partition)
        except LogError as error:
            raise _log_unavailable(error) from error
        # The request lands right after request_start (only appends racing the gateway's own can
        # come first), so a bounded scan finds any real turn and caps what a forged id costs.
        end = min(end, request_start + self.settings.resume_scan_limit)
        position = request_start
        while position < end:
            stop = min(end, position + 500)
            try:
                records = await self.log.read_range(TURN_REQUESTS, partition, position, stop)
            except LogError as error:
                raise _log_unavailable(error) from error
            for record in records:
                try:
                    decoded = turnlog.decode_request(record.value)
                except turnlog.UndecodableRecord:
                    continue
                if decoded.turn_id == turn_id:
                    return TurnInfo(
                        turn_id,
                        decoded.conversation_id,
                        decoded.tenant_id,
                        partition,
                        record.offset,
                        events_start,
                    )
            position = stop
        return None

    async def resume_turn(
        self,
        principal: Principal,
        turn_id: str,
        after_seq: int,
        *,
        notify: asyncio.Event | None = None,
        coalesce: bool = False,
    ) -> TurnStream:
        """Attach to a turn of the tenant: history after ``after_seq`` from the log, then live."""
        if after_seq < 0:
            raise InvalidArgument(
                f"after_seq={after_seq} must be >= 0", reason="AFTER_SEQ_INVALID", field="after_seq"
            )
        info = await self.find_turn(principal, turn_id)
        return await self._attach(info, after_seq=after_seq, notify=notify, coalesce=coalesce)

    async def _attach(
        self, info: TurnInfo, *, after_seq: int, notify: asyncio.Event | None, coalesce: bool
    ) -> TurnStream:
        sub = self.hub.subscribe(info.turn_id, info.partition, info.events_start, notify)
        try:
            position = await self.queue.position(info.partition, info.request_offset)
        except BaseException:
            sub.close()
            raise
        return TurnStream(
            info=info,
            sub=sub,
            queue=self.queue,
            after_seq=after_seq,
            position=position,
            owner=False,
            coalesce=coalesce,
        )

    async def cancel_turn(self, principal: Principal, turn_id: str) -> str:
        info = await self.find_turn(principal, turn_id)
        await self.cancel(info)
        return info.turn_id

    async def cancel(self, info: TurnInfo) -> None:
        """Log a TurnCancelled for the turn and wait until it is durable."""
        value = turnlog.encode(
            turnlog.TurnCancelled(info.turn_id, info.conversation_id, info.tenant_id)
        )
        try:
            await asyncio.shield(
                self.log.append(TURN_EVENTS, info.partition, info.conversation_id.encode(), value)
            )
        except LogError as error:
            raise _log_unavailable(error) from error

    # -- streaming -----------------------------------------------------------------------------

    async def follow(self, turn: TurnStream) -> AsyncIterator[Output]:
        """Everything the turn sends until it finishes (StreamTurn and ResumeTurn).

        There is no credit here: gRPC's own flow control holds the writer back, and the
        subscription falls back to the log if the client reads slowly.
        """
        notify = turn.sub.notify
        poll_s = self.settings.queue_poll_s
        try:
            while True:
                outputs, _ = turn.drain(UNLIMITED)
                for output in outputs:
                    yield output
                if turn.done:
                    return
                if outputs:
                    continue
                if turn.sub.closed:
                    raise _stopping()
                notify.clear()
                if turn.ready(UNLIMITED):
                    await turn.fill()
                    continue
                if turn.waiting:
                    try:
                        async with asyncio.timeout(poll_s):
                            await notify.wait()
                    except TimeoutError:
                        accepted = await turn.refresh_position()
                        if accepted is not None:
                            yield accepted
                else:
                    await notify.wait()
        finally:
            turn.close()

    def chat_session(self, principal: Principal) -> ChatSession:
        return ChatSession(self, principal)


def _stopping() -> Unavailable:
    return Unavailable(
        "this gateway is stopping; resume the turn on another gateway",
        reason="GATEWAY_STOPPING",
        retry_after_s=0.5,
    )


def _log_unavailable(error: Exception) -> Unavailable:
    return Unavailable(
        f"the turn log is unavailable ({error}); retry shortly",
        reason="LOG_UNAVAILABLE",
        retry_after_s=1.0,
    )


# -- the Chat stream ----------------------------------------------------------------------------


class ChatSession:
    """One Chat stream: a sequence of turns, with cancel, resume and credit frames in between.

    Frames are read by a task into a small queue; the session's loop handles them between
    outputs, so a cancel is logged even while tokens stream. A frame that fails yields a
    FrameError and the stream goes on. Each turn starts with ``initial_window`` tokens of credit;
    FlowCredit frames add to the current turn's credit.
    """

    def __init__(self, core: GatewayCore, principal: Principal) -> None:
        self._core = core
        self._principal = principal
        self._wake = asyncio.Event()
        self._control: asyncio.Queue[Frame] = asyncio.Queue(CONTROL_QUEUE)
        self._turn: TurnStream | None = None
        self._credit = 0
        self._had_turn = False
        self._reader_done = False
        self._reader_error: BaseException | None = None

    async def _read(self, frames: AsyncIterator[Frame]) -> None:
        try:
            async for frame in frames:
                await self._control.put(frame)
                self._wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the client's side failed; the handler re-raises it
            self._reader_error = error
        finally:
            self._reader_done = True
            self._wake.set()

    async def run(self, frames: AsyncIterator[Frame]) -> AsyncIterator[Output]:
        reader = asyncio.create_task(self._read(frames), name="gateway-chat-reader")
        poll_s = self._core.settings.queue_poll_s
        control = self._control
        try:
            while True:
                while not control.empty():
                    for output in await self._handle(control.get_nowait()):
                        yield output
                turn = self._turn
                if turn is not None:
                    outputs, used = turn.drain(self._credit)
                    if outputs:
                        self._credit -= used
                        for output in outputs:
                            yield output
                        if turn.done:
                            self._turn = None
                        continue
                    if not turn.has_pending and turn.sub.ready():
                        await turn.fill()
                        continue
                    if turn.sub.closed:
                        raise _stopping()
                elif self._reader_done and control.empty():
                    if self._reader_error is not None:
                        raise self._reader_error
                    return
                self._wake.clear()
                if not control.empty() or (turn is not None and turn.ready(self._credit)):
                    continue
                if turn is not None and turn.waiting:
                    try:
                        async with asyncio.timeout(poll_s):
                            await self._wake.wait()
                    except TimeoutError:
                        accepted = await turn.refresh_position()
                        if accepted is not None:
                            yield accepted
                else:
                    await self._wake.wait()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            if self._turn is not None:
                self._turn.close()
                self._turn = None

    async def _handle(self, frame: Frame) -> list[Output]:
        try:
            return await self._dispatch(frame)
        except MeshError as error:
            turn_id = getattr(frame, "turn_id", "") or (self._turn.turn_id if self._turn else "")
            return [FrameError(error, turn_id)]

    async def _dispatch(self, frame: Frame) -> list[Output]:
        core, principal, turn = self._core, self._principal, self._turn
        if isinstance(frame, CreditFrame):
            if frame.tokens <= 0:
                raise InvalidArgument(
                    f"credit.tokens={frame.tokens} must be positive",
                    reason="CREDIT_INVALID",
                    field="credit.tokens",
                )
            if not self._had_turn:
                raise _no_active_turn("credit")
            if turn is not None:
                self._credit = min(MAX_CREDIT, self._credit + frame.tokens)
            # Credit racing the end of a turn is harmless and ignored.
            return []
        if isinstance(frame, CancelFrame):
            if frame.turn_id and (turn is None or frame.turn_id != turn.turn_id):
                await core.cancel_turn(principal, frame.turn_id)
            elif turn is not None:
                await core.cancel(turn.info)
            elif not self._had_turn:
                raise _no_active_turn("cancel")
            return []
        if isinstance(frame, StartFrame | ResumeFrame):
            if turn is not None:
                raise FailedPrecondition(
                    f"turn {turn.turn_id} is still running on this stream; cancel it or wait for "
                    "its TurnFinished before starting another",
                    reason="TURN_IN_PROGRESS",
                )
            if isinstance(frame, StartFrame):
                new = await core.start_turn(principal, frame.start, notify=self._wake)
            else:
                new = await core.resume_turn(
                    principal,
                    frame.turn_id,
                    frame.after_seq,
                    notify=self._wake,
                    coalesce=frame.coalesce_tokens,
                )
            self._turn = new
            self._had_turn = True
            self._credit = core.settings.initial_window
            return []
        raise InvalidArgument(
            "ChatRequest carried no frame: set start, cancel, resume or credit",
            reason="FRAME_EMPTY",
        )


def _no_active_turn(what: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"{what} sent before any turn was started or resumed on this stream",
        reason="NO_ACTIVE_TURN",
    )

"""Turns from the request log: claim, recall, generate, append token events, commit.

The worker is one member of the ``agents`` group on the request topic (docs/protocol.md, "The
life of a turn"). It takes turns from all its partitions and runs up to ``parallel`` of them at
once, so the engine can batch them; a few more (``read_ahead``) wait in a fair queue
(``services.agent.scheduling``). A request is committed only once its ``TurnFinished`` is
durable and every earlier request of its partition is too, so if this process dies the group
redelivers every unfinished turn and the next agent continues after the tokens already in the
log. A tail of the event topic (every partition, from its end at start) catches
``TurnCancelled`` while turns generate.

Every append of a turn is fenced by the claim under which its request was handed out
(``mesh.log.Claim``): once the partition belongs to another agent, the log refuses them, and the
turn is abandoned here, uncommitted, to its new owner. A turn that runs longer than
``max_turn_s`` is stopped and finished with a ``TURN_TIME_LIMIT`` error, so one hung turn
cannot hold its partition's later turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

from opentelemetry.trace import Span, SpanContext, SpanKind

from mesh import logs, metrics, tracing, turnlog
from mesh.errors import Cancelled, DeadlineExceeded, InvalidArgument, MeshError, to_status_proto
from mesh.generation import FinishReason, TokenUsage, TurnTimings
from mesh.lifecycle import AsyncStartStop
from mesh.log import (
    AGENTS_GROUP,
    TURN_EVENTS,
    TURN_REQUESTS,
    Claim,
    EventLog,
    Fenced,
    GroupConsumer,
    LogError,
    Record,
)
from mesh.log.base import Headers
from services.agent import telemetry
from services.agent.clients import DependencyClients
from services.agent.core import (
    METRICS_SERVICE,
    AgentCore,
    GenerationFinished,
    Token,
    resolve_options,
)
from services.agent.followers import Followers, SeenByTails
from services.agent.prompt import PromptRequest
from services.agent.scheduling import CommitTracker, FairQueue

log = logging.getLogger(__name__)

GROUP = AGENTS_GROUP
# After a turn's time limit its generation is asked to stop; if it has not within this long
# (a wedged engine), the turn is finished without it.
_STOP_GRACE_S = 2.0

# Cancels remembered for turns this agent may claim later (their events are re-read anyway).
_CANCELS_REMEMBERED = 10_000
_REJOIN_DELAY_S = 1.0
# Most tokens in one TokenEmitted record.
MAX_RUN = 256


@contextlib.asynccontextmanager
async def _closing(iterator: AsyncIterator[Record]) -> AsyncGenerator[AsyncIterator[Record], None]:
    """Close a log iterator (an async generator in every driver) when the block ends."""
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


def _read_request(value: bytes) -> turnlog.TurnRequested | None:
    """The request in a record; None (and a log line) if it is not a readable TurnRequested."""
    try:
        turn = turnlog.decode_request(value)
    except turnlog.UndecodableRecord:
        log.error("unreadable TurnRequested record (%d bytes); skipping it", len(value))
        return None
    if not turn.turn_id or not turn.conversation_id:
        log.error("TurnRequested without turn or conversation id; skipping it")
        return None
    return turn


def _read_events(value: bytes) -> list[turnlog.TurnEvent]:
    try:
        return turnlog.decode_events(value)
    except turnlog.UndecodableRecord:
        return []


@dataclass
class _PriorEvents:
    """What the log already holds for a turn."""

    finished: bool = False
    cancelled: bool = False
    tokens: turnlog.FirstWins[int, str] = field(default_factory=turnlog.FirstWins)
    # The span of the last agent that started the turn (its TurnStarted's headers), for a link.
    started_by: SpanContext | None = None
    started_by_agent: str = ""
    followers: Followers = field(default_factory=Followers)
    end: int = 0  # the offset where the read of the turn's events stopped
    # The fencing rule (``turnlog.Attempts``) for this turn, and whether any agent started it.
    attempts: turnlog.Attempts = field(default_factory=turnlog.Attempts)
    started: bool = False

    @property
    def next_attempt(self) -> int:
        return max(self.attempts.values(), default=0) + 1

    @property
    def last_seq(self) -> int:
        return max(self.tokens, default=0)

    @property
    def text(self) -> str:
        return "".join(self.tokens[seq] for seq in sorted(self.tokens))


class TokenAppender:
    """Appends a turn's tokens: one goes out at once when none of the turn's appends is in
    flight; tokens produced while one is in flight are held and go out together, as one record
    of consecutive seqs, when it lands. A lone token never waits; a fast sequence costs the log
    one record per round trip instead of one per token."""

    def __init__(
        self,
        turn: turnlog.TurnRequested,
        append: Callable[[bytes], asyncio.Future[int]],
        attempt: int = 0,
    ) -> None:
        self._turn = turn
        self._append = append
        self._attempt = attempt
        self._inflight: asyncio.Future[int] | None = None
        self._first_held = 0
        self._held: list[str] = []

    def add(self, seq: int, text: str) -> None:
        if not self._held:
            self._first_held = seq
        self._held.append(text)
        if self._inflight is None or self._inflight.done() or len(self._held) >= MAX_RUN:
            self.flush()

    def flush(self) -> None:
        """Append what is held now (before the turn's TurnFinished)."""
        if not self._held:
            return
        turn, texts = self._turn, self._held
        self._held = []
        event = turnlog.TokenEmitted(
            turn.turn_id,
            self._first_held,
            texts[0],
            turn.conversation_id,
            turn.tenant_id,
            more=tuple(texts[1:]),
            attempt=self._attempt,
        )
        self._inflight = self._append(turnlog.encode(event))
        self._inflight.add_done_callback(self._landed)

    def _landed(self, future: asyncio.Future[int]) -> None:
        if future is self._inflight:
            self.flush()


@dataclass
class _Current:
    turn_id: str
    cancel: asyncio.Event
    last_seq: int = 0  # the last seq appended so far
    cancel_seen_at_seq: int = 0  # last_seq when the cancel arrived
    background: bool = False
    followers: Followers = field(default_factory=Followers)
    counted_from: int = 0  # tail records before this offset were counted by the claim's read
    orphaned: bool = False  # cancelled because no client followed it
    orphan_timer: asyncio.TimerHandle | None = None
    # Set when the log refused an append of the turn: another agent owns it now.
    fenced: bool = False
    # Set when the turn ran past its time limit.
    timed_out: bool = False


@dataclass(eq=False)
class _Claimed:
    """A request taken from the log: waiting in the fair queue, then running."""

    record: Record
    turn: turnlog.TurnRequested
    # The group's claim on the record's partition when it was handed out: fences every append.
    fence: Claim | None = None
    claimed_wall: float = field(default_factory=time.time)
    claimed: float = field(default_factory=time.monotonic)


class TurnWorker(AsyncStartStop):
    """Consumes turns for one agent.

    Args:
        log: a started event log.
        core: generation.
        clients: history and recall (degrade when unavailable).
        agent_id: member id in the group and ``agent_id`` of ``TurnStarted``.
        partitions: partitions of both topics, created if missing.
        recall_top_k: chunks to recall per turn (0: none).
        parallel: turns running at once (the engine batches their generations).
        read_ahead: turns taken from the log beyond the running ones, waiting in the fair queue.
        orphan_grace_s: how long a turn may have no client attached before it is cancelled
            (unless started in the background; ``services.agent.followers``).
        log_user_text: log each turn's user text (``MESH_LOG_USER_TEXT``; off by default).
        max_turn_s: a running turn's time limit (0: none); past it the turn is finished with
            a ``TURN_TIME_LIMIT`` error and its partition moves on.
    """

    def __init__(
        self,
        *,
        log: EventLog,
        core: AgentCore,
        clients: DependencyClients,
        agent_id: str,
        partitions: int,
        recall_top_k: int,
        parallel: int = 1,
        read_ahead: int = 0,
        orphan_grace_s: float = 30.0,
        log_user_text: bool = False,
        max_turn_s: float = 0.0,
    ) -> None:
        if parallel < 1 or read_ahead < 0:
            raise ValueError("need parallel >= 1 and read_ahead >= 0")
        self._log = log
        self._core = core
        self._clients = clients
        self._agent_id = agent_id
        self._partitions = partitions
        self._recall_top_k = recall_top_k
        self._log_user_text = log_user_text
        self._parallel = parallel
        self._window = parallel + read_ahead
        self._max_turn_s = max_turn_s
        self._cancels: OrderedDict[str, None] = OrderedDict()
        self._orphan_grace_s = orphan_grace_s
        self._presence_seen = SeenByTails()
        self._active: dict[str, _Current] = {}  # running turns by turn id
        self._tails: list[asyncio.Task[None]] = []
        self._loop_task: asyncio.Task[None] | None = None
        self._queue: FairQueue[_Claimed] = FairQueue()
        self._running: dict[_Claimed, asyncio.Task[None]] = {}
        self._busy_conversations: set[str] = set()
        self._stopping = False

    # Lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self._log.ensure_topic(TURN_REQUESTS, self._partitions)
        await self._log.ensure_topic(TURN_EVENTS, self._partitions)
        # Tails start at the current end before any turn is claimed: every cancel appended
        # later is seen by a tail, every earlier one by the claim's read of the turn's events.
        for partition in range(await self._log.partition_count(TURN_EVENTS)):
            start = await self._log.end_offset(TURN_EVENTS, partition)
            self._tails.append(
                asyncio.create_task(self._tail(partition, start), name=f"agent-tail-{partition}")
            )
        self._loop_task = asyncio.create_task(self._consume_loop(), name="agent-worker")

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop claiming; let running turns finish within ``grace_s``, else hand them back.

        A handed-back turn is not committed and gets no ``TurnFinished``: the group gives the
        request to another agent, which continues after the tokens already in the log.
        """
        self._stopping = True
        if self._loop_task is not None:
            running = list(self._running.values())
            if running and grace_s > 0:
                await asyncio.wait(running, timeout=grace_s)
            for claimed in [c for c, t in self._running.items() if not t.done()]:
                log.warning("handing back turn %s uncommitted", claimed.turn.turn_id)
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        tails, self._tails = self._tails, []
        for task in tails:
            task.cancel()
        for task in tails:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # Cancels ------------------------------------------------------------------------------

    async def _tail(self, partition: int, start: int) -> None:
        while True:
            try:
                async with _closing(self._log.read(TURN_EVENTS, partition, start)) as records:
                    async for record in records:
                        start = record.offset + 1
                        for event in _read_events(record.value):
                            if isinstance(event, turnlog.TurnCancelled):
                                self._note_cancel(event.turn_id)
                            elif isinstance(event, turnlog.ClientAttached | turnlog.ClientDetached):
                                self._note_presence(record, event)
            except LogError as error:
                log.warning("event tail of partition %d failed (%s); retrying", partition, error)
                await asyncio.sleep(_REJOIN_DELAY_S)

    def _note_cancel(self, turn_id: str) -> None:
        self._cancels[turn_id] = None
        self._cancels.move_to_end(turn_id)
        while len(self._cancels) > _CANCELS_REMEMBERED:
            self._cancels.popitem(last=False)
        current = self._active.get(turn_id)
        if current is not None:
            if not current.cancel.is_set():
                current.cancel_seen_at_seq = current.last_seq
            log.info("turn %s cancelled after seq %d", turn_id, current.last_seq)
            current.cancel.set()

    # Turns nobody follows (services.agent.followers) -------------------------------------

    def _note_presence(self, record: Record, event: turnlog.TurnEvent) -> None:
        # Timed when this agent saw it, not by the gateway's clock: clocks of other machines
        # may be off by more than the grace period.
        seen_ms = int(time.time() * 1000)
        self._presence_seen.note(record.offset, event, seen_ms)
        current = self._active.get(event.turn_id)
        if current is not None and record.offset >= current.counted_from:
            current.followers.apply(event, seen_ms)
            self._watch_followers(current)

    def _watch_followers(self, current: _Current) -> None:
        """Cancel the turn once nobody has followed it for the grace period; until then, look
        again when the grace period would end."""
        if current.orphan_timer is not None:
            current.orphan_timer.cancel()
            current.orphan_timer = None
        if current.background or current.cancel.is_set():
            return
        unfollowed_ms = current.followers.orphaned_for_ms(int(time.time() * 1000))
        if unfollowed_ms is None:
            return
        remaining_s = self._orphan_grace_s - unfollowed_ms / 1000
        if remaining_s > 0:
            loop = asyncio.get_running_loop()
            current.orphan_timer = loop.call_later(remaining_s, self._watch_followers, current)
            return
        current.orphaned = True
        current.cancel_seen_at_seq = current.last_seq
        current.cancel.set()
        log.info(
            "turn %s: no client attached for %.1f s; cancelled after seq %d",
            current.turn_id,
            unfollowed_ms / 1000,
            current.last_seq,
            extra=logs.event("turn-orphaned", current.turn_id),
        )

    # Consuming ----------------------------------------------------------------------------

    async def _consume_loop(self) -> None:
        while not self._stopping:
            consumer = self._log.consumer(TURN_REQUESTS, GROUP, self._agent_id)
            try:
                await self._consume(consumer)
            except LogError as error:
                # Rejoining makes the group redeliver whatever was not committed.
                log.warning("request log failed (%s); rejoining in %.1fs", error, _REJOIN_DELAY_S)
                await asyncio.sleep(_REJOIN_DELAY_S)
            except Exception:
                log.exception("turn handling failed; rejoining in %.1fs", _REJOIN_DELAY_S)
                await asyncio.sleep(_REJOIN_DELAY_S)
            finally:
                # Whatever is still running or waiting is handed back with the membership.
                await self._hand_back()
                with contextlib.suppress(LogError):
                    await asyncio.shield(consumer.close())

    async def _consume(self, consumer: GroupConsumer) -> None:
        """Take requests while the window has room; start them as batch slots free up."""
        trackers: dict[int, CommitTracker] = {}
        room = asyncio.Semaphore(self._window)
        committing = asyncio.Lock()
        failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def finished(record: Record) -> None:
            room.release()
            highest = trackers[record.partition].finished(record.offset)
            if highest is not None:
                async with committing:
                    await consumer.commit(dataclasses.replace(record, offset=highest))

        async def run(claimed: _Claimed) -> None:
            try:
                await self._handle(claimed)
                await finished(claimed.record)
            except Fenced as fenced:
                # Another agent owns the partition now and will run the turn: not ours to
                # commit, and no reason to drop the turns of partitions we still hold.
                log.warning("turn %s abandoned to its new owner: %s", claimed.turn.turn_id, fenced)
                metrics.TURNS.labels(METRICS_SERVICE, "fenced").inc()
                room.release()
            except Exception as error:  # the log, or a bug: rejoin and hand everything back
                if not failure.done():
                    failure.set_exception(error)
            finally:
                del self._running[claimed]
                self._busy_conversations.discard(claimed.turn.conversation_id)
                dispatch()

        def dispatch() -> None:
            """Start waiting turns while batch slots are free."""
            while not self._stopping and len(self._running) < self._parallel:
                waiting = self._queue.pop(lambda c: c in self._busy_conversations)
                if waiting is None:
                    return
                metrics.QUEUE_DEPTH.labels(METRICS_SERVICE).dec()
                claimed = waiting.item
                fence = claimed.fence
                if fence is None or consumer.claim(claimed.record.partition) != fence:
                    # The partition moved to another agent while the turn waited: it is theirs
                    # (or it came back under a new claim, which hands the request out again).
                    room.release()
                    continue
                self._busy_conversations.add(claimed.turn.conversation_id)
                self._running[claimed] = asyncio.create_task(
                    run(claimed), name=f"agent-turn-{claimed.turn.turn_id}"
                )

        async def take() -> None:
            async with _closing(aiter(consumer)) as records:
                async for record in records:
                    if self._stopping:
                        return  # not committed: another agent gets it
                    await room.acquire()
                    trackers.setdefault(record.partition, CommitTracker()).taken(record.offset)
                    turn = _read_request(record.value)
                    if turn is None:
                        await finished(record)
                        continue
                    claimed = _Claimed(record, turn, fence=consumer.claim(record.partition))
                    self._queue.push(turn.tenant_id, turn.conversation_id, claimed)
                    metrics.QUEUE_DEPTH.labels(METRICS_SERVICE).inc()
                    dispatch()
                    # Ask for the next record only once the window has room for it.
                    await room.acquire()
                    room.release()

        taking = asyncio.create_task(take(), name="agent-take")
        try:
            await asyncio.wait([taking, failure], return_when=asyncio.FIRST_COMPLETED)
            if failure.done():
                failure.result()
            taking.result()
        finally:
            taking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await taking
            if not failure.done():
                failure.cancel()

    async def _hand_back(self) -> None:
        """Drop waiting turns and stop running ones, uncommitted, so the group redelivers them."""
        dropped = self._queue.remove_if(lambda _: True)
        metrics.QUEUE_DEPTH.labels(METRICS_SERVICE).dec(len(dropped))
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _handle(self, claimed: _Claimed) -> None:
        turn, record = claimed.turn, claimed.record
        model = self._core.model_name
        with telemetry.turn_span(turn, record, model, claimed.claimed_wall) as span:
            with tracing.tracer().start_as_current_span(
                "claim turn", start_time=telemetry.wall_ns(claimed.claimed_wall)
            ):
                prior = await self._prior_events(turn)
            telemetry.note_takeover(span, prior.started_by, prior.started_by_agent, prior.last_seq)
            if prior.finished:
                log.info(
                    "turn %s already finished; skipping",
                    turn.turn_id,
                    extra=logs.event("turn-skipped", turn.turn_id),
                )
                return
            cancel = asyncio.Event()
            if prior.cancelled or turn.turn_id in self._cancels:
                cancel.set()
            current = _Current(
                turn.turn_id,
                cancel,
                last_seq=prior.last_seq,
                cancel_seen_at_seq=prior.last_seq,
                background=turn.background,
                followers=prior.followers,
                counted_from=prior.end,
            )
            # What the tails saw after the claim's read, then the tails count on their own.
            for event, at_ms in self._presence_seen.since(turn.turn_id, prior.end):
                current.followers.apply(event, at_ms)
            self._active[turn.turn_id] = current
            self._watch_followers(current)
            try:
                await self._run_turn(
                    turn,
                    record,
                    prior,
                    current,
                    claimed.claimed,
                    claimed.claimed_wall,
                    span,
                    claimed.fence,
                )
            finally:
                self._active.pop(turn.turn_id, None)
                if current.orphan_timer is not None:
                    current.orphan_timer.cancel()

    async def _prior_events(self, turn: turnlog.TurnRequested) -> _PriorEvents:
        prior = _PriorEvents()
        end = await self._log.end_offset(TURN_EVENTS, turn.events_partition)
        await self._read_prior(turn, prior, turn.events_start_offset, end)
        return prior

    async def _read_prior(
        self, turn: turnlog.TurnRequested, prior: _PriorEvents, start: int, end: int
    ) -> None:
        """Add the turn's events in ``[start, end)`` of its partition to ``prior``."""
        prior.end = end
        records = await self._log.read_range(TURN_EVENTS, turn.events_partition, start, end)
        wanted = (turn.turn_id,)
        for record in records:
            try:
                events = turnlog.decode_events(record.value, turns=wanted)
            except turnlog.UndecodableRecord:
                continue
            for event in events:
                if prior.followers.apply(event, record.timestamp_ms):
                    continue
                if not prior.attempts.admit(event):
                    continue  # a zombie's record, after a newer attempt started
                if isinstance(event, turnlog.TurnStarted):
                    prior.started = True
                    prior.started_by = tracing.span_context_of(record.headers)
                    prior.started_by_agent = event.agent_id
                elif isinstance(event, turnlog.TurnFinished):
                    prior.finished = True
                elif isinstance(event, turnlog.TurnCancelled):
                    prior.cancelled = True
                elif isinstance(event, turnlog.TokenEmitted) and event.seq > 0:
                    prior.tokens.offer(event.seq, event.text)

    async def _run_turn(
        self,
        turn: turnlog.TurnRequested,
        record: Record,
        prior: _PriorEvents,
        current: _Current,
        claimed: float,
        claimed_wall: float,
        span: Span,
        fence: Claim | None,
    ) -> None:
        cancel = current.cancel
        appends: list[asyncio.Future[int]] = []
        partition = turn.events_partition
        key = turn.conversation_id.encode()
        # TurnStarted and TurnFinished point at this agent's turn span: an agent that takes the
        # turn over, and the persister's spans, join the trace through them. Token records carry
        # nothing: they are most of the log.
        headers = tracing.headers_for(span)
        loop = asyncio.get_running_loop()
        started = loop.time()

        def refused(future: asyncio.Future[int]) -> None:
            if not future.cancelled() and isinstance(future.exception(), Fenced):
                # Stop generating for a turn that is no longer ours.
                current.fenced = True
                cancel.set()

        def append(value: bytes, with_headers: Headers = ()) -> asyncio.Future[int]:
            future = self._log.append(TURN_EVENTS, partition, key, value, with_headers, fence=fence)
            future.add_done_callback(refused)
            appends.append(future)
            return future

        def out_of_time() -> None:
            current.timed_out = True
            log.warning(
                "turn %s ran past its time limit (%.1fs); stopping it",
                turn.turn_id,
                self._max_turn_s,
            )
            cancel.set()

        time_limit = (
            loop.call_at(started + self._max_turn_s, out_of_time) if self._max_turn_s > 0 else None
        )

        # Timings count from the gateway's acceptance; fall back to our claim (also when the
        # gateway left accepted_at unset or zero).
        accepted_wall = (turn.accepted_at_ns or 0) / 1e9 or claimed_wall

        def since_accepted_ms(monotonic_at: float) -> float:
            return max(0.0, (claimed_wall + (monotonic_at - claimed) - accepted_wall) * 1000)

        if self._log_user_text:
            log.info(
                "turn %s: user text %r",
                turn.turn_id,
                turn.user_text,
                extra=logs.event("turn-text", turn.turn_id),
            )
        attempt = prior.next_attempt
        started_append = append(
            turnlog.encode(
                turnlog.TurnStarted(
                    turn.turn_id,
                    turn.conversation_id,
                    turn.tenant_id,
                    agent_id=self._agent_id,
                    request_partition=record.partition,
                    request_offset=record.offset,
                    resumed_after_seq=prior.last_seq,
                    attempt=attempt,
                )
            ),
            headers,
        )
        if prior.started:
            # A takeover. Readers fence by log order (turnlog.Attempts): what the earlier agent
            # logged before our TurnStarted is part of the turn, what it logs after is not. So
            # read up to our TurnStarted and continue after the last token found there.
            try:
                await self._read_prior(turn, prior, prior.end, await started_append + 1)
            except BaseException:
                if time_limit is not None:
                    time_limit.cancel()
                raise
            if prior.finished:
                log.info(
                    "turn %s was finished by its earlier agent meanwhile",
                    turn.turn_id,
                    extra=logs.event("turn-skipped", turn.turn_id),
                )
                if time_limit is not None:
                    time_limit.cancel()
                return
            if prior.cancelled:
                cancel.set()
            current.last_seq = current.cancel_seen_at_seq = prior.last_seq
        last_seq = prior.last_seq
        if last_seq:
            log.info(
                "turn %s: continuing after seq %d",
                turn.turn_id,
                last_seq,
                extra=logs.event("turn-taken-over", turn.turn_id),
            )
        options = resolve_options(turn.options, self._core.limits)
        remaining = options.max_tokens - last_seq
        retrieval_ms = 0.0
        first_token_at: float | None = None
        error: MeshError | None = None
        prompt_tokens = 0
        cached_tokens = 0
        skipped: tuple[tuple[str, str], ...] = ()
        new_tokens = 0
        if cancel.is_set():
            reason = FinishReason.CANCELLED
        elif remaining <= 0:
            reason = FinishReason.LENGTH
        else:
            t_retrieval = time.monotonic()
            # History first: its consistent read waits until the persister has committed every
            # earlier turn, which gave memory a head start on them, so the recall that follows
            # usually sees them too (always, unless memory is slow or down).
            tracer = tracing.tracer()
            with tracer.start_as_current_span("history read") as step:
                history, history_skipped = await self._clients.history(
                    turn.tenant_id, turn.conversation_id, for_turn_id=turn.turn_id
                )
                step.set_attribute("mesh.messages", len(history))
                if history_skipped:
                    step.set_attribute("mesh.skipped", history_skipped)
            with tracer.start_as_current_span("recall") as step:
                passages, recall_skipped = await self._clients.recall(
                    turn.tenant_id, turn.user_text, self._recall_top_k
                )
                step.set_attribute("mesh.passages", len(passages))
                if recall_skipped:
                    step.set_attribute("mesh.skipped", recall_skipped)
            skipped = tuple(
                (source, reason)
                for source, reason in (("history", history_skipped), ("recall", recall_skipped))
                if reason
            )
            retrieval_ms = (time.monotonic() - t_retrieval) * 1000
            prompt = PromptRequest(
                user_text=turn.user_text,
                history=history,
                context_passages=passages,
                assistant_prefix=prior.text,
            )
            step_options = dataclasses.replace(options, max_tokens=remaining)
            finished: GenerationFinished | None = None
            tokens = TokenAppender(turn, append, attempt)
            generating = tracer.start_span(
                "generate",
                attributes={
                    tracing.GEN_AI_OPERATION: "chat",
                    tracing.GEN_AI_REQUEST_MODEL: self._core.model_name,
                },
            )
            # Past the time limit plus a grace, a generation that did not stop is left behind.
            hard_limit = (
                started + self._max_turn_s + _STOP_GRACE_S if self._max_turn_s > 0 else None
            )
            try:
                async with (
                    asyncio.timeout_at(hard_limit),
                    contextlib.aclosing(
                        self._core.stream(
                            prompt, step_options, cancel, started_at=claimed, label=turn.turn_id
                        )
                    ) as events,
                ):
                    async for event in events:
                        if isinstance(event, Token):
                            last_seq += 1
                            if first_token_at is None:
                                first_token_at = time.monotonic()
                            tokens.add(last_seq, event.text)
                            current.last_seq = last_seq
                        else:
                            finished = event
            except InvalidArgument as invalid:  # the prompt cannot fit the context
                error = invalid
            except TimeoutError:
                log.error("turn %s: generation did not stop after its time limit", turn.turn_id)
            except Exception:  # a bug or a broken model must not wedge the queue
                log.exception("turn %s: generation failed", turn.turn_id)
                error = _generation_failed()
            except BaseException:  # handed back (cancelled): the span still ends
                generating.end()
                raise
            tokens.flush()
            if finished is not None:
                reason = finished.finish_reason
                prompt_tokens = finished.prompt_tokens
                cached_tokens = finished.cached_tokens
                new_tokens = finished.completion_tokens
                if finished.error:
                    log.error("turn %s: the engine failed: %s", turn.turn_id, finished.error)
                    error = _generation_failed()
            else:
                reason = FinishReason.ERROR
            if current.timed_out:
                error = _time_limit_error(self._max_turn_s)
            if error is not None:
                reason = FinishReason.ERROR
            telemetry.finish(
                generating,
                model=self._core.model_name,
                reason=reason,
                input_tokens=prompt_tokens,
                output_tokens=new_tokens,
                cached_tokens=cached_tokens,
                error=error.message if error is not None else None,
            )
            generating.end()
        if time_limit is not None:
            time_limit.cancel()
        if current.timed_out and error is None:  # ran out of time before generating
            error = _time_limit_error(self._max_turn_s)
        if current.fenced:
            raise Fenced(f"turn {turn.turn_id}: the log refused an append; another agent owns it")
        if error is not None:
            reason = FinishReason.ERROR
        now = time.monotonic()
        ending = turnlog.TurnFinished(
            turn.turn_id,
            finish_reason=reason,
            usage=TokenUsage(prompt_tokens, len(prior.tokens) + new_tokens),
            timings=TurnTimings(
                queued_ms=max(0.0, (claimed_wall - accepted_wall) * 1000),
                retrieval_ms=retrieval_ms,
                time_to_first_token_ms=(
                    since_accepted_ms(first_token_at) if first_token_at is not None else 0.0
                ),
                total_ms=since_accepted_ms(now),
            ),
            error_status=_error_status(error, reason, current, self._orphan_grace_s),
            conversation_id=turn.conversation_id,
            tenant_id=turn.tenant_id,
            last_seq=last_seq,
            model=self._core.model_name,
            cancel_seen_at_seq=(
                current.cancel_seen_at_seq if reason is FinishReason.CANCELLED else 0
            ),
            context_skipped=skipped,
            attempt=attempt,
        )
        with tracing.tracer().start_as_current_span("finish turn", kind=SpanKind.PRODUCER):
            append(turnlog.encode(ending), headers)
            # The request is committed by the caller only once everything above is durable.
            # Only this turn's appends are awaited: another turn's refused (fenced) appends are
            # its own.
            results = await asyncio.gather(*appends, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if any(isinstance(r, Fenced) for r in failed):
            raise Fenced(f"turn {turn.turn_id}: the log refused an append; another agent owns it")
        if failed:
            raise LogError(f"{len(failed)} appends of turn {turn.turn_id} failed: {failed[0]}")
        metrics.TURNS.labels(METRICS_SERVICE, reason.name.lower()).inc()
        model = self._core.model_name
        telemetry.finish(
            span,
            model=model,
            reason=reason,
            input_tokens=prompt_tokens,
            output_tokens=len(prior.tokens) + new_tokens,
            cached_tokens=cached_tokens,
            error=error.message if error is not None else None,
        )
        telemetry.observe(
            model=model,
            reason=reason,
            duration_s=now - claimed,
            first_token_s=first_token_at - claimed if first_token_at is not None else None,
            output_tokens=new_tokens,
        )
        log.info(
            "turn %s finished: %s, %d tokens (seq %d); prompt %d tokens, %d of them from the cache",
            turn.turn_id,
            reason.name,
            new_tokens,
            last_seq,
            prompt_tokens,
            cached_tokens,
            extra=logs.event("turn-finished", turn.turn_id),
        )


def _time_limit_error(max_turn_s: float) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"the turn ran longer than the agents' limit of {max_turn_s:g}s "
        "(MESH_AGENT_MAX_TURN_SECONDS) and was stopped",
        reason="TURN_TIME_LIMIT",
    )


def _error_status(
    error: MeshError | None, reason: FinishReason, current: _Current, grace_s: float
) -> bytes:
    """TurnFinished's error: the failure, or why an orphaned turn was cancelled."""
    if error is not None:
        return bytes(to_status_proto(error).SerializeToString())
    if reason is FinishReason.CANCELLED and current.orphaned:
        orphaned = Cancelled(
            f"no client followed the turn for {grace_s:g} s (MESH_AGENT_ORPHAN_GRACE_S), so it "
            "was cancelled; start it with background=true to let it run with nobody attached",
            reason="ORPHANED",
        )
        return bytes(to_status_proto(orphaned).SerializeToString())
    return b""


def _generation_failed() -> MeshError:
    """What a client learns of a failure inside the engine: that it happened, not its internals
    (the agent's log has those)."""
    return MeshError(
        "the model failed while generating this turn; the tokens already sent are kept, and "
        "the operator finds the cause in the agent's log",
        reason="GENERATION_FAILED",
    )

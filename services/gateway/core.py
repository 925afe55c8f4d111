"""The gateway's core: accepts, resumes and cancels turns, and streams them to clients.

No protobuf here: the servicer converts messages to the plain values of ``model`` and back, and
log records are read and written as ``mesh.turnlog`` events. See docs/protocol.md for the life of
a turn. What a client may send is checked in ``validation``; one turn's ordering lives in
``turn_stream`` and the bidirectional Chat stream in ``session``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Protocol

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from mesh import tracing, turnlog
from mesh.auth import Principal, RateLimiter
from mesh.errors import InvalidArgument, MeshError, NotFound, ResourceExhausted, Unavailable
from mesh.lifecycle import AsyncStartStop
from mesh.log import TURN_EVENTS, TURN_REQUESTS, EventLog, LogError, partition_for
from mesh.turn_ids import new_turn_ref, parse_turn_id
from services.gateway.caches import BoundedLru, IdempotencyCache, uncount
from services.gateway.context_check import ContextCheck
from services.gateway.hub import Subscription, TurnHub
from services.gateway.idempotency import ClaimedElsewhere, Claimer, RequestClaims, RequestIds
from services.gateway.key_streams import KeyStreams
from services.gateway.model import Output, StartRequest, TurnInfo
from services.gateway.queue_position import QueueTracker
from services.gateway.readiness import StartGate
from services.gateway.session import ChatSession
from services.gateway.settings import GatewaySettings
from services.gateway.token_budget import TokenBudget
from services.gateway.turn_lookup import (
    StoredState,
    StoredTurn,
    TurnDirectory,
    located,
    replay,
    scan_from,
)
from services.gateway.turn_stream import UNLIMITED, TurnStream, gateway_stopping
from services.gateway.validation import validate_start

_log = logging.getLogger(__name__)


class Conversations(Protocol):
    """Where the gateway checks that a conversation exists for a tenant (the persister)."""

    async def require_conversation(self, tenant_id: str, conversation_id: str) -> None:
        """Return if the tenant owns the conversation; raise NotFound/Unavailable otherwise."""
        ...


class GatewayCore(AsyncStartStop):
    """Accepts, resumes and cancels turns and streams them. ``async with`` or start/stop."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        log: EventLog,
        conversations: Conversations,
        limiter: RateLimiter | None = None,
        gate: StartGate | None = None,
        context: ContextCheck | None = None,
        turns: TurnDirectory | None = None,
        request_claims: RequestClaims | None = None,
    ) -> None:
        self.settings = settings
        self.log = log
        # Names this gateway in ClientAttached/ClientDetached: the launcher's instance name.
        self.gateway_id = settings.instance or f"{socket.gethostname()}-{os.getpid()}"
        self._conversations = conversations
        # Finds turns for resume and cancel without reading the log (services/gateway/turn_lookup).
        self._turns = turns
        # Refuses turns that could not start now (no agent, persister or log down).
        self._gate = gate
        # Refuses messages that cannot fit the model's context (None: the agent's check only).
        self._context = context
        self.limiter = limiter or RateLimiter(settings.rate_per_s, settings.rate_burst)
        self.token_budget = TokenBudget(settings.tokens_per_minute_per_tenant)
        self.queue = QueueTracker(
            log, poll_s=settings.queue_poll_s, scan_limit=settings.max_queued_turns
        )
        self.idempotency = IdempotencyCache(
            ttl_s=settings.idempotency_ttl_s, max_entries=settings.idempotency_max
        )
        # Request ids across gateways (claims at the persister); see ``idempotency``.
        self.request_ids = RequestIds(
            request_claims,
            takeover_after_s=settings.idempotency_takeover_s,
            max_entries=settings.idempotency_max,
        )
        # Turns this gateway has accepted or looked up, so resume and cancel skip the log scan.
        self._known: BoundedLru[str, TurnInfo] = BoundedLru(10_000)
        # Conversations known to exist, per tenant: the persister is asked once per conversation.
        # A conversation this gateway minted exists once its first request is on the log. One
        # deleted through this gateway is dropped (``forget_conversation``); another gateway
        # may still start a turn in it, which then begins a new conversation under that id.
        self._seen: BoundedLru[tuple[str, str], bool] = BoundedLru(50_000)
        # Turns this gateway cancelled or found ended: cancelling them again logs nothing.
        self._ended: BoundedLru[str, bool] = BoundedLru(10_000)
        self._cancelling: dict[str, asyncio.Future[None]] = {}
        self._hub: TurnHub | None = None
        self.partitions = 0
        self.draining = False
        self._streams = 0
        self._tenant_streams: Counter[str] = Counter()
        self._key_streams = KeyStreams()
        # Starts of a tenant on a partition between their queue check and their durable append:
        # counted with the pending requests so concurrent starts cannot all pass one check.
        self._starting: Counter[tuple[int, str]] = Counter()
        # The same per key id (on every partition), for keys with their own ``max_queued_turns``.
        self._starting_keys: Counter[str] = Counter()

    def forget_conversation(self, tenant_id: str, conversation_id: str) -> None:
        """The conversation is being deleted: ask the persister again before a turn in it."""
        self._seen.pop((tenant_id, conversation_id))

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

    def require_persister(self) -> None:
        """UNAVAILABLE at once while the persister is known to be down (past the threshold),
        instead of a call that waits for its timeout."""
        if self._gate is not None:
            self._gate.require_persister()

    def begin_drain(self) -> None:
        """Refuse new turns from now on; open streams keep going until the grace period ends."""
        self.draining = True

    @contextlib.contextmanager
    def stream_slot(self, tenant_id: str, key: Principal | None = None) -> Iterator[None]:
        """Hold one of the gateway's ``max_streams`` stream slots for the block, and one of the
        tenant's ``max_streams_per_tenant`` (and of the key's own ``max_streams``, when the
        keys file gives it one); the narrowest limit is checked first, so a key or tenant that
        holds its share is told so, and never fills the gateway for the others."""
        with self._key_streams.hold(key), self._tenant_stream_slot(tenant_id):
            yield

    @contextlib.contextmanager
    def _tenant_stream_slot(self, tenant_id: str) -> Iterator[None]:
        settings = self.settings
        held = self._tenant_streams[tenant_id]
        if held >= settings.max_streams_per_tenant:
            raise ResourceExhausted(
                f"tenant {tenant_id!r} already has {held} open streams on this gateway, its "
                f"limit (MESH_GATEWAY_MAX_STREAMS_PER_TENANT={settings.max_streams_per_tenant}); "
                "close streams it no longer reads, or retry shortly",
                reason="TENANT_STREAM_LIMIT",
                retry_after_s=1.0,
                quota_subject=f"tenant:{tenant_id}",
            )
        if self._streams >= settings.max_streams:
            raise ResourceExhausted(
                f"this gateway already serves {self._streams} streams; retry shortly or use "
                "another gateway",
                reason="TOO_MANY_STREAMS",
                retry_after_s=1.0,
            )
        self._streams += 1
        self._tenant_streams[tenant_id] += 1
        try:
            yield
        finally:
            self._streams -= 1
            uncount(self._tenant_streams, tenant_id)

    def tenant_streams(self, tenant_id: str) -> int:
        """Streams the tenant holds open on this gateway."""
        return self._tenant_streams.get(tenant_id, 0)

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
        trace_parent: Context | None = None,
    ) -> TurnStream:
        """Validate, rate-limit and log a new turn; return its stream (TurnAccepted first).

        The turn's trace starts here (``trace_parent``: the caller's, from its ``traceparent``),
        with this accept span; the request record carries it to the agent.
        """
        with tracing.tracer().start_as_current_span(
            "accept turn",
            context=trace_parent,
            kind=SpanKind.SERVER,
            attributes={tracing.GEN_AI_OPERATION: "chat"},
        ):
            return await self._start_turn(principal, request, notify)

    async def _start_turn(
        self, principal: Principal, request: StartRequest, notify: asyncio.Event | None
    ) -> TurnStream:
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
        replace = ""
        # A lost claim whose turn never reached the log is taken over; a few rounds settle any
        # contention (each round either attaches or appends unless another retry won it).
        for _ in range(3):
            try:
                return await self._start_once(principal, request, notify, key, replace)
            except ClaimedElsewhere as lost:
                assert key is not None
                found = await self.request_ids.settle(
                    key, request, lost.claim, lambda turn_id: self.find_turn(principal, turn_id)
                )
                if isinstance(found, str):
                    replace = found
                    continue
                # This gateway answers the next retry itself.
                settled = asyncio.get_running_loop().create_future()
                settled.set_result(found)
                self.idempotency.put(key, settled)
                return await self._attach(
                    found, after_seq=0, notify=notify, coalesce=request.coalesce_tokens
                )
        raise Unavailable(
            f"other starts with request_id {request.request_id[:128]!r} are contending; retry "
            "with the same request_id shortly",
            reason="REQUEST_ID_CONTENDED",
            retry_after_s=1.0,
        )

    async def _start_once(
        self,
        principal: Principal,
        request: StartRequest,
        notify: asyncio.Event | None,
        key: tuple[str, str] | None,
        replace: str,
    ) -> TurnStream:
        if key is not None:
            earlier = self.idempotency.get(key)
            if earlier is not None:
                info = await asyncio.shield(earlier)
                if info is not None:
                    self.request_ids.check_local(key, request, info.turn_id)
                    return await self._attach(
                        info, after_seq=0, notify=notify, coalesce=request.coalesce_tokens
                    )
        conversation_id = request.conversation_id or str(uuid.uuid4())
        if self._gate is not None:
            # Before the rate limiter and the persister: a turn that cannot start costs the
            # caller no token and no wait.
            self._gate.check(partition_for(conversation_id.encode(), self.partitions))
        self.limiter.acquire(principal)
        if self._context is not None:
            await self._context.check(request.text)  # after the limiter: tokenizing costs CPU
        if request.conversation_id and (principal.tenant_id, conversation_id) not in self._seen:
            await self._conversations.require_conversation(principal.tenant_id, conversation_id)
            self._seen.put((principal.tenant_id, conversation_id), True)
        # Reserved last before the append, so a start refused above costs the tenant nothing.
        reservation = self.token_budget.reserve(
            principal.tenant_id,
            request.options.max_tokens,
            key_id=principal.key_id,
            key_per_minute=principal.tokens_per_minute,
        )
        decided: asyncio.Future[TurnInfo | None] = asyncio.get_running_loop().create_future()
        claim: Claimer | None = None
        if key is not None:
            self.idempotency.put(key, decided)
            self.request_ids.remember(key, request)
            if self.request_ids.shared:
                claim = self.request_ids.claimer(principal.tenant_id, request, replace)
        try:
            stream = await self._append_request(
                principal, request, conversation_id, decided, notify, claim
            )
        except BaseException:
            if reservation is not None:
                reservation.settle(0)  # nothing was started: the tokens go back
            raise
        else:
            stream.hold(reservation)
            return stream
        finally:
            if key is not None:
                # A failed start must not pin its request_id; one whose append is still in flight
                # decides when the log answers.
                decided.add_done_callback(
                    lambda done: (
                        None if done.result() is not None else self.idempotency.discard(key, done)
                    )
                )

    async def _check_queue(self, partition: int, principal: Principal) -> None:
        """RESOURCE_EXHAUSTED when the agents' queue for this partition is full, or when the
        tenant, or the key when its entry sets ``max_queued_turns``, already holds its share."""
        tenant_id = principal.tenant_id
        try:
            pending = await self.queue.pending(partition)
        except LogError as error:
            raise _log_unavailable(error) from error
        settings = self.settings
        limit = settings.max_queued_turns
        if pending.depth >= limit:
            raise ResourceExhausted(
                f"{pending.depth} turns are already waiting for this conversation's agents (the "
                f"limit is {limit}); retry shortly",
                reason="QUEUE_FULL",
                retry_after_s=2.0,
            )
        share = settings.max_queued_turns_per_tenant
        own = pending.count(tenant_id) + self._starting[(partition, tenant_id)]
        if own >= share:
            raise ResourceExhausted(
                f"tenant {tenant_id!r} already has {own} unfinished turns queued or running for "
                f"this conversation's agents, its limit (MESH_GATEWAY_MAX_QUEUED_TURNS_PER_TENANT="
                f"{share}); wait for some to finish, or retry shortly",
                reason="TENANT_QUEUE_FULL",
                retry_after_s=2.0,
                quota_subject=f"tenant:{tenant_id}",
            )
        key_share = principal.max_queued_turns
        if key_share is not None:
            # A key's share counts its turns on every partition (the reads are cached).
            key_id = principal.key_id
            try:
                every = await asyncio.gather(
                    *(self.queue.pending(other) for other in range(self.partitions))
                )
            except LogError as error:
                raise _log_unavailable(error) from error
            own = sum(p.count_key(key_id) for p in every) + self._starting_keys[key_id]
            if own >= key_share:
                raise ResourceExhausted(
                    f"API key {key_id} already has {own} unfinished turns queued or running, its "
                    f"limit (max_queued_turns={key_share} in the keys file); wait for some to "
                    "finish, or retry shortly",
                    reason="KEY_QUEUE_FULL",
                    retry_after_s=2.0,
                    quota_subject=f"key:{key_id}",
                )

    async def _append_request(
        self,
        principal: Principal,
        request: StartRequest,
        conversation_id: str,
        decided: asyncio.Future[TurnInfo | None],
        notify: asyncio.Event | None,
        claim: Claimer | None = None,
    ) -> TurnStream:
        key = conversation_id.encode()
        partition = partition_for(key, self.partitions)
        await self._check_queue(partition, principal)
        starting = (partition, principal.tenant_id)
        starting_key = principal.key_id
        self._starting[starting] += 1
        self._starting_keys[starting_key] += 1
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                uncount(self._starting, starting)
                uncount(self._starting_keys, starting_key)

        try:
            return await self._append_checked(
                principal, request, conversation_id, decided, notify, partition, key, release, claim
            )
        finally:
            release()

    async def _claim(self, claim: Claimer, turn_id: str, conversation_id: str) -> None:
        try:
            await claim(turn_id, conversation_id)
        except Unavailable as error:
            # A gateway told not to require the persister keeps accepting turns while it is
            # unreachable: its request ids then hold on this gateway only (its own memory).
            if self.settings.require_persister or error.reason != "PERSISTER_UNAVAILABLE":
                raise
            _log.warning(
                "turn %s starts without a request-id claim (the persister is unreachable): "
                "a retry on another gateway would start another turn",
                turn_id,
            )

    async def _append_checked(
        self,
        principal: Principal,
        request: StartRequest,
        conversation_id: str,
        decided: asyncio.Future[TurnInfo | None],
        notify: asyncio.Event | None,
        partition: int,
        key: bytes,
        release: Callable[[], None],
        claim: Claimer | None = None,
    ) -> TurnStream:
        log = self.log
        sub: Subscription | None = None
        try:
            # Both at once: on Kafka each is a broker round trip on the way to TurnAccepted.
            request_start, events_start = await asyncio.gather(
                log.end_offset(TURN_REQUESTS, partition), log.end_offset(TURN_EVENTS, partition)
            )
            turn_id = str(new_turn_ref(partition, request_start, events_start))
            trace.get_current_span().set_attribute(tracing.TURN_ID, turn_id)
            if claim is not None:
                # The request id names this turn from here on, on every gateway (or raises
                # ClaimedElsewhere: it already names another).
                await self._claim(claim, turn_id, conversation_id)
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
                    background=request.background,
                    key_id=principal.key_id,
                )
            )
            appending = tracing.tracer().start_span("append request", kind=SpanKind.PRODUCER)
            try:
                appended = log.append(
                    TURN_REQUESTS, partition, key, value, tracing.headers_for(appending)
                )
            except BaseException:
                appending.end()  # refused at once
                raise
            appended.add_done_callback(lambda _: appending.end())  # once it is durable
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
            self._known.put(info.turn_id, info)
            self._seen.put((principal.tenant_id, conversation_id), True)
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
        # Counted at once by this gateway's next checks, not only after the next queue read.
        self.queue.note_appended(partition, request_offset, principal.tenant_id, principal.key_id)
        release()
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
            position = await self.queue.position(partition, request_offset, principal.tenant_id)
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
            on_detach=self._client_left,
        )

    # -- resume and cancel ---------------------------------------------------------------------

    async def find_turn(self, principal: Principal, turn_id: str) -> TurnInfo:
        """The turn's TurnRequested, if it exists and belongs to the caller's tenant."""
        info, _ = await self._locate(principal, turn_id, after_seq=None)
        return info

    async def _locate(
        self, principal: Principal, turn_id: str, *, after_seq: int | None
    ) -> tuple[TurnInfo, StoredTurn | None]:
        """The turn, and the persister's answer about it when one was asked for.

        A resume (``after_seq`` set) always asks the persister, which may serve a finished turn
        whole; otherwise this gateway's cache answers first. A turn the persister does not know
        is looked for on the request log only past the offset it has applied.
        """
        ref = parse_turn_id(turn_id)
        not_found = NotFound(f"turn {turn_id} not found", reason="TURN_NOT_FOUND")
        info = self._known.get(turn_id)
        if info is None and ref.partition >= self.partitions:
            raise not_found
        stored = None
        if info is None or after_seq is not None:
            # Finding the turn needs no token texts; a resume needs those after its seq.
            seq = _NO_TOKENS if after_seq is None else after_seq
            stored = await self._lookup(principal.tenant_id, turn_id, seq)
        if info is None and stored is not None:
            info = located(
                turn_id,
                principal.tenant_id,
                ref.partition,
                ref.events_start,
                ref.request_start,
                stored,
            )
        if info is None:
            info = await self._scan_for_request(
                turn_id,
                ref.partition,
                ref.request_start,
                ref.events_start,
                start=scan_from(ref.request_start, stored),
            )
            if info is None:
                raise not_found
        self._known.put(info.turn_id, info)
        # Another tenant's turn reads exactly like a missing one: ids must not leak existence.
        if info.tenant_id != principal.tenant_id:
            raise not_found
        return info, stored

    async def _lookup(self, tenant_id: str, turn_id: str, after_seq: int) -> StoredTurn | None:
        """The persister's answer, or None when it cannot give one now (the log serves then)."""
        if self._turns is None:
            return None
        try:
            self.require_persister()
            return await self._turns.lookup_turn(tenant_id, turn_id, after_seq)
        except MeshError as error:
            # Down, slow, or older than LookupTurn (UNIMPLEMENTED reads as unavailable).
            _log.info("turn lookup for %s fell back to the log: %s", turn_id, error)
            return None

    async def stored_turn(self, info: TurnInfo) -> StoredTurn | None:
        """The persister's answer about a turn already found (its whole stored text), or None
        when it cannot answer now."""
        return await self._lookup(info.tenant_id, info.turn_id, 0)

    async def _scan_for_request(
        self,
        turn_id: str,
        partition: int,
        request_start: int,
        events_start: int,
        *,
        start: int | None = None,
    ) -> TurnInfo | None:
        limit = request_start + self.settings.resume_scan_limit
        position = request_start if start is None else max(start, request_start)
        if position >= limit:
            return None  # the persister applied the whole range: no log read at all
        try:
            end = await self.log.end_offset(TURN_REQUESTS, partition)
        except LogError as error:
            raise _log_unavailable(error) from error
        # The request lands right after request_start (only appends racing the gateway's own can
        # come first), so a bounded scan finds any real turn and caps what a forged id costs.
        # Below ``start`` the persister has stored every request: nothing there to look for.
        end = min(end, limit)
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
        info, stored = await self._locate(principal, turn_id, after_seq=after_seq)
        if stored is not None and stored.replayable:
            # Finished and stored: served from the persister's answer, no log read.
            self._ended.put(turn_id, True)
            return replay(info, stored, queue=self.queue, notify=notify, coalesce=coalesce)
        return await self._attach(info, after_seq=after_seq, notify=notify, coalesce=coalesce)

    async def _attach(
        self, info: TurnInfo, *, after_seq: int, notify: asyncio.Event | None, coalesce: bool
    ) -> TurnStream:
        sub = self.hub.subscribe(info.turn_id, info.partition, info.events_start, notify)
        try:
            position = await self.queue.position(
                info.partition, info.request_offset, info.tenant_id
            )
            if not self._known_ended(info.turn_id):
                # Another follower: the agents count them to find turns nobody follows (one
                # logged for a turn that already ended is ignored).
                await self._presence(info, attached=True)
        except LogError as error:
            sub.close()
            raise _log_unavailable(error) from error
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
            on_detach=self._client_left,
        )

    def _known_ended(self, turn_id: str) -> bool:
        return turn_id in self._ended or self.hub.has_ended(turn_id)

    def _presence(self, info: TurnInfo, *, attached: bool) -> asyncio.Future[int]:
        """Append ClientAttached or ClientDetached for the turn (docs/protocol.md, "Turns
        nobody follows")."""
        kind = turnlog.ClientAttached if attached else turnlog.ClientDetached
        event = kind(info.turn_id, info.conversation_id, info.tenant_id, self.gateway_id)
        return self.log.append(
            TURN_EVENTS, info.partition, info.conversation_id.encode(), turnlog.encode(event)
        )

    def _client_left(self, info: TurnInfo) -> None:
        """A stream closed before its turn ended: log that one follower less is attached."""
        if self._known_ended(info.turn_id):
            return
        try:
            appended = self._presence(info, attached=False)
        except LogError as error:
            _log.warning("could not log that a client left turn %s: %s", info.turn_id, error)
            return

        def landed(future: asyncio.Future[int]) -> None:
            if not future.cancelled() and future.exception() is not None:
                _log.warning(
                    "could not log that a client left turn %s: %s",
                    info.turn_id,
                    future.exception(),
                )

        appended.add_done_callback(landed)

    async def cancel_turn(self, principal: Principal, turn_id: str) -> str:
        # The persister's answer, when finding the turn needed one, also says whether it ended.
        info, stored = await self._locate(principal, turn_id, after_seq=None)
        await self.cancel(info, stored)
        return info.turn_id

    async def cancel(self, info: TurnInfo, stored: StoredTurn | None = None) -> None:
        """Log a TurnCancelled for the turn and wait until it is durable.

        Idempotent: a turn that already finished or was already cancelled gets nothing more on
        the log. This gateway knows from its own cancels, from the cancels its hub dispatched and
        the finishes its streams took, from a finish the persister stored (``stored``, or asked
        now), and otherwise from a bounded read of the turn's events (``resume_scan_limit``
        records from its ``events_start``); concurrent cancels of one turn here append once.
        """
        turn_id = info.turn_id
        if self._known_ended(turn_id):
            return
        running = self._cancelling.get(turn_id)
        if running is not None:
            await asyncio.shield(running)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._cancelling[turn_id] = done
        try:
            if not await self._has_ended(info, stored):
                value = turnlog.encode(
                    turnlog.TurnCancelled(turn_id, info.conversation_id, info.tenant_id)
                )
                await asyncio.shield(
                    self.log.append(
                        TURN_EVENTS, info.partition, info.conversation_id.encode(), value
                    )
                )
            self._ended.put(turn_id, True)
            done.set_result(None)
        except BaseException as error:
            failure = _log_unavailable(error) if isinstance(error, LogError) else error
            done.set_exception(
                failure if isinstance(failure, Exception) else Unavailable("cancel interrupted")
            )
            done.exception()  # retrieved: concurrent cancels re-raise it, nobody else must
            if failure is error:
                raise
            raise failure from error
        finally:
            del self._cancelling[turn_id]

    async def _has_ended(self, info: TurnInfo, stored: StoredTurn | None) -> bool:
        """Whether the turn finished or was cancelled: a stored finish answers without a log
        read, otherwise the log does (the persister may not have its events yet)."""
        if stored is None:
            stored = await self._lookup(info.tenant_id, info.turn_id, after_seq=_NO_TOKENS)
        if stored is not None and stored.state is StoredState.FINISHED:
            return True
        return await self._ended_on_log(info)

    async def _ended_on_log(self, info: TurnInfo) -> bool:
        """Whether the turn's events, read from its ``events_start`` (at most
        ``resume_scan_limit`` records), hold a TurnFinished or a TurnCancelled."""
        log, partition = self.log, info.partition
        end = await log.end_offset(TURN_EVENTS, partition)
        end = min(end, info.events_start + self.settings.resume_scan_limit)
        position = info.events_start
        wanted = frozenset((info.turn_id,))
        attempts = turnlog.Attempts()  # a zombie's TurnFinished does not end the turn
        while position < end:
            stop = min(end, position + 1000)
            for record in await log.read_range(TURN_EVENTS, partition, position, stop):
                try:
                    events = turnlog.decode_events(record.value, turns=wanted)
                except turnlog.UndecodableRecord:
                    continue
                for event in events:
                    ended = isinstance(event, turnlog.TurnFinished | turnlog.TurnCancelled)
                    if attempts.admit(event) and ended:
                        return True
            position = stop
        return False

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
                    raise gateway_stopping()
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

    def chat_session(
        self,
        principal: Principal,
        *,
        verify: Callable[[Principal], None] | None = None,
        trace_parent: Context | None = None,
    ) -> ChatSession:
        return ChatSession(self, principal, verify=verify, trace_parent=trace_parent)


# An after_seq past any turn's end: the persister's answer then carries no token texts.
_NO_TOKENS = 2**62


def _log_unavailable(error: Exception) -> Unavailable:
    # The cause (paths, broker addresses) goes to this gateway's log, not to the client.
    _log.warning("the turn log is unavailable: %s", error)
    return Unavailable(
        "the turn log is unavailable; retry shortly",
        reason="LOG_UNAVAILABLE",
        retry_after_s=1.0,
    )

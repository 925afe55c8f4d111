"""The persister's logic: assemble log events into batches, write them, serve history.

Nothing here imports generated protobuf code: log records are decoded by ``codec.decode`` (given
to ``Persister`` as ``decode``), PostgreSQL sits behind the ``Store`` protocol (``store.PgStore``)
and memory indexing behind ``Rememberer`` (``memory_client.MemoryIndexer``).

The write path, per batch:

1. records from both topics are collected until ``batch_size`` or ``linger_s`` (or a flush
   barrier asks for them now);
2. ``assemble`` turns them into rows, first record in log order winning on duplicates;
3. one transaction writes them with ``ON CONFLICT DO NOTHING``, so a replay changes nothing;
4. finished turns are remembered (idempotent by turn id);
5. only then are the log offsets committed. A crash anywhere before 5 redelivers the records,
   and steps 3 and 4 absorb the replay.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import functools
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from mesh import turnlog
from mesh.errors import InvalidArgument, NotFound, Unavailable
from mesh.generation import FinishReason
from mesh.lifecycle import AsyncStartStop
from mesh.log import TURN_EVENTS, TURN_REQUESTS, EventLog, GroupConsumer, LogError, Record
from mesh.retry import Backoff, retry
from mesh.turn_ids import TurnRef
from services.persister import metrics

log = logging.getLogger(__name__)

GROUP = "persister"
TOPICS = (TURN_REQUESTS, TURN_EVENTS)
TITLE_CHARS = 60
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
# Bounded so a stalled database pushes back on the log instead of growing memory.
BUFFER_BATCHES = 4
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Role(enum.IntEnum):
    """Message author; values match ``chat.common.v1.Role``."""

    UNSPECIFIED = 0
    USER = 1
    ASSISTANT = 2


# ---------------------------------------------------------------------------------------------
# Decoded log events


@dataclass(frozen=True, slots=True)
class UserTurn:
    """A ``TurnRequested``: the user's message of a turn."""

    turn_id: str
    conversation_id: str
    tenant_id: str
    text: str
    accepted_at: datetime


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A ``TokenEmitted``."""

    turn_id: str
    seq: int
    text: str


@dataclass(frozen=True, slots=True)
class TurnEnd:
    """A ``TurnFinished``; ``finished_at`` is the record's log timestamp (stable on replay)."""

    turn_id: str
    conversation_id: str
    tenant_id: str
    finish_reason: int
    last_seq: int
    finished_at: datetime


Event = UserTurn | TokenEvent | TurnEnd
# Decodes a record; None for records the persister does not store (started, cancelled, garbage).
Decoder = Callable[[Record], Event | None]


# ---------------------------------------------------------------------------------------------
# Rows and the store


@dataclass(frozen=True, slots=True)
class ConversationRow:
    tenant_id: str
    conversation_id: str
    title: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class UserMessageRow:
    turn_id: str
    conversation_id: str
    tenant_id: str
    text: str
    accepted_at: datetime


@dataclass(frozen=True, slots=True)
class TokenRow:
    turn_id: str
    seq: int
    text: str


@dataclass(frozen=True, slots=True)
class FinishRow:
    turn_id: str
    conversation_id: str
    tenant_id: str
    finish_reason: int
    last_seq: int
    finished_at: datetime


@dataclass(slots=True)
class BatchPlan:
    """The rows one batch writes, and the last record of each partition it covers."""

    conversations: list[ConversationRow] = field(default_factory=list)
    user_messages: list[UserMessageRow] = field(default_factory=list)
    tokens: list[TokenRow] = field(default_factory=list)
    finishes: list[FinishRow] = field(default_factory=list)
    last_records: dict[tuple[str, int], Record] = field(default_factory=dict)
    events: int = 0
    # Records that repeated an earlier record of the same batch (same turn and seq, say).
    in_batch_duplicates: int = 0

    @property
    def row_attempts(self) -> int:
        return len(self.user_messages) + len(self.tokens) + len(self.finishes)


@dataclass(frozen=True, slots=True)
class FinishedTurn:
    """A finished turn as stored, for memory indexing."""

    turn_id: str
    tenant_id: str
    conversation_id: str
    user_text: str | None
    assistant_text: str
    finish_reason: int


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What a committed batch changed."""

    user_messages_inserted: int
    tokens_inserted: int
    assistant_messages_inserted: int
    finished: list[FinishedTurn]

    @property
    def messages_inserted(self) -> int:
        return self.user_messages_inserted + self.assistant_messages_inserted

    @property
    def rows_inserted(self) -> int:
        return self.messages_inserted + self.tokens_inserted


@dataclass(frozen=True, slots=True)
class Message:
    turn_id: str
    role: Role
    text: str
    created_at: datetime
    finish_reason: int
    # The turn's acceptance time: messages sort by it, then turn id, then role.
    accepted_at: datetime


@dataclass(frozen=True, slots=True)
class Conversation:
    conversation_id: str
    title: str
    created_at: datetime
    updated_at: datetime
    messages: tuple[Message, ...] = ()


@dataclass(frozen=True, slots=True)
class MessageCursor:
    """Position after a message in conversation order."""

    accepted_at: datetime
    turn_id: str
    role: int


@dataclass(frozen=True, slots=True)
class ConversationCursor:
    """Position after a conversation in newest-first order."""

    updated_at: datetime
    conversation_id: str


class Store(Protocol):
    """PostgreSQL behind the persister (``store.PgStore``)."""

    async def write_batch(self, plan: BatchPlan) -> BatchResult:
        """Write a batch in one transaction; raise on failure (nothing is then written)."""
        ...

    async def get_conversation(self, tenant_id: str, conversation_id: str) -> Conversation | None:
        """The tenant's conversation without messages, or None."""
        ...

    async def list_messages(
        self,
        tenant_id: str,
        conversation_id: str,
        *,
        after: MessageCursor | None,
        limit: int,
    ) -> list[Message]:
        """Up to ``limit`` messages of a conversation after ``after``, oldest first."""
        ...

    async def list_conversations(
        self, tenant_id: str, *, after: ConversationCursor | None, limit: int
    ) -> list[Conversation]:
        """Up to ``limit`` of the tenant's conversations after ``after``, newest first."""
        ...


class Rememberer(Protocol):
    """Memory indexing of finished turns (``memory_client.MemoryIndexer``)."""

    async def remember(
        self, *, tenant_id: str, conversation_id: str, text: str, request_id: str
    ) -> None:
        """Index ``text``; idempotent by ``request_id``. Retries transient failures itself."""
        ...


# ---------------------------------------------------------------------------------------------
# Pure helpers


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


def remember_text(turn: FinishedTurn) -> str:
    parts = []
    if turn.user_text is not None:
        parts.append(f"user: {turn.user_text}")
    parts.append(f"assistant: {turn.assistant_text}")
    return "\n".join(parts)


def assemble(records: Iterable[Record], decode: Decoder) -> BatchPlan:
    """Turn records (in the order they were consumed) into the rows of one batch.

    Within a batch the first record in log order wins: a repeated token seq or a second
    ``TurnFinished`` of a turn is dropped here, and the database's ``ON CONFLICT DO NOTHING``
    does the same against earlier batches. Records of one partition arrive in offset order, and
    a turn's records share a partition, so consumption order is log order for each turn.
    """
    plan = BatchPlan()
    seen_users: turnlog.FirstWins[str, UserTurn] = turnlog.FirstWins()
    seen_tokens: turnlog.FirstWins[tuple[str, int], TokenEvent] = turnlog.FirstWins()
    seen_finishes: turnlog.FirstWins[str, TurnEnd] = turnlog.FirstWins()
    conversations: dict[tuple[str, str], ConversationRow] = {}
    for record in records:
        plan.events += 1
        plan.last_records[(record.topic, record.partition)] = record
        event = decode(record)
        if isinstance(event, TokenEvent):
            if not seen_tokens.offer((event.turn_id, event.seq), event):
                plan.in_batch_duplicates += 1
                continue
            plan.tokens.append(TokenRow(event.turn_id, event.seq, event.text))
        elif isinstance(event, UserTurn):
            if not seen_users.offer(event.turn_id, event):
                plan.in_batch_duplicates += 1
                continue
            plan.user_messages.append(
                UserMessageRow(
                    event.turn_id,
                    event.conversation_id,
                    event.tenant_id,
                    event.text,
                    event.accepted_at,
                )
            )
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
        elif isinstance(event, TurnEnd):
            if not seen_finishes.offer(event.turn_id, event):
                plan.in_batch_duplicates += 1
                continue
            plan.finishes.append(
                FinishRow(
                    event.turn_id,
                    event.conversation_id,
                    event.tenant_id,
                    event.finish_reason,
                    event.last_seq,
                    event.finished_at,
                )
            )
    plan.conversations = list(conversations.values())
    return plan


def encode_page_token(cursor: ConversationCursor) -> str:
    micros = (cursor.updated_at - EPOCH) // timedelta(microseconds=1)
    raw = json.dumps([micros, cursor.conversation_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> ConversationCursor:
    """Parse a token from ``encode_page_token``; anything else is INVALID_ARGUMENT."""
    bad = InvalidArgument(
        "page_token is not a token returned by ListConversations; "
        "send the next_page_token of the previous page, or an empty token for the first page",
        reason="PAGE_TOKEN_INVALID",
        field="page_token",
    )
    if len(token) > 2048:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError):
        raise bad from None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], int)
        or isinstance(value[0], bool)
        or not isinstance(value[1], str)
    ):
        raise bad
    micros, conversation_id = value
    try:
        updated_at = EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise bad from None
    return ConversationCursor(updated_at, conversation_id)


def _require(value: str, name: str) -> None:
    if not value:
        raise InvalidArgument(f"{name} is required", field=name, reason=f"{name.upper()}_MISSING")


def _not_found(conversation_id: str) -> NotFound:
    # The same answer whether the id is unknown or owned by another tenant.
    return NotFound(
        f"conversation {conversation_id[:128]!r} was not found",
        reason="CONVERSATION_NOT_FOUND",
    )


# ---------------------------------------------------------------------------------------------
# The persister


@dataclass(frozen=True, slots=True)
class Stats:
    events_consumed: int
    batches_committed: int
    tokens_written: int
    messages_written: int
    duplicates_ignored: int
    pending_events: int


@dataclass(frozen=True, slots=True)
class Page:
    conversations: list[Conversation]
    next_page_token: str


class Persister(AsyncStartStop):
    """Consumes both logs as group ``persister``, writes batches, serves reads.

    Use ``async with`` or ``start``/``stop``; ``drain`` writes and commits what was consumed
    before it returns, and is what a SIGTERM should run.
    """

    def __init__(
        self,
        *,
        log: EventLog,
        store: Store,
        decode: Decoder,
        partitions: int,
        memory: Rememberer | None = None,
        member_id: str,
        batch_size: int = 500,
        linger_s: float = 0.05,
        barrier_timeout_s: float = 10.0,
        message_page_size: int = 256,
        retry_max_s: float = 5.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self._log = log
        self._store = store
        self._decode = decode
        self._partitions = partitions
        self._memory = memory
        self._member_id = member_id
        self._batch_size = batch_size
        self._linger_s = linger_s
        self._barrier_timeout_s = barrier_timeout_s
        self._message_page_size = message_page_size
        self._retry_max_s = retry_max_s

        self._consumers: dict[str, GroupConsumer] = {}
        self._topic_partitions: dict[str, int] = {}
        self._readers: list[asyncio.Task[None]] = []
        self._batcher: asyncio.Task[None] | None = None
        self._buffer: deque[Record] = deque()
        self._capacity = batch_size * BUFFER_BATCHES
        self._has_data = asyncio.Event()
        self._has_space = asyncio.Event()
        self._has_space.set()
        self._committed = asyncio.Condition()
        self._in_flight = 0
        self._urgent = 0
        self._draining = False
        self._started = False
        # Highest offset known to be fully processed (DB, memory and log commit) per partition,
        # either by this member or, as read from the log, by any member of the group.
        self._durable: dict[tuple[str, int], int] = {}

        self._events_consumed = 0
        self._batches_committed = 0
        self._tokens_written = 0
        self._messages_written = 0
        self._duplicates_ignored = 0
        self._rows_written = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._draining = False
        for topic in TOPICS:
            await self._log.ensure_topic(topic, self._partitions)
            # An existing topic keeps its partition count, whatever the settings say now.
            self._topic_partitions[topic] = await self._log.partition_count(topic)
        for topic in TOPICS:
            self._consumers[topic] = self._log.consumer(topic, GROUP, self._member_id)
            self._readers.append(asyncio.create_task(self._read(topic), name=f"read {topic}"))
        self._batcher = asyncio.create_task(self._run_batches(), name="persister batches")
        self._started = True

    async def drain(self) -> None:
        """Stop consuming, then write and commit everything already consumed."""
        if not self._started or self._draining:
            return
        self._draining = True
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._has_data.set()
        if self._batcher is not None:
            await asyncio.gather(self._batcher, return_exceptions=True)

    async def stop(self) -> None:
        if not self._started:
            return
        self._draining = True
        for task in [*self._readers, *([self._batcher] if self._batcher else [])]:
            task.cancel()
        await asyncio.gather(
            *self._readers, *([self._batcher] if self._batcher else []), return_exceptions=True
        )
        for consumer in self._consumers.values():
            try:
                await consumer.close()
            except Exception:
                log.exception("closing a log consumer failed")
        self._consumers.clear()
        self._readers.clear()
        self._batcher = None
        self._started = False

    # -- consuming and writing ----------------------------------------------------------------

    async def _read(self, topic: str) -> None:
        backoff = self._backoff()
        while True:
            consumer = self._consumers[topic]
            try:
                async for record in consumer:
                    while len(self._buffer) >= self._capacity:
                        self._has_space.clear()
                        await self._has_space.wait()
                    self._buffer.append(record)
                    self._events_consumed += 1
                    metrics.PENDING_EVENTS.set(self.pending_events)
                    self._has_data.set()
                    backoff.reset()
                log.warning("the %s consumer stopped; joining the group again", topic)
            except LogError as error:
                log.warning(
                    "reading %s failed, joining again in %.1fs: %s", topic, backoff.delay, error
                )
            # A consumer is iterated once; rejoin with a fresh one. Records it yielded but we
            # did not commit come back, and the idempotent writes absorb them.
            try:
                await consumer.close()
            except LogError as error:
                log.warning("closing the %s consumer failed: %s", topic, error)
            await backoff.wait()
            self._consumers[topic] = self._log.consumer(topic, GROUP, self._member_id)

    async def _collect(self) -> list[Record]:
        """Wait for records, then gather a batch (size, linger or an urgent barrier ends it)."""
        while not self._buffer:
            if self._draining:
                return []
            self._has_data.clear()
            await self._has_data.wait()
        batch: list[Record] = []
        deadline = time.monotonic() + self._linger_s
        while True:
            while self._buffer and len(batch) < self._batch_size:
                batch.append(self._buffer.popleft())
            # Still pending while it lingers: count it with the buffer.
            self._in_flight = len(batch)
            self._has_space.set()
            if len(batch) >= self._batch_size or self._urgent or self._draining:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._has_data.clear()
            try:
                await asyncio.wait_for(self._has_data.wait(), remaining)
            except TimeoutError:
                pass
        return batch

    async def _run_batches(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:
                return
            try:
                # Unexpected failures (the store and memory paths retry their own): redo the
                # whole batch, which the idempotent writes make safe.
                await retry(
                    functools.partial(self._process, batch),
                    backoff=self._backoff(),
                    on_retry=lambda *_: log.exception("processing a batch failed; retrying it"),
                )
            finally:
                self._in_flight = 0
                metrics.PENDING_EVENTS.set(self.pending_events)

    async def _process(self, batch: list[Record]) -> None:
        plan = assemble(batch, self._decode)
        metrics.BATCH_SIZE.observe(len(batch))
        result = await self._write_with_retry(plan)

        self._batches_committed += 1
        self._tokens_written += result.tokens_inserted
        self._messages_written += result.messages_inserted
        self._rows_written += result.rows_inserted
        duplicates = plan.in_batch_duplicates + plan.row_attempts - (result.rows_inserted)
        self._duplicates_ignored += duplicates
        metrics.ROWS_WRITTEN.labels("tokens").inc(result.tokens_inserted)
        metrics.ROWS_WRITTEN.labels("messages").inc(result.messages_inserted)
        metrics.DUPLICATES_IGNORED.inc(duplicates)

        if self._memory is not None:
            await self._remember(result.finished)
        await self._commit_offsets(plan.last_records)

    async def _write_with_retry(self, plan: BatchPlan) -> BatchResult:
        async def write() -> BatchResult:
            started = time.perf_counter()
            result = await self._store.write_batch(plan)
            metrics.FLUSH_SECONDS.observe(time.perf_counter() - started)
            return result

        def failed(attempt: int, error: Exception, delay: float) -> None:
            metrics.BATCH_FAILURES.inc()
            log.warning(
                "writing a batch of %d events failed, retrying in %.1fs (offsets stay "
                "uncommitted): %r",
                plan.events,
                delay,
                error,
            )

        return await retry(write, backoff=self._backoff(), on_retry=failed)

    async def _remember(self, finished: Sequence[FinishedTurn]) -> None:
        assert self._memory is not None
        memory = self._memory
        # An error turn has no answer worth recalling later.
        turns = [t for t in finished if t.finish_reason != FinishReason.ERROR]
        if not turns:
            return
        limit = asyncio.Semaphore(8)

        async def one(turn: FinishedTurn) -> None:
            async with limit:
                await memory.remember(
                    tenant_id=turn.tenant_id,
                    conversation_id=turn.conversation_id,
                    text=remember_text(turn),
                    request_id=turn.turn_id,
                )

        outcomes = await asyncio.gather(*(one(turn) for turn in turns), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _commit_offsets(self, last_records: dict[tuple[str, int], Record]) -> None:
        for (topic, partition), record in last_records.items():
            try:
                await retry(
                    functools.partial(self._commit, topic, record),
                    backoff=self._backoff(),
                    attempts=5,
                    retry_if=lambda error: isinstance(error, LogError),
                )
            except LogError as error:
                # The rows are stored; the records come back after a restart or a rebalance
                # and change nothing then.
                log.warning("committing %s[%d] failed: %s", topic, partition, error)
                continue
            key = (topic, partition)
            self._durable[key] = max(self._durable.get(key, 0), record.offset + 1)
        async with self._committed:
            self._committed.notify_all()

    async def _commit(self, topic: str, record: Record) -> None:
        # Looked up at each try: a rejoin in ``_read`` may have replaced the consumer.
        await self._consumers[topic].commit(record)

    def _backoff(self) -> Backoff:
        return Backoff(0.1, max_s=self._retry_max_s)

    # -- the flush barrier --------------------------------------------------------------------

    async def _snapshot(self, before: TurnRef | None) -> dict[tuple[str, int], int]:
        """End offsets to wait for; on ``before``'s partition, only the records before it."""
        keys = [
            (topic, partition)
            for topic, count in self._topic_partitions.items()
            for partition in range(count)
        ]
        # Asked all at once: on Kafka each answer is a broker round trip.
        ends = await asyncio.gather(*(self._log.end_offset(*key) for key in keys))
        targets: dict[tuple[str, int], int] = {}
        for (topic, partition), end in zip(keys, ends, strict=True):
            if before is not None and partition == before.partition:
                start = before.request_start if topic == TURN_REQUESTS else before.events_start
                end = min(end, start)
            if end > 0:
                targets[(topic, partition)] = end
        return targets

    async def _reached(self, targets: dict[tuple[str, int], int]) -> bool:
        for key, target in targets.items():
            if self._durable.get(key, 0) >= target:
                continue
            # Another member may own the partition, or commits may predate this process.
            committed = await self._log.committed(key[0], GROUP, key[1])
            if committed > self._durable.get(key, 0):
                self._durable[key] = committed
            if committed < target:
                return False
        return True

    async def barrier(
        self, timeout_s: float | None = None, *, before: TurnRef | None = None
    ) -> int:
        """Wait until every record on the logs now is committed; return rows written meanwhile.

        With ``before``, the turn's own partition needs only the records logged before that
        turn: an agent reading history for the turn it is about to generate must not wait for
        the persister to write the turn's own request (a batch linger on every first token).

        Raises ``Unavailable`` when that takes longer than the timeout (the database or the
        memory service is down, or the persister is far behind).
        """
        if not self._started:
            raise Unavailable("the persister is not running", reason="PERSISTER_NOT_RUNNING")
        timeout = self._barrier_timeout_s if timeout_s is None else timeout_s
        started = time.perf_counter()
        rows_before = self._rows_written
        try:
            targets = await self._snapshot(before)
        except LogError as error:
            raise Unavailable(
                f"the log is unavailable: {error}", reason="LOG_UNAVAILABLE", retry_after_s=1.0
            ) from error
        try:
            if await self._reached(targets):
                return 0
            self._urgent += 1
            self._has_data.set()
            try:
                deadline = time.monotonic() + timeout
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        behind = await self._behind(targets)
                        raise Unavailable(
                            f"the persister did not commit the records on the log within "
                            f"{timeout:g}s ({behind} records behind); PostgreSQL or the memory "
                            "service may be down, see the persister's log",
                            reason="PERSISTER_BEHIND",
                            retry_after_s=1.0,
                        )
                    async with self._committed:
                        try:
                            # Commits by other members are not notified here, so poll too.
                            await asyncio.wait_for(self._committed.wait(), min(remaining, 0.05))
                        except TimeoutError:
                            pass
                    if await self._reached(targets):
                        return self._rows_written - rows_before
                    if self._draining and (self._batcher is None or self._batcher.done()):
                        raise Unavailable(
                            "the persister is shutting down; retry against another instance",
                            reason="PERSISTER_DRAINING",
                            retry_after_s=1.0,
                        )
            finally:
                self._urgent -= 1
        except LogError as error:
            raise Unavailable(
                f"the log is unavailable: {error}", reason="LOG_UNAVAILABLE", retry_after_s=1.0
            ) from error
        finally:
            metrics.BARRIER_SECONDS.observe(time.perf_counter() - started)

    async def _behind(self, targets: dict[tuple[str, int], int]) -> int:
        return sum(max(0, target - self._durable.get(key, 0)) for key, target in targets.items())

    # -- reads --------------------------------------------------------------------------------

    async def get_conversation(
        self,
        tenant_id: str,
        conversation_id: str,
        *,
        consistent: bool = False,
        before: TurnRef | None = None,
    ) -> Conversation:
        """The conversation; ``consistent`` first waits for the log (``before``: see barrier)."""
        _require(tenant_id, "tenant_id")
        _require(conversation_id, "conversation_id")
        if consistent or before is not None:
            await self.barrier(before=before)
        found = await self._store.get_conversation(tenant_id, conversation_id)
        if found is None:
            raise _not_found(conversation_id)
        messages = [m async for m in self._iter_messages(tenant_id, conversation_id)]
        return Conversation(
            found.conversation_id, found.title, found.created_at, found.updated_at, tuple(messages)
        )

    async def list_messages(self, tenant_id: str, conversation_id: str) -> AsyncIterator[Message]:
        """A conversation's messages, oldest first, fetched page by page."""
        _require(tenant_id, "tenant_id")
        _require(conversation_id, "conversation_id")
        if await self._store.get_conversation(tenant_id, conversation_id) is None:
            raise _not_found(conversation_id)
        async for message in self._iter_messages(tenant_id, conversation_id):
            yield message

    async def _iter_messages(self, tenant_id: str, conversation_id: str) -> AsyncIterator[Message]:
        after: MessageCursor | None = None
        while True:
            page = await self._store.list_messages(
                tenant_id, conversation_id, after=after, limit=self._message_page_size
            )
            for message in page:
                yield message
            if len(page) < self._message_page_size:
                return
            last = page[-1]
            after = MessageCursor(last.accepted_at, last.turn_id, int(last.role))

    async def list_conversations(self, tenant_id: str, page_size: int, page_token: str) -> Page:
        _require(tenant_id, "tenant_id")
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(
                f"page_size must be between 0 and {MAX_PAGE_SIZE} (0 means "
                f"{DEFAULT_PAGE_SIZE}); got {page_size}",
                reason="PAGE_SIZE_OUT_OF_RANGE",
                field="page_size",
            )
        limit = page_size or DEFAULT_PAGE_SIZE
        after = decode_page_token(page_token) if page_token else None
        rows = await self._store.list_conversations(tenant_id, after=after, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        token = ""
        if more and rows:
            token = encode_page_token(
                ConversationCursor(rows[-1].updated_at, rows[-1].conversation_id)
            )
        return Page(rows, token)

    # -- stats --------------------------------------------------------------------------------

    @property
    def pending_events(self) -> int:
        return len(self._buffer) + self._in_flight

    def stats(self) -> Stats:
        return Stats(
            events_consumed=self._events_consumed,
            batches_committed=self._batches_committed,
            tokens_written=self._tokens_written,
            messages_written=self._messages_written,
            duplicates_ignored=self._duplicates_ignored,
            pending_events=self.pending_events,
        )


def utc_from_ms(ms: int) -> datetime:
    """Exact (no float rounding), so a replayed record yields the very same timestamp."""
    return EPOCH + timedelta(milliseconds=ms)

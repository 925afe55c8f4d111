"""The persister's write path: consume both logs, write batches, remember, commit offsets.

The write path, per batch:

1. records from both topics are collected until ``batch_size`` or ``linger_s`` (or a flush
   barrier asks for them now);
2. ``assemble`` turns them into rows, first record in log order winning on duplicates;
3. one transaction writes them with ``ON CONFLICT DO NOTHING``, so a replay changes nothing;
4. the same transaction queues finished turns for memory (``outbox.MemoryOutbox`` indexes
   them on its own task); while memory is healthy the batch waits up to ``memory_wait_s`` for
   them, so recall usually sees a turn once its history does, and never waits while it is down;
5. then the log offsets are committed. A crash anywhere before 5 redelivers the records, and
   steps 3 and 4 absorb the replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Iterator

from opentelemetry.trace import SpanKind

from mesh import tracing
from mesh.generation import FinishReason
from mesh.log import (
    PERSISTER_GROUP,
    TURN_EVENTS,
    TURN_REQUESTS,
    EventLog,
    GroupConsumer,
    LogError,
    Record,
)
from mesh.log.base import Headers
from mesh.retry import Backoff, retry
from services.persister import metrics
from services.persister.batch import assemble
from services.persister.model import (
    BatchPlan,
    BatchResult,
    Decoder,
    Event,
    Stats,
    Store,
)
from services.persister.outbox import MemoryOutbox

log = logging.getLogger(__name__)

GROUP = PERSISTER_GROUP
TOPICS = (TURN_REQUESTS, TURN_EVENTS)
# Bounded so a stalled database pushes back on the log instead of growing memory.
BUFFER_BATCHES = 4


class WritePipeline:
    """Consumes both logs as group ``persister`` and writes them batch by batch.

    ``drain`` writes and commits what was consumed before it returns. The flush barrier watches
    progress through ``durable_offset``, ``wait_for_commits`` and ``urgent``.
    """

    def __init__(
        self,
        *,
        log: EventLog,
        store: Store,
        decode: Decoder,
        partitions: int,
        outbox: MemoryOutbox | None,
        member_id: str,
        batch_size: int,
        linger_s: float,
        retry_max_s: float,
        memory_wait_s: float = 5.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self._log = log
        self._store = store
        self._decode = decode
        self._partitions = partitions
        self._outbox = outbox
        self._member_id = member_id
        self._batch_size = batch_size
        self._linger_s = linger_s
        self._retry_max_s = retry_max_s
        self._memory_wait_s = memory_wait_s

        self._consumers: dict[str, GroupConsumer] = {}
        self.topic_partitions: dict[str, int] = {}
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
        self.started = False
        # Highest offset known to be fully processed (DB, memory and log commit) per partition,
        # either by this member or, as read from the log, by any member of the group.
        self._durable: dict[tuple[str, int], int] = {}

        self._events_consumed = 0
        self._batches_committed = 0
        self._tokens_written = 0
        self._messages_written = 0
        self._duplicates_ignored = 0
        self.rows_written = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.started:
            return
        self._draining = False
        for topic in TOPICS:
            await self._log.ensure_topic(topic, self._partitions)
            # An existing topic keeps its partition count, whatever the settings say now.
            self.topic_partitions[topic] = await self._log.partition_count(topic)
        for topic in TOPICS:
            self._consumers[topic] = self._log.consumer(topic, GROUP, self._member_id)
            self._readers.append(asyncio.create_task(self._read(topic), name=f"read {topic}"))
        self._batcher = asyncio.create_task(self._run_batches(), name="persister batches")
        self.started = True

    async def drain(self) -> None:
        """Stop consuming, then write and commit everything already consumed."""
        if not self.started or self._draining:
            return
        self._draining = True
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._has_data.set()
        if self._batcher is not None:
            await asyncio.gather(self._batcher, return_exceptions=True)

    async def stop(self) -> None:
        if not self.started:
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
        self.started = False

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
        began_ns = time.time_ns()
        traced: dict[str, Headers] = {}  # turn id -> its trace context, from record headers

        def decode(record: Record) -> list[Event]:
            events = self._decode(record)
            if record.headers:
                for event in events:
                    traced[event.turn_id] = record.headers
            return events

        plan = assemble(batch, decode)
        metrics.BATCH_SIZE.observe(len(batch))
        result = await self._write_with_retry(plan)

        self._batches_committed += 1
        self._tokens_written += result.tokens_inserted
        self._messages_written += result.messages_inserted
        self.rows_written += result.rows_inserted
        duplicates = (
            plan.in_batch_duplicates
            + plan.zombie_records
            + plan.row_attempts
            - result.rows_inserted
            - result.erased_rows_dropped
        )
        self._duplicates_ignored += duplicates
        metrics.ROWS_WRITTEN.labels("tokens").inc(result.tokens_inserted)
        metrics.ROWS_WRITTEN.labels("messages").inc(result.messages_inserted)
        metrics.DUPLICATES_IGNORED.inc(duplicates)

        if self._outbox is not None:
            # Non-error turns were queued; memory gets a head start, never a veto.
            queued = [t.turn_id for t in result.finished if t.finish_reason != FinishReason.ERROR]
            for turn_id in queued:
                self._outbox.note_trace(turn_id, traced.get(turn_id, ()))
            await self._outbox.wait_indexed(queued, self._memory_wait_s)
        await self._commit_offsets(plan.last_records)
        # A span in the trace of each turn this batch finished: its batch write, memory head
        # start and commit. (Token-only batches are part of no single turn's story.)
        for turn in result.finished:
            if turn.turn_id in traced:
                _batch_span(turn.turn_id, traced[turn.turn_id], began_ns, len(batch))

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
            self.advance_durable((topic, partition), record.offset + 1)
        async with self._committed:
            self._committed.notify_all()

    async def _commit(self, topic: str, record: Record) -> None:
        # Looked up at each try: a rejoin in ``_read`` may have replaced the consumer.
        await self._consumers[topic].commit(record)

    def _backoff(self) -> Backoff:
        return Backoff(0.1, max_s=self._retry_max_s)

    # -- progress, for the flush barrier ----------------------------------------------------

    def durable_offset(self, key: tuple[str, int]) -> int:
        """The offset below which the partition's records are written, remembered, committed."""
        return self._durable.get(key, 0)

    def advance_durable(self, key: tuple[str, int], offset: int) -> None:
        if offset > self._durable.get(key, 0):
            self._durable[key] = offset

    async def wait_for_commits(self, timeout_s: float) -> None:
        """Return after this member's next commit, or after ``timeout_s``."""
        async with self._committed:
            try:
                await asyncio.wait_for(self._committed.wait(), timeout_s)
            except TimeoutError:
                pass

    @contextlib.contextmanager
    def urgent(self) -> Iterator[None]:
        """While the block runs, a batch is written as soon as it has records (no linger)."""
        self._urgent += 1
        self._has_data.set()
        try:
            yield
        finally:
            self._urgent -= 1

    @property
    def stopped_writing(self) -> bool:
        """Draining, and the last batch is done: nothing more will be committed here."""
        return self._draining and (self._batcher is None or self._batcher.done())

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


def _batch_span(turn_id: str, headers: Headers, began_ns: int, records: int) -> None:
    span = tracing.tracer().start_span(
        "persister batch write",
        context=tracing.context_from_headers(headers),
        kind=SpanKind.CONSUMER,
        start_time=began_ns,
        attributes={tracing.TURN_ID: turn_id, "messaging.batch.message_count": records},
    )
    span.end()

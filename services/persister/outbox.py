"""Indexing finished turns into memory, apart from the batches that store them.

A batch's transaction queues each finished turn in the ``memory_outbox`` table; this drains the
table oldest first, one ``Remember`` attempt per turn, and deletes a row once memory has the
turn. When memory is down the batches, history reads and log offsets go on: the rows wait, the
drain backs off, and a circuit breaker stops the write path from waiting for memory at all.

While memory is healthy the write path gives it a head start (``wait_indexed``) before it
commits a batch's offsets, so a turn's recall, which follows its consistent history read,
usually already finds the turn before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable

from opentelemetry.trace import SpanKind

from mesh import tracing
from mesh.breaker import CircuitBreaker
from mesh.lifecycle import AsyncStartStop
from mesh.log.base import Headers
from mesh.retry import Backoff
from services.persister import metrics
from services.persister.model import FinishedTurn, Rememberer, Store

log = logging.getLogger(__name__)

# Turns read from the outbox per round, and Remember calls in flight at once.
DRAIN_BATCH = 64
CONCURRENCY = 8
_TRACES_REMEMBERED = 10_000

# What a drain round did.
_INDEXED, _EMPTY, _FAILED = object(), object(), object()


def remember_text(turn: FinishedTurn) -> str:
    """What memory indexes for a turn: the exchange, as the recalled passage will read."""
    parts = []
    if turn.user_text is not None:
        parts.append(f"user: {turn.user_text}")
    parts.append(f"assistant: {turn.assistant_text}")
    return "\n".join(parts)


class MemoryOutbox(AsyncStartStop):
    """Drains ``memory_outbox`` into memory with its own task.

    Args:
        store: where the outbox rows live.
        memory: memory's ``Remember``, one attempt per call (``MemoryIndexer(attempts=1)``).
        max_backoff_s: longest pause between drain rounds while memory fails, and how often
            memory is probed once the breaker opened.
    """

    def __init__(self, store: Store, memory: Rememberer, *, max_backoff_s: float = 30.0) -> None:
        self._store = store
        self._memory = memory
        self._max_backoff_s = max_backoff_s
        self._breaker = CircuitBreaker(open_s=max_backoff_s)
        self._wake = asyncio.Event()
        self._indexed = asyncio.Condition()
        self._recent: set[str] = set()  # indexed since the last time nobody waited
        self._waiters = 0
        self._task: asyncio.Task[None] | None = None
        # Trace context of turns queued by this process, so their indexing joins their trace.
        self._traces: OrderedDict[str, Headers] = OrderedDict()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="memory outbox")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def healthy(self) -> bool:
        """False while the breaker is open: memory failed its last calls."""
        return not self._breaker.is_open

    def note_trace(self, turn_id: str, headers: Headers) -> None:
        """The trace of a turn just queued (its indexing span becomes part of it)."""
        if headers:
            self._traces[turn_id] = headers
            while len(self._traces) > _TRACES_REMEMBERED:
                self._traces.popitem(last=False)

    def kick(self) -> None:
        """New rows were queued: drain now rather than at the next round."""
        self._wake.set()

    async def wait_indexed(self, turn_ids: Iterable[str], timeout_s: float) -> bool:
        """Wait until memory has every turn in ``turn_ids``, at most ``timeout_s``.

        Returns at once (False) while memory is failing, so an outage never slows the batches.
        """
        wanted = set(turn_ids)
        if not wanted or not self.healthy:
            return not wanted
        self.kick()
        self._waiters += 1
        try:
            async with asyncio.timeout(timeout_s), self._indexed:
                await self._indexed.wait_for(lambda: wanted <= self._recent or not self.healthy)
            return wanted <= self._recent
        except TimeoutError:
            return False
        finally:
            self._waiters -= 1
            if not self._waiters:
                self._recent.clear()

    async def _run(self) -> None:
        backoff = Backoff(0.5, max_s=self._max_backoff_s)
        while True:
            try:
                outcome = await self._drain_once()
            except Exception as error:  # the database; memory errors are handled per turn
                log.warning("reading the memory outbox failed (%s); retrying", error)
                outcome = _FAILED
            if outcome is _INDEXED:
                backoff.reset()
            elif outcome is _EMPTY:
                self._wake.clear()
                await self._wake.wait()
            else:
                await backoff.wait()

    async def _drain_once(self) -> object:
        """One round: index the oldest queued turns. _INDEXED, _EMPTY or _FAILED."""
        if not self._breaker.allow():
            return _FAILED
        turns = await self._store.pending_memory(DRAIN_BATCH)
        if not turns:
            return _EMPTY
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(turn: FinishedTurn) -> str | None:
            async with limit:
                started = time.perf_counter()
                parent = tracing.context_from_headers(self._traces.pop(turn.turn_id, ()))
                try:
                    with tracing.tracer().start_as_current_span(
                        "memory index",
                        context=parent,
                        kind=SpanKind.PRODUCER,
                        attributes={tracing.TURN_ID: turn.turn_id},
                    ):
                        await self._memory.remember(
                            tenant_id=turn.tenant_id,
                            conversation_id=turn.conversation_id,
                            text=remember_text(turn),
                            request_id=turn.turn_id,
                        )
                except Exception as error:
                    log.warning("memory did not take turn %s (%s)", turn.turn_id, error)
                    return None
                metrics.REMEMBER_SECONDS.observe(time.perf_counter() - started)
                return turn.turn_id

        done = [t for t in await asyncio.gather(*(one(t) for t in turns)) if t is not None]
        if done:
            self._breaker.succeeded()
            await self._store.memory_indexed(done)
            self._recent.update(done)
            metrics.OUTBOX_INDEXED.inc(len(done))
        else:
            self._breaker.failed()
        async with self._indexed:
            self._indexed.notify_all()
        return _INDEXED if done else _FAILED

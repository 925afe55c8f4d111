"""The persister: one object that writes the turn log to PostgreSQL and serves history.

Nothing here imports generated protobuf code: log records are decoded by ``codec.decode`` (given
to ``Persister`` as ``decode``), PostgreSQL sits behind the ``Store`` protocol (``store.PgStore``)
and memory indexing behind ``Rememberer`` (``memory_client.MemoryIndexer``).

The parts: ``pipeline`` is the write path (and states its crash semantics), ``barrier`` the
read-your-writes wait, ``reads`` the history queries; ``model`` holds the values they share.
"""

from __future__ import annotations

from mesh.lifecycle import AsyncStartStop
from mesh.log import EventLog
from mesh.turn_ids import TurnRef
from services.persister.barrier import FlushBarrier
from services.persister.model import Decoder, Rememberer, Stats, Store
from services.persister.outbox import MemoryOutbox
from services.persister.pipeline import WritePipeline
from services.persister.reads import HistoryReader


class Persister(HistoryReader, AsyncStartStop):
    """Consumes both logs as group ``persister``, writes batches, serves reads.

    The reads are ``HistoryReader``'s; the writing is a ``WritePipeline`` this object runs.
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
        memory_wait_s: float = 5.0,
    ) -> None:
        self._outbox = (
            MemoryOutbox(store, memory, max_backoff_s=retry_max_s) if memory is not None else None
        )
        self._pipeline = WritePipeline(
            log=log,
            store=store,
            decode=decode,
            partitions=partitions,
            outbox=self._outbox,
            memory_wait_s=memory_wait_s,
            member_id=member_id,
            batch_size=batch_size,
            linger_s=linger_s,
            retry_max_s=retry_max_s,
        )
        barrier = FlushBarrier(log=log, pipeline=self._pipeline, timeout_s=barrier_timeout_s)
        super().__init__(store=store, barrier=barrier, message_page_size=message_page_size)

    async def start(self) -> None:
        if self._outbox is not None:
            await self._outbox.start()
        await self._pipeline.start()

    async def drain(self) -> None:
        """Stop consuming, then write and commit everything already consumed."""
        await self._pipeline.drain()

    async def stop(self) -> None:
        await self._pipeline.stop()
        if self._outbox is not None:
            await self._outbox.stop()

    async def barrier(
        self, timeout_s: float | None = None, *, before: TurnRef | None = None
    ) -> int:
        """Wait until the log's records now are committed (``barrier.FlushBarrier.wait``)."""
        return await self._barrier.wait(timeout_s, before=before)

    @property
    def pending_events(self) -> int:
        return self._pipeline.pending_events

    def stats(self) -> Stats:
        return self._pipeline.stats()

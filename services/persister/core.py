"""The persister: one object that writes the turn log to PostgreSQL and serves history.

Nothing here imports generated protobuf code: log records are decoded by ``codec.decode`` (given
to ``Persister`` as ``decode``), PostgreSQL sits behind the ``Store`` protocol (``store.PgStore``)
and memory indexing behind ``Rememberer`` (``memory_client.MemoryIndexer``).

The parts: ``pipeline`` is the write path (and states its crash semantics), ``barrier`` the
read-your-writes wait, ``reads`` the history queries; ``model`` holds the values they share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

from mesh.errors import InvalidArgument, Unavailable
from mesh.lifecycle import AsyncStartStop
from mesh.log import TURN_REQUESTS, EventLog, LogError
from mesh.turn_ids import TurnRef
from services.persister.barrier import FlushBarrier
from services.persister.model import (
    Decoder,
    Erasure,
    Forgetter,
    Rememberer,
    Stats,
    Store,
)
from services.persister.outbox import MemoryOutbox
from services.persister.pipeline import GROUP, WritePipeline
from services.persister.reads import HistoryReader
from services.persister.turn_lookup import TurnAnswer, TurnLookup

log = logging.getLogger(__name__)


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
        forgetter: Forgetter | None = None,
    ) -> None:
        self._forgetter = forgetter
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
        self._log = log
        self._turns = TurnLookup(store=store, applied=self._applied_requests)
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

    async def delete_conversation(
        self, tenant_id: str, conversation_id: str, *, force: bool = False
    ) -> Erasure:
        """Erase one conversation: its rows (with a tombstone), then its memory.

        Waits for the log first, so every turn already accepted is stored and seen: a turn
        without a stored finish is refused (``FailedPrecondition``, reason TURN_IN_PROGRESS)
        unless ``force``. Deleting again succeeds (``already_deleted``) and asks memory again,
        which finishes an erasure whose memory step failed.
        """
        _require_id(tenant_id, "tenant_id")
        _require_id(conversation_id, "conversation_id")
        return await self._erase(tenant_id, conversation_id, force=force)

    async def erase_tenant(self, tenant_id: str) -> Erasure:
        """Erase all of a tenant's conversations and memory, finished or not."""
        _require_id(tenant_id, "tenant_id")
        return await self._erase(tenant_id, "", force=True)

    async def _erase(self, tenant_id: str, conversation_id: str, *, force: bool) -> Erasure:
        await self._barrier.wait()
        # No Remember of a turn being deleted may land after memory forgot the conversation.
        paused = self._outbox.paused() if self._outbox else contextlib.nullcontext()
        async with paused:
            erasure = await self._store.erase(tenant_id, conversation_id, force=force)
            chunks = 0
            if self._forgetter is not None:
                chunks = await self._forgetter.forget(
                    tenant_id=tenant_id, conversation_id=conversation_id
                )
        counts = dataclasses.replace(erasure.counts, chunks=chunks)
        log.info(
            "erased tenant %s conversation %s: %s",
            tenant_id,
            conversation_id or "(all)",
            counts,
        )
        return dataclasses.replace(erasure, counts=counts)

    async def lookup_turn(self, tenant_id: str, turn_id: str, after_seq: int = 0) -> TurnAnswer:
        """The turn as PostgreSQL has it (``turn_lookup``), for a gateway's resume or cancel."""
        return await self._turns.lookup(tenant_id, turn_id, after_seq)

    async def _applied_requests(self, partition: int) -> int:
        """The request offset below which ``partition`` is stored, by any member of the group."""
        pipeline = self._pipeline
        if partition >= pipeline.topic_partitions.get(TURN_REQUESTS, 0):
            return 0  # not started, or no such partition: nothing is known to be applied
        key = (TURN_REQUESTS, partition)
        try:
            # The group's commit: another member may own the partition.
            pipeline.advance_durable(
                key, await self._log.committed(TURN_REQUESTS, GROUP, partition)
            )
        except LogError as error:
            log.warning("reading the persister's committed offset failed: %s", error)
            raise Unavailable(
                "the log is unavailable; retry shortly",
                reason="LOG_UNAVAILABLE",
                retry_after_s=1.0,
            ) from error
        return pipeline.durable_offset(key)

    @property
    def pending_events(self) -> int:
        return self._pipeline.pending_events

    def stats(self) -> Stats:
        return self._pipeline.stats()


def _require_id(value: str, name: str) -> None:
    if not value:
        raise InvalidArgument(f"{name} is required", field=name, reason=f"{name.upper()}_MISSING")

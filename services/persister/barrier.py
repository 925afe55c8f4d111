"""The flush barrier: wait until what is on the log now is written, remembered and committed.

Read-your-writes for history: an agent about to generate a turn reads the conversation through
the barrier, so every earlier turn on the log is in PostgreSQL when it reads.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mesh.errors import Unavailable
from mesh.log import TURN_REQUESTS, EventLog, LogError
from mesh.turn_ids import TurnRef
from services.persister import metrics
from services.persister.pipeline import GROUP, WritePipeline

log = logging.getLogger(__name__)


class FlushBarrier:
    """Waits on ``pipeline``'s progress, or on the group's commits read from the log."""

    def __init__(self, *, log: EventLog, pipeline: WritePipeline, timeout_s: float) -> None:
        self._log = log
        self._pipeline = pipeline
        self._timeout_s = timeout_s

    async def wait(self, timeout_s: float | None = None, *, before: TurnRef | None = None) -> int:
        """Wait until every record on the logs now is committed; return rows written meanwhile.

        With ``before``, the turn's own partition needs only the records logged before that
        turn: an agent reading history for the turn it is about to generate must not wait for
        the persister to write the turn's own request (a batch linger on every first token).

        Raises ``Unavailable`` when that takes longer than the timeout (the database or the
        memory service is down, or the persister is far behind).
        """
        pipeline = self._pipeline
        if not pipeline.started:
            raise Unavailable("the persister is not running", reason="PERSISTER_NOT_RUNNING")
        timeout = self._timeout_s if timeout_s is None else timeout_s
        started = time.perf_counter()
        rows_before = pipeline.rows_written
        try:
            targets = await self._snapshot(before)
        except LogError as error:
            raise _log_unavailable(error) from error
        try:
            if await self._reached(targets):
                return 0
            with pipeline.urgent():
                deadline = time.monotonic() + timeout
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise Unavailable(
                            f"the persister did not commit the records on the log within "
                            f"{timeout:g}s ({self._behind(targets)} records behind); PostgreSQL "
                            "or the memory service may be down, see the persister's log",
                            reason="PERSISTER_BEHIND",
                            retry_after_s=1.0,
                        )
                    # Commits by other members are not notified here, so poll too.
                    await pipeline.wait_for_commits(min(remaining, 0.05))
                    if await self._reached(targets):
                        return pipeline.rows_written - rows_before
                    if pipeline.stopped_writing:
                        raise Unavailable(
                            "the persister is shutting down; retry against another instance",
                            reason="PERSISTER_DRAINING",
                            retry_after_s=1.0,
                        )
        except LogError as error:
            raise _log_unavailable(error) from error
        finally:
            metrics.BARRIER_SECONDS.observe(time.perf_counter() - started)

    async def _snapshot(self, before: TurnRef | None) -> dict[tuple[str, int], int]:
        """End offsets to wait for; on ``before``'s partition, only the records before it."""
        keys = [
            (topic, partition)
            for topic, count in self._pipeline.topic_partitions.items()
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
        pipeline = self._pipeline
        for key, target in targets.items():
            if pipeline.durable_offset(key) >= target:
                continue
            # Another member may own the partition, or commits may predate this process.
            committed = await self._log.committed(key[0], GROUP, key[1])
            pipeline.advance_durable(key, committed)
            if committed < target:
                return False
        return True

    def _behind(self, targets: dict[tuple[str, int], int]) -> int:
        pipeline = self._pipeline
        return sum(max(0, target - pipeline.durable_offset(key)) for key, target in targets.items())


def _log_unavailable(error: LogError) -> Unavailable:
    # The cause (a path, a broker address) is for the operator's log, not for the caller.
    log.warning("the log is unavailable: %s", error)
    return Unavailable(
        "the log is unavailable; retry shortly", reason="LOG_UNAVAILABLE", retry_after_s=1.0
    )

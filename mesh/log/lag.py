"""Consumer lag as a metric: per group, topic and partition, the records not yet committed.

One process reports for every group (the persister, see services/persister/__main__.py), so the
figure exists even when all the members of a group are down, which is when it matters most: the
"no agent consuming" alert (monitoring/prometheus/mesh-rules.yml) reads the agents' lag.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from mesh import metrics
from mesh.log.base import EventLog, LogError

log = logging.getLogger(__name__)


async def measure_lag(event_log: EventLog, group: str, topic: str) -> dict[int, int]:
    """Per partition of ``topic``: its end offset minus ``group``'s committed offset."""
    lags: dict[int, int] = {}
    for partition in range(await event_log.partition_count(topic)):
        end, committed = await asyncio.gather(
            event_log.end_offset(topic, partition), event_log.committed(topic, group, partition)
        )
        lags[partition] = max(0, end - committed)
    return lags


async def report_lag(
    event_log: EventLog, groups: Sequence[tuple[str, str]], *, interval_s: float
) -> None:
    """Every ``interval_s``, set ``mesh_consumer_lag_records`` for each (group, topic)."""
    while True:
        for group, topic in groups:
            try:
                lags = await measure_lag(event_log, group, topic)
            except LogError as error:  # the log is down: the gauges keep their last values
                log.debug("consumer lag of %s on %s unavailable: %s", group, topic, error)
                continue
            for partition, lag in lags.items():
                metrics.CONSUMER_LAG.labels(group, topic, str(partition)).set(lag)
        await asyncio.sleep(interval_s)

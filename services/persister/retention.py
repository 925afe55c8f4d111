"""The persister's retention task: the embedded log's old records, and old erased-turn ids.

Kafka enforces its own retention (``retention.ms``/``retention.bytes`` on the topics the mesh
creates); the embedded log has nobody else to do it, and the persister is the one process every
embedded mesh runs once. Passes are idempotent, so two persisters on one file do no harm.
"""

from __future__ import annotations

import asyncio
import logging

from mesh.log import EventLog, LogError
from mesh.log.embedded import EmbeddedLog
from services.persister.claims import ClaimStore
from services.persister.store import PgStore

log = logging.getLogger(__name__)


async def retention_pass(
    event_log: EventLog,
    store: PgStore | None,
    *,
    max_age_s: float,
    max_bytes: int,
    claims: ClaimStore | None = None,
) -> int:
    """One pass; returns the log records deleted."""
    deleted = 0
    if isinstance(event_log, EmbeddedLog):
        pruned = await event_log.enforce_retention(max_age_s=max_age_s, max_bytes=max_bytes or None)
        deleted = pruned.records
        if deleted:
            log.info(
                "log retention deleted %d records (%d bytes) older than %.1fh or past %s",
                pruned.records,
                pruned.bytes,
                max_age_s / 3600,
                f"{max_bytes} bytes per partition" if max_bytes else "no size limit",
            )
    if store is not None:
        # Past the retention no record of those turns is left on the log to drop.
        await store.prune_erased_turns(max_age_s)
    if claims is not None:
        # Expired claims no longer decide anything (a start renews them); the rows can go.
        await claims.prune()
    return deleted


async def run_retention(
    event_log: EventLog,
    store: PgStore | None,
    *,
    max_age_s: float,
    max_bytes: int,
    interval_s: float,
    claims: ClaimStore | None = None,
) -> None:
    """``retention_pass`` every ``interval_s`` until cancelled; failures are logged and retried."""
    while True:
        try:
            await retention_pass(
                event_log, store, max_age_s=max_age_s, max_bytes=max_bytes, claims=claims
            )
        except (LogError, OSError) as error:
            log.warning("log retention pass failed (next in %.0fs): %s", interval_s, error)
        except Exception:
            log.exception("log retention pass failed (next in %.0fs)", interval_s)
        await asyncio.sleep(interval_s)

"""``python -m services.persister``: run the persister, configured by the environment."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from contextlib import AsyncExitStack

from mesh.log import AGENTS_GROUP, PERSISTER_GROUP, TURN_EVENTS, TURN_REQUESTS, open_log
from mesh.log.lag import report_lag
from mesh.pg import EmbeddedPostgres
from mesh.readiness import Probe, Readiness
from mesh.server import run_main, serve_until_signalled, start_metrics
from services.persister.claims import ClaimStore
from services.persister.codec import decode
from services.persister.core import Persister
from services.persister.memory_client import MemoryIndexer
from services.persister.retention import run_retention
from services.persister.server import SERVICE_NAME, PersisterDeps, build_server
from services.persister.settings import PersisterSettings
from services.persister.store import PgStore

log = logging.getLogger("services.persister")


def member_id() -> str:
    """Unique per process, readable in the log's group tables."""
    return f"persister-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


async def run(settings: PersisterSettings) -> None:
    dsn = settings.pg_dsn.reveal()
    if not dsn:
        # The embedded server outlives this process on purpose: the memory service shares it.
        log.info(
            "MESH_PG_DSN is empty; using the embedded PostgreSQL in %s", settings.embedded_pg_dir
        )
        dsn = await asyncio.to_thread(EmbeddedPostgres(settings.embedded_pg_dir).start)
    metrics_port = start_metrics(settings.metrics_port, settings.host)
    if metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", settings.host, metrics_port)
    if not settings.memory_addr:
        log.warning("MESH_MEMORY_ADDR is empty: finished turns are not indexed into memory")

    async with AsyncExitStack() as stack:
        event_log = await stack.enter_async_context(open_log(settings.log))
        store = await stack.enter_async_context(PgStore(dsn, pool_size=settings.pg_pool_size))
        claims = ClaimStore(store, ttl_s=settings.claim_ttl_s)
        memory = None
        if settings.memory_addr:
            # One attempt per call: the outbox keeps what memory did not take and retries it.
            memory = await stack.enter_async_context(
                MemoryIndexer(settings.memory_addr, attempts=1, tls=settings.tls)
            )
        persister = await stack.enter_async_context(
            Persister(
                log=event_log,
                store=store,
                decode=decode,
                partitions=settings.log.partitions,
                memory=memory,
                forgetter=memory,
                member_id=member_id(),
                batch_size=settings.batch_size,
                linger_s=settings.linger_ms / 1000,
                barrier_timeout_s=settings.barrier_timeout_s,
            )
        )
        # Lag of both groups, so "no agent consuming" shows even with every agent down.
        lag_groups = [
            (AGENTS_GROUP, TURN_REQUESTS),
            (PERSISTER_GROUP, TURN_REQUESTS),
            (PERSISTER_GROUP, TURN_EVENTS),
        ]
        lag = asyncio.create_task(
            report_lag(event_log, lag_groups, interval_s=settings.lag_interval_s)
        )
        stack.callback(lag.cancel)
        retention = asyncio.create_task(
            run_retention(
                event_log,
                store,
                max_age_s=settings.log.retention_s,
                max_bytes=settings.log.retention_bytes,
                interval_s=settings.log.retention_check_s,
                claims=claims,
            ),
            name="log retention",
        )
        stack.callback(retention.cancel)
        # Ready while PostgreSQL answers and the log takes writes (offset commits); memory is
        # not required: the outbox keeps what it cannot take.
        readiness = await stack.enter_async_context(
            Readiness(
                "persister",
                [
                    Probe("postgres", store.ping),
                    Probe("log", lambda: event_log.check_writable(TURN_EVENTS)),
                ],
                settings.health,
            )
        )
        deps = PersisterDeps(persister=persister, claims=claims)
        server, port = build_server(settings, deps)
        assert deps.health is not None
        log.info("persister listening on %s:%d", settings.host, port)

        async def drain() -> None:
            # Write and commit what was consumed; whatever misses the grace period is
            # redelivered to the next persister and absorbed by the idempotent writes.
            try:
                await asyncio.wait_for(persister.drain(), settings.grace_s)
            except TimeoutError:
                log.warning("drain did not finish within %.1fs", settings.grace_s)

        await serve_until_signalled(
            server,
            deps.health,
            [SERVICE_NAME],
            grace_s=settings.grace_s,
            on_drain=drain,
            readiness=readiness,
        )


def main() -> int:
    # config_errors=(): a bad configuration still ends in a traceback here, as it always has.
    return run_main("persister", PersisterSettings.from_env, run, config_errors=())


if __name__ == "__main__":
    raise SystemExit(main())

"""Persister settings, read once from the environment (``MESH_PERSISTER_*`` plus shared ones)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.log import LogSettings
from mesh.readiness import HealthSettings
from mesh.settings import (
    PostgresSettings,
    ServiceSettings,
    memory_addr_setting,
    port_setting,
    setting,
)


@dataclass(frozen=True, kw_only=True)
class PersisterSettings(ServiceSettings, PostgresSettings):
    """Everything the persister needs; build with ``from_env``.

    Attributes:
        host, metrics_port, grace_s, log_level: see ``mesh.settings.ServiceSettings``.
        port: gRPC port, 0 picks one (``MESH_PERSISTER_PORT``).
        pg_dsn, state_dir: PostgreSQL (see ``mesh.settings.PostgresSettings``); an empty DSN
            starts the embedded server in ``embedded_pg_dir`` (``$MESH_STATE_DIR/postgres``),
            shared with the memory service.
        memory_addr: memory service address (``MESH_MEMORY_ADDR``, default 127.0.0.1:50053);
            empty skips indexing.
        batch_size: most log records per batch (``MESH_PERSISTER_BATCH_SIZE``).
        linger_ms: how long a batch waits for more records (``MESH_PERSISTER_LINGER_MS``).
        barrier_timeout_s: longest wait of Flush and consistent reads before UNAVAILABLE
            (``MESH_PERSISTER_BARRIER_TIMEOUT_S``).
        pg_pool_size: most PostgreSQL connections (``MESH_PERSISTER_PG_POOL_SIZE``).
        lag_interval_s: how often the consumer lag of every group is measured for
            ``mesh_consumer_lag_records`` (``MESH_PERSISTER_LAG_INTERVAL_S``).
        request_id_ttl_s: how long a request-id claim (an idempotent start) holds, so a retry
            on any gateway returns the same turn (``MESH_PERSISTER_REQUEST_ID_TTL_S``); never
            longer than the log's retention.
        log: the log driver (``MESH_LOG_*``).
        health: how PostgreSQL and the log are probed for readiness (``MESH_HEALTH_*``).
    """

    env_prefix = "MESH_PERSISTER_"

    port: int = port_setting(50054)
    memory_addr: str = memory_addr_setting()
    batch_size: int = setting("BATCH_SIZE", 500, minimum=1)
    linger_ms: int = setting("LINGER_MS", 50, minimum=0)
    barrier_timeout_s: float = setting("BARRIER_TIMEOUT_S", 10.0, above=0)
    pg_pool_size: int = setting("PG_POOL_SIZE", 4, minimum=2)
    lag_interval_s: float = setting("LAG_INTERVAL_S", 5.0, above=0)
    request_id_ttl_s: float = setting("REQUEST_ID_TTL_S", 86_400.0, above=0)
    log: LogSettings = field(default_factory=LogSettings)
    health: HealthSettings = field(default_factory=HealthSettings)

    @property
    def claim_ttl_s(self) -> float:
        """How long claims hold: past the log's retention their turns are gone from it."""
        return min(self.request_id_ttl_s, self.log.retention_s)


__all__ = ["PersisterSettings"]

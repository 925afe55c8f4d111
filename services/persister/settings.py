"""Persister settings, read once from the environment (``MESH_PERSISTER_*`` plus shared ones)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mesh.log import LogSettings
from mesh.settings import Env, Secret, SettingsError, default_state_dir


@dataclass(frozen=True)
class PersisterSettings:
    """Everything the persister needs; build with ``from_env``.

    Attributes:
        host: gRPC listen host (``MESH_PERSISTER_HOST``).
        port: gRPC port, 0 picks one (``MESH_PERSISTER_PORT``).
        metrics_port: Prometheus port, 0 picks one, -1 turns it off
            (``MESH_PERSISTER_METRICS_PORT``).
        grace_s: drain time on SIGTERM (``MESH_PERSISTER_GRACE_S``).
        log_level: logging level (``MESH_PERSISTER_LOG_LEVEL``).
        pg_dsn: PostgreSQL DSN (``MESH_PG_DSN``); empty starts the embedded server in
            ``embedded_pg_dir``.
        embedded_pg_dir: data directory of the embedded PostgreSQL
            (``$MESH_STATE_DIR/postgres``), shared with the memory service.
        memory_addr: memory service address (``MESH_MEMORY_ADDR``); empty skips indexing.
        batch_size: most log records per batch (``MESH_PERSISTER_BATCH_SIZE``).
        linger_ms: how long a batch waits for more records (``MESH_PERSISTER_LINGER_MS``).
        barrier_timeout_s: longest wait of Flush and consistent reads before UNAVAILABLE
            (``MESH_PERSISTER_BARRIER_TIMEOUT_S``).
        pg_pool_size: most PostgreSQL connections (``MESH_PERSISTER_PG_POOL_SIZE``).
        log: the log driver (``MESH_LOG_*``).
    """

    host: str = "127.0.0.1"
    port: int = 50054
    metrics_port: int = 0
    grace_s: float = 10.0
    log_level: str = "INFO"
    pg_dsn: Secret = Secret("")
    embedded_pg_dir: Path = field(default_factory=lambda: Path(".state/postgres").absolute())
    memory_addr: str = ""
    batch_size: int = 500
    linger_ms: int = 50
    barrier_timeout_s: float = 10.0
    pg_pool_size: int = 4
    log: LogSettings = field(default_factory=LogSettings)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"MESH_PERSISTER_PORT={self.port} must be a port number")
        if self.grace_s < 0:
            raise SettingsError(f"MESH_PERSISTER_GRACE_S={self.grace_s} must be >= 0")
        if self.barrier_timeout_s <= 0:
            raise SettingsError(
                f"MESH_PERSISTER_BARRIER_TIMEOUT_S={self.barrier_timeout_s} must be > 0"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> PersisterSettings:
        env = Env(environ, "MESH_PERSISTER_")
        shared = Env(environ, "MESH_")
        return cls(
            host=env.str("HOST", "127.0.0.1"),
            port=env.int("PORT", 50054, minimum=0),
            metrics_port=env.int("METRICS_PORT", 0, minimum=-1),
            grace_s=env.float("GRACE_S", 10.0),
            log_level=env.str("LOG_LEVEL", "INFO"),
            pg_dsn=shared.secret("PG_DSN"),
            embedded_pg_dir=default_state_dir(environ) / "postgres",
            memory_addr=shared.str("MEMORY_ADDR", ""),
            batch_size=env.int("BATCH_SIZE", 500, minimum=1),
            linger_ms=env.int("LINGER_MS", 50, minimum=0),
            barrier_timeout_s=env.float("BARRIER_TIMEOUT_S", 10.0),
            pg_pool_size=env.int("PG_POOL_SIZE", 4, minimum=2),
            log=LogSettings.from_env(environ),
        )

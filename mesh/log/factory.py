"""Choosing and opening the log driver from settings."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mesh.log.base import EventLog
from mesh.settings import Env, SettingsError, default_state_dir

DRIVERS = ("embedded", "kafka")


@dataclass(frozen=True)
class LogSettings:
    """Where the log lives. Shared by gateway, agent and persister (``MESH_LOG_*``)."""

    driver: str = "embedded"
    path: Path = field(default_factory=lambda: Path(".state/log/mesh-log.sqlite3").absolute())
    kafka_bootstrap: str = ""
    partitions: int = 4
    # Group liveness: how fast a dead member's partitions move to the others. None picks the
    # driver's default: 3 s embedded, 6 s on Kafka (brokers refuse less unless configured to).
    session_timeout_s: float | None = None
    heartbeat_interval_s: float = 0.5
    # Embedded only: how often a tail checks the file for other processes' appends, where
    # inotify cannot report them (or ``watch_writes`` is off).
    poll_interval_s: float = 0.002
    watch_writes: bool = True

    def __post_init__(self) -> None:
        if self.driver not in DRIVERS:
            raise SettingsError(f"MESH_LOG_DRIVER={self.driver!r} must be one of {DRIVERS}")
        if self.driver == "kafka" and not self.kafka_bootstrap:
            raise SettingsError("MESH_LOG_DRIVER=kafka needs MESH_KAFKA_BOOTSTRAP (host:port,...)")
        if self.partitions < 1:
            raise SettingsError(f"MESH_LOG_PARTITIONS={self.partitions} must be >= 1")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> LogSettings:
        log = Env(environ, "MESH_LOG_")
        default_path = default_state_dir(environ) / "log" / "mesh-log.sqlite3"
        return cls(
            driver=log.str("DRIVER", "embedded").strip().lower(),
            path=log.path("PATH", default_path).absolute(),
            kafka_bootstrap=Env(environ, "MESH_KAFKA_").str("BOOTSTRAP", ""),
            partitions=log.int("PARTITIONS", 4, minimum=1),
            session_timeout_s=_optional_float(log, "SESSION_TIMEOUT_S"),
            heartbeat_interval_s=log.float("HEARTBEAT_INTERVAL_S", 0.5),
            poll_interval_s=log.float("POLL_INTERVAL_S", 0.002),
            watch_writes=log.bool("WATCH_WRITES", True),
        )


def open_log(settings: LogSettings) -> EventLog:
    """Build the configured driver (not started: use ``async with`` or ``start()``)."""
    if settings.driver == "kafka":
        # Imported here so the embedded profile runs without confluent-kafka installed.
        from mesh.log.kafka import KafkaLog

        return KafkaLog(
            settings.kafka_bootstrap,
            session_timeout_s=settings.session_timeout_s or 6.0,
            heartbeat_interval_s=settings.heartbeat_interval_s,
        )
    from mesh.log.embedded import EmbeddedLog

    return EmbeddedLog(
        settings.path,
        poll_interval_s=settings.poll_interval_s,
        watch_writes=settings.watch_writes,
        session_timeout_s=settings.session_timeout_s or 3.0,
        heartbeat_interval_s=settings.heartbeat_interval_s,
    )


def _optional_float(env: Env, name: str) -> float | None:
    value = env.float(name, -1.0)
    return None if value < 0 else value

"""Choosing and opening the log driver from settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mesh.log.base import EventLog
from mesh.settings import Settings, SettingsError, default_state_dir, setting

DRIVERS = ("embedded", "kafka")


@dataclass(frozen=True, kw_only=True)
class LogSettings(Settings):
    """Where the log lives. Shared by gateway, agent and persister (``MESH_LOG_*``)."""

    env_prefix = "MESH_LOG_"

    driver: str = setting("DRIVER", "embedded", choices=DRIVERS)
    path: Path = setting(
        "PATH", derive=lambda env: default_state_dir(env) / "log" / "mesh-log.sqlite3"
    )
    kafka_bootstrap: str = setting("MESH_KAFKA_BOOTSTRAP", "")
    partitions: int = setting("PARTITIONS", 4, minimum=1)
    # Group liveness: how fast a dead member's partitions move to the others. None (unset or
    # negative) picks the driver's default: 3 s embedded, 6 s on Kafka (brokers refuse less
    # unless configured to).
    session_timeout_s: float | None = setting("SESSION_TIMEOUT_S", None)
    heartbeat_interval_s: float = setting("HEARTBEAT_INTERVAL_S", 0.5)
    # Embedded only: how often a tail checks the file for other processes' appends, where
    # inotify cannot report them (or ``watch_writes`` is off).
    poll_interval_s: float = setting("POLL_INTERVAL_S", 0.002)
    watch_writes: bool = setting("WATCH_WRITES", True)

    def check(self) -> None:
        if self.driver == "kafka" and not self.kafka_bootstrap:
            raise SettingsError("MESH_LOG_DRIVER=kafka needs MESH_KAFKA_BOOTSTRAP (host:port,...)")


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

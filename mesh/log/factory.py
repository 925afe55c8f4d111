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
    # Retention: records older than this go (the persister enforces it on the embedded log,
    # only below every group's commit; Kafka topics the mesh creates get it as retention.ms).
    retention_hours: float = setting("RETENTION_HOURS", 168.0, above=0)
    # And past this many bytes per partition the oldest go too; 0: no size limit.
    retention_bytes: int = setting("RETENTION_BYTES", 0, minimum=0)
    # How often the persister enforces retention on the embedded log.
    retention_check_s: float = setting("RETENTION_CHECK_S", 300.0, above=0)

    @property
    def retention_s(self) -> float:
        return self.retention_hours * 3600.0

    def topic_config(self) -> dict[str, str]:
        """The retention config of Kafka topics the mesh creates."""
        return {
            "retention.ms": str(int(self.retention_s * 1000)),
            "retention.bytes": str(self.retention_bytes or -1),
        }

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
            topic_config=settings.topic_config(),
        )
    from mesh.log.embedded import EmbeddedLog

    return EmbeddedLog(
        settings.path,
        poll_interval_s=settings.poll_interval_s,
        watch_writes=settings.watch_writes,
        session_timeout_s=settings.session_timeout_s or 3.0,
        heartbeat_interval_s=settings.heartbeat_interval_s,
    )

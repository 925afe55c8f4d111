"""Choosing and opening the log driver from settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mesh.log.base import EventLog
from mesh.settings import Secret, Settings, SettingsError, default_state_dir, setting

DRIVERS = ("embedded", "kafka")
KAFKA_SECURITY_PROTOCOLS = ("plaintext", "ssl", "sasl_plaintext", "sasl_ssl")
KAFKA_SASL_MECHANISMS = ("plain", "scram-sha-256", "scram-sha-512")


@dataclass(frozen=True, kw_only=True)
class LogSettings(Settings):
    """Where the log lives. Shared by gateway, agent and persister (``MESH_LOG_*``)."""

    env_prefix = "MESH_LOG_"

    driver: str = setting("DRIVER", "embedded", choices=DRIVERS)
    path: Path = setting(
        "PATH", derive=lambda env: default_state_dir(env) / "log" / "mesh-log.sqlite3"
    )
    kafka_bootstrap: str = setting("MESH_KAFKA_BOOTSTRAP", "")
    # How the Kafka clients connect: librdkafka's security.protocol, SASL and the CA bundle the
    # brokers' certificates must chain to (unset: the system's trust store).
    kafka_security_protocol: str = setting(
        "KAFKA_SECURITY_PROTOCOL", "plaintext", choices=KAFKA_SECURITY_PROTOCOLS
    )
    kafka_sasl_mechanism: str = setting(
        "KAFKA_SASL_MECHANISM", "scram-sha-512", choices=KAFKA_SASL_MECHANISMS
    )
    kafka_sasl_username: str = setting("KAFKA_SASL_USERNAME", "")
    kafka_sasl_password: Secret = setting("KAFKA_SASL_PASSWORD", Secret(""))
    kafka_ca: Path | None = setting("KAFKA_CA", None)
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
    # Kafka only: topics the mesh creates roll their active segment after this (segment.ms).
    # Kafka deletes a segment once its newest record is past retention.ms, so on a partition that
    # keeps being written a record goes at most this plus the retention after it was written
    # (Kafka's own default, 7 days, would double a week's retention).
    segment_hours: float = setting("SEGMENT_HOURS", 24.0, above=0)

    @property
    def retention_s(self) -> float:
        return self.retention_hours * 3600.0

    def topic_config(self) -> dict[str, str]:
        """The retention config of Kafka topics the mesh creates (retention, segment roll)."""
        return {
            "retention.ms": str(int(self.retention_s * 1000)),
            "retention.bytes": str(self.retention_bytes or -1),
            "segment.ms": str(max(1, int(self.segment_hours * 3_600_000))),
        }

    def check(self) -> None:
        if self.driver == "kafka" and not self.kafka_bootstrap:
            raise SettingsError("MESH_LOG_DRIVER=kafka needs MESH_KAFKA_BOOTSTRAP (host:port,...)")
        protocol = self.kafka_security_protocol
        protocol_var = type(self).var("kafka_security_protocol")
        credentials = bool(self.kafka_sasl_username or self.kafka_sasl_password.reveal())
        if protocol.startswith("sasl_"):
            if not (self.kafka_sasl_username and self.kafka_sasl_password.reveal()):
                raise SettingsError(
                    f"{protocol_var}={protocol} needs {type(self).var('kafka_sasl_username')} "
                    f"and {type(self).var('kafka_sasl_password')}"
                )
        elif credentials:
            # Credentials a plaintext or TLS-only connection would silently never send.
            raise SettingsError(
                f"SASL credentials are set but {protocol_var}={protocol} does not use them: "
                "set it to sasl_ssl"
            )
        if self.kafka_ca is not None and not protocol.endswith("ssl"):
            raise SettingsError(
                f"{type(self).var('kafka_ca')} is set but {protocol_var}={protocol} has no TLS: "
                "set it to ssl or sasl_ssl"
            )

    def kafka_config(self) -> dict[str, str]:
        """The librdkafka settings of these security settings (empty for plaintext)."""
        protocol = self.kafka_security_protocol
        if protocol == "plaintext":
            return {}
        config = {"security.protocol": protocol.upper()}
        if self.kafka_ca is not None:
            config["ssl.ca.location"] = str(self.kafka_ca)
        if protocol.startswith("sasl_"):
            config["sasl.mechanism"] = self.kafka_sasl_mechanism.upper()
            config["sasl.username"] = self.kafka_sasl_username
            config["sasl.password"] = self.kafka_sasl_password.reveal()
        return config


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
            config=settings.kafka_config(),
        )
    from mesh.log.embedded import EmbeddedLog

    return EmbeddedLog(
        settings.path,
        poll_interval_s=settings.poll_interval_s,
        watch_writes=settings.watch_writes,
        session_timeout_s=settings.session_timeout_s or 3.0,
        heartbeat_interval_s=settings.heartbeat_interval_s,
    )

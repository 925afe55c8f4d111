"""The durable message log (embedded SQLite driver by default, Kafka for scale-out)."""

from mesh.log.base import (
    AGENTS_GROUP,
    PERSISTER_GROUP,
    TURN_EVENTS,
    TURN_REQUESTS,
    Claim,
    EventLog,
    Fenced,
    GroupConsumer,
    LogError,
    Record,
    partition_for,
)
from mesh.log.factory import LogSettings, open_log

__all__ = [
    "AGENTS_GROUP",
    "PERSISTER_GROUP",
    "TURN_EVENTS",
    "TURN_REQUESTS",
    "Claim",
    "EventLog",
    "Fenced",
    "GroupConsumer",
    "LogError",
    "LogSettings",
    "Record",
    "open_log",
    "partition_for",
]

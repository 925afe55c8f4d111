"""Kafka topics the mesh creates carry the log retention settings (a real broker)."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource  # type: ignore[attr-defined]

from mesh.log.factory import LogSettings, open_log

pytestmark = pytest.mark.integration


async def test_created_topics_get_retention_ms_and_bytes(
    kafka_bootstrap: str, kafka_client_env: dict[str, str], kafka_client_config: dict[str, str]
) -> None:
    settings = LogSettings.from_env(
        {
            "MESH_LOG_DRIVER": "kafka",
            "MESH_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "MESH_LOG_RETENTION_HOURS": "2",
            "MESH_LOG_RETENTION_BYTES": "5000000",
            **kafka_client_env,  # the session's broker takes SASL_SSL only
        }
    )
    topic = f"retention-{uuid.uuid4().hex[:8]}"
    async with open_log(settings) as log:
        await log.ensure_topic(topic, 2)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap, **kafka_client_config})
    resource = ConfigResource("topic", topic)
    described = admin.describe_configs([resource])[resource].result(timeout=30)
    assert described["retention.ms"].value == str(2 * 3600 * 1000)
    assert described["retention.bytes"].value == "5000000"

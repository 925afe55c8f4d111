"""Log settings from the environment, and picking the driver."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.log import LogSettings, open_log
from mesh.log.embedded import EmbeddedLog
from mesh.settings import SettingsError


def test_defaults_put_the_embedded_log_under_the_state_dir(tmp_path: Path) -> None:
    settings = LogSettings.from_env({"MESH_STATE_DIR": str(tmp_path)})
    assert settings.driver == "embedded"
    assert settings.path == tmp_path / "log" / "mesh-log.sqlite3"
    assert settings.partitions == 4


def test_environment_overrides() -> None:
    settings = LogSettings.from_env(
        {
            "MESH_LOG_DRIVER": "Kafka",
            "MESH_KAFKA_BOOTSTRAP": "127.0.0.1:1234",
            "MESH_LOG_PARTITIONS": "8",
            "MESH_LOG_PATH": "/tmp/x.sqlite3",
            "MESH_LOG_SESSION_TIMEOUT_S": "10",
        }
    )
    assert settings.driver == "kafka"
    assert settings.kafka_bootstrap == "127.0.0.1:1234"
    assert settings.partitions == 8
    assert settings.path == Path("/tmp/x.sqlite3")
    assert settings.session_timeout_s == 10


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"MESH_LOG_DRIVER": "redis"}, "MESH_LOG_DRIVER"),
        ({"MESH_LOG_DRIVER": "kafka"}, "MESH_KAFKA_BOOTSTRAP"),
        ({"MESH_LOG_PARTITIONS": "0"}, "MESH_LOG_PARTITIONS"),
        ({"MESH_LOG_PARTITIONS": "four"}, "MESH_LOG_PARTITIONS"),
    ],
)
def test_bad_values_name_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        LogSettings.from_env(environ)


def test_open_log_builds_the_embedded_driver_with_its_defaults(tmp_path: Path) -> None:
    log = open_log(LogSettings(path=tmp_path / "l.sqlite3"))
    assert isinstance(log, EmbeddedLog)
    assert log.path == tmp_path / "l.sqlite3"
    assert log.session_timeout_s == 3.0


def test_open_log_builds_the_kafka_driver() -> None:
    from mesh.log.kafka import KafkaLog

    log = open_log(LogSettings(driver="kafka", kafka_bootstrap="127.0.0.1:1"))
    assert isinstance(log, KafkaLog)
    assert log.bootstrap == "127.0.0.1:1"


def test_kafka_tls_and_sasl_settings_become_librdkafka_settings(tmp_path: Path) -> None:
    env = {
        "MESH_LOG_DRIVER": "kafka",
        "MESH_KAFKA_BOOTSTRAP": "k1:9093",
        "MESH_LOG_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "MESH_LOG_KAFKA_SASL_USERNAME": "mesh",
        "MESH_LOG_KAFKA_SASL_PASSWORD": "s3cret",
        "MESH_LOG_KAFKA_CA": str(tmp_path / "ca.pem"),
    }
    settings = LogSettings.from_env(env)
    assert settings.kafka_config() == {
        "security.protocol": "SASL_SSL",
        "ssl.ca.location": str(tmp_path / "ca.pem"),
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "mesh",
        "sasl.password": "s3cret",
    }
    assert "s3cret" not in repr(settings)
    assert LogSettings.from_env(settings.to_env()) == settings
    log = open_log(settings)
    assert log.config["sasl.password"] == "s3cret"  # type: ignore[attr-defined]
    # Plaintext, the default, adds nothing.
    assert LogSettings.from_env({}).kafka_config() == {}
    tls_only = LogSettings.from_env({"MESH_LOG_KAFKA_SECURITY_PROTOCOL": "ssl"})
    assert tls_only.kafka_config() == {"security.protocol": "SSL"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MESH_LOG_KAFKA_SECURITY_PROTOCOL": "sasl_ssl"}, "needs MESH_LOG_KAFKA_SASL_USERNAME"),
        (
            {"MESH_LOG_KAFKA_SASL_USERNAME": "u", "MESH_LOG_KAFKA_SASL_PASSWORD": "p"},
            "does not use them",
        ),
        ({"MESH_LOG_KAFKA_CA": "/ca.pem"}, "has no TLS"),
        ({"MESH_LOG_KAFKA_SECURITY_PROTOCOL": "tls"}, "must be one of"),
    ],
)
def test_inconsistent_kafka_security_settings_are_refused(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        LogSettings.from_env(env)

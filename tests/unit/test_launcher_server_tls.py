"""The launcher's part in the data stores' TLS, without starting them: which certificates it
issues, and where its hourly renewal sends the reissued ones."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest

from mesh.infra.kafka import KafkaServer
from mesh.infra.postgres import PostgresServer
from mesh.launcher import InfraServer, Mesh, MeshConfig, client_env
from mesh.log import LogSettings


class Reloading:
    """Stands in for a running PostgreSQL or Elasticsearch: records ``reload_tls`` calls."""

    def __init__(self) -> None:
        self.reloads = 0

    def start(self) -> str:
        return ""

    def stop(self) -> None:
        pass

    def reload_tls(self) -> bool:
        self.reloads += 1
        return True


def mesh_in(tmp_path: Path, **config: object) -> Mesh:
    paths = {"state_dir": tmp_path, "model_path": tmp_path / "m.gguf", "api_keys_file": tmp_path}
    return Mesh(MeshConfig(**paths, **config))  # type: ignore[arg-type]


def test_renewal_reloads_running_servers_and_warns_about_kafka(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mesh = mesh_in(tmp_path)
    certs = mesh.ensure_certs()
    assert certs is not None
    postgres = Reloading()
    kafka = KafkaServer(tmp_path, tls=mesh._server_tls("kafka"))
    mesh._server_tls("postgres")
    mesh.infra = [InfraServer("postgres", postgres), InfraServer("kafka", kafka)]
    before = certs.cert("postgres").read_bytes()
    with caplog.at_level(logging.WARNING, logger="mesh.launcher"):
        renewed = mesh.renew_certs(within=timedelta(days=10 * 365))  # everything is "due"
    assert {"postgres", "kafka"} <= set(renewed)
    assert certs.cert("postgres").read_bytes() != before
    assert postgres.reloads == 1
    assert "kafka" in caplog.text and "next start" in caplog.text


def test_server_tls_settings_of_started_servers(tmp_path: Path) -> None:
    mesh = mesh_in(tmp_path, mesh_tls=False)  # the CA is made for the servers anyway
    tls = mesh._server_tls("kafka")
    assert tls is not None and tls.ca == tmp_path / "certs" / "ca.pem"
    kafka = KafkaServer(tmp_path, data_dir=tmp_path / "broker", tls=tls)
    settings = LogSettings.from_env(client_env(kafka))
    assert settings.kafka_security_protocol == "sasl_ssl"
    assert settings.kafka_sasl_password.reveal() == kafka.sasl_password().reveal() != ""
    assert settings.kafka_config()["ssl.ca.location"] == str(tls.ca)
    # The password is created once and kept (a restarted broker keeps its SCRAM user).
    assert KafkaServer(tmp_path, data_dir=tmp_path / "broker", tls=tls).sasl_password() == (
        kafka.sasl_password()
    )
    assert client_env(KafkaServer(tmp_path)) == {}
    assert client_env(PostgresServer(tmp_path, tls=tls)) == {}  # the DSN carries it
    assert mesh_in(tmp_path / "plain", server_tls=False)._server_tls("kafka") is None

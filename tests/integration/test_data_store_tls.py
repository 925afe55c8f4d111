"""The data stores as the scale profile starts them: TLS and credentials, nothing else.

The session's Kafka, Elasticsearch and PostgreSQL servers come from ``mesh.infra`` with
certificates from the session's CA (tests/fixtures). Clients with the settings the launcher hands
the services connect over TLS; a client without the CA, with another CA, with a wrong password
or without TLS is refused, and the error says which.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mesh.certs import CertDir
from mesh.errors import FailedPrecondition
from mesh.infra.elasticsearch import ElasticsearchServer
from mesh.infra.kafka import KafkaServer
from mesh.infra.postgres import PostgresServer, redact_dsn
from mesh.infra.process import log_tail
from mesh.launcher import Mesh, MeshStartError, scale_config
from mesh.log import LogError
from mesh.memory.elasticsearch import ElasticsearchMemoryStore
from mesh.settings import default_state_dir
from tests.fixtures.mesh import make_keys
from tests.integration.grpc_helpers import gateway, start_request, stream_turn

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.infra]


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA that issued none of the servers' certificates."""
    certs = CertDir(Path(tmp_path_factory.mktemp("other-ca")) / "certs")
    certs.init()
    return certs.ca_cert


# -- Kafka -----------------------------------------------------------------------------------


async def kafka_start(bootstrap: str, config: dict[str, str]) -> None:
    from mesh.log.kafka import KafkaLog

    async with KafkaLog(bootstrap, config=config, request_timeout_s=5):
        pass


async def test_kafka_takes_sasl_ssl_with_the_settings(
    kafka_bootstrap: str, kafka_client_config: dict[str, str], kafka_server: KafkaServer
) -> None:
    assert kafka_client_config["security.protocol"] == "SASL_SSL"
    assert kafka_client_config["sasl.mechanism"] == "SCRAM-SHA-512"
    await kafka_start(kafka_bootstrap, kafka_client_config)
    # The broker's config holds no plaintext listener.
    properties = (kafka_server.data_dir / "server.properties").read_text()
    assert "PLAINTEXT://" not in properties and "SASL_SSL://127.0.0.1" in properties


async def test_kafka_refuses_a_wrong_password(
    kafka_bootstrap: str, kafka_client_config: dict[str, str]
) -> None:
    with pytest.raises(LogError, match="SASL authentication error.*invalid credentials"):
        await kafka_start(kafka_bootstrap, {**kafka_client_config, "sasl.password": "wrong"})


async def test_kafka_refuses_a_client_that_does_not_trust_its_ca(
    kafka_bootstrap: str, kafka_client_config: dict[str, str], other_ca: Path
) -> None:
    with pytest.raises(LogError, match="SSL handshake failed.*certificate verify failed"):
        await kafka_start(
            kafka_bootstrap, {**kafka_client_config, "ssl.ca.location": str(other_ca)}
        )


async def test_kafka_refuses_plaintext(kafka_bootstrap: str) -> None:
    with pytest.raises(LogError, match="Kafka at"):
        await kafka_start(kafka_bootstrap, {})


# -- Elasticsearch ---------------------------------------------------------------------------


async def es_start(url: str, **client: Any) -> None:
    store = ElasticsearchMemoryStore(
        url, index_prefix="tls-probe", dims=8, request_timeout_s=5, **client
    )
    async with store:
        pass


async def test_elasticsearch_takes_https_and_the_password(
    elasticsearch_url: str, elasticsearch_client: dict[str, Any]
) -> None:
    assert elasticsearch_url.startswith("https://")
    assert elasticsearch_client["username"] == "elastic"
    await es_start(elasticsearch_url, **elasticsearch_client)


async def test_elasticsearch_refuses_a_wrong_password(
    elasticsearch_url: str, elasticsearch_client: dict[str, Any]
) -> None:
    with pytest.raises(FailedPrecondition, match="refused the password of user 'elastic' .401"):
        await es_start(elasticsearch_url, **{**elasticsearch_client, "password": "wrong"})
    with pytest.raises(FailedPrecondition, match="refused requests without credentials"):
        await es_start(elasticsearch_url, ca=elasticsearch_client["ca"])


async def test_elasticsearch_refuses_a_client_that_does_not_trust_its_ca(
    elasticsearch_url: str, elasticsearch_client: dict[str, Any], other_ca: Path
) -> None:
    with pytest.raises(
        FailedPrecondition, match="TLS with Elasticsearch .* failed.*MESH_ES_CA"
    ) as err:
        await es_start(elasticsearch_url, **{**elasticsearch_client, "ca": other_ca})
    assert err.value.reason == "MEMORY_STORE_TLS"
    plain = elasticsearch_url.replace("https://", "http://")
    with pytest.raises(Exception):  # noqa: B017 - the node answers no plaintext at all
        await es_start(plain, username="elastic", password=elasticsearch_client["password"])


# -- PostgreSQL ------------------------------------------------------------------------------


def test_postgres_dsn_verifies_the_server_and_connects_over_tls(
    debian_pg_server: PostgresServer,
) -> None:
    dsn = debian_pg_server.dsn
    assert dsn is not None and debian_pg_server.tls is not None
    assert "sslmode=verify-full" in dsn and f"sslrootcert={debian_pg_server.tls.ca}" in dsn
    assert "***" in redact_dsn(
        dsn
    ) and debian_pg_server.password_file.read_text().strip() not in redact_dsn(dsn)
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert row == (True,)


def test_postgres_refuses_plaintext_another_ca_and_a_wrong_password(
    debian_pg_server: PostgresServer, other_ca: Path
) -> None:
    dsn = debian_pg_server.dsn
    assert dsn is not None and debian_pg_server.tls is not None
    plaintext = re.sub(r"sslmode=[a-z-]+", "sslmode=disable", dsn)
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(plaintext).close()
    untrusted = dsn.replace(str(debian_pg_server.tls.ca), str(other_ca))
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(untrusted).close()
    password = debian_pg_server.password_file.read_text().strip()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(dsn.replace(f":{password}@", ":wrong@")).close()


# -- the launcher's own servers --------------------------------------------------------------


def test_scale_profile_starts_its_servers_with_tls_and_a_turn_goes_through(
    tiny_model_path: Path,
) -> None:
    """No addresses given: the launcher starts PostgreSQL, Kafka and Elasticsearch itself, each
    with TLS and a password, hands the services the settings, and a turn is served, persisted
    and indexed through them."""
    # Under the system temp dir: the servers run as other users when the tests run as root.
    state_dir = Path(tempfile.mkdtemp(prefix="mesh-scale-tls-"))
    state_dir.chmod(0o755)
    keys_file = state_dir / "api-keys.json"
    key, _, _ = make_keys(keys_file)
    config = scale_config(
        state_dir=state_dir,
        model_path=tiny_model_path,
        api_keys_file=keys_file,
        environ={},
        cache_dir=default_state_dir({"MESH_STATE_DIR": str(ROOT / ".state"), **os.environ}),
        gateways=1,
        agents=1,
        agent_threads=1,
        envoy=False,
        extra_env={"MESH_AGENT_DEFAULT_MAX_TOKENS": "8"},
    )
    mesh = Mesh(config)
    try:
        try:
            mesh.start(timeout_s=180)
        except MeshStartError as error:
            pytest.fail(f"the scale profile did not start: {error}")
        assert [entry.name for entry in mesh.infra] == ["postgres", "kafka", "elasticsearch"]
        env = mesh.base_env()
        assert env["MESH_LOG_KAFKA_SECURITY_PROTOCOL"] == "sasl_ssl"
        assert env["MESH_LOG_KAFKA_CA"] == str(state_dir / "certs" / "ca.pem")
        assert env["MESH_ES_URL"].startswith("https://") and env["MESH_ES_USER"] == "elastic"
        assert "sslmode=verify-full" in env["MESH_PG_DSN"]
        # What the launcher records and prints holds no password.
        described = json.dumps(mesh.describe())
        for secret in ("MESH_LOG_KAFKA_SASL_PASSWORD", "MESH_ES_PASSWORD"):
            assert env[secret] and env[secret] not in described
        assert (state_dir / "infra" / "postgres" / "password").read_text().strip() not in described

        with grpc.insecure_channel(mesh.gateway_addr) as channel:
            result = stream_turn(
                gateway(channel), key, start_request("Hello over TLS", max_tokens=6), 120
            )
        assert result.finished is not None and result.tokens, result
        # Persisted through PostgreSQL over TLS (its TCP port takes nothing else).
        deadline = time.monotonic() + 30
        with psycopg.connect(mesh.pg_dsn) as conn:
            while True:
                row = conn.execute(
                    "SELECT count(*) FROM messages WHERE turn_id = %s", (result.turn_id,)
                ).fetchone()
                if row == (2,) or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            persister = mesh.all("persister")[0]
            assert row == (2,), log_tail(persister.log_path)
            encrypted = conn.execute(
                "SELECT bool_and(s.ssl), count(*) FROM pg_stat_ssl s "
                "JOIN pg_stat_activity a USING (pid) WHERE a.client_addr IS NOT NULL"
            ).fetchone()
        assert encrypted is not None and encrypted[0] is True and encrypted[1] >= 2, encrypted
    finally:
        mesh.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


# -- rotation --------------------------------------------------------------------------------


def postgres_certificate(port: int, ca: Path) -> bytes:
    """The DER certificate a PostgreSQL server presents (SSLRequest, then a TLS handshake)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(struct.pack("!ii", 8, 80877103))
        assert sock.recv(1) == b"S"
        context = ssl.create_default_context(cafile=str(ca))
        with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def https_certificate(url: str) -> bytes:
    host, port = url.removeprefix("https://").rsplit(":", 1)
    return ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((host, int(port))))


def der_of(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)


def test_reissued_certificates_reach_postgres_and_elasticsearch_while_they_run(
    server_certs: CertDir,
    debian_pg_server: PostgresServer,
    elasticsearch_server: ElasticsearchServer,
) -> None:
    """What the launcher's hourly renewal does: reissue, then ``reload_tls``. New connections
    get the new certificate; the servers keep running."""
    assert debian_pg_server.port is not None and elasticsearch_server.url is not None
    ca = server_certs.ca_cert
    before = postgres_certificate(debian_pg_server.port, ca)
    assert before == der_of(server_certs.cert("postgres"))
    server_certs.issue("postgres")
    server_certs.issue("elasticsearch")
    assert debian_pg_server.reload_tls() and elasticsearch_server.reload_tls()
    new_pg, new_es = (
        der_of(server_certs.cert("postgres")),
        der_of(server_certs.cert("elasticsearch")),
    )
    assert new_pg != before
    deadline = time.monotonic() + 30  # Elasticsearch looks at its files every 5 s
    while time.monotonic() < deadline:
        served = (
            postgres_certificate(debian_pg_server.port, ca),
            https_certificate(elasticsearch_server.url),
        )
        if served == (new_pg, new_es):
            break
        time.sleep(0.5)
    assert served == (new_pg, new_es)
    assert debian_pg_server.dsn is not None
    with psycopg.connect(debian_pg_server.dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

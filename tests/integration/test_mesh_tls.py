"""Mutual TLS and identity authorization on a real service port, with real certificates.

The memory service runs behind its real gRPC server (``build_server``) with the certificates
``mesh certs`` writes; clients dial it with the certificates of the other identities, of
another CA, expired, or none. Rotation is done on the files while a stream is open. Processes
(``python -m services.*``) show a plaintext public address is refused, and a gateway with edge
TLS serves the ``mesh`` CLI with ``--ca``.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from chat.memory.v1 import memory_pb2, memory_service_pb2_grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mesh.certs import CertDir
from mesh.cli import main as cli_main
from mesh.log.embedded import EmbeddedLog
from mesh.memory.embedding import HashingEmbedder
from mesh.server import channel, set_serving
from mesh.settings import TlsSettings
from mesh.tls import channel_credentials, load_identity
from services.memory.server import SERVICE_NAME, MemoryDeps, build_server
from services.memory.settings import MemorySettings
from services.persister.memory_client import MemoryIndexer
from tests.integration.test_gateway_service import (
    Keys,
    free_port,
    gateway_settings,
    run_gateway,
)
from tests.integration.test_gateway_service import agent_log as agent_log  # noqa: F401 - fixture
from tests.integration.test_gateway_service import keys as keys  # noqa: F401 - fixture
from tests.integration.test_gateway_service import log_path as log_path  # noqa: F401 - fixture
from tests.unit.test_memory_core import FakeStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
IDENTITIES = ("gateway", "agent", "memory", "persister", "operator")
CALL_S = 5.0


@dataclass
class Pki:
    """The project CA with every identity, plus certificates that must not get in."""

    certs: CertDir
    # A CA of its own, with a "persister" certificate: right name, wrong issuer.
    stranger: CertDir
    # Issued by the project CA, but expired an hour ago.
    expired: CertDir

    def tls(self, name: str, certs: CertDir | None = None) -> TlsSettings:
        where = certs or self.certs
        return TlsSettings(ca=where.ca_cert, cert=where.cert(name), key=where.key(name), reload_s=0)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    certs = CertDir(tmp_path / "certs")
    certs.init()
    for name in IDENTITIES:
        certs.issue(name)
    stranger = CertDir(tmp_path / "stranger")
    stranger.init()
    stranger.issue("persister")
    expired = CertDir(tmp_path / "expired")
    expired.path.mkdir()
    shutil.copy(certs.ca_cert, expired.ca_cert)
    shutil.copy(certs.ca_key, expired.ca_key)
    now = datetime.datetime.now(datetime.UTC)
    expired.issue(
        "persister",
        not_before=now - datetime.timedelta(days=2),
        not_after=now - datetime.timedelta(hours=1),
    )
    return Pki(certs, stranger, expired)


@dataclass
class Memory:
    addr: str
    deps: MemoryDeps


@pytest.fixture
async def memory(pki: Pki) -> AsyncIterator[Memory]:
    settings = MemorySettings(port=0, tls=pki.tls("memory"))
    deps = MemoryDeps(store=FakeStore(), embedder=HashingEmbedder())
    server, port = build_server(settings, deps)
    assert deps.health is not None
    await server.start()
    await set_serving(deps.health, [SERVICE_NAME], True)
    try:
        yield Memory(f"127.0.0.1:{port}", deps)
    finally:
        await server.stop(0)


def dial(addr: str, pki: Pki, name: str | None, *, certs: CertDir | None = None) -> aio.Channel:
    """A channel to memory as identity ``name`` (None: TLS without a client certificate)."""
    where = certs or pki.certs
    if name is None:
        credentials = grpc.ssl_channel_credentials(pki.certs.ca_cert.read_bytes())
    else:
        identity = load_identity(pki.certs.ca_cert, where.cert(name), where.key(name))
        credentials = channel_credentials(identity)
    return channel(addr, credentials=credentials, server_name="memory")


def remember(text: str = "the vault code is 4417") -> memory_pb2.RememberRequest:
    return memory_pb2.RememberRequest(
        tenant_id="t", conversation_id="c", text=text, request_id=text
    )


def recall() -> memory_pb2.RecallRequest:
    return memory_pb2.RecallRequest(tenant_id="t", query="vault code", top_k=3)


async def check(ch: aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(ch).Check(
        health_pb2.HealthCheckRequest(), timeout=CALL_S
    )
    return int(reply.status)


# -- who may call what ------------------------------------------------------------------------


async def test_each_identity_calls_only_what_the_table_gives_it(pki: Pki, memory: Memory) -> None:
    async with dial(memory.addr, pki, "persister") as ch:
        stub = memory_service_pb2_grpc.MemoryServiceStub(ch)
        stored = await stub.Remember(remember(), timeout=CALL_S)
        assert stored.chunks_stored == 1
        # The persister writes memory; it has no business reading it.
        with pytest.raises(aio.AioRpcError) as denied:
            await stub.Recall(recall(), timeout=CALL_S)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "spiffe://llm-mesh/persister is not allowed" in (denied.value.details() or "")
    assert "only spiffe://llm-mesh/agent may call it" in (denied.value.details() or "")

    async with dial(memory.addr, pki, "agent") as ch:
        stub = memory_service_pb2_grpc.MemoryServiceStub(ch)
        recalled = await stub.Recall(recall(), timeout=CALL_S)
        assert [chunk.text for chunk in recalled.chunks] == ["the vault code is 4417"]
        with pytest.raises(aio.AioRpcError) as denied:
            await stub.Remember(remember("forged memory"), timeout=CALL_S)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    details = denied.value.details() or ""
    assert "only spiffe://llm-mesh/persister may call it" in details
    assert "mesh certs issue" in details

    for name in ("gateway", "memory", "operator"):
        async with dial(memory.addr, pki, name) as ch:
            stub = memory_service_pb2_grpc.MemoryServiceStub(ch)
            with pytest.raises(aio.AioRpcError) as denied:
                await stub.Remember(remember("forged memory"), timeout=CALL_S)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
    # Nothing the denied calls sent was stored.
    async with dial(memory.addr, pki, "agent") as ch:
        recalled = await memory_service_pb2_grpc.MemoryServiceStub(ch).Recall(
            memory_pb2.RecallRequest(tenant_id="t", query="forged memory", top_k=5),
            timeout=CALL_S,
        )
    assert all("forged" not in chunk.text for chunk in recalled.chunks)


async def test_a_client_streaming_call_is_authorized_too(pki: Pki, memory: Memory) -> None:
    async def upload() -> AsyncIterator[memory_pb2.IngestRequest]:
        yield memory_pb2.IngestRequest(
            header=memory_pb2.DocumentHeader(tenant_id="t", document_id="d", title="T")
        )
        yield memory_pb2.IngestRequest(text="a document")

    async with dial(memory.addr, pki, "agent") as ch:
        with pytest.raises(aio.AioRpcError) as denied:
            await memory_service_pb2_grpc.MemoryServiceStub(ch).Ingest(upload(), timeout=CALL_S)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with dial(memory.addr, pki, "operator") as ch:
        reply = await memory_service_pb2_grpc.MemoryServiceStub(ch).Ingest(upload(), timeout=CALL_S)
    assert reply.chunks_stored >= 1


async def test_health_and_reflection_are_open_to_every_identity(pki: Pki, memory: Memory) -> None:
    for name in IDENTITIES:
        async with dial(memory.addr, pki, name) as ch:
            assert await check(ch) == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)

            async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            replies = [r async for r in stub.ServerReflectionInfo(ask(), timeout=CALL_S)]
            listed = {s.name for s in replies[0].list_services_response.service}
            assert SERVICE_NAME in listed


# -- who may not connect at all ---------------------------------------------------------------


async def refused(ch: aio.Channel) -> grpc.StatusCode:
    with pytest.raises(aio.AioRpcError) as error:
        await check(ch)
    return error.value.code()


async def test_a_client_without_a_certificate_is_refused(pki: Pki, memory: Memory) -> None:
    async with dial(memory.addr, pki, None) as ch:
        assert await refused(ch) == grpc.StatusCode.UNAVAILABLE
    async with aio.insecure_channel(memory.addr) as ch:
        assert await refused(ch) == grpc.StatusCode.UNAVAILABLE


async def test_a_certificate_from_another_ca_is_refused(pki: Pki, memory: Memory) -> None:
    async with dial(memory.addr, pki, "persister", certs=pki.stranger) as ch:
        assert await refused(ch) == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(aio.AioRpcError) as error:
            await memory_service_pb2_grpc.MemoryServiceStub(ch).Remember(remember(), timeout=CALL_S)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_an_expired_certificate_is_refused(pki: Pki, memory: Memory) -> None:
    async with dial(memory.addr, pki, "persister", certs=pki.expired) as ch:
        assert await refused(ch) == grpc.StatusCode.UNAVAILABLE


async def test_the_client_checks_which_service_answers(pki: Pki, memory: Memory) -> None:
    # A persister client dialling memory's address: memory's certificate does not name it.
    identity = load_identity(pki.certs.ca_cert, pki.certs.cert("agent"), pki.certs.key("agent"))
    credentials = channel_credentials(identity)
    async with channel(memory.addr, credentials=credentials, server_name="persister") as ch:
        assert await refused(ch) == grpc.StatusCode.UNAVAILABLE


# -- rotation ---------------------------------------------------------------------------------


def only_first_ca(bundle: Path, to: Path) -> Path:
    """A bundle with only the first (newest) CA certificate of ``bundle``."""
    pem = bundle.read_text()
    end = "-----END CERTIFICATE-----\n"
    to.write_text(pem[: pem.index(end) + len(end)])
    return to


async def test_rotation_keeps_an_open_stream_and_new_connections_get_the_new_certificate(
    pki: Pki, memory: Memory, tmp_path: Path
) -> None:
    old_ca = tmp_path / "old-ca.pem"
    shutil.copy(pki.certs.ca_cert, old_ca)
    watcher = dial(memory.addr, pki, "operator")
    try:
        stream = health_pb2_grpc.HealthStub(watcher).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=60
        )
        first = await asyncio.wait_for(stream.read(), CALL_S)
        assert first.status == health_pb2.HealthCheckResponse.SERVING

        # A new CA, and every certificate reissued under it, while the stream is open.
        pki.certs.rotate(ca=True)
        new_ca_only = only_first_ca(pki.certs.ca_cert, tmp_path / "new-ca.pem")
        new_operator = load_identity(
            new_ca_only, pki.certs.cert("operator"), pki.certs.key("operator")
        )
        # A client that trusts only the new CA: the server must present its new certificate.
        async with channel(
            memory.addr, credentials=channel_credentials(new_operator), server_name="memory"
        ) as fresh:
            assert await check(fresh) == health_pb2.HealthCheckResponse.SERVING
        # One that trusts only the old CA no longer accepts the server.
        old_trust = grpc.ssl_channel_credentials(
            old_ca.read_bytes(),
            pki.certs.key("operator").read_bytes(),
            pki.certs.cert("operator").read_bytes(),
        )
        async with channel(memory.addr, credentials=old_trust, server_name="memory") as stale:
            assert await refused(stale) == grpc.StatusCode.UNAVAILABLE

        # The stream opened before the rotation still delivers.
        assert memory.deps.health is not None
        await set_serving(memory.deps.health, [SERVICE_NAME], False)
        changed = await asyncio.wait_for(stream.read(), CALL_S)
        assert changed.status == health_pb2.HealthCheckResponse.NOT_SERVING
        stream.cancel()
    finally:
        await watcher.close()


async def test_a_client_switches_to_its_rotated_certificate(
    pki: Pki, memory: Memory, tmp_path: Path
) -> None:
    old_persister = (pki.certs.cert("persister").read_bytes(), pki.certs.key("persister"))
    async with MemoryIndexer(memory.addr, attempts=1, tls=pki.tls("persister")) as indexer:
        await indexer.remember(tenant_id="t", conversation_id="c", text="before", request_id="1")
        before = indexer.stub
        pki.certs.rotate(ca=True)
        # The server now trusts only the new CA: a connection with the old certificate fails.
        only_first_ca(pki.certs.ca_cert, pki.certs.ca_cert)
        stale = grpc.ssl_channel_credentials(
            pki.certs.ca_cert.read_bytes(), old_persister[1].read_bytes(), old_persister[0]
        )
        async with channel(memory.addr, credentials=stale, server_name="memory") as ch:
            assert await refused(ch) == grpc.StatusCode.UNAVAILABLE
        # The indexer noticed the files and dials with its new certificate.
        await indexer.remember(tenant_id="t", conversation_id="c", text="after", request_id="2")
        assert indexer.stub is not before


# -- plaintext on a public address -------------------------------------------------------------


def run_service(
    module: str, env: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    environ = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen" / "python")]),
        "MESH_STATE_DIR": str(tmp_path / "state"),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_service_process_refuses_a_public_address_without_tls(tmp_path: Path) -> None:
    result = run_service("services.memory", {"MESH_MEMORY_HOST": "0.0.0.0"}, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "MESH_MEMORY_HOST='0.0.0.0' is not a loopback address" in result.stderr
    assert "MESH_TLS_CA, MESH_TLS_CERT and MESH_TLS_KEY" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_gateway_process_refuses_a_public_address_without_tls(tmp_path: Path, pki: Pki) -> None:
    env = {
        "MESH_GATEWAY_HOST": "0.0.0.0",
        "MESH_GATEWAY_API_KEYS_FILE": str(tmp_path / "keys.json"),
        **pki.certs.env("gateway"),  # a mesh identity does not make the public port TLS
    }
    result = run_service("services.gateway", env, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "MESH_GATEWAY_TLS_CERT and MESH_GATEWAY_TLS_KEY" in result.stderr
    assert "Traceback" not in result.stderr


# -- TLS at the edge ---------------------------------------------------------------------------


@pytest.fixture
def edge(pki: Pki) -> Iterator[CertDir]:
    pki.certs.issue("gateway-edge")
    yield pki.certs


async def test_the_cli_talks_to_a_tls_gateway_with_its_ca(
    edge: CertDir,
    log_path: Path,  # noqa: F811
    keys: Keys,  # noqa: F811
    agent_log: EmbeddedLog,  # noqa: F811
) -> None:
    settings = gateway_settings(
        log_path,
        keys,
        f"127.0.0.1:{free_port()}",
        tls_cert=edge.cert("gateway-edge"),
        tls_key=edge.key("gateway-edge"),
    )
    async with run_gateway(settings, tls_ca=edge.ca_cert) as gateway:

        def cli(*argv: str) -> tuple[int, str]:
            err = io.StringIO()
            code = cli_main(
                ["history", "--gateway", gateway.addr, *argv],
                environ={},
                out=io.StringIO(),
                err=err,
            )
            return code, err.getvalue()

        # Over TLS the gateway answers: a wrong key is refused by the gateway itself...
        code, err = await asyncio.to_thread(cli, "--ca", str(edge.ca_cert), "--api-key", "nope")
        assert code == 1 and "API key" in err, err
        # ...and a good one gets as far as the (absent) conversation store.
        code, err = await asyncio.to_thread(cli, "--ca", str(edge.ca_cert), "--api-key", keys.acme)
        assert code == 1 and "conversation store" in err, err
        # Plaintext gets no answer at all.
        code, err = await asyncio.to_thread(cli, "--api-key", keys.acme)
        assert code == 1 and "API key" not in err and "conversation store" not in err, err

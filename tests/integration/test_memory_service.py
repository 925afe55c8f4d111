"""The memory service as a real process (``python -m services.memory``) on a real PostgreSQL.

Every RPC goes through a grpc.aio channel; every bad input must come back with its status code
and an ErrorInfo reason in ``grpc-status-details-bin``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest
from chat.memory.v1 import memory_pb2, memory_service_pb2_grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from mesh.errors import DOMAIN, Unavailable
from mesh.infra.elasticsearch import ElasticsearchServer
from mesh.launcher import client_env
from mesh.memory.base import StoredChunk
from mesh.memory.chunking import chunk_id
from mesh.memory.embedding import HashingEmbedder
from mesh.memory.postgres import PostgresMemoryStore
from mesh.pg import server_data_dir
from mesh.server import channel
from tests.fixtures.postgres import create_database

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SERVICE = "chat.memory.v1.MemoryService"
START_TIMEOUT_S = 60.0
RPC_TIMEOUT_S = 15.0
_LISTENING = re.compile(r"memory service listening on [\d.]+:(\d+) \(metrics on port (\d+)")


@dataclass
class MemoryProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int
    metrics_port: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_memory_service(dsn: str, log_path: Path, **extra_env: str) -> MemoryProcess:
    """Start the service on free ports and wait for its 'listening' line; fail saying why."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "gen" / "python")]),
        "MESH_PG_DSN": dsn,
        "MESH_MEMORY_HOST": "127.0.0.1",
        "MESH_MEMORY_PORT": "0",
        "MESH_MEMORY_METRICS_PORT": "0",
        "MESH_MEMORY_GRACE_S": "2",
        "MESH_MEMORY_MAX_TEXT_CHARS": "5000",
        "MESH_MEMORY_MAX_DOCUMENT_CHARS": "300000",
        **extra_env,
    }
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.memory"],
        cwd=REPO,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    log_file.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        found = _LISTENING.search(log_path.read_text(errors="replace"))
        if found:
            return MemoryProcess(process, log_path, int(found.group(1)), int(found.group(2)))
        if process.poll() is not None:
            pytest.fail(
                f"memory service exited with {process.returncode} before listening:\n"
                + log_path.read_text(errors="replace")
            )
        time.sleep(0.05)
    process.kill()
    process.wait(timeout=10)
    pytest.fail(
        f"memory service did not listen within {START_TIMEOUT_S:.0f}s:\n"
        + log_path.read_text(errors="replace")
    )


def stop(service: MemoryProcess) -> int:
    if service.process.poll() is None:
        service.process.send_signal(signal.SIGTERM)
        try:
            service.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait(timeout=10)
    return service.process.returncode


@pytest.fixture(scope="module")
def memory_service(
    pg_server_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MemoryProcess]:
    service = start_memory_service(
        create_database(pg_server_dsn, prefix="memory_svc"),
        tmp_path_factory.mktemp("memory") / "service.log",
    )
    yield service
    stop(service)


@pytest.fixture(scope="module")
async def memory_channel(memory_service: MemoryProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with channel(f"127.0.0.1:{memory_service.port}") as chan:
        await asyncio.wait_for(chan.channel_ready(), RPC_TIMEOUT_S)
        yield chan


@pytest.fixture
def stub(memory_channel: grpc.aio.Channel) -> memory_service_pb2_grpc.MemoryServiceStub:
    return memory_service_pb2_grpc.MemoryServiceStub(memory_channel)


def error_reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None, f"no rich status in {error!r}"
    assert status.code == error.code().value[0]
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == DOMAIN
            return str(info.reason)
    raise AssertionError(f"no ErrorInfo among {status.details}")


def header(tenant: str, document: str, title: str = "") -> memory_pb2.IngestRequest:
    return memory_pb2.IngestRequest(
        header=memory_pb2.DocumentHeader(tenant_id=tenant, document_id=document, title=title)
    )


def text(part: str) -> memory_pb2.IngestRequest:
    return memory_pb2.IngestRequest(text=part)


async def upload(
    frames: Sequence[memory_pb2.IngestRequest],
) -> AsyncIterator[memory_pb2.IngestRequest]:
    for frame in frames:
        yield frame


async def test_health_and_reflection(memory_channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(memory_channel)
    for name in ("", SERVICE):
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service=name), timeout=RPC_TIMEOUT_S
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name

    reflection = reflection_pb2_grpc.ServerReflectionStub(memory_channel)

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: set[str] = set()
    async for reply in reflection.ServerReflectionInfo(ask(), timeout=RPC_TIMEOUT_S):
        names.update(s.name for s in reply.list_services_response.service)
    assert SERVICE in names


async def test_remember_recall_ingest_forget(
    stub: memory_service_pb2_grpc.MemoryServiceStub,
) -> None:
    tenant = "tenant-flow"
    facts = [
        ("c1", "t1:user", "My sister's name is Ondine and she lives in Lisbon."),
        ("c1", "t1:assistant", "Noted: your sister Ondine lives in Lisbon."),
        ("c2", "t2:user", "The staging database password rotates every Tuesday."),
    ]
    for conversation, request_id, fact in facts:
        reply = await stub.Remember(
            memory_pb2.RememberRequest(
                tenant_id=tenant, conversation_id=conversation, text=fact, request_id=request_id
            ),
            timeout=RPC_TIMEOUT_S,
        )
        assert reply.chunks_stored == 1
    # A replay (the persister retrying after a crash) stores nothing new.
    replay = await stub.Remember(
        memory_pb2.RememberRequest(
            tenant_id=tenant, conversation_id="c1", text=facts[0][2], request_id="t1:user"
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert replay.chunks_stored == 0

    recalled = await stub.Recall(
        memory_pb2.RecallRequest(tenant_id=tenant, query="Where does Ondine live?", top_k=2),
        timeout=RPC_TIMEOUT_S,
    )
    assert len(recalled.chunks) == 2
    assert {c.text for c in recalled.chunks} == {facts[0][2], facts[1][2]}
    assert recalled.chunks[0].score >= recalled.chunks[1].score > 0
    assert all(c.conversation_id == "c1" and c.chunk_id for c in recalled.chunks)

    scoped = await stub.Recall(
        memory_pb2.RecallRequest(tenant_id=tenant, query="Ondine", conversation_id="c2"),
        timeout=RPC_TIMEOUT_S,
    )
    assert [c.text for c in scoped.chunks] == [facts[2][2]]

    # A document in many frames, big enough for many chunks.
    paragraph = "Section {i}. The warehouse in zone {i} stores pallets of item {i}. "
    body = "".join(paragraph.format(i=i) for i in range(400))
    parts = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    ingested = await stub.Ingest(
        upload([header(tenant, "ops-manual", "Operations manual"), *map(text, parts)]),
        timeout=RPC_TIMEOUT_S,
    )
    assert ingested.document_id == "ops-manual"
    assert ingested.chunks_stored > 10
    hits = await stub.Recall(
        memory_pb2.RecallRequest(tenant_id=tenant, query="warehouse zone 317", top_k=3),
        timeout=RPC_TIMEOUT_S,
    )
    assert hits.chunks[0].document_id == "ops-manual"
    assert "zone 317" in hits.chunks[0].text

    # Ingesting the same id replaces the document.
    replaced = await stub.Ingest(
        upload([header(tenant, "ops-manual"), text("The manual was withdrawn.")]),
        timeout=RPC_TIMEOUT_S,
    )
    assert replaced.chunks_stored == 1
    hits = await stub.Recall(
        memory_pb2.RecallRequest(tenant_id=tenant, query="warehouse zone 317 withdrawn", top_k=100),
        timeout=RPC_TIMEOUT_S,
    )
    assert len(hits.chunks) == 4
    assert "zone 317" not in " ".join(c.text for c in hits.chunks)

    # Another tenant sees none of it.
    other = await stub.Recall(
        memory_pb2.RecallRequest(tenant_id="tenant-other", query="Ondine Lisbon manual"),
        timeout=RPC_TIMEOUT_S,
    )
    assert list(other.chunks) == []

    forgot = await stub.Forget(
        memory_pb2.ForgetRequest(tenant_id=tenant, conversation_id="c1"), timeout=RPC_TIMEOUT_S
    )
    assert forgot.chunks_deleted == 2
    forgot = await stub.Forget(memory_pb2.ForgetRequest(tenant_id=tenant), timeout=RPC_TIMEOUT_S)
    assert forgot.chunks_deleted == 2
    empty = await stub.Recall(
        memory_pb2.RecallRequest(tenant_id=tenant, query="Ondine"), timeout=RPC_TIMEOUT_S
    )
    assert list(empty.chunks) == []


_OK_REMEMBER = {"tenant_id": "t", "conversation_id": "c", "text": "hello", "request_id": "r"}

UNARY_CASES: list[tuple[str, str, Message, str]] = [
    (
        "remember-no-tenant",
        "Remember",
        memory_pb2.RememberRequest(**{**_OK_REMEMBER, "tenant_id": ""}),
        "TENANT_REQUIRED",
    ),
    (
        "remember-no-conversation",
        "Remember",
        memory_pb2.RememberRequest(**{**_OK_REMEMBER, "conversation_id": ""}),
        "CONVERSATION_REQUIRED",
    ),
    (
        "remember-empty-text",
        "Remember",
        memory_pb2.RememberRequest(**{**_OK_REMEMBER, "text": "   "}),
        "TEXT_REQUIRED",
    ),
    (
        "remember-oversized-text",
        "Remember",
        memory_pb2.RememberRequest(**{**_OK_REMEMBER, "text": "word " * 1001}),
        "TEXT_TOO_LARGE",
    ),
    ("recall-no-tenant", "Recall", memory_pb2.RecallRequest(query="q"), "TENANT_REQUIRED"),
    ("recall-empty-query", "Recall", memory_pb2.RecallRequest(tenant_id="t"), "QUERY_REQUIRED"),
    (
        "recall-top-k-negative",
        "Recall",
        memory_pb2.RecallRequest(tenant_id="t", query="q", top_k=-1),
        "TOP_K_OUT_OF_RANGE",
    ),
    (
        "recall-top-k-too-big",
        "Recall",
        memory_pb2.RecallRequest(tenant_id="t", query="q", top_k=101),
        "TOP_K_OUT_OF_RANGE",
    ),
    ("forget-no-tenant", "Forget", memory_pb2.ForgetRequest(), "TENANT_REQUIRED"),
]


@pytest.mark.parametrize(
    ("method", "request_message", "reason"),
    [pytest.param(m, r, reason, id=case) for case, m, r, reason in UNARY_CASES],
)
async def test_bad_unary_input_is_invalid_argument_with_reason(
    stub: memory_service_pb2_grpc.MemoryServiceStub,
    method: str,
    request_message: Message,
    reason: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub, method)(request_message, timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == reason
    assert caught.value.details()


INGEST_CASES: list[tuple[str, list[memory_pb2.IngestRequest], str, str]] = [
    ("text-before-header", [text("hi"), header("t", "d")], "INGEST_HEADER_REQUIRED", "first frame"),
    ("no-frames", [], "INGEST_HEADER_REQUIRED", "without a header"),
    (
        "header-twice",
        [header("t", "d"), text("hi"), header("t", "d")],
        "INGEST_HEADER_REPEATED",
        "twice",
    ),
    (
        "empty-frame",
        [header("t", "d"), memory_pb2.IngestRequest()],
        "INGEST_FRAME_EMPTY",
        "neither",
    ),
    ("no-tenant", [header("", "d"), text("hi")], "TENANT_REQUIRED", "tenant_id"),
    ("no-document-id", [header("t", ""), text("hi")], "DOCUMENT_ID_REQUIRED", "document_id"),
    ("empty-document", [header("t", "d")], "DOCUMENT_EMPTY", "no text"),
    ("blank-document", [header("t", "d"), text(" \n ")], "DOCUMENT_EMPTY", "no text"),
    (
        "oversized-document",
        [header("t", "d"), *[text("x" * 100_000) for _ in range(4)]],
        "DOCUMENT_TOO_LARGE",
        "exceeds",
    ),
]


@pytest.mark.parametrize(
    ("frames", "reason", "message_part"),
    [pytest.param(f, r, m, id=case) for case, f, r, m in INGEST_CASES],
)
async def test_bad_ingest_stream_is_invalid_argument_with_reason(
    stub: memory_service_pb2_grpc.MemoryServiceStub,
    frames: list[memory_pb2.IngestRequest],
    reason: str,
    message_part: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Ingest(upload(frames), timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == reason
    assert message_part in (caught.value.details() or "")


async def test_metrics_count_rpcs_by_code(
    stub: memory_service_pb2_grpc.MemoryServiceStub, memory_service: MemoryProcess
) -> None:
    await stub.Recall(memory_pb2.RecallRequest(tenant_id="m", query="q"), timeout=RPC_TIMEOUT_S)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Recall(memory_pb2.RecallRequest(tenant_id="m"), timeout=RPC_TIMEOUT_S)

    def scrape() -> str:
        url = f"http://127.0.0.1:{memory_service.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=RPC_TIMEOUT_S) as response:
            return str(response.read().decode())

    page = await asyncio.to_thread(scrape)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    recall = {"service": "memory", "method": "Recall"}
    assert value("mesh_rpcs_handled_total", code="OK", **recall) >= 1
    assert value("mesh_rpc_errors_total", code="INVALID_ARGUMENT", **recall) >= 1
    assert value("mesh_memory_recall_seconds_count") >= 1
    # Tenant ids never become metric labels.
    assert "tenant-flow" not in page and 'tenant_id="' not in page


def test_sigterm_drains_and_exits_cleanly(pg_server_dsn: str, tmp_path: Path) -> None:
    service = start_memory_service(
        create_database(pg_server_dsn, prefix="memory_drain"), tmp_path / "drain.log"
    )
    assert stop(service) == 0, service.log()
    assert "draining" in service.log()
    assert "memory service stopped" in service.log()


def test_bad_configuration_exits_with_a_clear_message(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "gen" / "python")]),
        "MESH_MEMORY_BACKEND": "redis",
    }
    result = subprocess.run(
        [sys.executable, "-m", "services.memory"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "MESH_MEMORY_BACKEND" in result.stderr


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A fresh state directory; afterwards, its embedded PostgreSQL is stopped and removed."""
    path = Path(tempfile.mkdtemp(prefix="mesh-memory-state-"))
    yield path
    data_dir = server_data_dir(path / "postgres")
    pid_file = data_dir / "postmaster.pid"
    if pid_file.exists():  # the service did not stop it: do it, so nothing outlives the test
        pid = int(pid_file.read_text().split()[0])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and pid_file.exists():
            time.sleep(0.1)
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)


async def test_without_a_dsn_it_runs_on_embedded_postgres(state_dir: Path) -> None:
    service = start_memory_service("", state_dir / "service.log", MESH_STATE_DIR=str(state_dir))
    try:
        async with channel(f"127.0.0.1:{service.port}") as chan:
            stub = memory_service_pb2_grpc.MemoryServiceStub(chan)
            stored = await stub.Remember(
                memory_pb2.RememberRequest(
                    tenant_id="t", conversation_id="c", text="embedded works", request_id="r"
                ),
                timeout=RPC_TIMEOUT_S,
            )
            assert stored.chunks_stored == 1
            hits = await stub.Recall(
                memory_pb2.RecallRequest(tenant_id="t", query="embedded"), timeout=RPC_TIMEOUT_S
            )
            assert [c.text for c in hits.chunks] == ["embedded works"]
    finally:
        assert stop(service) == 0, service.log()
    data_dir = server_data_dir(state_dir / "postgres")
    assert (data_dir / "PG_VERSION").exists()
    # The service was the server's only user, so stopping the service stopped the server.
    assert not (data_dir / "postmaster.pid").exists(), service.log()


@pytest.mark.infra
async def test_service_on_the_elasticsearch_backend(
    elasticsearch_server: ElasticsearchServer, tmp_path: Path
) -> None:
    assert elasticsearch_server.url is not None
    service = start_memory_service(
        "",
        tmp_path / "service-es.log",
        MESH_MEMORY_BACKEND="elasticsearch",
        MESH_ES_URL=elasticsearch_server.url,
        MESH_MEMORY_ES_INDEX_PREFIX=f"svc-{uuid.uuid4().hex[:12]}",
        # HTTPS and the elastic user's password, as in the scale profile.
        **client_env(elasticsearch_server),
    )
    try:
        async with channel(f"127.0.0.1:{service.port}") as chan:
            stub = memory_service_pb2_grpc.MemoryServiceStub(chan)
            for i, fact in enumerate(["The vault combination is 31-7-22.", "Lunch is at noon."]):
                stored = await stub.Remember(
                    memory_pb2.RememberRequest(
                        tenant_id="t", conversation_id="c", text=fact, request_id=f"r{i}"
                    ),
                    timeout=RPC_TIMEOUT_S,
                )
                assert stored.chunks_stored == 1
            hits = await stub.Recall(
                memory_pb2.RecallRequest(tenant_id="t", query="vault combination", top_k=1),
                timeout=RPC_TIMEOUT_S,
            )
            assert [c.text for c in hits.chunks] == ["The vault combination is 31-7-22."]
            other = await stub.Recall(
                memory_pb2.RecallRequest(tenant_id="u", query="vault"), timeout=RPC_TIMEOUT_S
            )
            assert list(other.chunks) == []
            forgot = await stub.Forget(
                memory_pb2.ForgetRequest(tenant_id="t"), timeout=RPC_TIMEOUT_S
            )
            assert forgot.chunks_deleted == 2
    finally:
        assert stop(service) == 0, service.log()


# -- PostgreSQL store specifics (the conformance suite covers the shared behaviour) ----------


async def test_postgres_store_leaves_very_common_words_to_the_vector_half(pg_dsn: str) -> None:
    embedder = HashingEmbedder(64)
    filler = [f"Weekly meeting notes number {i} about topic {i % 7}." for i in range(300)]
    fact = "At the meeting we agreed the zirconium supplier is Halvorsen."
    chunks = [
        StoredChunk(
            chunk_id("t", f"s{i}", 0), "t", text, embedder.embed_one(text), "c", "", f"s{i}"
        )
        for i, text in enumerate([*filler, fact])
    ]
    async with PostgresMemoryStore(pg_dsn, dims=64) as store:
        await store.upsert(chunks)
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute("ANALYZE memory_chunks")
    async with PostgresMemoryStore(pg_dsn, dims=64) as store:
        query = "meeting notes about the zirconium supplier"
        hits = await store.search("t", query, embedder.embed_one(query), 5)
        assert "meet" in store._common_terms and "note" in store._common_terms
        assert "zirconium" not in store._common_terms
        assert hits[0].text == fact
        # Only common words: the vector half still answers.
        hits = await store.search("t", "meeting notes", embedder.embed_one("meeting notes"), 5)
        assert len(hits) == 5
    async with PostgresMemoryStore(pg_dsn, dims=64, common_term_fraction=1.0) as store:
        await store.search("t", "meeting", embedder.embed_one("meeting"), 5)
        assert store._common_terms == []


async def test_postgres_store_refuses_a_table_of_another_dimension(pg_dsn: str) -> None:
    async with PostgresMemoryStore(pg_dsn, dims=64):
        pass
    with pytest.raises(RuntimeError, match=r"vector\(64\).*vector\(128\)"):
        async with PostgresMemoryStore(pg_dsn, dims=128):
            pass


async def test_postgres_stores_starting_together_create_the_schema_once(pg_dsn: str) -> None:
    stores = [PostgresMemoryStore(pg_dsn, dims=64) for _ in range(4)]
    await asyncio.gather(*(store.start() for store in stores))
    await asyncio.gather(*(store.stop() for store in stores))


async def test_postgres_store_reports_an_unreachable_database_as_unavailable(
    tmp_path: Path,
) -> None:
    store = PostgresMemoryStore(
        f"postgresql://postgres@/postgres?host={tmp_path}", connect_timeout_s=1
    )
    with pytest.raises(Unavailable) as caught:
        await store.start()
    assert caught.value.reason == "MEMORY_STORE_UNAVAILABLE"

"""The servicer in-process over a real channel: proto mapping and rich error statuses."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from chat.memory.v1 import memory_pb2, memory_service_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mesh.errors import DOMAIN
from mesh.memory.chunking import ChunkingConfig
from mesh.memory.embedding import HashingEmbedder
from mesh.server import channel
from services.memory.server import MemoryDeps, build_server
from services.memory.settings import MemorySettings
from tests.unit.test_memory_core import FakeStore


@pytest.fixture
async def stub() -> AsyncIterator[memory_service_pb2_grpc.MemoryServiceStub]:
    settings = MemorySettings(port=0, chunking=ChunkingConfig(max_words=8, overlap_words=2))
    server, port = build_server(settings, MemoryDeps(store=FakeStore(), embedder=HashingEmbedder()))
    await server.start()
    async with channel(f"127.0.0.1:{port}") as chan:
        yield memory_service_pb2_grpc.MemoryServiceStub(chan)
    await server.stop(None)


def reason_of(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None, "no grpc-status-details-bin in the trailers"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == DOMAIN
            return str(info.reason)
    raise AssertionError(f"no ErrorInfo in {status}")


async def test_every_rpc_maps_proto_to_core_and_back(
    stub: memory_service_pb2_grpc.MemoryServiceStub,
) -> None:
    remembered = await stub.Remember(
        memory_pb2.RememberRequest(
            tenant_id="t", conversation_id="c", text="the lab code is 4417", request_id="r"
        ),
        timeout=10,
    )
    assert remembered.chunks_stored == 1

    async def upload() -> AsyncIterator[memory_pb2.IngestRequest]:
        yield memory_pb2.IngestRequest(
            header=memory_pb2.DocumentHeader(tenant_id="t", document_id="d", title="T")
        )
        yield memory_pb2.IngestRequest(text="document text about code")

    ingested = await stub.Ingest(upload(), timeout=10)
    assert (ingested.document_id, ingested.chunks_stored) == ("d", 1)

    recalled = await stub.Recall(memory_pb2.RecallRequest(tenant_id="t", query="code"), timeout=10)
    by_text = {chunk.text: chunk for chunk in recalled.chunks}
    assert set(by_text) == {"the lab code is 4417", "T document text about code"}
    assert by_text["the lab code is 4417"].conversation_id == "c"
    assert by_text["T document text about code"].document_id == "d"
    assert all(chunk.chunk_id and chunk.score > 0 for chunk in recalled.chunks)

    forgot = await stub.Forget(memory_pb2.ForgetRequest(tenant_id="t"), timeout=10)
    assert forgot.chunks_deleted == 2


async def test_errors_carry_code_and_reason(
    stub: memory_service_pb2_grpc.MemoryServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Recall(memory_pb2.RecallRequest(tenant_id="t", query="q", top_k=500), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(caught.value) == "TOP_K_OUT_OF_RANGE"

    async def text_first() -> AsyncIterator[memory_pb2.IngestRequest]:
        yield memory_pb2.IngestRequest(text="no header yet")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Ingest(text_first(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(caught.value) == "INGEST_HEADER_REQUIRED"
    assert "first frame must be the header" in (caught.value.details() or "")

"""The memory service's gRPC face: proto <-> core dataclasses, server assembly and ``main``."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from chat.memory.v1 import memory_pb2, memory_service_pb2, memory_service_pb2_grpc
from grpc import aio

from mesh.memory.base import MemoryStore
from mesh.memory.embedding import Embedder, HashingEmbedder
from mesh.memory.factory import open_store
from mesh.readiness import Probe, Readiness
from mesh.server import (
    ServiceDeps,
    build_service_server,
    run_main,
    serve_until_signalled,
    start_metrics,
)
from services.memory.core import (
    DocumentHeader,
    EmptyFrame,
    IngestFrame,
    MemoryCore,
    TextPart,
)
from services.memory.settings import MemorySettings

log = logging.getLogger("services.memory")

SERVICE_NAME: str = memory_service_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name
# Label of this service in the shared RPC metrics.
METRICS_SERVICE = "memory"

_Context = aio.ServicerContext[Any, Any]


@dataclass
class MemoryDeps(ServiceDeps):
    """What the service needs from outside: a started store and an embedder of its dimension."""

    store: MemoryStore
    embedder: Embedder


def _frame(request: memory_pb2.IngestRequest) -> IngestFrame:
    kind = request.WhichOneof("frame")
    if kind == "header":
        return DocumentHeader(
            tenant_id=request.header.tenant_id,
            document_id=request.header.document_id,
            title=request.header.title,
        )
    if kind == "text":
        return TextPart(request.text)
    return EmptyFrame()


class MemoryServicer(memory_service_pb2_grpc.MemoryServiceServicer):
    """Converts between proto messages and ``MemoryCore`` calls; holds no logic of its own."""

    def __init__(self, core: MemoryCore) -> None:
        self._core = core

    async def Remember(
        self, request: memory_pb2.RememberRequest, context: _Context
    ) -> memory_pb2.RememberResponse:
        stored = await self._core.remember(
            tenant_id=request.tenant_id,
            conversation_id=request.conversation_id,
            text=request.text,
            request_id=request.request_id,
        )
        return memory_pb2.RememberResponse(chunks_stored=stored)

    async def Recall(
        self, request: memory_pb2.RecallRequest, context: _Context
    ) -> memory_pb2.RecallResponse:
        hits = await self._core.recall(
            tenant_id=request.tenant_id,
            query=request.query,
            top_k=request.top_k,
            conversation_id=request.conversation_id,
        )
        return memory_pb2.RecallResponse(
            chunks=[
                memory_pb2.Chunk(
                    chunk_id=hit.chunk_id,
                    text=hit.text,
                    score=hit.score,
                    conversation_id=hit.conversation_id,
                    document_id=hit.document_id,
                )
                for hit in hits
            ]
        )

    async def Ingest(
        self, request_iterator: AsyncIterator[memory_pb2.IngestRequest], context: _Context
    ) -> memory_pb2.IngestResponse:
        async def frames() -> AsyncIterator[IngestFrame]:
            async for request in request_iterator:
                yield _frame(request)

        result = await self._core.ingest(frames())
        return memory_pb2.IngestResponse(
            document_id=result.document_id, chunks_stored=result.chunks_stored
        )

    async def Forget(
        self, request: memory_pb2.ForgetRequest, context: _Context
    ) -> memory_pb2.ForgetResponse:
        deleted = await self._core.forget(
            tenant_id=request.tenant_id, conversation_id=request.conversation_id
        )
        return memory_pb2.ForgetResponse(chunks_deleted=deleted)


def build_server(settings: MemorySettings, deps: MemoryDeps) -> tuple[aio.Server, int]:
    """The memory gRPC server, bound but not started, and its port."""
    core = MemoryCore(
        store=deps.store,
        embedder=deps.embedder,
        chunking=settings.chunking,
        limits=settings.limits,
    )
    server, port, deps.health = build_service_server(
        METRICS_SERVICE,
        SERVICE_NAME,
        memory_service_pb2_grpc.add_MemoryServiceServicer_to_server,
        MemoryServicer(core),
        host=settings.host,
        port=settings.port,
        tls=settings.tls,
    )
    return server, port


async def serve(settings: MemorySettings) -> None:
    """Open the store, serve until SIGTERM/SIGINT, drain, close the store."""
    embedder = HashingEmbedder(settings.store.dims)
    async with open_store(settings.store) as store:
        deps = MemoryDeps(store=store, embedder=embedder)
        server, port = build_server(settings, deps)
        assert deps.health is not None
        metrics_port = start_metrics(settings.metrics_port, settings.host)
        # Tests and supervisors read this line to find the ports when they asked for port 0.
        log.info(
            "memory service listening on %s:%d (metrics on port %s, backend %s)",
            settings.host,
            port,
            metrics_port,
            settings.store.backend,
        )
        # Ready while its store (PostgreSQL or Elasticsearch) answers.
        async with Readiness("memory", [Probe("store", store.ping)], settings.health) as ready:
            await serve_until_signalled(
                server, deps.health, [SERVICE_NAME], grace_s=settings.grace_s, readiness=ready
            )
    log.info("memory service stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m services.memory``; configuration comes from the environment."""
    del argv  # no flags: the environment is the single source of configuration
    return run_main("memory", lambda: MemorySettings.from_env(os.environ), serve)


__all__ = [
    "SERVICE_NAME",
    "MemoryDeps",
    "MemoryServicer",
    "build_server",
    "main",
    "serve",
]

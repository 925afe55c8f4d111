"""The memory service's gRPC face: proto <-> core dataclasses, server assembly and ``main``."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from chat.memory.v1 import memory_pb2, memory_service_pb2, memory_service_pb2_grpc
from grpc import aio
from grpc_health.v1 import health

from mesh.memory.base import MemoryStore
from mesh.memory.embedding import Embedder, HashingEmbedder
from mesh.memory.factory import open_store
from mesh.metrics import start_metrics_server
from mesh.server import (
    add_health_and_reflection,
    bind,
    configure_logging,
    new_server,
    serve_until_signalled,
)
from mesh.settings import SettingsError
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


@dataclass(frozen=True)
class MemoryDeps:
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

    async def Remember(  # noqa: N802 - gRPC method names are PascalCase
        self, request: memory_pb2.RememberRequest, context: _Context
    ) -> memory_pb2.RememberResponse:
        stored = await self._core.remember(
            tenant_id=request.tenant_id,
            conversation_id=request.conversation_id,
            text=request.text,
            request_id=request.request_id,
        )
        return memory_pb2.RememberResponse(chunks_stored=stored)

    async def Recall(  # noqa: N802
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

    async def Ingest(  # noqa: N802
        self, request_iterator: AsyncIterator[memory_pb2.IngestRequest], context: _Context
    ) -> memory_pb2.IngestResponse:
        async def frames() -> AsyncIterator[IngestFrame]:
            async for request in request_iterator:
                yield _frame(request)

        result = await self._core.ingest(frames())
        return memory_pb2.IngestResponse(
            document_id=result.document_id, chunks_stored=result.chunks_stored
        )

    async def Forget(  # noqa: N802
        self, request: memory_pb2.ForgetRequest, context: _Context
    ) -> memory_pb2.ForgetResponse:
        deleted = await self._core.forget(
            tenant_id=request.tenant_id, conversation_id=request.conversation_id
        )
        return memory_pb2.ForgetResponse(chunks_deleted=deleted)


def build_server_with_health(
    settings: MemorySettings, deps: MemoryDeps
) -> tuple[aio.Server, int, health.aio.HealthServicer]:
    """Like ``build_server``, also returning the health servicer that drain flips."""
    core = MemoryCore(
        store=deps.store,
        embedder=deps.embedder,
        chunking=settings.chunking,
        limits=settings.limits,
    )
    server = new_server(METRICS_SERVICE)
    memory_service_pb2_grpc.add_MemoryServiceServicer_to_server(  # type: ignore[no-untyped-call]
        MemoryServicer(core), server
    )
    health_servicer = add_health_and_reflection(server, [SERVICE_NAME])
    port = bind(server, settings.host, settings.port)
    return server, port, health_servicer


def build_server(settings: MemorySettings, deps: MemoryDeps) -> tuple[aio.Server, int]:
    """The memory gRPC server, bound but not started, and its port."""
    server, port, _ = build_server_with_health(settings, deps)
    return server, port


async def serve(settings: MemorySettings) -> None:
    """Open the store, serve until SIGTERM/SIGINT, drain, close the store."""
    embedder = HashingEmbedder(settings.store.dims)
    async with open_store(settings.store) as store:
        server, port, health_servicer = build_server_with_health(
            settings, MemoryDeps(store=store, embedder=embedder)
        )
        metrics_port = start_metrics_server(settings.metrics_port, settings.host)
        # Tests and supervisors read this line to find the ports when they asked for port 0.
        log.info(
            "memory service listening on %s:%d (metrics on port %d, backend %s)",
            settings.host,
            port,
            metrics_port,
            settings.store.backend,
        )
        await serve_until_signalled(
            server, health_servicer, [SERVICE_NAME], grace_s=settings.grace_s
        )
    log.info("memory service stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m services.memory``; configuration comes from the environment."""
    del argv  # no flags: the environment is the single source of configuration
    try:
        settings = MemorySettings.from_env(os.environ)
    except SettingsError as error:
        print(f"memory: bad configuration: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        return 130
    return 0


__all__ = [
    "SERVICE_NAME",
    "MemoryDeps",
    "MemoryServicer",
    "build_server",
    "build_server_with_health",
    "main",
    "serve",
]

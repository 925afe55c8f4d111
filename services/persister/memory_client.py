"""Indexes finished turns into the memory service (``MemoryService.Remember``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
from chat.memory.v1 import memory_pb2, memory_service_pb2_grpc
from grpc import aio

from mesh.lifecycle import AsyncStartStop
from mesh.server import channel as mesh_channel
from services.persister import metrics

log = logging.getLogger(__name__)

# The generated stub class is untyped; give its constructor a type once, here.
_new_stub: Callable[[aio.Channel], Any] = memory_service_pb2_grpc.MemoryServiceStub

# Worth waiting out: the memory service is restarting, overloaded or briefly unreachable.
_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


class MemoryIndexer(AsyncStartStop):
    """A ``core.Rememberer`` over gRPC.

    Transient failures are retried with capped exponential backoff for as long as it takes:
    the persister's offsets wait for indexing, so a memory outage delays commits instead of
    losing recall. Other failures (a request the service rejects) are logged and dropped, since
    retrying cannot fix them.
    """

    def __init__(
        self,
        target: str,
        *,
        call_timeout_s: float = 10.0,
        initial_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._target = target
        self._call_timeout_s = call_timeout_s
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._channel: aio.Channel | None = None
        self._stub: Any = None

    async def start(self) -> None:
        if self._channel is None:
            self._channel = mesh_channel(self._target)
            self._stub = _new_stub(self._channel)

    async def stop(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()

    async def remember(
        self, *, tenant_id: str, conversation_id: str, text: str, request_id: str
    ) -> None:
        if self._stub is None:
            raise RuntimeError("MemoryIndexer is not started")
        request = memory_pb2.RememberRequest(
            tenant_id=tenant_id, conversation_id=conversation_id, text=text, request_id=request_id
        )
        backoff = self._initial_backoff_s
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._stub.Remember(
                    request, timeout=self._call_timeout_s, wait_for_ready=attempt > 1
                )
                return
            except grpc.RpcError as error:
                code = error.code() if isinstance(error, aio.AioRpcError) else None
                if code not in _TRANSIENT:
                    metrics.REMEMBER_FAILURES.labels("dropped").inc()
                    log.error(
                        "memory Remember for turn %s failed with %s; not indexed: %s",
                        request_id,
                        code.name if code else "an unknown error",
                        error.details() if isinstance(error, aio.AioRpcError) else error,
                    )
                    return
                metrics.REMEMBER_FAILURES.labels("retried").inc()
                if attempt == 1 or attempt % 10 == 0:
                    log.warning(
                        "memory service at %s: %s (attempt %d), retrying in %.1fs",
                        self._target,
                        code.name if code else "error",
                        attempt,
                        backoff,
                    )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff_s)

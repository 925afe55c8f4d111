"""Indexes finished turns into the memory service (``MemoryService.Remember``)."""

from __future__ import annotations

import logging

import grpc
from chat.memory.v1 import memory_pb2, memory_service_pb2_grpc
from grpc import aio

from mesh.client import ServiceClient, is_retryable
from mesh.retry import Backoff, retry
from mesh.settings import TlsSettings
from services.persister import metrics

log = logging.getLogger(__name__)


class MemoryIndexer(ServiceClient):
    """A ``core.Rememberer`` over gRPC.

    Transient failures are retried with capped exponential backoff, ``attempts`` times (None:
    for as long as it takes); when they run out the failure is raised, so the caller (the
    persister's memory outbox) keeps the turn for later. Other failures (a request the service
    rejects) are logged and dropped, since retrying cannot fix them.
    """

    def __init__(
        self,
        target: str,
        *,
        call_timeout_s: float = 10.0,
        initial_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        attempts: int | None = None,
        tls: TlsSettings | None = None,
    ) -> None:
        super().__init__(
            target, memory_service_pb2_grpc.MemoryServiceStub, tls=tls, server_name="memory"
        )
        self._call_timeout_s = call_timeout_s
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._attempts = attempts

    async def remember(
        self, *, tenant_id: str, conversation_id: str, text: str, request_id: str
    ) -> None:
        if self.stub is None:
            raise RuntimeError("MemoryIndexer is not started")
        request = memory_pb2.RememberRequest(
            tenant_id=tenant_id, conversation_id=conversation_id, text=text, request_id=request_id
        )
        # The first try fails fast on a service that is down; later ones wait for the channel.
        wait_for_ready = False

        async def call() -> None:
            await self.stub.Remember(
                request, timeout=self._call_timeout_s, wait_for_ready=wait_for_ready
            )

        def retrying(attempt: int, error: Exception, delay: float) -> None:
            nonlocal wait_for_ready
            wait_for_ready = True
            metrics.REMEMBER_FAILURES.labels("retried").inc()
            if attempt == 1 or attempt % 10 == 0:
                code = error.code() if isinstance(error, aio.AioRpcError) else None
                log.warning(
                    "memory service at %s: %s (attempt %d), retrying in %.1fs",
                    self.target,
                    code.name if code else "error",
                    attempt,
                    delay,
                )

        try:
            await retry(
                call,
                backoff=Backoff(self._initial_backoff_s, max_s=self._max_backoff_s),
                retry_if=is_retryable,
                on_retry=retrying,
                attempts=self._attempts,
            )
        except grpc.RpcError as error:
            if is_retryable(error):
                raise  # the attempts ran out: the caller keeps the turn for later
            code = error.code() if isinstance(error, aio.AioRpcError) else None
            metrics.REMEMBER_FAILURES.labels("dropped").inc()
            log.error(
                "memory Remember for turn %s failed with %s; not indexed: %s",
                request_id,
                code.name if code else "an unknown error",
                error.details() if isinstance(error, aio.AioRpcError) else error,
            )

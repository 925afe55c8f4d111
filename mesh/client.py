"""One way to call another mesh service: a channel with a lifecycle, and which failures to retry.

``ServiceClient`` owns the channel and the stub (``start``/``stop`` or ``async with``);
``is_retryable`` is the retry policy every caller passes to ``mesh.retry.retry``; the rich status
of a failed call is read with ``mesh.errors.rich_status``. The service clients (the agent's
``DependencyClients``, the persister's ``MemoryIndexer``, the gateway's ``PersisterClient``) add
only their calls and what a failure means to their caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.lifecycle import AsyncStartStop
from mesh.server import channel

# Worth another try: the service is starting, restarting, overloaded or slow.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


def is_retryable(error: BaseException) -> bool:
    """Whether a failed call may succeed if tried again: a ``grpc.aio`` error of those codes."""
    return isinstance(error, aio.AioRpcError) and error.code() in RETRYABLE_CODES


class ServiceClient(AsyncStartStop):
    """A channel to one mesh service and a stub on it.

    ``stub`` is ``None`` until ``start()`` and again after ``stop()``, so a caller can tell "not
    started" from a failed call. Starting twice keeps the first channel.

    Args:
        target: ``host:port`` of the service.
        new_stub: builds the stub on the channel (the generated ``XServiceStub`` class).
    """

    def __init__(self, target: str, new_stub: Callable[[aio.Channel], Any]) -> None:
        self.target = target
        self._new_stub = new_stub
        self._channel: aio.Channel | None = None
        self._stub: Any = None

    @property
    def stub(self) -> Any:
        """The started stub, or ``None``."""
        return self._stub

    async def check_ready(self, service: str, *, timeout_s: float) -> None:
        """Return if the service reports ``service`` (its readiness name) SERVING.

        Raises ``ConnectionError`` when it is not started or says otherwise, and the call's
        ``AioRpcError`` when it does not answer: a readiness probe (``mesh.readiness``).
        """
        if self._channel is None:
            raise ConnectionError(f"the client of {self.target} is not started")
        reply = await health_pb2_grpc.HealthStub(self._channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
        )
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            raise ConnectionError(f"{self.target} reports {service} {state}")

    async def start(self) -> None:
        if self._channel is None:
            self._channel = channel(self.target)
            self._stub = self._new_stub(self._channel)

    async def stop(self) -> None:
        channel_, self._channel, self._stub = self._channel, None, None
        if channel_ is not None:
            await channel_.close()


__all__ = ["RETRYABLE_CODES", "ServiceClient", "is_retryable"]

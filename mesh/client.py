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
from mesh.settings import TlsSettings
from mesh.tls import CertificateFiles, channel_credentials

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

    With ``tls`` enabled the channel is mutual TLS: it presents this process's certificate and
    accepts only a server whose certificate names ``server_name`` (the service, ``persister``).
    When the certificate files change (a rotation), new calls go over a new channel with the new
    certificate; the old channel stays open for the calls still on it until ``stop()``.

    Args:
        target: ``host:port`` of the service.
        new_stub: builds the stub on the channel (the generated ``XServiceStub`` class).
        tls: this process's mesh identity; None or disabled: plaintext.
        server_name: the service's name in its certificate (required with ``tls``).
    """

    def __init__(
        self,
        target: str,
        new_stub: Callable[[aio.Channel], Any],
        *,
        tls: TlsSettings | None = None,
        server_name: str = "",
    ) -> None:
        if tls is not None and tls.enabled and not server_name:
            raise ValueError("a TLS client needs the server's name (server_name)")
        self.target = target
        self._new_stub = new_stub
        self._tls = tls if tls is not None and tls.enabled else None
        self._server_name = server_name
        self._files: CertificateFiles | None = None
        self._channel: aio.Channel | None = None
        self._retired: list[aio.Channel] = []
        self._stub: Any = None

    @property
    def stub(self) -> Any:
        """The started stub, or ``None``; a new one on a new channel after a rotation."""
        if self._files is not None and self._channel is not None:
            identity = self._files.changed()
            if identity is not None:
                self._retired.append(self._channel)
                self._open(channel_credentials(identity))
        return self._stub

    def _open(self, credentials: Any) -> None:
        self._channel = channel(self.target, credentials=credentials, server_name=self._server_name)
        self._stub = self._new_stub(self._channel)

    async def check_ready(self, service: str, *, timeout_s: float) -> None:
        """Return if the service reports ``service`` (its readiness name) SERVING.

        Raises ``ConnectionError`` when it is not started or says otherwise, and the call's
        ``AioRpcError`` when it does not answer: a readiness probe (``mesh.readiness``).
        """
        # Through ``stub``, so a rotated certificate gives the probe the new channel too.
        if self.stub is None or self._channel is None:
            raise ConnectionError(f"the client of {self.target} is not started")
        reply = await health_pb2_grpc.HealthStub(self._channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
        )
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            raise ConnectionError(f"{self.target} reports {service} {state}")

    async def start(self) -> None:
        if self._channel is None:
            if self._tls is not None:
                self._files = CertificateFiles(self._tls)
                self._open(channel_credentials(self._files.current))
            else:
                self._open(None)

    async def stop(self) -> None:
        channel_, self._channel, self._stub = self._channel, None, None
        retired, self._retired = self._retired, []
        for old in [*retired, channel_]:
            if old is not None:
                await old.close()


__all__ = ["RETRYABLE_CODES", "ServiceClient", "is_retryable"]

"""Scaffolding every service shares: health, reflection, metrics, interceptors, graceful drain.

One way to run a service: ``main`` calls ``run_main`` with the service's settings loader and
``serve``; ``serve`` starts its resources, calls the service's ``build_server(settings, deps)``
(which supplies only its servicer to ``build_service_server``), starts metrics and hands the
server to ``serve_until_signalled``, which drains on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import descriptor_pool
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mesh import logs, tracing
from mesh.authz import AuthzInterceptor
from mesh.interceptors import ErrorInterceptor, MetricsInterceptor, TracingInterceptor
from mesh.metrics import start_metrics_server
from mesh.readiness import Readiness
from mesh.settings import SettingsError
from mesh.tls import (
    CertificateError,
    CertificateFiles,
    TlsSettings,
    is_loopback,
    server_credentials,
)

log = logging.getLogger(__name__)

# Streams carry whole documents (Ingest) and long histories; keep the cap explicit.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def new_server(
    service: str, *, extra_interceptors: Sequence[aio.ServerInterceptor] = ()
) -> aio.Server:
    """A grpc.aio server with the shared interceptors (metrics outermost, spans, then errors)."""
    return aio.server(
        interceptors=[
            MetricsInterceptor(service),
            TracingInterceptor(),
            *extra_interceptors,
            ErrorInterceptor(),
        ],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )


class _MethodAwarePool:
    """A descriptor pool view that also resolves ``pkg.Service.Method`` symbols.

    grpcurl's ``describe pkg.Service.Method`` asks reflection for the file of a method symbol,
    which the stock Python reflection servicer cannot resolve (grpc/grpc#34743).
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            descriptor = self._pool.FindServiceByName(service)  # KeyError when unknown too
            if method not in descriptor.methods_by_name:
                raise
            return descriptor.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def add_health_and_reflection(
    server: aio.Server, service_names: Sequence[str]
) -> health.aio.HealthServicer:
    """Register grpc.health.v1 (every service SERVING, plus the overall "") and reflection."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME],
        server,
        pool=_MethodAwarePool(descriptor_pool.Default()),
    )
    return servicer


async def set_serving(
    servicer: health.aio.HealthServicer, service_names: Sequence[str], serving: bool
) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", *service_names):
        await servicer.set(name, status)


class PlaintextRefused(SettingsError):
    """A port would listen without TLS on an address other machines can reach."""


def bind(
    server: aio.Server,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None = None,
    *,
    fix: str = "set MESH_TLS_CA, MESH_TLS_CERT and MESH_TLS_KEY (see `mesh certs`)",
) -> int:
    """Bind ``host:port`` (0 picks a free port) and return the bound port.

    Without ``credentials`` the port is plaintext, which only a loopback ``host`` may be.

    Raises:
        PlaintextRefused: plaintext on a non-loopback address; the message says ``fix``.
    """
    if credentials is None and not is_loopback(host):
        raise PlaintextRefused(
            f"refusing to listen on {host}:{port} without TLS: anyone who can reach it could "
            f"call it. To fix: {fix}; or listen on 127.0.0.1"
        )
    address = f"{host}:{port}"
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    if bound == 0:
        raise RuntimeError(f"could not bind {address}")
    return bound


def mesh_server_credentials(tls: TlsSettings | None) -> grpc.ServerCredentials | None:
    """Mutual TLS following the files of ``tls`` (see ``mesh.tls``), or None when TLS is off."""
    if tls is None or not tls.enabled:
        return None
    return server_credentials(CertificateFiles(tls))


@dataclass
class ServiceDeps:
    """Base of each service's deps (``XDeps``): what its server runs on, started by the caller.

    ``build_server`` fills ``health`` with the server's health servicer, for
    ``serve_until_signalled`` and for tests that flip it.
    """

    health: health.aio.HealthServicer | None = field(default=None, kw_only=True)


def build_service_server(
    metrics_label: str,
    service_name: str,
    add_servicer: Callable[[Any, aio.Server], None],
    servicer: object,
    *,
    host: str,
    port: int,
    extra_interceptors: Sequence[aio.ServerInterceptor] = (),
    tls: TlsSettings | None = None,
    edge_credentials: grpc.ServerCredentials | None = None,
) -> tuple[aio.Server, int, health.aio.HealthServicer]:
    """A service's gRPC server, bound to ``host:port`` but not started.

    It carries the shared interceptors (``extra_interceptors`` between metrics and errors), the
    servicer, health and reflection. Each service's ``build_server(settings, deps)`` is this call
    with its own servicer; it keeps the health servicer in ``deps.health`` for
    ``serve_until_signalled``.

    Args:
        metrics_label: the ``service`` label of the RPC metrics.
        service_name: the full proto name, registered with health and reflection.
        add_servicer: the generated ``add_XServicer_to_server``.
        servicer: the service's servicer.
        host, port: where to listen; port 0 picks a free one.
        extra_interceptors: e.g. authentication.
        tls: the service's mesh identity; when enabled the port takes mutual TLS only and
            each RPC is authorized by the caller's identity (``mesh.authz``). Off, the port is
            plaintext and unauthorized, which ``bind`` allows on a loopback host only.
        edge_credentials: server-only TLS of a public port (the gateway's), instead of ``tls``.

    Returns:
        The server, the bound port and the health servicer.
    """
    credentials = edge_credentials or mesh_server_credentials(tls)
    interceptors = list(extra_interceptors)
    if edge_credentials is None and credentials is not None:
        interceptors.insert(0, AuthzInterceptor(metrics_label))
    elif credentials is None:
        log.warning(
            "%s listens in PLAINTEXT on %s (no TLS configured): fine for one machine, "
            "but any local process may call it",
            metrics_label,
            host,
        )
    server = new_server(metrics_label, extra_interceptors=interceptors)
    add_servicer(servicer, server)
    health_servicer = add_health_and_reflection(server, [service_name])
    return server, bind(server, host, port, credentials), health_servicer


def start_metrics(port: int, host: str) -> int | None:
    """Serve Prometheus ``/metrics`` on ``host:port`` and return the bound port.

    Port 0 picks a free one; a negative port turns metrics off and returns ``None``.
    """
    if port < 0:
        return None
    return start_metrics_server(port, host)


async def serve_until_signalled(
    server: aio.Server,
    health_servicer: health.aio.HealthServicer,
    service_names: Sequence[str],
    *,
    grace_s: float,
    on_drain: Callable[[], Awaitable[Any]] | None = None,
    readiness: Readiness | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain: report NOT_SERVING, let RPCs finish, stop.

    Load balancers and Envoy's health checks see NOT_SERVING first, so no new streams arrive
    while the open ones finish within ``grace_s``. With ``readiness`` (started by the caller),
    ``service_names`` follow the dependencies' state while serving; ``""`` stays liveness.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await set_serving(health_servicer, service_names, True)
    if readiness is not None:
        await readiness.attach(health_servicer, service_names)
    await stop.wait()
    log.info("draining (grace %.1fs)", grace_s)
    if readiness is not None:
        await readiness.detach()
    await set_serving(health_servicer, service_names, False)
    if on_drain is not None:
        await on_drain()
    await server.stop(grace_s)


class _Logged(Protocol):
    @property
    def log_level(self) -> str: ...

    @property
    def log_format(self) -> str: ...

    @property
    def instance(self) -> str: ...


_S = TypeVar("_S", bound=_Logged)


def run_main(
    name: str,
    load: Callable[[], _S],
    serve: Callable[[_S], Coroutine[Any, Any, None]],
    *,
    config_errors: tuple[type[Exception], ...] = (SettingsError, CertificateError),
    fatal_errors: tuple[type[Exception], ...] = (),
) -> int:
    """A service's ``main``: load its settings, configure logging, serve; return the exit status.

    Exit status 2 for a bad configuration (one line on stderr, no traceback), 1 for one of
    ``fatal_errors`` (likewise), 130 for a Ctrl-C before the signal handlers are in place, else 0.

    Args:
        name: the prefix of the error lines (``agent: ...``).
        load: builds the settings from the environment; may raise ``config_errors``.
        serve: runs the service until it is signalled.
        config_errors: what ``load`` raises for a bad configuration.
        fatal_errors: what ``serve`` raises for a failure the operator must fix (a bad model).
    """
    try:
        settings = load()
    except config_errors as error:
        print(f"{name}: bad configuration: {error}", file=sys.stderr)
        return 2
    logs.configure(name, settings.log_level, settings.log_format, settings.instance)
    tracing.configure(name, settings.instance)
    try:
        asyncio.run(serve(settings))
    except config_errors as error:
        # Found while starting: a TLS file that does not load, a plaintext public address.
        print(f"{name}: bad configuration: {error}", file=sys.stderr)
        return 2
    except fatal_errors as error:
        print(f"{name}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        tracing.shutdown()  # export the spans still queued
    return 0


def channel(
    target: str, *, credentials: grpc.ChannelCredentials | None = None, server_name: str = ""
) -> aio.Channel:
    """A client channel to another mesh service with the mesh's message limits.

    With ``credentials`` it is TLS; ``server_name`` is then the name the server's certificate
    must carry (a mesh service's bare name, ``persister``), whatever address ``target`` is.
    """
    interceptors = tracing.client_interceptors()
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 20_000),
    ]
    if credentials is None:
        return aio.insecure_channel(target, interceptors=interceptors, options=options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return aio.secure_channel(target, credentials, interceptors=interceptors, options=options)


__all__ = [
    "MAX_MESSAGE_BYTES",
    "PlaintextRefused",
    "ServiceDeps",
    "add_health_and_reflection",
    "bind",
    "build_service_server",
    "channel",
    "mesh_server_credentials",
    "new_server",
    "run_main",
    "serve_until_signalled",
    "set_serving",
    "start_metrics",
]

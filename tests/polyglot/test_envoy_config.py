"""The Envoy bootstrap built from typed envoy-data-plane models (no Envoy process needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mesh.infra.envoy import (
    EXPOSED_HEADERS,
    EnvoyConfig,
    build_bootstrap,
    render,
)
from mesh.settings import SettingsError

REPO = Path(__file__).resolve().parents[2]


def rendered(config: EnvoyConfig) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(render(config, admin_port=9901))
    return document


def manager(document: dict[str, Any]) -> dict[str, Any]:
    [listener] = document["staticResources"]["listeners"]
    [chain] = listener["filterChains"]
    [hcm] = chain["filters"]
    config: dict[str, Any] = hcm["typedConfig"]
    return config


def test_bootstrap_is_a_typed_model() -> None:
    bootstrap = build_bootstrap(EnvoyConfig(upstreams=("127.0.0.1:50051",)), admin_port=0)
    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

    assert isinstance(bootstrap, Bootstrap)
    # It survives the binary encoding Envoy itself would read.
    assert Bootstrap.parse(bytes(bootstrap)).to_dict() == bootstrap.to_dict()


def test_filters_in_order_and_long_stream_timeouts() -> None:
    document = rendered(EnvoyConfig(upstreams=("127.0.0.1:50051",), web_root=REPO / "web"))
    hcm = manager(document)
    names = [f["name"] for f in hcm["httpFilters"]]
    assert names == [
        "envoy.filters.http.cors",
        "envoy.filters.http.grpc_web",
        "envoy.filters.http.file_server",
        "envoy.filters.http.router",
    ]
    assert hcm["streamIdleTimeout"] == "300s"
    [vhost] = hcm["routeConfig"]["virtualHosts"]
    gateway_route = vhost["routes"][0]
    assert gateway_route["match"]["prefix"] == "/chat.gateway.v1.GatewayService/"
    assert gateway_route["route"]["cluster"] == "gateway"
    assert gateway_route["route"]["timeout"] == "0s"
    # file_server answers every method under "/", so gRPC routes switch it off.
    assert gateway_route["typedPerFilterConfig"]["envoy.filters.http.file_server"]["disabled"]


def test_cors_policy_lists_exact_origins_and_exposes_grpc_headers() -> None:
    origins = ("http://localhost:5173", "https://chat.example.com")
    hcm = manager(rendered(EnvoyConfig(upstreams=("127.0.0.1:50051",), allowed_origins=origins)))
    [vhost] = hcm["routeConfig"]["virtualHosts"]
    cors = vhost["typedPerFilterConfig"]["envoy.filters.http.cors"]
    assert [m["exact"] for m in cors["allowOriginStringMatch"]] == list(origins)
    assert cors["exposeHeaders"].split(",") == list(EXPOSED_HEADERS)
    assert "x-api-key" in cors["allowHeaders"].split(",")


def test_cluster_is_http2_and_grpc_health_checked() -> None:
    document = rendered(EnvoyConfig(upstreams=("127.0.0.1:50051", "127.0.0.1:50061")))
    [cluster] = document["staticResources"]["clusters"]
    assert cluster["type"] == "STATIC"
    protocol = cluster["typedExtensionProtocolOptions"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2ProtocolOptions" in protocol["explicitHttpConfig"]
    [check] = cluster["healthChecks"]
    assert check["grpcHealthCheck"]["serviceName"] == "chat.gateway.v1.GatewayService"
    endpoints = cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"]
    ports = [e["endpoint"]["address"]["socketAddress"]["portValue"] for e in endpoints]
    assert ports == [50051, 50061]


def test_host_names_use_dns_and_no_page_means_no_file_server() -> None:
    document = rendered(EnvoyConfig(upstreams=("gateway.internal:50051",), web_root=None))
    [cluster] = document["staticResources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS"
    names = [f["name"] for f in manager(document)["httpFilters"]]
    assert "envoy.filters.http.file_server" not in names


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        ({"MESH_ENVOY_UPSTREAMS": "no-port"}, "host:port"),
        ({"MESH_ENVOY_UPSTREAMS": "127.0.0.1:99999"}, "host:port"),
        ({"MESH_ENVOY_ALLOWED_ORIGINS": "localhost:3000"}, "http(s)://"),
        ({"MESH_ENVOY_ALLOWED_ORIGINS": "http://x.example/"}, "no path"),
        ({"MESH_ENVOY_PORT": "eighty"}, "MESH_ENVOY_PORT"),
        ({"MESH_ENVOY_HOST": "0.0.0.0"}, "without TLS: set MESH_ENVOY_TLS_CERT"),
        ({"MESH_ENVOY_TLS_CERT": "/x.pem"}, "go together"),
    ],
)
def test_bad_settings_say_what_is_wrong(environ: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        EnvoyConfig.from_env(environ)


def test_from_env_defaults_to_the_gateway_address() -> None:
    config = EnvoyConfig.from_env({"MESH_GATEWAY_PORT": "6000", "MESH_ENVOY_PORT": "0"})
    assert config.upstreams == ("127.0.0.1:6000",)
    assert config.listen_port == 0


def test_render_command_prints_the_bootstrap() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mesh.infra.envoy", "render", "--admin-port", "9999"],
        cwd=REPO,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": f"{REPO}:{REPO / 'gen' / 'python'}",
            "MESH_ENVOY_UPSTREAMS": "127.0.0.1:7000",
            "MESH_ENVOY_ALLOWED_ORIGINS": "http://localhost:5173",
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["admin"]["address"]["socketAddress"]["portValue"] == 9999


def test_http_api_routes_v1_to_its_own_health_checked_cluster() -> None:
    config = EnvoyConfig.from_env(
        {
            "MESH_ENVOY_UPSTREAMS": "127.0.0.1:50051",
            "MESH_ENVOY_HTTP_UPSTREAMS": "127.0.0.1:8000,127.0.0.1:8001",
        }
    )
    assert config.http_upstreams == ("127.0.0.1:8000", "127.0.0.1:8001")
    document = rendered(config)
    clusters = {c["name"]: c for c in document["staticResources"]["clusters"]}
    http = clusters["gateway_http"]
    protocol = http["typedExtensionProtocolOptions"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "httpProtocolOptions" in protocol["explicitHttpConfig"]
    [check] = http["healthChecks"]
    assert check["httpHealthCheck"]["path"] == "/healthz"
    assert "grpcHealthCheck" not in check
    assert "httpHealthCheck" not in clusters["gateway"]["healthChecks"][0]
    [vhost] = manager(document)["routeConfig"]["virtualHosts"]
    [route] = [r for r in vhost["routes"] if r["match"]["prefix"] == "/v1/"]
    assert route["route"]["cluster"] == "gateway_http"
    assert route["route"]["timeout"] == "0s"
    cors = vhost["typedPerFilterConfig"]["envoy.filters.http.cors"]
    assert "authorization" in cors["allowHeaders"].split(",")
    assert "retry-after" in cors["exposeHeaders"].split(",")
    # Without HTTP upstreams there is no /v1/ route and no second cluster.
    plain = rendered(EnvoyConfig(upstreams=("127.0.0.1:50051",)))
    assert [c["name"] for c in plain["staticResources"]["clusters"]] == ["gateway"]


def test_tls_listener_and_tls_towards_the_gateways() -> None:
    config = EnvoyConfig(
        upstreams=("127.0.0.1:50051",),
        http_upstreams=("127.0.0.1:8000",),
        listen_host="0.0.0.0",
        tls_cert=Path("/certs/edge.pem"),
        tls_key=Path("/certs/edge.key"),
        upstream_ca=Path("/certs/ca.pem"),
    )
    document = rendered(config)
    [listener] = document["staticResources"]["listeners"]
    [chain] = listener["filterChains"]
    downstream = chain["transportSocket"]["typedConfig"]["commonTlsContext"]
    assert downstream["tlsCertificates"] == [
        {
            "certificateChain": {"filename": "/certs/edge.pem"},
            "privateKey": {"filename": "/certs/edge.key"},
        }
    ]
    assert downstream["alpnProtocols"] == ["h2", "http/1.1"]
    clusters = {c["name"]: c for c in document["staticResources"]["clusters"]}
    for name, alpn in (("gateway", ["h2"]), ("gateway_http", ["http/1.1"])):
        upstream = clusters[name]["transportSocket"]["typedConfig"]
        assert upstream["sni"] == "localhost"
        context = upstream["commonTlsContext"]
        assert context["validationContext"]["trustedCa"] == {"filename": "/certs/ca.pem"}
        assert context["alpnProtocols"] == alpn
    plain = rendered(EnvoyConfig(upstreams=("127.0.0.1:50051",)))
    assert "transportSocket" not in plain["staticResources"]["listeners"][0]["filterChains"][0]
    assert "transportSocket" not in plain["staticResources"]["clusters"][0]

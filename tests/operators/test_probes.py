"""What an operator runs against a live mesh, run for real: grpc_health_probe on every service,
grpcurl listing, describing and calling every service through server reflection, and every
service's Prometheus /metrics. The commands mirror docs/operators.md.

The services behind the gateway take mutual TLS only (the launcher's certificates): the tools
present the ``operator`` certificate, or a service's own where only that service may call.

The tools come from scripts/install-operator-tools.sh (pinned versions, built from the Go module
proxy); the session fixture runs it, so a fresh machine with Go needs nothing else.
"""

from __future__ import annotations

import io
import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from chat.agent.v1 import agent_service_pb2
from chat.gateway.v1 import gateway_service_pb2
from chat.memory.v1 import memory_service_pb2
from chat.persister.v1 import persister_service_pb2
from prometheus_client.parser import text_string_to_metric_families

from mesh.certs import CertDir
from mesh.cli import main as cli_main
from mesh.launcher import MeshStartError, Service, free_port, wait_healthy
from tests.fixtures.mesh import RunningMesh

# A fresh machine builds both tools from source first: minutes on two cores.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO / "scripts" / "install-operator-tools.sh"
BIN_DIR = REPO / ".build" / "bin"

# What an operator types; checked against the generated descriptors below so a renamed service
# or method shows up here and in docs/operators.md.
SERVICES = {
    "memory": "chat.memory.v1.MemoryService",
    "persister": "chat.persister.v1.PersisterService",
    "agent": "chat.agent.v1.AgentService",
    "gateway": "chat.gateway.v1.GatewayService",
}
DESCRIPTORS = {
    "memory": memory_service_pb2.DESCRIPTOR.services_by_name["MemoryService"],
    "persister": persister_service_pb2.DESCRIPTOR.services_by_name["PersisterService"],
    "agent": agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"],
    "gateway": gateway_service_pb2.DESCRIPTOR.services_by_name["GatewayService"],
}
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"

# grpc_health_probe's documented exit codes.
PROBE_CONNECTION_FAILURE = 2
PROBE_RPC_FAILURE = 3
# grpcurl exits with 64 + the gRPC status code when a call fails.
GRPCURL_INVALID_ARGUMENT = 64 + 3
GRPCURL_UNAUTHENTICATED = 64 + 16
GRPCURL_PERMISSION_DENIED = 64 + 7


@dataclass(frozen=True)
class Tools:
    health_probe: Path
    grpcurl: Path


@dataclass(frozen=True)
class GrpcurlTurn:
    """A turn streamed through the gateway by grpcurl, as parsed JSON frames."""

    frames: list[dict[str, Any]]
    turn_id: str
    conversation_id: str
    tokens: list[dict[str, Any]]
    finished: dict[str, Any]


@pytest.fixture(scope="session")
def operator_tools() -> Tools:
    """grpc_health_probe and grpcurl at the pinned versions (installed here when missing)."""
    hint = "run scripts/install-operator-tools.sh (needs Go 1.25 or later) and see its output"
    try:
        result = subprocess.run(
            [str(INSTALL_SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=840
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"installing the operator tools took over 14 minutes; {hint}")
    if result.returncode != 0:
        pytest.fail(
            f"scripts/install-operator-tools.sh failed (exit {result.returncode}); {hint}:\n"
            f"{result.stderr[-3000:]}"
        )
    tools = Tools(BIN_DIR / "grpc_health_probe", BIN_DIR / "grpcurl")
    for binary in (tools.health_probe, tools.grpcurl):
        if not os.access(binary, os.X_OK):
            pytest.fail(f"{binary} is missing after the install script ran; {hint}")
    return tools


def run(
    argv: list[str | Path], *, timeout_s: float = 30.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [str(arg) for arg in argv], capture_output=True, text=True, timeout=timeout_s, env=env
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{' '.join(map(str, argv))} did not finish within {timeout_s}s: {error}")


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"$ {' '.join(result.args)}\nexit {result.returncode}\n"
        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    )


@dataclass
class MeshTls:
    """Which addresses take mutual TLS (address -> service kind), and the certificates."""

    kinds: dict[str, str]
    certs: CertDir | None = None


# Filled from the running mesh by ``_mesh_tls``: the tools' helpers below look addresses up here.
MESH_TLS = MeshTls({})


@pytest.fixture(autouse=True)
def _mesh_tls(running_mesh: RunningMesh) -> None:
    certs = running_mesh.mesh.certs
    assert certs is not None, "the launcher turns mutual TLS on by default"
    MESH_TLS.certs = certs
    for service in running_mesh.mesh.services:
        kind = service.name.split("-")[0]
        if kind not in ("gateway", "envoy"):
            MESH_TLS.kinds[service.addr] = kind


def probe_tls_flags(addr: str, identity: str = "operator") -> list[str]:
    kind, certs = MESH_TLS.kinds.get(addr), MESH_TLS.certs
    if kind is None or certs is None:
        return []
    return [
        "-tls",
        f"-tls-ca-cert={certs.ca_cert}",
        f"-tls-client-cert={certs.cert(identity)}",
        f"-tls-client-key={certs.key(identity)}",
        f"-tls-server-name={kind}",
    ]


def grpcurl_tls_flags(addr: str, identity: str = "operator") -> list[str]:
    kind, certs = MESH_TLS.kinds.get(addr), MESH_TLS.certs
    if kind is None or certs is None:
        return ["-plaintext"]
    return [
        "-cacert",
        str(certs.ca_cert),
        "-cert",
        str(certs.cert(identity)),
        "-key",
        str(certs.key(identity)),
        "-servername",
        kind,
    ]


def probe(tools: Tools, addr: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return run(
        [
            tools.health_probe,
            f"-addr={addr}",
            "-connect-timeout=2s",
            "-rpc-timeout=5s",
            *probe_tls_flags(addr),
            *flags,
        ]
    )


def grpcurl(
    tools: Tools,
    addr: str,
    *command: str,
    data: object | None = None,
    api_key: str = "",
    flags: tuple[str, ...] = (),
    timeout_s: float = 60.0,
    identity: str = "operator",
) -> subprocess.CompletedProcess[str]:
    argv: list[str | Path] = [
        tools.grpcurl,
        *grpcurl_tls_flags(addr, identity),
        "-max-time",
        str(int(timeout_s)),
        *flags,
    ]
    env = None
    if api_key:
        # The key travels in the environment, not argv, as docs/operators.md recommends.
        env = {**os.environ, "MESH_API_KEY": api_key}
        argv += ["-expand-headers", "-H", "x-api-key: ${MESH_API_KEY}"]
    if data is not None:
        argv += ["-d", json.dumps(data)]
    return run([*argv, addr, *command], timeout_s=timeout_s + 10, env=env)


def json_frames(text: str) -> list[dict[str, Any]]:
    """grpcurl prints one JSON document per response message, one after the other."""
    decoder = json.JSONDecoder()
    frames: list[dict[str, Any]] = []
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index == len(text):
            return frames
        frame, index = decoder.raw_decode(text, index)
        frames.append(frame)


def services_of(running_mesh: RunningMesh, kind: str) -> list[Service]:
    found = [s for s in running_mesh.mesh.services if s.name.split("-")[0] == kind]
    assert found, f"the mesh runs no {kind}: {[s.name for s in running_mesh.mesh.services]}"
    return found


def call_ok(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, describe(result)
    return json_frames(result.stdout)


@pytest.fixture(scope="module")
def grpcurl_turn(running_mesh: RunningMesh, operator_tools: Tools) -> GrpcurlTurn:
    """One turn streamed with grpcurl: StreamTurn is server-streaming, so grpcurl prints it all."""
    result = grpcurl(
        operator_tools,
        running_mesh.gateway_addr,
        f"{SERVICES['gateway']}/StreamTurn",
        data={"start": {"text": "hello from the operator probe", "options": {"max_tokens": 8}}},
        api_key=running_mesh.api_key,
        timeout_s=120,
    )
    frames = call_ok(result)
    assert frames and "accepted" in frames[0], describe(result)
    assert "finished" in frames[-1], describe(result)
    tokens = [frame["token"] for frame in frames if "token" in frame]
    return GrpcurlTurn(
        frames=frames,
        turn_id=frames[0]["accepted"]["turn_id"],
        conversation_id=frames[0]["accepted"]["conversation_id"],
        tokens=tokens,
        finished=frames[-1]["finished"],
    )


# -- names: the literals operators type match the contract ---------------------------------------


def test_service_names_match_the_generated_descriptors() -> None:
    assert {kind: d.full_name for kind, d in DESCRIPTORS.items()} == SERVICES


# -- grpc_health_probe ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(SERVICES))
def test_health_probe_reports_serving(
    running_mesh: RunningMesh, operator_tools: Tools, kind: str
) -> None:
    for service in services_of(running_mesh, kind):
        for flags in ((), (f"-service={SERVICES[kind]}",)):
            result = probe(operator_tools, service.addr, *flags)
            assert result.returncode == 0, describe(result)
            # grpc_health_probe reports on stderr, the exit code is the verdict.
            assert "status: SERVING" in result.stderr, describe(result)


def test_health_probe_fails_for_a_service_the_server_does_not_have(
    running_mesh: RunningMesh, operator_tools: Tools
) -> None:
    # A typo in a readiness probe must fail it, not pass it.
    result = probe(operator_tools, running_mesh.gateway_addr, f"-service={SERVICES['agent']}")
    assert result.returncode == PROBE_RPC_FAILURE, describe(result)
    assert "NotFound" in result.stderr, describe(result)


def test_health_probe_fails_on_a_closed_port(operator_tools: Tools) -> None:
    result = probe(operator_tools, f"127.0.0.1:{free_port()}")
    assert result.returncode == PROBE_CONNECTION_FAILURE, describe(result)


# -- grpcurl through reflection -------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(SERVICES))
def test_grpcurl_lists_services_and_methods(
    running_mesh: RunningMesh, operator_tools: Tools, kind: str
) -> None:
    for service in services_of(running_mesh, kind):
        result = grpcurl(operator_tools, service.addr, "list")
        assert result.returncode == 0, describe(result)
        assert set(result.stdout.split()) == {SERVICES[kind], HEALTH, REFLECTION}, describe(result)

        result = grpcurl(operator_tools, service.addr, "list", SERVICES[kind])
        assert result.returncode == 0, describe(result)
        expected = {f"{SERVICES[kind]}.{m.name}" for m in DESCRIPTORS[kind].methods}
        assert set(result.stdout.split()) == expected, describe(result)


@pytest.mark.parametrize("kind", list(SERVICES))
def test_grpcurl_describes_each_service_and_its_messages(
    running_mesh: RunningMesh, operator_tools: Tools, kind: str
) -> None:
    addr = services_of(running_mesh, kind)[0].addr
    result = grpcurl(operator_tools, addr, "describe", SERVICES[kind])
    assert result.returncode == 0, describe(result)
    assert f"{SERVICES[kind]} is a service:" in result.stdout, describe(result)
    for method in DESCRIPTORS[kind].methods:
        streams_in = "stream " if method.client_streaming else ""
        streams_out = "stream " if method.server_streaming else ""
        line = (
            f"rpc {method.name} ( {streams_in}.{method.input_type.full_name} ) "
            f"returns ( {streams_out}.{method.output_type.full_name} );"
        )
        assert line in result.stdout, describe(result)
        # Every request type resolves too, which is what `grpcurl -d` needs to encode a call.
        request = grpcurl(operator_tools, addr, "describe", method.input_type.full_name)
        assert request.returncode == 0, describe(request)
        assert f"{method.input_type.full_name} is a message:" in request.stdout, describe(request)


def test_grpcurl_shows_a_message_template(running_mesh: RunningMesh, operator_tools: Tools) -> None:
    result = grpcurl(
        operator_tools,
        running_mesh.mesh.memory_addr,
        "describe",
        "chat.memory.v1.RecallRequest",
        flags=("-msg-template",),
    )
    assert result.returncode == 0, describe(result)
    template = json_frames(result.stdout.split("Message template:", 1)[1])
    assert template == [{"tenant_id": "", "query": "", "top_k": 0, "conversation_id": ""}]


@pytest.mark.parametrize("kind", ["gateway", "agent"])
def test_grpcurl_describes_a_method(
    running_mesh: RunningMesh, operator_tools: Tools, kind: str
) -> None:
    method = {"gateway": "StreamTurn", "agent": "GetNodeInfo"}[kind]
    symbol = f"{SERVICES[kind]}.{method}"
    result = grpcurl(operator_tools, services_of(running_mesh, kind)[0].addr, "describe", symbol)
    assert result.returncode == 0, describe(result)
    assert f"{symbol} is a method:" in result.stdout, describe(result)


def test_grpcurl_streams_a_turn_through_the_gateway(grpcurl_turn: GrpcurlTurn) -> None:
    assert grpcurl_turn.turn_id and grpcurl_turn.conversation_id
    assert grpcurl_turn.tokens, f"no tokens in {grpcurl_turn.frames}"
    # protojson prints int64 as strings.
    seqs = [int(token["seq"]) for token in grpcurl_turn.tokens]
    assert seqs == list(range(1, len(seqs) + 1))
    assert {token["turn_id"] for token in grpcurl_turn.tokens} == {grpcurl_turn.turn_id}
    assert "".join(token.get("text", "") for token in grpcurl_turn.tokens)
    finished = grpcurl_turn.finished
    assert finished["turn_id"] == grpcurl_turn.turn_id
    assert finished["finish_reason"] in {"FINISH_REASON_LENGTH", "FINISH_REASON_STOP"}
    assert int(finished["last_seq"]) == len(seqs)
    assert int(finished["usage"]["completion_tokens"]) == len(seqs) <= 8


def test_grpcurl_calls_the_gateway_with_and_without_a_key(
    running_mesh: RunningMesh, operator_tools: Tools, grpcurl_turn: GrpcurlTurn
) -> None:
    method = f"{SERVICES['gateway']}/ListConversations"
    addr = running_mesh.gateway_addr
    [page] = call_ok(
        grpcurl(operator_tools, addr, method, data={"page_size": 100}, api_key=running_mesh.api_key)
    )
    ids = [conversation["conversation_id"] for conversation in page["conversations"]]
    assert grpcurl_turn.conversation_id in ids

    # Another tenant's key does not see it.
    [other] = call_ok(
        grpcurl(
            operator_tools,
            addr,
            method,
            data={"page_size": 100},
            api_key=running_mesh.other_api_key,
        )
    )
    other_ids = [c["conversation_id"] for c in other.get("conversations", [])]
    assert grpcurl_turn.conversation_id not in other_ids

    # No key: refused with the rich status an operator can read.
    refused = grpcurl(operator_tools, addr, method, data={})
    assert refused.returncode == GRPCURL_UNAUTHENTICATED, describe(refused)
    assert "Unauthenticated" in refused.stderr and "API_KEY_MISSING" in refused.stderr, describe(
        refused
    )


def test_grpcurl_calls_the_persister(
    running_mesh: RunningMesh, operator_tools: Tools, grpcurl_turn: GrpcurlTurn
) -> None:
    addr = running_mesh.mesh.persister_addr
    # Flush waits until everything on the logs (our turn included) is written.
    call_ok(grpcurl(operator_tools, addr, f"{SERVICES['persister']}/Flush", data={}))
    [stats] = call_ok(
        grpcurl(
            operator_tools, addr, f"{SERVICES['persister']}/GetStats", flags=("-emit-defaults",)
        )
    )
    assert int(stats["messages_written"]) >= 2, stats
    assert int(stats["tokens_written"]) >= len(grpcurl_turn.tokens), stats
    assert int(stats["pending_events"]) == 0, stats


def test_grpcurl_calls_every_agent(
    running_mesh: RunningMesh, operator_tools: Tools, tiny_model_path: Path
) -> None:
    for service in services_of(running_mesh, "agent"):
        [info] = call_ok(
            grpcurl(
                operator_tools,
                service.addr,
                f"{SERVICES['agent']}/GetNodeInfo",
                flags=("-emit-defaults",),
            )
        )
        assert info["agent_id"] == service.name, info
        assert info["model"] == tiny_model_path.name, info
        assert info["context_size"] == running_mesh.mesh.config.n_ctx, info
        assert info["total_slots"] >= 1, info


def test_grpcurl_calls_memory_scoped_to_a_tenant(
    running_mesh: RunningMesh, operator_tools: Tools
) -> None:
    addr = running_mesh.mesh.memory_addr
    service = SERVICES["memory"]
    # Tenants of their own, so nothing here reaches the memory other tests recall.
    tenant, stranger = f"operator-probe-{secrets.token_hex(4)}", f"stranger-{secrets.token_hex(4)}"
    phrase = f"the lighthouse keeper feeds {secrets.token_hex(3)} gulls"
    [stored] = call_ok(
        grpcurl(
            operator_tools,
            addr,
            f"{service}/Remember",
            data={
                "tenant_id": tenant,
                "conversation_id": "operator-probe",
                "text": phrase,
                "request_id": secrets.token_hex(8),
            },
            identity="persister",  # only the persister may write memory
        )
    )
    assert stored["chunks_stored"] >= 1, stored

    [recalled] = call_ok(
        grpcurl(
            operator_tools,
            addr,
            f"{service}/Recall",
            data={"tenant_id": tenant, "query": "lighthouse keeper", "top_k": 3},
            identity="agent",  # only agents recall
        )
    )
    assert [chunk["text"] for chunk in recalled["chunks"]] == [phrase], recalled

    [nothing] = call_ok(
        grpcurl(
            operator_tools,
            addr,
            f"{service}/Recall",
            data={"tenant_id": stranger, "query": "lighthouse keeper"},
            identity="agent",
        )
    )
    assert nothing.get("chunks", []) == [], nothing

    # A missing tenant is the caller's mistake, reported as such.
    refused = grpcurl(
        operator_tools, addr, f"{service}/Recall", data={"query": "lighthouse"}, identity="agent"
    )
    assert refused.returncode == GRPCURL_INVALID_ARGUMENT, describe(refused)
    assert "TENANT_REQUIRED" in refused.stderr, describe(refused)


def test_grpcurl_with_the_wrong_identity_is_denied(
    running_mesh: RunningMesh, operator_tools: Tools
) -> None:
    memory = running_mesh.mesh.memory_addr
    requests = {
        "Remember": {"tenant_id": "t", "conversation_id": "c", "text": "x", "request_id": "r"},
        "Recall": {"tenant_id": "t", "query": "q"},
    }
    # The operator certificate opens health and reflection, not other services' RPCs.
    for identity, method in (
        ("operator", "Remember"),
        ("agent", "Remember"),
        ("gateway", "Recall"),
    ):
        denied = grpcurl(
            operator_tools,
            memory,
            f"{SERVICES['memory']}/{method}",
            data=requests[method],
            identity=identity,
        )
        assert denied.returncode == GRPCURL_PERMISSION_DENIED, describe(denied)
        assert f"spiffe://llm-mesh/{identity} is not allowed" in denied.stderr, describe(denied)
    persister = running_mesh.mesh.persister_addr
    denied = grpcurl(
        operator_tools,
        persister,
        f"{SERVICES['persister']}/ListConversations",
        data={"tenant_id": running_mesh.tenant_id},
        identity="operator",
    )
    assert denied.returncode == GRPCURL_PERMISSION_DENIED, describe(denied)
    assert "gateway" in denied.stderr and "agent" in denied.stderr, describe(denied)


def test_the_services_refuse_plaintext_and_a_missing_certificate(
    running_mesh: RunningMesh, operator_tools: Tools
) -> None:
    certs = MESH_TLS.certs
    assert certs is not None
    for kind in ("memory", "persister", "agent"):
        addr = services_of(running_mesh, kind)[0].addr
        plain = run([operator_tools.health_probe, f"-addr={addr}", "-connect-timeout=2s"])
        assert plain.returncode != 0, describe(plain)
        anonymous = run(
            [
                operator_tools.health_probe,
                f"-addr={addr}",
                "-connect-timeout=2s",
                "-tls",
                f"-tls-ca-cert={certs.ca_cert}",
                f"-tls-server-name={kind}",
            ]
        )
        assert anonymous.returncode != 0, describe(anonymous)


# -- Prometheus /metrics --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def scrape(service: Service) -> list[Sample]:
    url = f"http://127.0.0.1:{service.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200, url
        text = response.read().decode()
    return [
        Sample(sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.mark.parametrize("kind", list(SERVICES))
def test_every_service_serves_metrics(
    running_mesh: RunningMesh, operator_tools: Tools, kind: str
) -> None:
    for service in services_of(running_mesh, kind):
        # At least one RPC the metrics interceptor counts, whatever ran before.
        assert probe(operator_tools, service.addr).returncode == 0
        samples = scrape(service)
        handled = total(samples, "mesh_rpcs_handled_total", service=kind, method="Check", code="OK")
        assert handled >= 1, [s for s in samples if s.name.startswith("mesh_rpcs")]


def test_metrics_show_the_turn_and_never_a_tenant(
    running_mesh: RunningMesh, tiny_model_path: Path, grpcurl_turn: GrpcurlTurn
) -> None:
    model = tiny_model_path.name
    gateway = scrape(services_of(running_mesh, "gateway")[0])
    assert (
        total(gateway, "mesh_time_to_first_token_seconds_count", service="gateway", model=model)
        >= 1
    )
    assert total(gateway, "mesh_turns_total", service="gateway") >= 1

    agents = [scrape(agent) for agent in services_of(running_mesh, "agent")]
    generated = sum(
        total(samples, "mesh_tokens_generated_total", model=model) for samples in agents
    )
    assert generated >= len(grpcurl_turn.tokens)

    # Labels are bounded sets (service, method, code, model, ...): nothing a tenant sent or owns.
    secrets_in_labels = {
        running_mesh.tenant_id,
        running_mesh.other_tenant_id,
        "tenant-limited",
        grpcurl_turn.conversation_id,
        grpcurl_turn.turn_id,
    }
    for service in [s for kind in SERVICES for s in services_of(running_mesh, kind)]:
        for sample in scrape(service):
            for value in sample.labels.values():
                leaked = [secret for secret in secrets_in_labels if secret in value]
                assert not leaked, f"{service.name}: {sample.name}{sample.labels} carries {leaked}"


# -- graceful drain -------------------------------------------------------------------------------


@pytest.fixture
def lone_memory_service(
    running_mesh: RunningMesh, tmp_path: Path
) -> Iterator[tuple[Service, float]]:
    """A memory service of its own (on the mesh's PostgreSQL) that a test may SIGTERM."""
    grace_s = 2.0
    port, metrics_port = free_port(), free_port()
    env = {
        **running_mesh.mesh.base_env(),
        "MESH_MEMORY_HOST": "127.0.0.1",
        "MESH_MEMORY_PORT": str(port),
        "MESH_MEMORY_METRICS_PORT": str(metrics_port),
        "MESH_MEMORY_GRACE_S": str(grace_s),
    }
    log_path = tmp_path / "memory.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.memory"],
            env=env,
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    service = Service("memory-drain", f"127.0.0.1:{port}", metrics_port, process, log_path)
    try:
        wait_healthy(
            service.addr, timeout_s=60, process=process, log_path=log_path, name=service.name
        )
    except MeshStartError as error:
        service.terminate()
        pytest.fail(f"the extra memory service did not start: {error}")
    yield service, grace_s
    service.terminate()


def test_sigterm_reports_not_serving_then_drains_within_the_grace_period(
    operator_tools: Tools, lone_memory_service: tuple[Service, float], tmp_path: Path
) -> None:
    service, grace_s = lone_memory_service
    argv = [
        str(operator_tools.grpcurl),
        "-plaintext",
        "-max-time",
        "60",
        "-d",
        json.dumps({"service": SERVICES["memory"]}),
        service.addr,
        f"{HEALTH}/Watch",
    ]
    lines: queue.Queue[str | None] = queue.Queue()
    seen: list[str] = []
    with (
        (tmp_path / "watch.stderr").open("w") as stderr,
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True) as watch,
    ):

        def pump() -> None:
            assert watch.stdout is not None
            for line in watch.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        try:
            deadline = time.monotonic() + 30
            while not any('"SERVING"' in line for line in seen):
                try:
                    line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    pytest.fail(f"Health/Watch said nothing within 30s: {''.join(seen)}")
                assert line is not None, f"the watch ended early: {''.join(seen)}"
                seen.append(line)

            started = time.monotonic()
            service.process.send_signal(signal.SIGTERM)
            exit_code = service.process.wait(timeout=grace_s + 20)
            drained_in = time.monotonic() - started
            watch.wait(timeout=30)
            while (line := lines.get(timeout=10)) is not None:
                seen.append(line)
        finally:
            if watch.poll() is None:
                watch.kill()
    statuses = [frame["status"] for frame in json_frames("".join(seen))]
    log_tail = service.log_path.read_text(errors="replace")[-2000:]
    # The Watch stream is the in-flight RPC: it hears NOT_SERVING first, then keeps the server
    # draining for the whole grace period before it is cancelled.
    assert statuses == ["SERVING", "NOT_SERVING"], (statuses, log_tail)
    assert exit_code == 0, log_tail
    assert grace_s - 0.5 <= drained_in <= grace_s + 15, (drained_in, log_tail)
    assert "draining (grace 2.0s)" in log_tail


# -- mesh health --------------------------------------------------------------------------------


def test_mesh_health_checks_every_service_over_mutual_tls(
    running_mesh: RunningMesh, tmp_path: Path
) -> None:
    state = tmp_path / "mesh.json"
    state.write_text(json.dumps(running_mesh.mesh.describe()))
    out, err = io.StringIO(), io.StringIO()
    code = cli_main(["health", "--state", str(state)], environ={}, out=out, err=err)
    rows = {line.split()[0]: line.split()[-1] for line in out.getvalue().splitlines()}
    assert code == 0, (out.getvalue(), err.getvalue())
    assert set(rows.values()) == {"SERVING"} and {"memory", "persister", "agent-1"} <= set(rows)

    # Without the mesh's certificates the services behind the gateway do not answer.
    described = running_mesh.mesh.describe()
    described["tls"] = {}
    state.write_text(json.dumps(described))
    out = io.StringIO()
    code = cli_main(["health", "--state", str(state), "--timeout", "2"], environ={}, out=out)
    rows = {line.split()[0]: line.split()[-1] for line in out.getvalue().splitlines()}
    assert code == 1 and rows["gateway-1"] == "SERVING", out.getvalue()
    assert rows["memory"] in {"UNREACHABLE", "TIMEOUT"}, out.getvalue()

"""A launched mesh with TLS everywhere: mutual TLS between the services (the default) and
``edge_tls`` on the gateway's public gRPC and HTTP ports and on Envoy's listener (which talks
TLS to the gateways), as real processes on the tiny model.

Two turns of one conversation go through every internal hop (the agent reads history from the
persister and recalls from memory, the persister indexes into memory), so a hop the identity
table refused would show: the test also reads every service's log for a denial.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from chat.gateway.v1 import gateway_pb2
from chat.persister.v1 import persister_pb2, persister_service_pb2_grpc
from grpc import aio

from mesh.auth import add_key_to_file
from mesh.launcher import EDGE_IDENTITY, Mesh, MeshConfig, MeshStartError
from tests.integration.grpc_helpers import TurnResult, auth, gateway, start_request

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def edge_mesh(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path
) -> Iterator[tuple[Mesh, str]]:
    state = Path(tmp_path_factory.mktemp("edge-tls"))
    keys_file = state / "api-keys.json"
    key = add_key_to_file(keys_file, "tenant-edge", rate_per_s=100.0, burst=100)
    config = MeshConfig(
        state_dir=state,
        model_path=tiny_model_path,
        api_keys_file=keys_file,
        n_ctx=512,
        edge_tls=True,
        envoy=True,
        extra_env={
            "MESH_AGENT_DEFAULT_MAX_TOKENS": "8",
            "MESH_AGENT_PROMPT_LOG": str(state / "prompts.jsonl"),
        },
    )
    mesh = Mesh(config)
    try:
        mesh.start(timeout_s=180)
    except MeshStartError as error:
        pytest.fail(f"the mesh did not start: {error}")
    yield mesh, key
    mesh.stop()


def ca_of(mesh: Mesh) -> bytes:
    assert mesh.certs is not None
    return mesh.certs.ca_cert.read_bytes()


def stream_turn(stub: object, key: str, text: str, conversation_id: str = "") -> TurnResult:
    result = TurnResult()
    request = gateway_pb2.StreamTurnRequest(start=start_request(text, conversation_id))
    for frame in stub.StreamTurn(request, metadata=auth(key), timeout=120):  # type: ignore[attr-defined]
        result.add(frame)
    return result


def test_turns_over_tls_at_the_edge_and_mutual_tls_inside(edge_mesh: tuple[Mesh, str]) -> None:
    mesh, key = edge_mesh
    credentials = grpc.ssl_channel_credentials(ca_of(mesh))
    with grpc.secure_channel(mesh.gateway_addr, credentials) as channel:
        stub = gateway(channel)
        first = stream_turn(stub, key, "my locker number is 5521")
        assert first.finished is not None and first.tokens
        second = stream_turn(stub, key, "what is my locker number?", first.conversation_id)
        assert second.finished is not None and second.tokens
        reply = stub.GetConversation(  # type: ignore[attr-defined]
            gateway_pb2.GetConversationRequest(conversation_id=first.conversation_id),
            metadata=auth(key),
            timeout=30,
        )
    texts = [message.text for message in reply.conversation.messages]
    assert texts[0] == "my locker number is 5521" and len(texts) == 4, texts
    # The second prompt held the first turn: history came from the persister over mutual TLS.
    prompts = (mesh.config.state_dir / "prompts.jsonl").read_text().splitlines()
    assert "5521" in prompts[-1], prompts[-1]
    for service in mesh.services:
        log = service.log_path.read_text(errors="replace")
        assert "denied" not in log, f"{service.name} denied a call:\n{log[-3000:]}"
        if service.name.startswith("gateway"):
            assert "PLAINTEXT" not in log, log[-3000:]


def test_plaintext_to_the_tls_gateway_gets_nothing(edge_mesh: tuple[Mesh, str]) -> None:
    mesh, key = edge_mesh
    with grpc.insecure_channel(mesh.gateway_addr) as channel:
        with pytest.raises(grpc.RpcError) as error:
            stream_turn(gateway(channel), key, "hello")
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_the_http_api_serves_https(edge_mesh: tuple[Mesh, str]) -> None:
    mesh, key = edge_mesh
    url = mesh.gateway_http_urls[0].replace("http://", "https://") + "/v1/models"
    context = ssl.create_default_context(cadata=ca_of(mesh).decode())
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, context=context, timeout=30) as response:
        models = json.loads(response.read())
    assert models["data"], models
    plain = url.replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(plain, timeout=10).read()


async def test_the_edge_certificate_is_not_a_mesh_identity(edge_mesh: tuple[Mesh, str]) -> None:
    # Its key lives in the gateway too, but it opens no internal RPC: it names no service.
    mesh, _ = edge_mesh
    async with mesh.channel(mesh.persister_addr, "persister", identity=EDGE_IDENTITY) as channel:
        stub = persister_service_pb2_grpc.PersisterServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(aio.AioRpcError) as error:
            await stub.ListConversations(
                persister_pb2.ListConversationsRequest(tenant_id="tenant-edge"), timeout=10
            )
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "spiffe://llm-mesh/gateway-edge is not allowed" in (error.value.details() or "")


def test_envoy_serves_tls_and_reaches_the_gateways_over_tls(edge_mesh: tuple[Mesh, str]) -> None:
    mesh, key = edge_mesh
    assert mesh.envoy is not None and mesh.envoy_url.startswith("https://")
    # Native gRPC through Envoy: TLS to Envoy, and TLS from Envoy to a gateway.
    credentials = grpc.ssl_channel_credentials(ca_of(mesh))
    with grpc.secure_channel(mesh.envoy.addr, credentials) as channel:
        result = stream_turn(gateway(channel), key, "hello through envoy")
    assert result.finished is not None and result.tokens
    context = ssl.create_default_context(cadata=ca_of(mesh).decode())
    # The chat page, and the HTTP API behind it.
    with urllib.request.urlopen(mesh.envoy_url + "/", context=context, timeout=30) as response:
        assert b"<html" in response.read().lower()
    request = urllib.request.Request(
        mesh.envoy_url + "/v1/models", headers={"Authorization": f"Bearer {key}"}
    )
    with urllib.request.urlopen(request, context=context, timeout=30) as response:
        assert json.loads(response.read())["data"]
    # Plaintext to Envoy's listener gets no page.
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(mesh.envoy_url.replace("https://", "http://"), timeout=10).read()


def call_raw(channel: grpc.Channel, method: str, streaming: tuple[bool, bool]) -> grpc.StatusCode:
    """Call ``method`` with an empty request (or no frames); the status code it ends with."""
    client_streams, server_streams = streaming
    try:
        if client_streams and server_streams:
            list(channel.stream_stream(method)(iter(()), timeout=10))
        elif client_streams:
            channel.stream_unary(method)(iter(()), timeout=10)
        elif server_streams:
            list(channel.unary_stream(method)(b"", timeout=10))
        else:
            channel.unary_unary(method)(b"", timeout=10)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[attr-defined,no-any-return]
    return grpc.StatusCode.OK


def test_every_internal_rpc_admits_exactly_the_identities_of_the_table(
    edge_mesh: tuple[Mesh, str],
) -> None:
    from chat.agent.v1 import agent_service_pb2
    from chat.memory.v1 import memory_service_pb2
    from chat.persister.v1 import persister_service_pb2

    from mesh import authz

    mesh, _ = edge_mesh
    assert mesh.certs is not None
    targets = {
        "agent": (mesh.agents[0].addr, agent_service_pb2),
        "memory": (mesh.memory_addr, memory_service_pb2),
        "persister": (mesh.persister_addr, persister_service_pb2),
    }
    seen = 0
    for kind, (addr, module) in targets.items():
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                streaming = (method.client_streaming, method.server_streaming)
                for identity in ("gateway", "agent", "memory", "persister", "operator"):
                    credentials = mesh.credentials(identity)
                    assert credentials is not None
                    options = [("grpc.ssl_target_name_override", kind)]
                    with grpc.secure_channel(addr, credentials, options=options) as channel:
                        code = call_raw(channel, path, streaming)
                    allowed = identity in authz.allowed_callers(path)
                    denied = code == grpc.StatusCode.PERMISSION_DENIED
                    assert denied != allowed, f"{identity} -> {path}: {code}"
                    seen += 1
    assert seen == 5 * len(authz.POLICY)


def test_mesh_health_reads_every_identity_from_mesh_json(
    edge_mesh: tuple[Mesh, str], tmp_path: Path
) -> None:
    import io

    from mesh.cli import main as cli_main

    mesh, _ = edge_mesh
    state = tmp_path / "mesh.json"
    state.write_text(json.dumps(mesh.describe()))
    out = io.StringIO()
    code = cli_main(["health", "--state", str(state)], environ={}, out=out, err=io.StringIO())
    rows = {line.split()[0]: line.split()[-1] for line in out.getvalue().splitlines()}
    # The gateway and Envoy over TLS (the edge CA), the others over mutual TLS.
    assert code == 0 and set(rows.values()) == {"SERVING"}, out.getvalue()
    assert {"gateway-1", "envoy", "memory", "persister", "agent-1"} <= set(rows)

"""A request_id names one turn on every gateway: through the launcher users run, with two
gateways, the persister's claims in PostgreSQL and the embedded log (docs/protocol.md,
"Idempotent starts")."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from chat.gateway.v1 import gateway_pb2
from chat.persister.v1 import persister_pb2, persister_service_pb2_grpc

from mesh import turnlog
from mesh.auth import add_key_to_file
from mesh.launcher import wait_healthy
from mesh.log import TURN_REQUESTS
from mesh.log.embedded import EmbeddedLog
from mesh.tls import channel_credentials, load_identity
from services.gateway.idempotency import fingerprint
from services.gateway.server import start_from_proto
from tests.fixtures.launched import launched, read_info, tail
from tests.integration.grpc_helpers import (
    TurnResult,
    auth,
    error_reason,
    gateway,
    rich_status,
    start_request,
    stream_turn,
)

pytestmark = pytest.mark.integration

MAX_TOKENS = 24
TOKEN_INTERVAL_MS = 40  # a turn takes about a second: a gateway can be killed mid-turn
TAKEOVER_S = 6.0


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("idempotent")
    keys_file = tmp / "api-keys.json"
    key = add_key_to_file(keys_file, "tenant-a", rate_per_s=100.0, burst=100)
    args = ["--model", str(tiny_model_path), "--keys-file", str(keys_file), "--gateways", "2"]
    env = {
        "MESH_AGENT_MIN_TOKEN_INTERVAL_MS": str(TOKEN_INTERVAL_MS),
        # A turn whose gateway was killed waits for the retry, not for the orphan cancel.
        "MESH_AGENT_ORPHAN_GRACE_S": "120",
        # Short, so the takeover of an abandoned claim is quick to test.
        "MESH_GATEWAY_IDEMPOTENCY_TAKEOVER_S": str(TAKEOVER_S),
    }
    with launched(tmp, args, env) as launcher:
        yield {
            **launcher.wait_started(),
            "key": key,
            "log": launcher.log,
            "info_path": launcher.info_path,
            "log_path": launcher.state_dir / "log" / "mesh-log.sqlite3",
            "model": tiny_model_path.name,
        }


def addr(mesh: dict[str, Any], name: str) -> str:
    return str(mesh["services"][name]["addr"])


def hello(request_id: str, text: str = "count to ten") -> gateway_pb2.StartTurn:
    start = start_request(text, max_tokens=MAX_TOKENS, temperature=0.0)
    start.request_id = request_id
    return start


def run(mesh: dict[str, Any], gateway_name: str, start: gateway_pb2.StartTurn) -> TurnResult:
    with grpc.insecure_channel(addr(mesh, gateway_name)) as channel:
        result = stream_turn(gateway(channel), mesh["key"], start)
    assert result.finished is not None, result
    return result


def logged_requests(mesh: dict[str, Any], request_id: str) -> list[str]:
    """Turn ids of the TurnRequested records on the mesh's log with this request id."""

    async def read() -> list[str]:
        found = []
        async with EmbeddedLog(mesh["log_path"]) as log:
            for partition in range(await log.partition_count(TURN_REQUESTS)):
                end = await log.end_offset(TURN_REQUESTS, partition)
                for record in await log.read_range(TURN_REQUESTS, partition, 0, end):
                    request = turnlog.decode_request(record.value)
                    if request.request_id == request_id:
                        found.append(request.turn_id)
        return found

    return asyncio.run(read())


def stored_user_messages(mesh: dict[str, Any], conversation_id: str) -> list[str]:
    """The user messages PostgreSQL holds for the conversation (through a gateway)."""
    with grpc.insecure_channel(addr(mesh, "gateway-2")) as channel:
        reply = gateway(channel).GetConversation(
            gateway_pb2.GetConversationRequest(conversation_id=conversation_id),
            metadata=auth(mesh["key"]),
            timeout=30,
        )
    return [m.turn_id for m in reply.conversation.messages if m.role == 1]


def test_a_retry_on_the_other_gateway_streams_the_same_turn(mesh: dict[str, Any]) -> None:
    first = run(mesh, "gateway-1", hello("r-other"))
    again = run(mesh, "gateway-2", hello("r-other"))
    assert again.turn_id == first.turn_id and again.conversation_id == first.conversation_id
    assert again.seqs == first.seqs == list(range(1, len(first.tokens) + 1))
    assert again.text == first.text and first.text
    assert logged_requests(mesh, "r-other") == [first.turn_id]
    assert stored_user_messages(mesh, first.conversation_id) == [first.turn_id]


def test_a_retry_after_the_gateway_was_killed_returns_the_same_turn(
    mesh: dict[str, Any],
) -> None:
    info_path: Path = mesh["info_path"]
    before = read_info(info_path)
    assert before is not None
    old_pid = before["services"]["gateway-1"]["pid"]
    # Killed mid-turn, as a client's connection would be cut.
    seen = TurnResult()
    with grpc.insecure_channel(addr(mesh, "gateway-1")) as channel:
        call = gateway(channel).StreamTurn(
            gateway_pb2.StreamTurnRequest(start=hello("r-killed")),
            metadata=auth(mesh["key"]),
            timeout=60,
        )
        with pytest.raises(grpc.RpcError):  # noqa: PT012 - the stream breaks while read
            for frame in call:
                seen.add(frame)
                if seen.tokens:
                    os.kill(old_pid, signal.SIGKILL)
    assert seen.turn_id and seen.finished is None
    deadline = time.monotonic() + 90
    while True:
        now = read_info(info_path)
        if now is not None and now["services"]["gateway-1"]["pid"] != old_pid:
            break
        assert time.monotonic() < deadline, f"gateway-1 was not restarted:\n{tail(mesh['log'])}"
        time.sleep(0.2)
    wait_healthy(addr(mesh, "gateway-1"), timeout_s=60, name="gateway-1")
    again = run(mesh, "gateway-1", hello("r-killed"))
    assert again.turn_id == seen.turn_id
    assert again.seqs == list(range(1, len(again.tokens) + 1)) and again.tokens
    assert again.text.startswith("".join(t.text for t in seen.tokens))
    assert logged_requests(mesh, "r-killed") == [seen.turn_id]


def test_a_retry_asking_for_something_else_is_refused(mesh: dict[str, Any]) -> None:
    first = run(mesh, "gateway-1", hello("r-reused"))
    with grpc.insecure_channel(addr(mesh, "gateway-2")) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            stream_turn(gateway(channel), mesh["key"], hello("r-reused", "something else"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(rich_status(refused.value)) == "REQUEST_ID_REUSED"
    assert "r-reused" in (refused.value.details() or "")
    assert logged_requests(mesh, "r-reused") == [first.turn_id]


def test_concurrent_retries_on_two_gateways_make_one_turn(mesh: dict[str, Any]) -> None:
    results: list[TurnResult] = []
    errors: list[BaseException] = []
    ready = threading.Barrier(4)

    def start(name: str) -> None:
        try:
            ready.wait(timeout=30)
            results.append(run(mesh, name, hello("r-burst")))
        except BaseException as error:
            errors.append(error)

    threads = [
        threading.Thread(target=start, args=(name,))
        for name in ("gateway-1", "gateway-2", "gateway-1", "gateway-2")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len({r.turn_id for r in results}) == 1 and len(results) == 4
    assert len({r.text for r in results}) == 1
    turn_id, conversation_id = results[0].turn_id, results[0].conversation_id
    assert logged_requests(mesh, "r-burst") == [turn_id]
    assert stored_user_messages(mesh, conversation_id) == [turn_id]


def post_chat(mesh: dict[str, Any], url: str, key: str, content: str) -> tuple[int, dict[str, Any]]:
    body = {
        "model": mesh["model"],
        "messages": [{"role": "user", "content": content}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    return post(mesh, url + "/v1/chat/completions", key, body)


def post(
    mesh: dict[str, Any], url: str, key: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {mesh['key']}",
            "Content-Type": "application/json",
            "Idempotency-Key": key,
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_an_http_retry_with_the_same_idempotency_key_gets_the_same_completion(
    mesh: dict[str, Any],
) -> None:
    urls = read_info(mesh["info_path"])["gateway_http_urls"]  # type: ignore[index]
    assert len(urls) == 2
    status, first = post_chat(mesh, urls[0], "k-http", "count to ten")
    assert status == 200, first
    status, again = post_chat(mesh, urls[1], "k-http", "count to ten")
    assert status == 200, again
    assert again["id"] == first["id"]
    assert again["choices"][0]["message"] == first["choices"][0]["message"]
    turn_id = first["id"].removeprefix("chatcmpl-")
    assert logged_requests(mesh, "k-http") == [turn_id]
    status, refused = post_chat(mesh, urls[1], "k-http", "something else")
    assert status == 400, refused
    assert refused["error"]["code"] == "request_id_reused"
    assert refused["error"]["param"] == "Idempotency-Key"


def test_an_http_response_retried_with_its_idempotency_key_is_the_same_response(
    mesh: dict[str, Any],
) -> None:
    urls = read_info(mesh["info_path"])["gateway_http_urls"]  # type: ignore[index]
    body = {"model": mesh["model"], "input": "count to ten", "max_output_tokens": MAX_TOKENS}
    status, first = post(mesh, urls[0] + "/v1/responses", "k-resp", body)
    assert status == 200, first
    status, again = post(mesh, urls[1] + "/v1/responses", "k-resp", body)
    assert status == 200, again
    assert again["id"] == first["id"] and again["output"] == first["output"]
    assert logged_requests(mesh, "k-resp") == [first["id"].removeprefix("resp_")]


def test_a_claim_left_by_a_gateway_that_died_before_its_append_is_taken_over(
    mesh: dict[str, Any],
) -> None:
    start = hello("r-abandoned")
    lost = "t0.0.0.00112233445566ff"
    # What a gateway killed between its claim and its append leaves: a claim (made here with
    # the gateway's certificate, as only gateways may) whose turn never reaches the log.
    tls = mesh["tls"]
    certs = Path(tls["MESH_TLS_CERT"]).parent
    identity = load_identity(Path(tls["MESH_TLS_CA"]), certs / "gateway.pem", certs / "gateway.key")
    options = [("grpc.ssl_target_name_override", "persister")]
    with grpc.secure_channel(
        addr(mesh, "persister"), channel_credentials(identity), options=options
    ) as channel:
        planted = persister_service_pb2_grpc.PersisterServiceStub(channel).ClaimRequestId(  # type: ignore[no-untyped-call]
            persister_pb2.ClaimRequestIdRequest(
                tenant_id="tenant-a",
                request_id="r-abandoned",
                turn_id=lost,
                conversation_id="c-lost",
                fingerprint=fingerprint(start_from_proto(start)),
            ),
            timeout=30,
        )
    assert planted.won
    began = time.monotonic()
    taken = run(mesh, "gateway-2", start)
    # The retry waited for the claim's turn to reach the log, then took the claim over.
    assert time.monotonic() - began >= TAKEOVER_S - 0.5
    assert taken.turn_id != lost and taken.tokens
    assert logged_requests(mesh, "r-abandoned") == [taken.turn_id]
    again = run(mesh, "gateway-1", start)
    assert again.turn_id == taken.turn_id and again.text == taken.text

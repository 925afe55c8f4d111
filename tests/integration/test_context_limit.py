"""A message over the model's context is refused at the gateway, never accepted and failed.

Against the launched mesh (tiny model, ``n_ctx=512``): the gateway counts the prompt with the
model's vocabulary and refuses what cannot leave one token of reply, on StreamTurn, on Chat (the
stream stays open) and on the OpenAI-compatible API; a message one token under the limit is
accepted and completes, and the agent's own count of its prompt agrees with the gateway's.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import grpc
import pytest
from chat.common.v1 import common_pb2
from chat.gateway.v1 import gateway_pb2
from google.rpc import error_details_pb2, status_pb2

from tests.fixtures.mesh import RunningMesh
from tests.integration.grpc_helpers import (
    ChatSession,
    error_reason,
    gateway,
    rich_status,
    start_request,
    stream_turn,
)

pytestmark = pytest.mark.integration

N_CTX = 512  # the running_mesh fixture's


def words(n: int) -> str:
    return "the " * n


def refusal_details(status: status_pb2.Status) -> tuple[dict[str, str], list[str]]:
    """(ErrorInfo metadata, BadRequest fields) of a PROMPT_TOO_LONG status."""
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert error_reason(status) == "PROMPT_TOO_LONG"
    metadata: dict[str, str] = {}
    fields: list[str] = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(info):
            metadata = dict(info.metadata)
        elif detail.Unpack(bad):
            fields += [violation.field for violation in bad.field_violations]
    return metadata, fields


def refuse(running_mesh: RunningMesh, text: str) -> dict[str, str]:
    with grpc.insecure_channel(running_mesh.gateway_addr) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            stream_turn(gateway(channel), running_mesh.api_key, start_request(text))
    metadata, fields = refusal_details(rich_status(refused.value))
    assert fields == ["start.text"]
    assert f"holds {N_CTX} tokens" in refused.value.details()  # type: ignore[attr-defined]
    assert metadata["context_tokens"] == str(N_CTX)
    return metadata


def test_a_message_over_the_context_is_refused_and_one_just_under_completes(
    running_mesh: RunningMesh,
) -> None:
    long = 700
    over = int(refuse(running_mesh, words(long))["prompt_tokens"])
    assert over > N_CTX
    # One "the " is one token of the tiny model: this many words make a prompt of N_CTX - 1.
    fitting = long - (over - (N_CTX - 1))
    refused = refuse(running_mesh, words(fitting + 1))
    assert refused["prompt_tokens"] == str(N_CTX)
    with grpc.insecure_channel(running_mesh.gateway_addr) as channel:
        # A new conversation: no history; recalled passages are dropped by the agent first.
        result = stream_turn(
            gateway(channel), running_mesh.api_key, start_request(words(fitting), max_tokens=64)
        )
    assert result.finished is not None
    # Room for one token of reply: cut short, never an error.
    assert result.finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert not result.finished.HasField("error")
    assert result.finished.usage.prompt_tokens == N_CTX - 1  # the agent counted the same
    assert result.finished.usage.completion_tokens == 1


def test_chat_refuses_the_start_and_keeps_the_stream_open(running_mesh: RunningMesh) -> None:
    with grpc.insecure_channel(running_mesh.gateway_addr) as channel:
        session = ChatSession(gateway(channel), running_mesh.api_key)
        try:
            session.send(gateway_pb2.ChatRequest(start=start_request(words(N_CTX + 10))))
            error = session.next().error
            metadata, fields = refusal_details(error.status)
            assert fields == ["start.text"] and int(metadata["prompt_tokens"]) > N_CTX
            session.send(gateway_pb2.ChatRequest(start=start_request("hello", max_tokens=2)))
            assert session.next().WhichOneof("frame") == "accepted"
            while session.next().WhichOneof("frame") != "finished":
                pass
        finally:
            session.close()


def post_chat(running_mesh: RunningMesh, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        running_mesh.mesh.gateway_http_urls[0] + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {running_mesh.api_key}",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_openai_api_answers_400_context_length_exceeded(running_mesh: RunningMesh) -> None:
    model_id = running_mesh.mesh.config.model_path.name  # what the agents report
    status, body = post_chat(
        running_mesh,
        {
            "model": model_id,
            "messages": [{"role": "user", "content": words(N_CTX + 10)}],
        },
    )
    assert status == 400, body
    error = body["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages"
    assert f"holds {N_CTX} tokens" in error["message"]
    status, body = post_chat(
        running_mesh,
        {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] in ("stop", "length")

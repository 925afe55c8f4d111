"""The OpenAI-compatible HTTP API against the real mesh (processes, llama.cpp on the tiny model).

Clients are the official ones: the ``openai`` Python SDK (at a gateway and through Envoy), the
``openai`` npm package, and ``curl -N``. Errors are checked raw, status and body.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
import pytest_asyncio
from chat.common.v1 import common_pb2, conversation_pb2
from chat.gateway.v1 import gateway_pb2

from mesh.infra.envoy import EnvoyProxy
from mesh.launcher import Service
from tests.fixtures.envoy import envoy_in_front_of, wait_upstreams_healthy
from tests.fixtures.mesh import RunningMesh
from tests.integration.grpc_helpers import auth, gateway, start_request

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NODE_CLIENT = Path(__file__).with_name("openai_stream.mjs")


def base_url(running_mesh: RunningMesh, index: int = 0) -> str:
    return running_mesh.mesh.gateway_http_urls[index]


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(running_mesh: RunningMesh) -> str:
    models = client(base_url(running_mesh), running_mesh.api_key).models.list()
    return models.data[0].id


@pytest.fixture(scope="module")
def sdk(running_mesh: RunningMesh) -> openai.OpenAI:
    return client(base_url(running_mesh), running_mesh.api_key)


@pytest_asyncio.fixture(scope="module")
async def envoy_http(running_mesh: RunningMesh) -> AsyncIterator[EnvoyProxy]:
    mesh = running_mesh.mesh
    # Only live gateways: other tests here kill the ones they added.
    live = [
        (service.addr, url.removeprefix("http://"))
        for service, url in zip(mesh.all("gateway"), mesh.gateway_http_urls, strict=True)
        if service.process.poll() is None
    ]
    async with envoy_in_front_of(
        [addr for addr, _ in live], http_upstreams=tuple(http for _, http in live)
    ) as proxy:
        await wait_upstreams_healthy(proxy)
        yield proxy


def raw(
    url: str,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    connection.request(method, path, body=data, headers=all_headers)
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, payload


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def error_of(payload: bytes) -> dict[str, Any]:
    body = json.loads(payload)
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"]
    return error


def conversation(running_mesh: RunningMesh, key: str, conversation_id: str) -> Any:
    with grpc.insecure_channel(running_mesh.gateway_addr) as channel:
        reply = gateway(channel).GetConversation(
            gateway_pb2.GetConversationRequest(conversation_id=conversation_id),
            metadata=auth(key),
            timeout=30,
        )
    return reply.conversation


def conversation_of_turn(running_mesh: RunningMesh, turn_id: str) -> Any:
    """The stored conversation holding ``turn_id`` (of the main test tenant)."""
    with grpc.insecure_channel(running_mesh.gateway_addr) as channel:
        listing = gateway(channel).ListConversations(
            gateway_pb2.ListConversationsRequest(page_size=100),
            metadata=auth(running_mesh.api_key),
            timeout=30,
        )
    for summary in listing.conversations:
        stored = conversation(running_mesh, running_mesh.api_key, summary.conversation_id)
        if any(m.turn_id == turn_id for m in stored.messages):
            return stored
    raise AssertionError(f"no conversation holds turn {turn_id}")


# -- models and chat completions --------------------------------------------------------------


def test_models_lists_what_the_agents_serve(running_mesh: RunningMesh, sdk: openai.OpenAI) -> None:
    models = sdk.models.list()
    ids = [model.id for model in models.data]
    agent_model = running_mesh.mesh.config.model_path.name
    assert ids == [agent_model]
    assert sdk.models.retrieve(agent_model).id == agent_model


def test_chat_completion_not_streamed(sdk: openai.OpenAI, model_id: str) -> None:
    completion = sdk.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=8,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        user="someone",
    )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert 0 < completion.usage.completion_tokens <= 8
    assert completion.usage.prompt_tokens > 0


def test_chat_completion_streamed_with_and_without_usage(sdk: openai.OpenAI, model_id: str) -> None:
    for include_usage in (False, True):
        chunks = list(
            sdk.chat.completions.create(
                model=model_id,
                messages=[{"role": "user", "content": "stream please"}],
                max_completion_tokens=6,
                stream=True,
                stream_options={"include_usage": True} if include_usage else None,
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == "length" or finishes[-1] == "stop"
        usage_chunks = [c for c in chunks if c.usage is not None]
        if include_usage:
            assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0]
            assert chunks[-1].choices == []
            assert usage_chunks[0].usage is not None
            assert usage_chunks[0].usage.completion_tokens <= 6
        else:
            assert usage_chunks == []


def test_full_history_continues_one_conversation_without_counting_it_twice(
    running_mesh: RunningMesh, sdk: openai.OpenAI, model_id: str
) -> None:
    first_messages: list[Any] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
    ]
    first = sdk.chat.completions.with_raw_response.create(
        model=model_id, messages=first_messages, max_tokens=5
    )
    conversation_id = first.headers["x-mesh-conversation-id"]
    answer = first.parse().choices[0].message.content
    second_messages = [
        *first_messages,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "second question"},
    ]
    second = sdk.chat.completions.with_raw_response.create(
        model=model_id, messages=second_messages, max_tokens=5
    )
    assert second.headers["x-mesh-conversation-id"] == conversation_id
    stored = conversation(running_mesh, running_mesh.api_key, conversation_id)
    texts = [m.text for m in stored.messages]
    assert len(texts) == 4
    # The first turn carries the system message; the second only the new user text.
    assert "Be brief." in texts[0] and "first question" in texts[0]
    assert texts[1] == answer
    assert texts[2] == "second question"
    # The same history again (a regenerate) must not continue the conversation twice.
    third = sdk.chat.completions.with_raw_response.create(
        model=model_id, messages=second_messages, max_tokens=5
    )
    assert third.headers["x-mesh-conversation-id"] != conversation_id
    forked = conversation(
        running_mesh, running_mesh.api_key, third.headers["x-mesh-conversation-id"]
    )
    assert len(forked.messages) == 2
    assert "first question" in forked.messages[0].text
    assert "second question" in forked.messages[0].text


def test_client_disconnect_cancels_generation(running_mesh: RunningMesh, model_id: str) -> None:
    parts = urllib.parse.urlsplit(base_url(running_mesh))
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": "a long one"}],
        "max_tokens": 400,
        "stream": True,
    }
    connection.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body),
        headers={**bearer(running_mesh.api_key), "Content-Type": "application/json"},
    )
    response = connection.getresponse()
    assert response.status == 200
    line = response.readline()
    chunk = json.loads(line.removeprefix(b"data: "))
    turn_id = chunk["id"].removeprefix("chatcmpl-")
    response.readline()
    connection.sock.close()  # type: ignore[union-attr]
    connection.close()
    # The turn is readable as a response: it must end cancelled, well before 400 tokens.
    sdk = client(base_url(running_mesh), running_mesh.api_key)
    deadline = time.monotonic() + 20
    status = ""
    while time.monotonic() < deadline:
        status = sdk.responses.retrieve("resp_" + turn_id).status or ""
        if status not in ("queued", "in_progress"):
            break
        time.sleep(0.2)
    assert status == "cancelled"


def test_client_disconnect_cancels_a_non_streamed_completion(
    running_mesh: RunningMesh, model_id: str
) -> None:
    marker = f"wait for me {time.time_ns()}"
    body = json.dumps(
        {"model": model_id, "messages": [{"role": "user", "content": marker}], "max_tokens": 400}
    ).encode()
    parts = urllib.parse.urlsplit(base_url(running_mesh))
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: mesh\r\n"
            + f"Authorization: Bearer {running_mesh.other_api_key}\r\n".encode()
            + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(1.0)
    # The persister shows the turn: the user's message, then a reply cut short by the cancel.
    deadline = time.monotonic() + 20
    messages: list[Any] = []
    while time.monotonic() < deadline:
        with grpc.insecure_channel(running_mesh.gateway_addr) as channel:
            listing = gateway(channel).ListConversations(
                gateway_pb2.ListConversationsRequest(page_size=20),
                metadata=auth(running_mesh.other_api_key),
                timeout=30,
            )
        for summary in listing.conversations:
            stored = conversation(running_mesh, running_mesh.other_api_key, summary.conversation_id)
            if stored.messages and stored.messages[0].text == marker:
                messages = list(stored.messages)
        if len(messages) == 2:
            break
        time.sleep(0.3)
    assert len(messages) == 2, messages
    assert messages[1].finish_reason == common_pb2.FINISH_REASON_CANCELLED


def test_curl_streams_raw_sse(running_mesh: RunningMesh, model_id: str) -> None:
    curl = shutil.which("curl")
    assert curl is not None, "curl is needed for this test"
    body = json.dumps(
        {
            "model": model_id,
            "messages": [{"role": "user", "content": "curl"}],
            "max_tokens": 4,
            "stream": True,
        }
    )
    result = subprocess.run(
        [
            curl,
            "-N",
            "-sS",
            "--fail-with-body",
            "-H",
            f"Authorization: Bearer {running_mesh.api_key}",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            base_url(running_mesh) + "/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    events = [block for block in result.stdout.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events), result.stdout
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(block.removeprefix("data: ")) for block in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_npm_openai_streams_a_completion(running_mesh: RunningMesh, model_id: str) -> None:
    node = shutil.which("node")
    assert node is not None, "node is needed for this test"
    result = subprocess.run(
        [node, str(NODE_CLIENT)],
        env={
            **os.environ,
            "OPENAI_BASE_URL": base_url(running_mesh) + "/v1",
            "OPENAI_API_KEY": running_mesh.api_key,
            "MODEL": model_id,
        },
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["chunks"] >= 2
    assert report["text"]
    assert report["finish_reason"] in ("stop", "length")


# -- responses ---------------------------------------------------------------------------------


def collect(events: Iterator[Any]) -> list[Any]:
    return list(events)


def check_sequence(events: list[Any], start: int = 0) -> None:
    numbers = [event.sequence_number for event in events]
    assert numbers == list(range(start, start + len(numbers))), numbers


def test_response_streamed_and_not(sdk: openai.OpenAI, model_id: str) -> None:
    response = sdk.responses.create(
        model=model_id, input="hello", instructions="Answer briefly.", max_output_tokens=6
    )
    assert response.status in ("completed", "incomplete")
    assert response.output_text
    assert response.usage is not None and response.usage.output_tokens <= 6
    events = collect(
        sdk.responses.create(model=model_id, input="hello", max_output_tokens=6, stream=True)
    )
    check_sequence(events)
    assert events[0].type == "response.created"
    assert events[-1].type in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = [e for e in events if e.type == "response.output_text.done"]
    assert done[0].text == deltas
    fetched = sdk.responses.retrieve(events[-1].response.id)
    assert fetched.output_text == deltas
    assert fetched.status == events[-1].response.status


def test_previous_response_id_continues_the_conversation(
    running_mesh: RunningMesh, sdk: openai.OpenAI, model_id: str
) -> None:
    first = sdk.responses.create(model=model_id, input="remember 42", max_output_tokens=4)
    second = sdk.responses.create(
        model=model_id,
        input=[{"role": "user", "content": "what number?"}],
        previous_response_id=first.id,
        max_output_tokens=4,
    )
    assert second.previous_response_id == first.id
    first_turn = first.id.removeprefix("resp_")
    second_turn = second.id.removeprefix("resp_")
    found = conversation_of_turn(running_mesh, second_turn)
    assert found is not None
    assert [m.turn_id for m in found.messages] == [first_turn] * 2 + [second_turn] * 2
    assert [m.role for m in found.messages] == [
        conversation_pb2.ROLE_USER,
        conversation_pb2.ROLE_ASSISTANT,
    ] * 2
    assert found.messages[0].text == "remember 42"
    assert found.messages[1].text == first.output_text
    assert found.messages[2].text == "what number?"
    # A branch from the first response: a new conversation that never sees the second turn.
    branch = sdk.responses.create(
        model=model_id, input="another number?", previous_response_id=first.id, max_output_tokens=4
    )
    branched = conversation_of_turn(running_mesh, branch.id.removeprefix("resp_"))
    assert branched.conversation_id != found.conversation_id
    assert len(branched.messages) == 2
    transcript = branched.messages[0].text
    assert "User: remember 42" in transcript
    assert "another number?" in transcript
    assert "what number?" not in transcript


def test_cancel_a_background_response(sdk: openai.OpenAI, model_id: str) -> None:
    created = sdk.responses.create(
        model=model_id, input="go on for a while", max_output_tokens=400, background=True
    )
    assert created.status in ("queued", "in_progress")
    time.sleep(0.3)
    cancelled = sdk.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    assert sdk.responses.retrieve(created.id).status == "cancelled"
    assert len(sdk.responses.retrieve(created.id).output_text) < 400


@pytest.mark.parametrize("resume_via", ["gateway", "envoy"])
async def test_background_response_resumes_on_another_gateway_after_sigkill(
    running_mesh: RunningMesh, envoy_http: EnvoyProxy, model_id: str, resume_via: str
) -> None:
    mesh = running_mesh.mesh
    doomed = await asyncio.to_thread(mesh.start_gateway)
    try:
        await resume_after_sigkill(running_mesh, envoy_http, model_id, resume_via, doomed)
    finally:
        mesh.retire(doomed)  # later tests (and the probes) see only live gateways


async def resume_after_sigkill(
    running_mesh: RunningMesh,
    envoy_http: EnvoyProxy,
    model_id: str,
    resume_via: str,
    doomed: Service,
) -> None:
    mesh = running_mesh.mesh
    doomed_url = mesh.gateway_http_urls[-1]
    # Envoy (started before this gateway existed) fronts the survivors only.
    survivor_url = base_url(running_mesh) if resume_via == "gateway" else envoy_http.url
    key = running_mesh.api_key
    async with (
        openai.AsyncOpenAI(base_url=doomed_url + "/v1", api_key=key, max_retries=0) as creator,
        openai.AsyncOpenAI(base_url=survivor_url + "/v1", api_key=key, max_retries=0) as other,
    ):
        stream = await creator.responses.create(
            model=model_id,
            input="a long story",
            max_output_tokens=80,
            background=True,
            stream=True,
        )
        seen: list[Any] = []
        async for event in stream:
            seen.append(event)
            if event.type == "response.output_text.delta" and len(seen) >= 10:
                break
        response_id = seen[0].response.id
        doomed.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(doomed.process.wait, 10)
        # The turn goes on with no client and no gateway of its own.
        await asyncio.sleep(0.3)
        resumed = await other.responses.retrieve(
            response_id, stream=True, starting_after=seen[-1].sequence_number
        )
        rest = [event async for event in resumed]
        final = await other.responses.retrieve(response_id)
    events = seen + rest
    check_sequence(events)
    assert events[-1].type in ("response.completed", "response.incomplete")
    delta_events = [e for e in events if e.type == "response.output_text.delta"]
    deltas = "".join(e.delta for e in delta_events)
    assert [e.text for e in events if e.type == "response.output_text.done"] == [deltas]
    assert len(delta_events) > 10
    assert final.output_text == deltas
    assert final.usage is not None
    assert final.usage.output_tokens == len(delta_events)


# -- through Envoy ------------------------------------------------------------------------------


async def test_sdk_through_envoy(
    running_mesh: RunningMesh, envoy_http: EnvoyProxy, model_id: str
) -> None:
    sdk = openai.AsyncOpenAI(
        base_url=envoy_http.url + "/v1", api_key=running_mesh.api_key, max_retries=0
    )
    completion = await sdk.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "via envoy"}], max_tokens=4
    )
    assert completion.choices[0].message.content
    chunks = [
        chunk
        async for chunk in await sdk.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "via envoy"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    ]
    assert chunks[-1].usage is not None
    created = await sdk.responses.create(
        model=model_id, input="via envoy", max_output_tokens=30, background=True
    )
    events = [
        event
        async for event in await sdk.responses.retrieve(created.id, stream=True, starting_after=2)
    ]
    assert events[0].sequence_number == 3
    check_sequence(events, start=3)
    follow_up = await sdk.responses.create(
        model=model_id, input="and then?", previous_response_id=created.id, max_output_tokens=2
    )
    assert follow_up.previous_response_id == created.id
    long_one = await sdk.responses.create(
        model=model_id, input="long", max_output_tokens=400, background=True
    )
    assert (await sdk.responses.cancel(long_one.id)).status == "cancelled"
    await sdk.close()
    async with openai.AsyncOpenAI(
        base_url=envoy_http.url + "/v1", api_key="nope", max_retries=0
    ) as stranger:
        with pytest.raises(openai.AuthenticationError):
            await stranger.models.list()


def test_envoy_answers_cors_preflight_for_the_api(envoy_http: EnvoyProxy) -> None:
    status, headers, _ = raw(
        envoy_http.url,
        "OPTIONS",
        "/v1/chat/completions",
        headers={
            "Origin": "http://localhost:5173",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert status == 200
    assert headers["access-control-allow-origin"] == "http://localhost:5173"
    assert "authorization" in headers["access-control-allow-headers"]


# -- errors ------------------------------------------------------------------------------------


def chat_body(model: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **(extra or {})}


def test_auth_errors(running_mesh: RunningMesh, model_id: str) -> None:
    url = base_url(running_mesh)
    for headers, code in (
        ({}, "missing_api_key"),
        (bearer("mk_wrong"), "invalid_api_key"),
        ({"Authorization": "Basic abc"}, "invalid_api_key"),
    ):
        status, _, payload = raw(url, "POST", "/v1/chat/completions", chat_body(model_id), headers)
        assert status == 401
        assert error_of(payload)["code"] == code
    status, _, payload = raw(url, "GET", "/v1/models")
    assert status == 401
    with pytest.raises(openai.AuthenticationError):
        client(url, "mk_wrong").models.list()


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 7}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"stop": 5}, "stop"),
        ({"stop": [""]}, "stop[0]"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": "   "}]}, "messages[0].content"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "a\u0000b"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x" * 20_000}]}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0].type",
        ),
        ({"model": ""}, "model"),
        ({"model": 3}, "model"),
        ({"user": {"id": 1}}, "user"),
    ],
)
def test_bad_parameters_are_400_naming_them(
    running_mesh: RunningMesh, model_id: str, extra: dict[str, Any], param: str
) -> None:
    status, _, payload = raw(
        base_url(running_mesh),
        "POST",
        "/v1/chat/completions",
        chat_body(model_id, extra),
        bearer(running_mesh.api_key),
    )
    assert status == 400, payload
    error = error_of(payload)
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "empty_body"),
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'{"model": NaN}', "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (
            b'{"model": "MODEL", "messages": [{"role": "user", "content": "\\ud800"}]}',
            "invalid_value",
        ),
    ],
)
def test_malformed_bodies_are_400(
    running_mesh: RunningMesh, model_id: str, body: bytes, code: str
) -> None:
    body = body.replace(b"MODEL", model_id.encode())
    status, _, payload = raw(
        base_url(running_mesh), "POST", "/v1/chat/completions", body, bearer(running_mesh.api_key)
    )
    assert status == 400
    assert error_of(payload)["code"] == code


def test_huge_body_is_413(running_mesh: RunningMesh, model_id: str) -> None:
    body = chat_body(model_id, {"messages": [{"role": "user", "content": "x" * 2_000_000}]})
    status, _, payload = raw(
        base_url(running_mesh), "POST", "/v1/chat/completions", body, bearer(running_mesh.api_key)
    )
    assert status == 413
    assert error_of(payload)["code"] == "request_too_large"


def test_unknown_model_route_and_method(running_mesh: RunningMesh, model_id: str) -> None:
    url, key = base_url(running_mesh), bearer(running_mesh.api_key)
    status, _, payload = raw(url, "POST", "/v1/chat/completions", chat_body("gpt-9"), key)
    assert (status, error_of(payload)["code"]) == (404, "model_not_found")
    status, _, payload = raw(url, "GET", "/v1/embeddings", None, key)
    assert status == 404
    error_of(payload)
    status, _, payload = raw(url, "GET", "/v1/chat/completions", None, key)
    assert status == 405
    error_of(payload)


def test_unknown_and_other_tenants_responses_are_404(
    running_mesh: RunningMesh, sdk: openai.OpenAI, model_id: str
) -> None:
    mine = sdk.responses.create(model=model_id, input="mine", max_output_tokens=2)
    other = client(base_url(running_mesh), running_mesh.other_api_key)
    for response_id in (mine.id, "resp_t0.0.0.0123456789abcdef", "resp_garbage", "nope"):
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(response_id)
        with pytest.raises(openai.NotFoundError):
            other.responses.cancel(response_id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(
            model=model_id, input="x", previous_response_id=mine.id, max_output_tokens=2
        )
    unstored = sdk.responses.create(model=model_id, input="x", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(unstored.id)
    status, _, payload = raw(
        base_url(running_mesh),
        "GET",
        f"/v1/responses/{mine.id}?stream=maybe",
        None,
        bearer(running_mesh.api_key),
    )
    assert (status, error_of(payload)["param"]) == (400, "stream")


def test_rate_limit_is_429_with_retry_after(running_mesh: RunningMesh, model_id: str) -> None:
    url, key = base_url(running_mesh), bearer(running_mesh.limited_api_key)
    statuses = []
    for _ in range(4):
        status, headers, payload = raw(
            url, "POST", "/v1/chat/completions", chat_body(model_id, {"max_tokens": 1}), key
        )
        statuses.append(status)
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            assert error_of(payload)["code"] == "rate_limit_exceeded"
            break
    assert statuses[-1] == 429, statuses


def test_draining_gateway_answers_503(running_mesh: RunningMesh, model_id: str) -> None:
    mesh = running_mesh.mesh
    draining = mesh.start_gateway()
    url = mesh.gateway_http_urls[-1]
    # An open gRPC stream keeps the gateway draining (not yet stopped) after SIGTERM.
    channel = grpc.insecure_channel(draining.addr)
    frames = gateway(channel).StreamTurn(
        gateway_pb2.StreamTurnRequest(start=start_request("keep me open", max_tokens=300)),
        metadata=auth(running_mesh.api_key),
        timeout=60,
    )
    next(frames)
    try:
        draining.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        status = 0
        while time.monotonic() < deadline:
            status, headers, payload = raw(
                url,
                "POST",
                "/v1/chat/completions",
                chat_body(model_id),
                bearer(running_mesh.api_key),
            )
            if status == 503:
                assert error_of(payload)["code"] == "draining"
                assert headers["retry-after"] == "1"
                break
            time.sleep(0.05)
        assert status == 503
    finally:
        frames.cancel()
        channel.close()
        draining.process.wait(timeout=30)
        mesh.retire(draining)


def test_http_requests_are_counted_like_rpcs(running_mesh: RunningMesh) -> None:
    service = running_mesh.mesh.all("gateway")[0]
    raw(base_url(running_mesh), "GET", "/v1/models", None, bearer(running_mesh.api_key))
    raw(base_url(running_mesh), "GET", "/v1/models")
    url = f"http://127.0.0.1:{service.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    assert 'mesh_rpcs_handled_total{code="OK",method="ListModels",service="gateway"}' in text
    assert (
        'mesh_rpc_errors_total{code="UNAUTHENTICATED",method="ListModels",service="gateway"}'
        in (text)
    )


# -- on Kafka, behind the launcher's Envoy -------------------------------------------------------


@pytest.mark.infra
def test_background_response_on_kafka_resumes_on_the_other_gateway_and_through_envoy(
    scale_mesh: Any,
) -> None:
    mesh = scale_mesh.mesh
    first, second = mesh.gateway_http_urls
    key = scale_mesh.api_key
    model = client(first, key).models.list().data[0].id
    stream = client(first, key).responses.create(
        model=model, input="on kafka", max_output_tokens=12, background=True, stream=True
    )
    seen: list[Any] = []
    for event in stream:
        seen.append(event)
        if len(seen) == 5:
            break
    stream.close()  # a background response goes on without its client
    response_id = seen[0].response.id
    rest = collect(
        client(second, key).responses.retrieve(
            response_id, stream=True, starting_after=seen[-1].sequence_number
        )
    )
    check_sequence(seen + rest)
    assert rest[-1].type in ("response.completed", "response.incomplete")
    through_envoy = collect(
        client(mesh.envoy_url, key).responses.retrieve(response_id, stream=True, starting_after=0)
    )
    assert [e.sequence_number for e in through_envoy] == [e.sequence_number for e in seen + rest][
        1:
    ]

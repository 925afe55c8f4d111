"""The OpenAI HTTP API's pure parts: request parsing, history mapping, event numbering, errors.

End to end (real mesh, official SDKs) is tests/integration/test_openai_http.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mesh.auth import Principal, hash_key
from mesh.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from mesh.generation import FinishReason
from mesh.log import LogSettings
from mesh.log.embedded import EmbeddedLog
from services.gateway.core import GatewayCore
from services.gateway.http.app import discover_models, parse_chat, parse_response
from services.gateway.http.conversations import ConversationIndex, Known, compose, history_key
from services.gateway.http.errors import ApiError, from_mesh_error
from services.gateway.http.parsing import ChatMessage, parse_json_object
from services.gateway.http.responses import (
    HEADER_EVENTS,
    ResponseState,
    closing_events,
    header_events,
    parse_response_id,
    read_state,
    response_id,
    status_of,
)
from services.gateway.model import StartRequest
from services.gateway.settings import GatewaySettings
from tests.unit.test_gateway_core import Agent, KnownConversations

MODEL = "tiny.gguf"


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


def refused(body: dict[str, Any], served: tuple[str, ...] = (MODEL,)) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_chat(body, served)
    return caught.value


def test_chat_parameters_become_generation_options() -> None:
    call = parse_chat(
        chat(
            max_completion_tokens=12,
            temperature=0.5,
            top_p=0.9,
            seed=-1,
            stop="END",
            stream=True,
            stream_options={"include_usage": True},
            user="u1",
            n=1,
            logprobs=False,
            tools=[],
            metadata={"a": "b"},
        ),
        (MODEL,),
    )
    options = call.sampling.options
    assert (options.max_tokens, options.temperature, options.top_p) == (12, 0.5, 0.9)
    assert options.stop_sequences == ("END",)
    assert options.seed == 0xFFFFFFFF  # 64-bit seeds fold into the log's 32 bits
    assert call.stream and call.include_usage
    assert call.sampling.max_tokens_param == "max_completion_tokens"
    assert parse_chat(chat(stop=["a", "b"]), (MODEL,)).sampling.options.stop_sequences == (
        "a",
        "b",
    )


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"n": 3}, "n", "unsupported_parameter"),
        ({"logprobs": True}, "logprobs", "unsupported_parameter"),
        ({"tools": [{"type": "function"}]}, "tools", "unsupported_parameter"),
        ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
        ({"presence_penalty": 1}, "presence_penalty", "unsupported_parameter"),
        ({"bogus": True}, "bogus", "unrecognized_request_argument"),
        ({"temperature": True}, "temperature", "invalid_type"),
        ({"max_tokens": 1.5}, "max_tokens", "invalid_type"),
        ({"max_tokens": -3}, "max_tokens", "invalid_value"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens", "invalid_value"),
        ({"seed": 2**70}, "seed", "invalid_value"),
        ({"stop": ["ok", 3]}, "stop[1]", "invalid_type"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"user": "x" * 300}, "user", "invalid_value"),
        ({"model": "other"}, "model", "model_not_found"),
        ({"messages": [{"role": "user", "content": "a\x07"}]}, "messages[0].content", None),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content", None),
        ({"messages": [{"role": "user"}]}, "messages[0].content", None),
        ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages[0].extra", None),
        ({"messages": [{"role": "user", "content": "x"}] * 1001}, "messages", None),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role", None),
    ],
)
def test_chat_refusals_name_the_parameter(
    extra: dict[str, Any], param: str, code: str | None
) -> None:
    error = refused(chat(**extra))
    assert error.param == param
    assert error.status == (404 if code == "model_not_found" else 400)
    if code is not None:
        assert error.code == code


def test_model_is_free_when_no_list_is_configured() -> None:
    assert parse_chat(chat(model="anything"), ()).model == "anything"
    assert refused({"messages": []}, ()).param == "model"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "empty_body"),
        (b"{", "invalid_json"),
        (b"3", "invalid_json"),
        (b"\xff", "invalid_json"),
    ],
)
def test_bodies_must_be_json_objects(raw: bytes, code: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_json_object(raw)
    assert (caught.value.status, caught.value.code) == (400, code)


def test_deeply_nested_json_is_a_400_not_a_crash() -> None:
    with pytest.raises(ApiError):
        parse_json_object(b"[" * 100_000 + b"]" * 100_000)


def test_responses_input_and_flags() -> None:
    call = parse_response(
        {
            "model": MODEL,
            "input": [
                {"role": "developer", "content": "be nice"},
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "q"}],
                },
            ],
            "instructions": "short",
            "background": True,
            "max_output_tokens": 9,
            "store": True,
        },
        (MODEL,),
    )
    assert call.input == [ChatMessage("system", "be nice"), ChatMessage("user", "q")]
    assert call.background and call.store and call.max_output_tokens == 9
    assert parse_response({"model": MODEL, "input": "plain"}, ()).input == [
        ChatMessage("user", "plain")
    ]
    for body, param in (
        ({"model": MODEL, "input": "x", "background": True, "store": False}, "background"),
        ({"model": MODEL}, "input"),
        ({"model": MODEL, "input": ""}, "input"),
        ({"model": MODEL, "input": "x", "reasoning": {"effort": "low"}}, "reasoning"),
        ({"model": MODEL, "input": [{"type": "function_call_output"}]}, "input[0].role"),
        ({"model": MODEL, "input": "x", "previous_response_id": 4}, "previous_response_id"),
    ):
        with pytest.raises(ApiError) as caught:
            parse_response(body, (MODEL,))
        assert caught.value.param == param, body


def test_compose_sends_a_lone_message_as_is_and_history_as_a_transcript() -> None:
    assert compose([ChatMessage("user", "hi")]) == "hi"
    text = compose(
        [
            ChatMessage("system", "rules"),
            ChatMessage("user", "a"),
            ChatMessage("assistant", "b"),
            ChatMessage("user", "c"),
        ]
    )
    assert text == "Instructions:\nrules\n\nEarlier messages:\nUser: a\nAssistant: b\n\nMessage:\nc"


def test_history_keys_are_per_tenant_and_per_content() -> None:
    history = [ChatMessage("user", "a"), ChatMessage("assistant", "b")]
    assert history_key("t1", history) == history_key("t1", list(history))
    assert history_key("t1", history) != history_key("t2", history)
    assert history_key("t1", history) != history_key("t1", history[:1])
    assert history_key("t1", [ChatMessage("user", "ab")]) != history_key(
        "t1", [ChatMessage("user", "a"), ChatMessage("user", "b")]
    )


def test_an_indexed_conversation_is_continued_once() -> None:
    index = ConversationIndex(capacity=2)
    index.put("k", Known("c1", 2))
    assert index.take("k") == Known("c1", 2)
    assert index.take("k") is None  # a second request with the same history starts afresh
    for key in ("a", "b", "c"):
        index.put(key, Known(key, 2))
    assert len(index) == 2 and index.take("a") is None


def test_response_ids_carry_the_turn_and_the_store_flag() -> None:
    turn = "t1.2.3.0123456789abcdef"
    assert parse_response_id(response_id(turn)) == (turn, True)
    assert parse_response_id(response_id(turn, store=False)) == (turn, False)
    with pytest.raises(NotFound):
        parse_response_id("chatcmpl-" + turn)


def test_sequence_numbers_follow_from_the_log_alone() -> None:
    state = ResponseState(turn_id="t0.0.0.0123456789abcdef", model=MODEL, created_at=1)
    head = header_events(state)
    assert len(head) == HEADER_EVENTS
    assert [e["type"] for e in head] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    state.texts = ["a", "b"]
    state.status = status_of(FinishReason.STOP, True, False)
    closing = closing_events(state)
    assert [e["type"] for e in closing] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert closing[0]["text"] == "ab"
    assert closing[-1]["response"]["output"][0]["content"][0]["text"] == "ab"


@pytest.mark.parametrize(
    ("reason", "started", "cancelled", "status"),
    [
        (None, False, False, "queued"),
        (None, True, False, "in_progress"),
        (None, False, True, "cancelled"),
        (FinishReason.STOP, True, False, "completed"),
        (FinishReason.STOP_SEQUENCE, True, False, "completed"),
        (FinishReason.LENGTH, True, False, "incomplete"),
        (FinishReason.CANCELLED, True, True, "cancelled"),
        (FinishReason.ERROR, True, False, "failed"),
    ],
)
def test_status_of_a_turn(
    reason: FinishReason | None, started: bool, cancelled: bool, status: str
) -> None:
    assert status_of(reason, started, cancelled) == status


def test_core_errors_map_to_http_statuses() -> None:
    limited = from_mesh_error(
        ResourceExhausted("slow down", reason="RATE_LIMITED", retry_after_s=0.25)
    )
    assert (limited.status, limited.code) == (429, "rate_limit_exceeded")
    assert limited.headers() == {"retry-after": "1", "retry-after-ms": "250"}
    invalid = from_mesh_error(
        InvalidArgument("bad", reason="TEMPERATURE_INVALID", field="start.options.temperature"),
        param_names={"start.options.temperature": "temperature"},
    )
    assert (invalid.status, invalid.param, invalid.code) == (
        400,
        "temperature",
        "temperature_invalid",
    )
    stops = from_mesh_error(
        InvalidArgument("bad", field="start.options.stop_sequences[2]"),
        param_names={"start.options.stop_sequences": "stop"},
    )
    assert stops.param == "stop[2]"
    assert from_mesh_error(Unavailable("x", reason="DRAINING")).status == 503
    assert from_mesh_error(NotFound("x")).status == 404
    body = from_mesh_error(NotFound("gone")).body()
    assert body == {
        "error": {
            "message": "gone",
            "type": "invalid_request_error",
            "param": None,
            "code": "not_found",
        }
    }


async def test_a_response_and_the_served_models_are_read_back_from_the_log(
    tmp_path: Path,
) -> None:
    principal = Principal("acme", hash_key("acme-key"))
    settings = GatewaySettings(log=LogSettings(path=tmp_path / "log.sqlite3"))
    async with (
        EmbeddedLog(tmp_path / "log.sqlite3") as log,
        GatewayCore(settings, log=log, conversations=KnownConversations()) as core,
    ):
        assert await discover_models(log, core.partitions) == ()
        turn = await core.start_turn(principal, StartRequest("", "hello"))
        turn.close()
        state = ResponseState(turn_id=turn.turn_id, model="", created_at=0)
        assert (await read_state(log, turn.info, state)).status == "queued"
        agent = Agent(log, turn)
        await agent.started()
        await agent.tokens([1, 2])
        assert (await read_state(log, turn.info, state)).status == "in_progress"
        assert state.text == "1 2 "
        await agent.tokens([2, 3], tag="zombie-")  # a repeated seq: the first record wins
        await agent.finished(reason=2, last_seq=3, model="m1")
        await read_state(log, turn.info, state)
        assert (state.status, state.text, state.model) == ("incomplete", "1 2 zombie-3 ", "m1")
        assert state.to_json()["incomplete_details"] == {"reason": "max_output_tokens"}
        assert await discover_models(log, core.partitions) == ("m1",)

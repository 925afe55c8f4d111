"""Start validation, settings, and the proto <-> value conversions of the gateway."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from chat.common.v1 import common_pb2
from chat.gateway.v1 import gateway_pb2
from google.rpc import error_details_pb2, status_pb2

from mesh.errors import InvalidArgument, ResourceExhausted
from mesh.generation import FinishReason, GenerationOptions, TokenUsage, TurnTimings
from mesh.paging import validate_page_size
from mesh.settings import SettingsError
from services.gateway.model import (
    Accepted,
    CancelFrame,
    CreditFrame,
    EmptyFrame,
    FinishedOut,
    FrameError,
    ResumeFrame,
    StartFrame,
    StartRequest,
    TokenOut,
    TurnError,
)
from services.gateway.server import chat_response, frame_from_proto
from services.gateway.settings import GatewaySettings
from services.gateway.validation import validate_conversation_id, validate_start


def check(request: StartRequest) -> None:
    validate_start(request, max_text_chars=100, max_tokens_limit=64)


@pytest.mark.parametrize(
    ("request_", "reason", "field"),
    [
        (StartRequest("", ""), "TEXT_EMPTY", "start.text"),
        (StartRequest("", "  \n "), "TEXT_EMPTY", "start.text"),
        (StartRequest("", "x" * 101), "TEXT_TOO_LONG", "start.text"),
        (
            StartRequest("", "hi", GenerationOptions(max_tokens=-1)),
            "MAX_TOKENS_INVALID",
            "start.options.max_tokens",
        ),
        (
            StartRequest("", "hi", GenerationOptions(max_tokens=65)),
            "MAX_TOKENS_INVALID",
            "start.options.max_tokens",
        ),
        (
            StartRequest("", "hi", GenerationOptions(temperature=2.01)),
            "TEMPERATURE_INVALID",
            "start.options.temperature",
        ),
        (
            StartRequest("", "hi", GenerationOptions(temperature=-0.1)),
            "TEMPERATURE_INVALID",
            "start.options.temperature",
        ),
        (
            StartRequest("", "hi", GenerationOptions(temperature=math.nan)),
            "TEMPERATURE_INVALID",
            "start.options.temperature",
        ),
        (
            StartRequest("", "hi", GenerationOptions(top_p=0.0)),
            "TOP_P_INVALID",
            "start.options.top_p",
        ),
        (
            StartRequest("", "hi", GenerationOptions(top_p=1.5)),
            "TOP_P_INVALID",
            "start.options.top_p",
        ),
        (
            StartRequest("", "hi", GenerationOptions(stop_sequences=("a",) * 9)),
            "STOP_SEQUENCES_TOO_MANY",
            "start.options.stop_sequences",
        ),
        (
            StartRequest("", "hi", GenerationOptions(stop_sequences=("ok", "y" * 65))),
            "STOP_SEQUENCE_TOO_LONG",
            "start.options.stop_sequences[1]",
        ),
        (
            StartRequest("", "hi", GenerationOptions(stop_sequences=("",))),
            "STOP_SEQUENCE_EMPTY",
            "start.options.stop_sequences[0]",
        ),
        (StartRequest("c" * 129, "hi"), "CONVERSATION_ID_INVALID", "start.conversation_id"),
        (StartRequest(" padded", "hi"), "CONVERSATION_ID_INVALID", "start.conversation_id"),
        (StartRequest("", "hi", request_id="r\n"), "REQUEST_ID_INVALID", "start.request_id"),
    ],
)
def test_bad_starts_are_invalid_argument_with_reason_and_field(
    request_: StartRequest, reason: str, field: str
) -> None:
    with pytest.raises(InvalidArgument) as error:
        check(request_)
    assert error.value.reason == reason
    assert error.value.field == field
    assert error.value.message


@pytest.mark.parametrize(
    "request_",
    [
        StartRequest("", "x" * 100),
        StartRequest(
            "c-1",
            "hi",
            GenerationOptions(
                max_tokens=64, temperature=0.0, top_p=1.0, stop_sequences=("z" * 64,) * 8, seed=7
            ),
        ),
        StartRequest("", "hi", GenerationOptions(temperature=2.0, top_p=1e-6)),
    ],
)
def test_edge_values_are_accepted(request_: StartRequest) -> None:
    check(request_)


def test_conversation_id_and_page_size_checks() -> None:
    with pytest.raises(InvalidArgument) as missing:
        validate_conversation_id("")
    assert missing.value.reason == "CONVERSATION_ID_MISSING"
    validate_conversation_id("abc")
    for size in (0, 1, 100):
        validate_page_size(size)
    for size in (-1, 101):
        with pytest.raises(InvalidArgument) as bad:
            validate_page_size(size)
        assert bad.value.reason == "PAGE_SIZE_OUT_OF_RANGE"


def test_settings_from_env_defaults_and_overrides(tmp_path: Path) -> None:
    defaults = GatewaySettings.from_env({"MESH_STATE_DIR": str(tmp_path)})
    assert (defaults.host, defaults.port) == ("127.0.0.1", 50051)
    assert defaults.rate_per_s == 5.0 and defaults.rate_burst == 10
    assert defaults.max_text_chars == 16_000 and defaults.max_tokens_limit == 4096
    assert defaults.api_keys_file == tmp_path / "api-keys.json"
    assert defaults.persister_addr == "127.0.0.1:50054"
    custom = GatewaySettings.from_env(
        {
            "MESH_GATEWAY_PORT": "0",
            "MESH_GATEWAY_RATE_PER_S": "2.5",
            "MESH_GATEWAY_RATE_BURST": "3",
            "MESH_GATEWAY_MAX_STREAMS": "7",
            "MESH_GATEWAY_API_KEYS_FILE": str(tmp_path / "k.json"),
            "MESH_PERSISTER_ADDR": "10.0.0.1:1",
            "MESH_LOG_PARTITIONS": "8",
            "MESH_GATEWAY_GRACE_S": "1.5",
        }
    )
    assert custom.port == 0 and custom.rate_per_s == 2.5 and custom.rate_burst == 3
    assert custom.max_streams == 7 and custom.grace_s == 1.5
    assert custom.api_keys_file == tmp_path / "k.json"
    assert custom.persister_addr == "10.0.0.1:1" and custom.log.partitions == 8
    for bad in ({"MESH_GATEWAY_PORT": "x"}, {"MESH_GATEWAY_RATE_PER_S": "0"}):
        with pytest.raises(SettingsError):
            GatewaySettings.from_env(bad)


def test_chat_frames_and_responses_convert() -> None:
    start = gateway_pb2.ChatRequest(
        start=gateway_pb2.StartTurn(conversation_id="c", text="hi", request_id="r")
    )
    frame = frame_from_proto(start)
    assert isinstance(frame, StartFrame) and frame.start == StartRequest("c", "hi", request_id="r")
    assert frame_from_proto(gateway_pb2.ChatRequest()) == EmptyFrame()
    assert frame_from_proto(
        gateway_pb2.ChatRequest(credit=gateway_pb2.FlowCredit(tokens=3))
    ) == CreditFrame(3)
    assert frame_from_proto(
        gateway_pb2.ChatRequest(cancel=gateway_pb2.CancelTurn(turn_id="t"))
    ) == CancelFrame("t")
    assert frame_from_proto(
        gateway_pb2.ChatRequest(resume=gateway_pb2.ResumeTurn(turn_id="t", after_seq=2))
    ) == ResumeFrame("t", 2)

    token = chat_response(TokenOut("t", 1, "a"))
    assert token is not None and token.token.seq == 1
    accepted = chat_response(Accepted("t", "c", 2))
    assert accepted is not None and accepted.accepted.queue_position == 2
    done = chat_response(
        FinishedOut("t", FinishReason.LENGTH, 9, TokenUsage(3, 9), TurnTimings(1.0, 2.0, 3.0, 4.0))
    )
    assert done is not None and done.finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert done.finished.usage.completion_tokens == 9 and done.finished.timings.total_ms == 4.0
    error = chat_response(
        FrameError(ResourceExhausted("slow down", reason="RATE_LIMITED", retry_after_s=0.25))
    )
    assert error is not None
    status = error.error.status
    assert status.code == 8  # RESOURCE_EXHAUSTED
    info = error_details_pb2.ErrorInfo()
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and info.reason == "RATE_LIMITED"
    assert status.details[1].Unpack(retry) and retry.retry_delay.nanos == 250_000_000
    agent_error = chat_response(TurnError(status_pb2.Status(code=13).SerializeToString(), "t"))
    assert agent_error is not None and agent_error.error.status.code == 13

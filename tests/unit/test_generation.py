"""The shared generation values (mesh.generation) and their proto conversions (mesh.codec)."""

from __future__ import annotations

import math

import pytest
from chat.common.v1 import common_pb2

from mesh.codec import (
    finish_reason_from_proto,
    finish_reason_to_proto,
    options_from_proto,
    options_to_proto,
    timings_from_proto,
    timings_to_proto,
    usage_from_proto,
    usage_to_proto,
)
from mesh.errors import InvalidArgument
from mesh.generation import (
    FinishReason,
    GenerationOptions,
    TokenUsage,
    TurnTimings,
    validate_options,
)


def test_finish_reasons_mirror_the_proto_enum() -> None:
    # Both directions: a reason added on either side fails here instead of in a log record.
    assert {r.value for r in FinishReason} == set(common_pb2.FinishReason.values())
    for reason in FinishReason:
        assert common_pb2.FinishReason.Name(reason.value) == f"FINISH_REASON_{reason.name}"
        assert finish_reason_to_proto(reason) == reason.value
        assert finish_reason_from_proto(finish_reason_to_proto(reason)) is reason


def test_unknown_proto_finish_reason_reads_as_unspecified() -> None:
    assert finish_reason_from_proto(99) is FinishReason.UNSPECIFIED


def test_options_round_trip_keeps_unset_fields_unset() -> None:
    unset = options_from_proto(common_pb2.GenerationOptions())
    assert unset == GenerationOptions()
    assert not options_to_proto(GenerationOptions()).HasField("temperature")
    full = GenerationOptions(
        max_tokens=5, temperature=0.0, top_p=0.5, stop_sequences=("x",), seed=0
    )
    assert options_from_proto(options_to_proto(full)) == full


def check(options: GenerationOptions) -> None:
    validate_options(
        options,
        max_tokens_limit=64,
        max_stop_sequences=2,
        max_stop_sequence_chars=4,
        field_prefix="start.options",
    )


@pytest.mark.parametrize(
    ("options", "reason", "field"),
    [
        (GenerationOptions(max_tokens=-1), "MAX_TOKENS_INVALID", "start.options.max_tokens"),
        (GenerationOptions(max_tokens=65), "MAX_TOKENS_INVALID", "start.options.max_tokens"),
        (GenerationOptions(temperature=-0.1), "TEMPERATURE_INVALID", "start.options.temperature"),
        (
            GenerationOptions(temperature=math.inf),
            "TEMPERATURE_INVALID",
            "start.options.temperature",
        ),
        (GenerationOptions(top_p=0.0), "TOP_P_INVALID", "start.options.top_p"),
        (GenerationOptions(top_p=math.nan), "TOP_P_INVALID", "start.options.top_p"),
        (
            GenerationOptions(stop_sequences=("a", "b", "c")),
            "STOP_SEQUENCES_TOO_MANY",
            "start.options.stop_sequences",
        ),
        (
            GenerationOptions(stop_sequences=("a", "")),
            "STOP_SEQUENCE_EMPTY",
            "start.options.stop_sequences[1]",
        ),
        (
            GenerationOptions(stop_sequences=("abcde",)),
            "STOP_SEQUENCE_TOO_LONG",
            "start.options.stop_sequences[0]",
        ),
    ],
)
def test_bad_options_name_reason_and_field(
    options: GenerationOptions, reason: str, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check(options)
    assert caught.value.reason == reason
    assert caught.value.field == field
    assert field in caught.value.message


def test_limits_are_inclusive() -> None:
    check(GenerationOptions())
    check(
        GenerationOptions(
            max_tokens=64, temperature=2.0, top_p=1.0, stop_sequences=("abcd", "x"), seed=1
        )
    )
    check(GenerationOptions(temperature=0.0, top_p=1e-6))


def test_usage_and_timings_round_trip() -> None:
    usage = TokenUsage(3, 9)
    timings = TurnTimings(1.0, 2.5, 3.0, 4.0)
    assert usage_from_proto(usage_to_proto(usage)) == usage
    assert timings_from_proto(timings_to_proto(timings)) == timings
    assert usage_from_proto(common_pb2.TokenUsage()) == TokenUsage()
    assert timings_from_proto(common_pb2.TurnTimings()) == TurnTimings()

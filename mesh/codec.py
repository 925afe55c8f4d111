"""``chat.common.v1`` messages <-> the plain values of ``mesh.generation``.

Servicers and log codecs of every service convert through here, so a field added to
``GenerationOptions`` or a new finish reason is handled once.
"""

from __future__ import annotations

from chat.common.v1 import common_pb2

from mesh.generation import FinishReason, GenerationOptions, TokenUsage, TurnTimings

__all__ = [
    "finish_reason_from_proto",
    "finish_reason_to_proto",
    "options_from_proto",
    "options_to_proto",
    "timings_from_proto",
    "timings_to_proto",
    "usage_from_proto",
    "usage_to_proto",
]

_FINISH_REASONS: dict[FinishReason, common_pb2.FinishReason] = {
    FinishReason.UNSPECIFIED: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: common_pb2.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}


def finish_reason_to_proto(reason: FinishReason) -> common_pb2.FinishReason:
    return _FINISH_REASONS[reason]


def finish_reason_from_proto(value: int) -> FinishReason:
    """The reason for a proto enum number; UNSPECIFIED for numbers newer than this code."""
    try:
        return FinishReason(value)
    except ValueError:
        return FinishReason.UNSPECIFIED


def options_to_proto(options: GenerationOptions) -> common_pb2.GenerationOptions:
    message = common_pb2.GenerationOptions(
        max_tokens=options.max_tokens, stop_sequences=list(options.stop_sequences)
    )
    # Unset stays unset on the wire: absence means "the agent's default", not 0.
    if options.temperature is not None:
        message.temperature = options.temperature
    if options.top_p is not None:
        message.top_p = options.top_p
    if options.seed is not None:
        message.seed = options.seed
    return message


def options_from_proto(message: common_pb2.GenerationOptions) -> GenerationOptions:
    return GenerationOptions(
        max_tokens=message.max_tokens,
        temperature=message.temperature if message.HasField("temperature") else None,
        top_p=message.top_p if message.HasField("top_p") else None,
        stop_sequences=tuple(message.stop_sequences),
        seed=message.seed if message.HasField("seed") else None,
    )


def usage_to_proto(usage: TokenUsage) -> common_pb2.TokenUsage:
    return common_pb2.TokenUsage(
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens
    )


def usage_from_proto(message: common_pb2.TokenUsage) -> TokenUsage:
    return TokenUsage(message.prompt_tokens, message.completion_tokens)


def timings_to_proto(timings: TurnTimings) -> common_pb2.TurnTimings:
    return common_pb2.TurnTimings(
        queued_ms=timings.queued_ms,
        retrieval_ms=timings.retrieval_ms,
        time_to_first_token_ms=timings.time_to_first_token_ms,
        total_ms=timings.total_ms,
    )


def timings_from_proto(message: common_pb2.TurnTimings) -> TurnTimings:
    return TurnTimings(
        message.queued_ms,
        message.retrieval_ms,
        message.time_to_first_token_ms,
        message.total_ms,
    )

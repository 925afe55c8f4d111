"""``chat.common.v1`` messages <-> the plain values of ``mesh.generation``.

Servicers and log codecs of every service convert through here, so a field added to
``GenerationOptions`` or a new finish reason is handled once.
"""

from __future__ import annotations

from chat.common.v1 import common_pb2

from mesh.generation import FinishReason, GenerationOptions

__all__ = [
    "finish_reason_from_proto",
    "finish_reason_to_proto",
    "options_from_proto",
    "options_to_proto",
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

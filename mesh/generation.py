"""Plain values every service shares about a generation: how to sample it, why it ended, what
it used and how long it took.

No protobuf here, so core modules can use it; ``mesh.codec`` converts to and from
``chat.common.v1``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from mesh.errors import InvalidArgument

__all__ = ["FinishReason", "GenerationOptions", "TokenUsage", "TurnTimings", "validate_options"]


class FinishReason(enum.IntEnum):
    """Why a generation ended; values are those of ``chat.common.v1.FinishReason``.

    The numbers travel in log records and database rows as they are, so a unit test keeps them in
    step with the proto enum.
    """

    UNSPECIFIED = 0
    STOP = 1  # the model produced an end-of-generation token
    LENGTH = 2  # max_tokens (or the context window) was reached
    STOP_SEQUENCE = 3
    CANCELLED = 4
    ERROR = 5


@dataclass(frozen=True, slots=True)
class GenerationOptions:
    """Sampling options as a client sent them; None and 0 mean "the agent's default"."""

    max_tokens: int = 0
    temperature: float | None = None
    top_p: float | None = None
    stop_sequences: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token counts of a turn (``chat.common.v1.TokenUsage``)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class TurnTimings:
    """Phases of a turn in milliseconds (``chat.common.v1.TurnTimings``)."""

    queued_ms: float = 0.0
    retrieval_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0


def validate_options(
    options: GenerationOptions,
    *,
    max_tokens_limit: int,
    max_stop_sequences: int,
    max_stop_sequence_chars: int,
    field_prefix: str,
) -> None:
    """Raise INVALID_ARGUMENT for options outside the documented ranges.

    Args:
        options: What the caller sent.
        max_tokens_limit: The largest ``max_tokens`` accepted (0 always is: the default).
        max_stop_sequences: How many stop sequences may be given.
        max_stop_sequence_chars: The longest stop sequence accepted.
        field_prefix: Path of the options message in the request (``"start.options"``); the
            error's BadRequest field and message name ``<field_prefix>.<field>``.

    Raises:
        InvalidArgument: reason ``MAX_TOKENS_INVALID``, ``TEMPERATURE_INVALID``,
            ``TOP_P_INVALID``, ``STOP_SEQUENCES_TOO_MANY``, ``STOP_SEQUENCE_EMPTY`` or
            ``STOP_SEQUENCE_TOO_LONG``.
    """
    field = f"{field_prefix}.max_tokens"
    if not 0 <= options.max_tokens <= max_tokens_limit:
        raise InvalidArgument(
            f"{field}={options.max_tokens} must be between 0 (the agent's default) "
            f"and {max_tokens_limit}",
            reason="MAX_TOKENS_INVALID",
            field=field,
        )
    temperature = options.temperature
    if temperature is not None and not (math.isfinite(temperature) and 0 <= temperature <= 2):
        field = f"{field_prefix}.temperature"
        raise InvalidArgument(
            f"{field}={temperature} must be within [0, 2]",
            reason="TEMPERATURE_INVALID",
            field=field,
        )
    top_p = options.top_p
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        field = f"{field_prefix}.top_p"
        raise InvalidArgument(
            f"{field}={top_p} must be within (0, 1]",
            reason="TOP_P_INVALID",
            field=field,
        )
    stops = options.stop_sequences
    if len(stops) > max_stop_sequences:
        field = f"{field_prefix}.stop_sequences"
        raise InvalidArgument(
            f"{field} has {len(stops)} entries; at most {max_stop_sequences} are allowed",
            reason="STOP_SEQUENCES_TOO_MANY",
            field=field,
        )
    for index, stop in enumerate(stops):
        field = f"{field_prefix}.stop_sequences[{index}]"
        if not stop:
            raise InvalidArgument(
                f"{field} is empty; it would stop generation before the first token",
                reason="STOP_SEQUENCE_EMPTY",
                field=field,
            )
        if len(stop) > max_stop_sequence_chars:
            raise InvalidArgument(
                f"{field} has {len(stop)} characters; the limit is {max_stop_sequence_chars}",
                reason="STOP_SEQUENCE_TOO_LONG",
                field=field,
            )

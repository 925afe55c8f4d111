"""The agent's share of a turn's trace and of the GenAI metrics.

A turn's span tree on the agent (docs/observability.md): ``chat <model>`` (the turn, a consumer
span under the gateway's append of the request) with ``claim turn``, ``history read``,
``recall``, ``generate`` (prefill and decode as one span, token counts as attributes) and
``finish turn``. An agent that takes over a turn links its turn span to the span of the agent
that started it, found in the headers of that agent's ``TurnStarted`` record.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from opentelemetry.trace import Span, SpanContext, SpanKind, Status, StatusCode

from mesh import metrics, tracing
from mesh.generation import FinishReason
from mesh.log import Record
from mesh.turnlog import TurnRequested

PROVIDER = "llama.cpp"


def wall_ns(wall_s: float) -> int:
    return int(wall_s * 1_000_000_000)


@contextlib.contextmanager
def turn_span(
    turn: TurnRequested, record: Record, model: str, claimed_wall: float
) -> Iterator[Span]:
    """The agent's span for ``turn``, current inside the block, started when it was claimed."""
    with tracing.tracer().start_as_current_span(
        f"chat {model}",
        context=tracing.context_from_headers(record.headers),
        kind=SpanKind.CONSUMER,
        start_time=wall_ns(claimed_wall),
        attributes={
            tracing.TURN_ID: turn.turn_id,
            tracing.GEN_AI_OPERATION: "chat",
            tracing.GEN_AI_PROVIDER: PROVIDER,
            tracing.GEN_AI_REQUEST_MODEL: model,
            "messaging.destination.partition.id": str(record.partition),
            "messaging.kafka.offset": record.offset,
        },
    ) as span:
        yield span


def note_takeover(
    span: Span, earlier: SpanContext | None, earlier_agent: str, last_seq: int
) -> None:
    """Mark a turn this agent continues after another agent's tokens."""
    if earlier is not None:
        span.add_link(earlier, {"mesh.link": "taken over from"})
    if last_seq or earlier is not None:
        span.set_attribute("mesh.turn.taken_over_from", earlier_agent)
        span.set_attribute("mesh.turn.resumed_after_seq", last_seq)


def finish(
    span: Span,
    *,
    model: str,
    reason: FinishReason,
    input_tokens: int,
    output_tokens: int,
    cached_tokens: int,
    error: str | None,
) -> None:
    """Put the turn's outcome on ``span`` (GenAI attributes) and its status."""
    span.set_attribute(tracing.GEN_AI_RESPONSE_MODEL, model)
    span.set_attribute(tracing.GEN_AI_INPUT_TOKENS, input_tokens)
    span.set_attribute(tracing.GEN_AI_OUTPUT_TOKENS, output_tokens)
    span.set_attribute(tracing.GEN_AI_FINISH_REASONS, [reason.name.lower()])
    span.set_attribute("mesh.usage.cached_input_tokens", cached_tokens)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))


def observe(
    *,
    model: str,
    reason: FinishReason,
    duration_s: float,
    first_token_s: float | None,
    output_tokens: int,
) -> None:
    """The GenAI server metrics of one turn, timed from the agent's claim.

    Time to first token and time per output token count successful turns only, as the
    conventions say; the duration counts every turn, with ``error_type`` on failures.
    """
    labels = ("chat", model, PROVIDER)
    error_type = "" if reason is not FinishReason.ERROR else "generation_failed"
    metrics.GEN_AI_REQUEST_DURATION.labels(*labels, error_type).observe(duration_s)
    if error_type or first_token_s is None:
        return
    metrics.GEN_AI_TIME_TO_FIRST_TOKEN.labels(*labels).observe(first_token_s)
    if output_tokens > 1:
        per_token = max(0.0, duration_s - first_token_s) / (output_tokens - 1)
        metrics.GEN_AI_TIME_PER_OUTPUT_TOKEN.labels(*labels).observe(per_token)

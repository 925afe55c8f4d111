"""The agent's logic without gRPC: validating requests, prompting and streaming a generation.

Both ways into an agent use it: the direct ``Generate`` RPC (servicer) and turns claimed from the
request log (worker). Everything here speaks plain dataclasses; the servicer and the worker do the
protobuf conversion.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from mesh import metrics
from mesh.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from mesh.generation import FinishReason, GenerationOptions, validate_options
from mesh.llm.engine import Device, LlamaEngine, SamplingOptions
from services.agent.prompt import ChatMessage, PromptBuilder, PromptRequest

METRICS_SERVICE = "agent"

MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256
MAX_ID_CHARS = 256


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A direct generation request (the ``StartGeneration`` frame)."""

    generation_id: str
    user_text: str
    history: tuple[ChatMessage, ...] = ()
    context_passages: tuple[str, ...] = ()
    options: GenerationOptions = field(default_factory=GenerationOptions)


@dataclass(frozen=True, slots=True)
class Limits:
    """What the agent accepts and assumes when a request leaves something unset."""

    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    default_temperature: float = 0.8
    default_top_p: float = 0.95
    max_waiting: int = 16


@dataclass(frozen=True, slots=True)
class Token:
    """One generated piece; ``index`` counts pieces of this generation from 1."""

    index: int
    text: str


@dataclass(frozen=True, slots=True)
class GenerationFinished:
    """The end of a generation. Times are milliseconds from the start of ``stream``."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    pieces: int
    time_to_first_token_ms: float
    total_ms: float
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens continued from the KV cache, not read again


@dataclass(frozen=True, slots=True)
class NodeInfo:
    agent_id: str
    model: str
    device: Device
    context_size: int
    free_slots: int
    total_slots: int
    gpu_layers: int


def validate_request(request: GenerateRequest, limits: Limits) -> None:
    if not request.generation_id:
        raise InvalidArgument(
            "start.generation_id is required",
            field="start.generation_id",
            reason="GENERATION_ID_MISSING",
        )
    if len(request.generation_id) > MAX_ID_CHARS:
        raise InvalidArgument(
            f"start.generation_id is longer than {MAX_ID_CHARS} characters",
            field="start.generation_id",
            reason="GENERATION_ID_TOO_LONG",
        )
    if not request.user_text.strip():
        raise InvalidArgument(
            "start.user_text must not be empty",
            field="start.user_text",
            reason="USER_TEXT_MISSING",
        )
    for message in request.history:
        if message.role not in ("user", "assistant"):
            raise InvalidArgument(
                f"start.history roles must be 'user' or 'assistant', not {message.role[:32]!r}",
                field="start.history",
                reason="HISTORY_ROLE_INVALID",
            )
    validate_options(
        request.options,
        max_tokens_limit=limits.max_tokens_limit,
        max_stop_sequences=MAX_STOP_SEQUENCES,
        max_stop_sequence_chars=MAX_STOP_SEQUENCE_CHARS,
        field_prefix="start.options",
    )


def resolve_options(options: GenerationOptions, limits: Limits) -> SamplingOptions:
    """Fill defaults and clamp into range (log turns were validated by the gateway already)."""
    max_tokens = options.max_tokens or limits.default_max_tokens
    temperature = limits.default_temperature if options.temperature is None else options.temperature
    top_p = limits.default_top_p if options.top_p is None else options.top_p
    return SamplingOptions(
        max_tokens=max(1, min(max_tokens, limits.max_tokens_limit)),
        temperature=min(max(temperature, 0.0), 2.0),
        top_p=min(max(top_p, 1e-6), 1.0),
        seed=options.seed,
        stop=tuple(s for s in options.stop_sequences if s)[:MAX_STOP_SEQUENCES],
    )


class AgentCore:
    """Generation on one engine: prompts, slots, cancellation and metrics."""

    def __init__(
        self,
        *,
        engine: LlamaEngine,
        prompts: PromptBuilder,
        agent_id: str,
        limits: Limits,
        prompt_log: Path | None = None,
    ) -> None:
        self.engine = engine
        self.prompts = prompts
        self.agent_id = agent_id
        self.limits = limits
        self._prompt_log = prompt_log

    def _audit_prompt(self, label: str, text: str) -> None:
        if self._prompt_log is None:
            return
        line = json.dumps({"turn_id": label, "agent_id": self.agent_id, "prompt": text})
        with self._prompt_log.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def node_info(self) -> NodeInfo:
        return NodeInfo(
            agent_id=self.agent_id,
            model=self.engine.model_name,
            device=self.engine.device,
            context_size=self.engine.n_ctx,
            free_slots=self.engine.free_slots,
            total_slots=self.engine.total_slots,
            gpu_layers=self.engine.n_gpu_layers,
        )

    async def generate(
        self, request: GenerateRequest, cancel: asyncio.Event
    ) -> AsyncGenerator[Token | GenerationFinished, None]:
        """A direct generation: validate, refuse when too many wait, then ``stream``."""
        validate_request(request, self.limits)
        if self.engine.free_slots == 0 and self.engine.waiting >= self.limits.max_waiting:
            raise ResourceExhausted(
                f"all {self.engine.total_slots} generation slots are busy and "
                f"{self.engine.waiting} requests are waiting; retry shortly",
                reason="AGENT_BUSY",
                retry_after_s=1.0,
            )
        prompt = PromptRequest(
            user_text=request.user_text,
            history=request.history,
            context_passages=request.context_passages,
        )
        async with contextlib.aclosing(
            self.stream(prompt, resolve_options(request.options, self.limits), cancel)
        ) as events:
            async for event in events:
                yield event

    async def stream(
        self,
        prompt: PromptRequest,
        options: SamplingOptions,
        cancel: asyncio.Event,
        *,
        started_at: float | None = None,
        label: str = "",
    ) -> AsyncGenerator[Token | GenerationFinished, None]:
        """Generate for ``prompt``; yields ``Token``s, then exactly one ``GenerationFinished``.

        Setting ``cancel`` stops generation before the next token. ``started_at``
        (``time.monotonic()``) is where the time-to-first-token metric counts from.
        Raises ``PromptTooLong`` (INVALID_ARGUMENT) before generating when the message cannot
        fit the context.
        """
        t0 = time.monotonic()
        metric_t0 = t0 if started_at is None else started_at
        built = self.prompts.build(prompt, options.max_tokens)
        self._audit_prompt(label, built.text)
        sampling = SamplingOptions(
            max_tokens=built.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            stop=options.stop + tuple(s for s in built.stop if s not in options.stop),
        )
        model = self.engine.model_name
        if cancel.is_set():
            yield _finished(FinishReason.CANCELLED, built.prompt_tokens, 0, 0, t0, None)
            return
        first_at: float | None = None
        last_at = 0.0
        pieces = 0
        emitted_tokens = 0
        async with contextlib.AsyncExitStack() as stack:
            tokens = self.engine.tokenize_segments(built.segments)
            generation = await stack.enter_async_context(self.engine.generate(tokens, sampling))
            watcher = asyncio.create_task(_cancel_when_set(cancel, generation.cancel))
            stack.callback(watcher.cancel)
            async for piece in generation:
                # Pieces may already wait in the queue; a cancel wins over every one of them.
                if cancel.is_set():
                    generation.cancel()
                    break
                now = time.monotonic()
                if first_at is None:
                    first_at = now
                    metrics.TIME_TO_FIRST_TOKEN.labels(METRICS_SERVICE, model).observe(
                        now - metric_t0
                    )
                else:
                    metrics.INTER_TOKEN_LATENCY.labels(METRICS_SERVICE, model).observe(
                        now - last_at
                    )
                last_at = now
                if piece.tokens:
                    metrics.TOKENS_GENERATED.labels(model).inc(piece.tokens)
                    emitted_tokens += piece.tokens
                pieces += 1
                yield Token(pieces, piece.text)
        reason = generation.finish_reason or (
            FinishReason.CANCELLED if cancel.is_set() else FinishReason.ERROR
        )
        finished = _finished(
            reason,
            generation.prompt_tokens or built.prompt_tokens,
            emitted_tokens,
            pieces,
            t0,
            first_at,
            generation.error,
        )
        yield dataclasses.replace(finished, cached_tokens=generation.cached_tokens)


def _finished(
    reason: FinishReason,
    prompt_tokens: int,
    completion_tokens: int,
    pieces: int,
    t0: float,
    first_at: float | None,
    error: str | None = None,
) -> GenerationFinished:
    now = time.monotonic()
    return GenerationFinished(
        finish_reason=reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        pieces=pieces,
        time_to_first_token_ms=(first_at - t0) * 1000 if first_at is not None else 0.0,
        total_ms=(now - t0) * 1000,
        error=error,
    )


async def _cancel_when_set(event: asyncio.Event, cancel: Callable[[], None]) -> None:
    await event.wait()
    cancel()


def check_cancel_frame(current_id: str, requested_id: str) -> None:
    """A cancel frame must name the generation of its stream (or leave the id empty)."""
    if requested_id and requested_id != current_id:
        raise InvalidArgument(
            f"cancel.generation_id {requested_id[:64]!r} is not the generation of this stream",
            field="cancel.generation_id",
            reason="GENERATION_ID_MISMATCH",
        )


def no_generation() -> FailedPrecondition:
    return FailedPrecondition(
        "a cancel frame arrived before any start frame: there is no generation to cancel",
        reason="NO_GENERATION",
    )


def duplicate_start() -> InvalidArgument:
    return InvalidArgument(
        "a second start frame arrived; a Generate stream carries exactly one",
        field="start",
        reason="DUPLICATE_START",
    )

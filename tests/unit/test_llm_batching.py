"""Several generations in one llama.cpp context, on the tiny model: the real batching path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from mesh.generation import FinishReason
from mesh.llm.engine import LlamaEngine, SamplingOptions
from mesh.llm.tiny_model import ensure_tiny_model

GREEDY = SamplingOptions(max_tokens=12, temperature=0.0)
# Distinct prompts whose greedy continuations differ (checked below), so a crossed wire shows.
PROMPTS = [
    "hello the model",
    "the mesh and the log",
    "model model hello",
    "log the hello mesh and",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("models"))


@pytest_asyncio.fixture(scope="module")
async def engine(tiny_model: Path) -> AsyncIterator[LlamaEngine]:
    async with LlamaEngine(tiny_model, n_ctx=256, n_threads=1, slots=4) as started:
        yield started


async def text_of(engine: LlamaEngine, prompt: str, options: SamplingOptions = GREEDY) -> str:
    async with engine.generate(prompt, options) as generation:
        return "".join([piece.text async for piece in generation])


async def test_concurrent_generations_are_never_cross_wired(engine: LlamaEngine) -> None:
    alone = [await text_of(engine, prompt) for prompt in PROMPTS]
    assert len(set(alone)) == len(PROMPTS), "the prompts must continue differently"
    together = await asyncio.gather(*(text_of(engine, prompt) for prompt in PROMPTS))
    assert list(together) == alone


async def test_cancelling_one_leaves_the_others_complete(engine: LlamaEngine) -> None:
    long = SamplingOptions(max_tokens=40, temperature=0.0)

    async def cancelled_after_two() -> int:
        async with engine.generate(PROMPTS[0], long) as generation:
            async for _ in generation:
                if generation.completion_tokens == 2:
                    generation.cancel()
        assert generation.finish_reason is FinishReason.CANCELLED
        return generation.completion_tokens

    async def complete(prompt: str) -> FinishReason | None:
        async with engine.generate(prompt, long) as generation:
            async for _ in generation:
                pass
        assert generation.completion_tokens == 40
        return generation.finish_reason

    results = await asyncio.gather(cancelled_after_two(), *(complete(p) for p in PROMPTS[1:]))
    assert results[0] == 2
    assert results[1:] == [FinishReason.LENGTH] * 3


async def test_a_slow_consumer_pauses_only_its_own_generation(engine: LlamaEngine) -> None:
    options = SamplingOptions(max_tokens=80, temperature=0.0)
    async with engine.generate(PROMPTS[0], options) as stalled:
        await anext(stalled)  # then never read again while the other runs
        other = await asyncio.wait_for(text_of(engine, PROMPTS[1], options), 30)
        assert other
        stalled.cancel()


async def test_next_turn_reuses_the_cached_prefix(engine: LlamaEngine) -> None:
    first_prompt = "the log and the mesh " * 6
    reply = await text_of(engine, first_prompt)
    follow_up = first_prompt + reply + " and the model"
    async with engine.generate(follow_up, GREEDY) as generation:
        reused_text = "".join([piece.text async for piece in generation])
    assert generation.cached_tokens >= engine.count_tokens(first_prompt) - 1
    assert generation.cached_tokens < generation.prompt_tokens
    # The continuation does not depend on whether the prefix came from the cache.
    async with LlamaEngine(engine.model_path, n_ctx=256, n_threads=1) as fresh:
        assert await text_of(fresh, follow_up) == reused_text


async def test_evicted_prefix_still_works(tiny_model: Path) -> None:
    """A cache with room for one window only: the next prompt evicts the idle prefix."""
    async with LlamaEngine(tiny_model, n_ctx=128, n_threads=1, slots=1) as small:
        first = "mesh " * 60
        await text_of(small, first)
        await text_of(small, "hello " * 60)  # unrelated, and both do not fit: evicts the first
        async with small.generate(first + "log", GREEDY) as generation:
            text = "".join([piece.text async for piece in generation])
        assert generation.cached_tokens == 0
        assert generation.finish_reason is FinishReason.LENGTH and text


async def test_long_prompt_is_read_in_chunks_while_others_stream(tiny_model: Path) -> None:
    async with LlamaEngine(tiny_model, n_ctx=512, n_threads=1, slots=2, prefill_chunk=8) as eng:
        running_pieces = 0
        long_started = asyncio.Event()
        during_prefill: list[int] = []

        async def running() -> None:
            nonlocal running_pieces
            options = SamplingOptions(max_tokens=120, temperature=0.0)
            async with eng.generate(PROMPTS[0], options) as generation:
                async for _ in generation:
                    running_pieces += 1
                    if running_pieces == 3:
                        long_started.set()

        async def long_prompt() -> None:
            await long_started.wait()
            at_submit = running_pieces
            async with eng.generate("hello mesh " * 100, GREEDY) as generation:
                await anext(generation)
            during_prefill.append(running_pieces - at_submit)

        await asyncio.gather(running(), long_prompt())
        # About 200 prompt tokens in chunks of 8: the running stream kept producing meanwhile.
        assert during_prefill[0] >= 10, during_prefill


async def test_pace_applies_per_sequence(tiny_model: Path) -> None:
    interval = 0.05
    async with LlamaEngine(
        tiny_model, n_ctx=256, n_threads=1, slots=2, min_token_interval_s=interval
    ) as paced:
        loop = asyncio.get_running_loop()

        async def gaps(prompt: str) -> list[float]:
            arrivals: list[float] = []
            async with paced.generate(prompt, SamplingOptions(max_tokens=5)) as generation:
                async for _ in generation:
                    arrivals.append(loop.time())
            return [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]

        started = loop.time()
        both = await asyncio.gather(gaps(PROMPTS[0]), gaps(PROMPTS[1]))
        for measured in both:
            assert len(measured) == 4 and min(measured) >= interval * 0.9, measured
        # Side by side, not one after the other.
        assert loop.time() - started < 8 * interval, both


async def test_seed_is_per_sequence(engine: LlamaEngine) -> None:
    sampled = SamplingOptions(max_tokens=12, temperature=1.0, seed=7)
    together = await asyncio.gather(*(text_of(engine, PROMPTS[0], sampled) for _ in range(3)))
    assert len(set(together)) == 1
    assert together[0] == await text_of(engine, PROMPTS[0], sampled)

"""The llama.cpp engine on the tiny random-weight model: the real llama.cpp code path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from mesh.generation import FinishReason
from mesh.llm.engine import Device, LlamaEngine, Piece, SamplingOptions
from mesh.llm.tiny_model import ensure_tiny_model

PROMPT = "hello the model and the mesh"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("models"))


@pytest_asyncio.fixture(scope="session")
async def engine(tiny_model: Path) -> AsyncIterator[LlamaEngine]:
    async with LlamaEngine(tiny_model, n_ctx=512, n_threads=1, n_gpu_layers=0) as started:
        yield started


async def collect(
    engine: LlamaEngine, prompt: str, options: SamplingOptions
) -> tuple[list[Piece], FinishReason | None, int]:
    pieces: list[Piece] = []
    async with engine.generate(prompt, options) as generation:
        async for piece in generation:
            pieces.append(piece)
    return pieces, generation.finish_reason, generation.completion_tokens


async def test_runs_to_max_tokens_one_piece_per_token(engine: LlamaEngine) -> None:
    pieces, reason, completion = await collect(
        engine, PROMPT, SamplingOptions(max_tokens=24, temperature=1.0, seed=7)
    )
    assert reason is FinishReason.LENGTH
    assert completion == 24
    assert len(pieces) == 24
    assert all(p.tokens == 1 for p in pieces)
    assert "".join(p.text for p in pieces).strip()


async def test_same_seed_same_text(engine: LlamaEngine) -> None:
    options = SamplingOptions(max_tokens=16, temperature=1.0, seed=11)
    first, _, _ = await collect(engine, PROMPT, options)
    second, _, _ = await collect(engine, PROMPT, options)
    assert [p.text for p in first] == [p.text for p in second]


async def test_pieces_stream_before_generation_ends(engine: LlamaEngine) -> None:
    """A consumer that stops reading holds generation back (bounded queue), then cancels."""
    async with engine.generate(PROMPT, SamplingOptions(max_tokens=400, seed=3)) as generation:
        first = await anext(generation)
        assert first.tokens == 1
        await asyncio.sleep(0.3)  # the producer fills the queue and waits
        generation.cancel()
        rest = [piece async for piece in generation]
    assert rest == []
    assert generation.finish_reason is FinishReason.CANCELLED
    assert generation.completion_tokens == 1


async def test_cancel_stops_within_one_token(engine: LlamaEngine) -> None:
    received: list[Piece] = []
    async with engine.generate(PROMPT, SamplingOptions(max_tokens=400, seed=5)) as generation:
        async for piece in generation:
            received.append(piece)
            if len(received) == 5:
                generation.cancel()
    assert len(received) == 5
    assert generation.finish_reason is FinishReason.CANCELLED
    assert generation.completion_tokens == 5
    # The slot is free again for the next generation.
    assert engine.free_slots == engine.total_slots


async def test_cancel_from_another_thread(engine: LlamaEngine) -> None:
    received = 0
    async with engine.generate(PROMPT, SamplingOptions(max_tokens=400, seed=5)) as generation:
        async for _ in generation:
            received += 1
            if received == 3:
                await asyncio.to_thread(generation.cancel)
    assert received == 3
    assert generation.finish_reason is FinishReason.CANCELLED


async def test_stop_sequence_ends_before_the_stop_text(engine: LlamaEngine) -> None:
    options = SamplingOptions(max_tokens=60, temperature=1.0, seed=21)
    pieces, _, _ = await collect(engine, PROMPT, options)
    text = "".join(p.text for p in pieces)
    # A stop sequence taken from the middle of what the model writes with this seed.
    middle = len(text) // 2
    stop = text[middle : middle + 4]
    assert len(stop) == 4
    expected = text[: text.index(stop)]
    stopped, reason, completion = await collect(
        engine,
        PROMPT,
        SamplingOptions(max_tokens=60, temperature=1.0, seed=21, stop=("never-in-output", stop)),
    )
    emitted = "".join(p.text for p in stopped)
    assert reason is FinishReason.STOP_SEQUENCE
    assert emitted == expected
    assert stop not in emitted
    assert completion < 60


async def test_end_of_sequence_finishes_with_stop(engine: LlamaEngine) -> None:
    # The tiny model is wired to say " friend" after " farewell", then end the sequence.
    pieces, reason, completion = await collect(
        engine, "say farewell", SamplingOptions(max_tokens=50, temperature=1.0, seed=1)
    )
    assert reason is FinishReason.STOP
    assert "".join(p.text for p in pieces) == " friend"
    assert completion == 1


async def test_multibyte_character_over_byte_tokens_is_emitted_whole(engine: LlamaEngine) -> None:
    # After " smile" the tiny model spells U+1F642 as four byte tokens.
    pieces, _, _ = await collect(
        engine, "a smile", SamplingOptions(max_tokens=6, temperature=1.0, seed=1)
    )
    assert [p.text for p in pieces[:4]] == ["", "", "", "🙂"]
    assert all(p.tokens == 1 for p in pieces)
    assert "\ufffd" not in "".join(p.text for p in pieces[:4])


async def test_length_flushes_an_incomplete_character(engine: LlamaEngine) -> None:
    pieces, reason, _ = await collect(
        engine, "a smile", SamplingOptions(max_tokens=2, temperature=1.0, seed=1)
    )
    assert reason is FinishReason.LENGTH
    assert [p.text for p in pieces] == ["", "\ufffd"]


async def test_prompt_longer_than_the_context_is_an_error(engine: LlamaEngine) -> None:
    pieces, reason, _ = await collect(
        engine, "the " * 600, SamplingOptions(max_tokens=5, temperature=0.0)
    )
    assert pieces == []
    assert reason is FinishReason.ERROR


async def test_reply_is_cut_at_the_end_of_the_context(engine: LlamaEngine) -> None:
    prompt = "the " * 500
    tokens = engine.count_tokens(prompt)
    assert tokens < engine.n_ctx
    _, reason, completion = await collect(
        engine, prompt, SamplingOptions(max_tokens=100, temperature=1.0, seed=2)
    )
    assert reason is FinishReason.LENGTH
    assert completion == engine.n_ctx - tokens


async def test_one_slot_serialises_generations(engine: LlamaEngine) -> None:
    """With one slot a second generation waits until the first has let go of it."""
    assert engine.total_slots == 1
    first_options = SamplingOptions(max_tokens=100, temperature=0.0)
    async with engine.generate(PROMPT, first_options) as first:
        await anext(first)  # running, and holding the only slot while its queue fills
        async with engine.generate(PROMPT, SamplingOptions(max_tokens=4, seed=1)) as second:
            waiting = asyncio.create_task(anext(second))
            await asyncio.sleep(0.3)
            assert not waiting.done(), "the second generation ran beside the first"
            assert engine.waiting == 1 and engine.free_slots == 0
            first.cancel()
            await asyncio.wait_for(waiting, 10)
            async for _ in second:
                pass
        assert second.finish_reason is FinishReason.LENGTH
    assert engine.free_slots == 1


def test_tokenizer_and_metadata(engine: LlamaEngine) -> None:
    tokens = engine.tokenize("hello world")
    assert tokens[0] == 1  # BOS
    # A template that writes BOS itself does not get a second one.
    assert engine.tokenize("<s>hello world") == tokens
    assert engine.count_tokens("hello world") == len(tokens)
    assert engine.tokenize("<|user|>hi")[1] == engine.tokenize("<|user|>")[1]
    assert engine.chat_template is not None and "<|assistant|>" in engine.chat_template
    assert engine.bos_text == "<s>"
    assert engine.device is Device.CPU
    assert engine.model_name.endswith(".gguf")


async def test_missing_model_file_is_a_clear_error(tmp_path: Path) -> None:
    from mesh.llm.engine import EngineError

    with pytest.raises(EngineError, match="does not exist"):
        await LlamaEngine(tmp_path / "nope.gguf").start()


async def test_pace_spaces_tokens_and_a_cancel_still_stops_at_once(tiny_model: Path) -> None:
    """``min_token_interval_s`` slows a fast model to a pace; cancelling does not wait for it."""
    interval = 0.05
    async with LlamaEngine(
        tiny_model, n_ctx=512, n_threads=1, min_token_interval_s=interval
    ) as paced:
        arrivals: list[float] = []
        loop = asyncio.get_running_loop()
        async with paced.generate(PROMPT, SamplingOptions(max_tokens=6, seed=2)) as generation:
            async for _ in generation:
                arrivals.append(loop.time())
        assert generation.finish_reason is FinishReason.LENGTH
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
        assert len(gaps) == 5
        assert min(gaps) >= interval * 0.9, gaps

        slow = 2.0  # a pace far longer than any cancel may take
        paced.min_token_interval_s = slow
        async with paced.generate(PROMPT, SamplingOptions(max_tokens=50, seed=2)) as generation:
            await anext(generation)
            cancelled_at = loop.time()
            generation.cancel()
        # Leaving the block waited for the thread: it left its pace wait at once.
        assert loop.time() - cancelled_at < slow / 2
        assert generation.completion_tokens == 1


def test_a_negative_pace_is_refused(tiny_model: Path) -> None:
    with pytest.raises(ValueError, match="min_token_interval_s"):
        LlamaEngine(tiny_model, min_token_interval_s=-1)

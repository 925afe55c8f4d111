"""The gateway's context check (services/gateway/context_check.py) on the tiny model's real
vocabulary, against the agent's own prompt builder over the loaded model."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mesh.errors import InvalidArgument
from mesh.llm import LlamaEngine
from mesh.llm.tiny_model import ensure_tiny_model
from mesh.log import TURN_REQUESTS
from mesh.log.embedded import EmbeddedLog
from mesh.settings import SettingsError
from services.agent.prompt import PromptBuilder, PromptRequest, PromptTooLong
from services.gateway.context_check import ContextCheck
from services.gateway.core import GatewayCore
from services.gateway.model import StartRequest
from services.gateway.settings import GatewaySettings
from tests.unit.test_gateway_core import ACME, KnownConversations, make_settings

N_CTX = 96
SYSTEM = "the model is a tiny model"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("models"))


@pytest.fixture
async def check(tiny_model: Path) -> AsyncIterator[ContextCheck]:
    async with ContextCheck([tiny_model], n_ctx=N_CTX, system_prompt=SYSTEM) as started:
        yield started


def message(words: int) -> str:
    return "the " * words


async def test_the_gateway_refuses_exactly_what_the_agent_cannot_fit(
    tiny_model: Path, check: ContextCheck
) -> None:
    """The agent's builder over the full model (weights, context) and the gateway's check over
    the vocabulary alone draw the line at the same message, whatever max_tokens asks."""
    async with LlamaEngine(tiny_model, n_ctx=N_CTX, n_threads=1, n_gpu_layers=0) as engine:
        agent = PromptBuilder(
            count_tokens=engine.count_segments,
            n_ctx=N_CTX,
            chat_template=engine.chat_template,
            bos_token=engine.bos_text,
            eos_token=engine.eos_text,
            system_prompt=SYSTEM,
        )
        assert agent.uses_chat_template
        outcomes = []
        for words in range(N_CTX - 30, N_CTX + 2):
            text = message(words)
            refusal = check.refusal(text)
            try:
                built = agent.build(PromptRequest(user_text=text), max_tokens=256)
            except PromptTooLong:
                assert refusal is not None, f"{words} words: the agent refused, the gateway not"
                outcomes.append("refused")
                continue
            assert refusal is None, f"{words} words: the gateway refused what the agent fits"
            assert built.prompt_tokens == check.prompt_tokens(text)[tiny_model.name]
            assert built.max_tokens >= 1
            outcomes.append("fits")
    # The range crosses the limit once: both outcomes were seen, in order.
    assert outcomes[0] == "fits" and outcomes[-1] == "refused"
    assert outcomes == sorted(outcomes)


async def test_the_refusal_names_the_prompt_tokens_and_the_limit(
    tiny_model: Path, check: ContextCheck
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await check.check(message(N_CTX * 2))
    error = refused.value
    tokens = check.prompt_tokens(message(N_CTX * 2))[tiny_model.name]
    assert tokens > N_CTX
    assert error.reason == "PROMPT_TOO_LONG"
    assert error.field == "start.text"
    assert f"{tokens} tokens" in error.message and f"holds {N_CTX} tokens" in error.message
    assert error.metadata == {"prompt_tokens": str(tokens), "context_tokens": str(N_CTX)}
    await check.check(message(10))  # a short message passes


async def test_the_system_prompt_counts(tiny_model: Path, check: ContextCheck) -> None:
    async with ContextCheck([tiny_model], n_ctx=N_CTX) as bare:
        text = message(20)
        assert (
            check.prompt_tokens(text)[tiny_model.name] > bare.prompt_tokens(text)[tiny_model.name]
        )


async def test_tokenizing_runs_off_the_event_loop(
    check: ContextCheck, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    counted = check.prompt_tokens

    def spy(text: str) -> dict[str, int]:
        threads.append(threading.current_thread().name)
        return counted(text)

    monkeypatch.setattr(check, "prompt_tokens", spy)
    await check.check(message(5))
    assert threads and threads[0].startswith("context-check")


async def test_every_model_must_fit_and_the_refusal_names_the_one_that_does_not(
    tmp_path: Path, tiny_model: Path
) -> None:
    other = ensure_tiny_model(tmp_path, seed=7)
    async with ContextCheck([tiny_model, other], n_ctx=N_CTX) as both:
        counts = both.prompt_tokens(message(N_CTX))
        assert set(counts) == {tiny_model.name, other.name}
        refusal = both.refusal(message(N_CTX))
        assert refusal is not None and " of mesh-tiny-" in refusal.message


async def test_a_file_that_is_not_a_model_is_a_configuration_error(tmp_path: Path) -> None:
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"not gguf")
    with pytest.raises(SettingsError, match="MESH_GATEWAY_CONTEXT_MODELS"):
        async with ContextCheck([bogus], n_ctx=N_CTX):
            pass


async def test_the_core_refuses_before_anything_is_logged(
    tmp_path: Path, check: ContextCheck
) -> None:
    async with (
        EmbeddedLog(tmp_path / "log.sqlite3") as log,
        GatewayCore(
            make_settings(tmp_path), log=log, conversations=KnownConversations(), context=check
        ) as core,
    ):
        with pytest.raises(InvalidArgument) as refused:
            await core.start_turn(ACME, StartRequest("", message(N_CTX)))
        assert refused.value.reason == "PROMPT_TOO_LONG"
        assert [await log.end_offset(TURN_REQUESTS, p) for p in range(core.partitions)] == [
            0
        ] * core.partitions
        (await core.start_turn(ACME, StartRequest("", message(10)))).close()


def test_the_settings_follow_the_agents_unless_set(tmp_path: Path, tiny_model: Path) -> None:
    agents = {
        "MESH_AGENT_MODEL_PATH": str(tiny_model),
        "MESH_AGENT_N_CTX": "777",
        "MESH_AGENT_SYSTEM_PROMPT": "be brief",
    }
    derived = GatewaySettings.from_env(agents)
    assert derived.context_model_paths == (tiny_model,)
    assert (derived.context_tokens, derived.context_system_prompt) == (777, "be brief")
    off = GatewaySettings.from_env({**agents, "MESH_GATEWAY_CONTEXT_MODELS": ""})
    assert off.context_model_paths == ()
    assert GatewaySettings.from_env({}).context_tokens == 2048  # the agent's default
    with pytest.raises(SettingsError, match="is not a file"):
        GatewaySettings.from_env({"MESH_GATEWAY_CONTEXT_MODELS": str(tmp_path / "missing.gguf")})

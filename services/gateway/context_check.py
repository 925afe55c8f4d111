"""Refusing a message that can never fit the model's context window, before it is logged.

An agent's prompt holds the chat template's markers, the system prompt, history, recalled
passages and the user's message; history and passages are dropped first when room runs out
(services/agent/prompt.py). What can never fit is therefore the *bare* prompt, the message alone
with the template and the system prompt, when it leaves no room for one token of reply: the agent
would finish that turn with FINISH_REASON_ERROR (PROMPT_TOO_LONG). The gateway counts the same
bare prompt with the same code (``PromptBuilder.bare_tokens``) over the model's own vocabulary,
loaded without weights, and refuses it with INVALID_ARGUMENT, so the turn is never accepted.

``max_tokens`` does not count: the agent gives the reply whatever room is left, and a reply cut
short by the window ends with FINISH_REASON_LENGTH (docs/protocol.md). Turns are not routed by
model, so with several models the message must fit every one of them.

Without model files (``MESH_GATEWAY_CONTEXT_MODELS`` empty, e.g. a gateway deployed without the
agents' files) there is no check here, and the agent's refusal remains the backstop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mesh.errors import InvalidArgument
from mesh.lifecycle import AsyncStartStop
from mesh.llm.native import EngineError, NativeVocab
from mesh.settings import SettingsError
from services.agent.prompt import PromptBuilder, PromptRequest

_log = logging.getLogger(__name__)

# Tokenizing a message of MAX_TEXT_CHARS takes milliseconds (tens at worst, for text the
# vocabulary splits finely); a few threads keep a burst of long messages off the event loop
# without letting it take every CPU.
WORKERS = 2


@dataclass(frozen=True, slots=True)
class _Model:
    name: str
    vocab: NativeVocab
    prompts: PromptBuilder


class ContextCheck(AsyncStartStop):
    """Counts a message's bare prompt for each model and refuses what cannot fit.

    Args:
        paths: the agents' GGUF files (only their vocabulary and metadata are read).
        n_ctx: the agents' context window in tokens.
        system_prompt: the agents' system prompt (part of every prompt).
    """

    def __init__(self, paths: Sequence[Path], *, n_ctx: int, system_prompt: str = "") -> None:
        self._paths = tuple(paths)
        self.n_ctx = n_ctx
        self._system_prompt = system_prompt
        self._models: tuple[_Model, ...] = ()
        self._pool: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        if self._pool is not None:
            return
        pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="context-check")
        self._pool = pool
        loop = asyncio.get_running_loop()
        try:
            for path in self._paths:
                model = await loop.run_in_executor(pool, self._load, path)
                self._models = (*self._models, model)
        except BaseException:
            await self.stop()
            raise

    def _load(self, path: Path) -> _Model:
        began = time.perf_counter()
        try:
            vocab = NativeVocab(path)
        except EngineError as error:
            raise SettingsError(f"MESH_GATEWAY_CONTEXT_MODELS: {error}") from None
        prompts = PromptBuilder(
            count_tokens=lambda segments: len(vocab.tokenize_segments(segments)),
            n_ctx=self.n_ctx,
            chat_template=vocab.metadata.get("tokenizer.chat_template") or None,
            bos_token=vocab.token_text(vocab.bos),
            eos_token=vocab.token_text(vocab.eos),
            system_prompt=self._system_prompt,
        )
        _log.info(
            "context check: %s vocabulary loaded in %.2fs (n_ctx=%d)",
            path.name,
            time.perf_counter() - began,
            self.n_ctx,
        )
        return _Model(path.name, vocab, prompts)

    async def stop(self) -> None:
        pool, self._pool = self._pool, None
        models, self._models = self._models, ()
        if pool is not None:
            # Off the event loop: a count still running finishes first.
            await asyncio.to_thread(pool.shutdown, wait=True)
        for model in models:
            model.vocab.close()

    def prompt_tokens(self, text: str) -> dict[str, int]:
        """Tokens of the bare prompt for ``text``, per model name (blocking: a few ms)."""
        request = PromptRequest(user_text=text)
        return {model.name: model.prompts.bare_tokens(request) for model in self._models}

    def refusal(self, text: str) -> InvalidArgument | None:
        """The INVALID_ARGUMENT for a message that cannot fit some model, or None."""
        counts = self.prompt_tokens(text)
        if not counts:
            return None
        name, tokens = max(counts.items(), key=lambda item: item[1])
        if tokens < self.n_ctx:
            return None
        model = f" of {name}" if len(counts) > 1 else ""
        return InvalidArgument(
            f"start.text makes a prompt of {tokens} tokens, but the model's context window"
            f"{model} holds {self.n_ctx} tokens, the prompt included, and the reply needs at "
            f"least 1; send a message that makes a prompt of at most {self.n_ctx - 1} tokens",
            reason="PROMPT_TOO_LONG",
            field="start.text",
            metadata={"prompt_tokens": str(tokens), "context_tokens": str(self.n_ctx)},
        )

    async def check(self, text: str) -> None:
        """Raise INVALID_ARGUMENT (PROMPT_TOO_LONG) when ``text`` cannot fit; off the loop."""
        if self._pool is None or not self._models:
            return
        refusal = await asyncio.get_running_loop().run_in_executor(self._pool, self.refusal, text)
        if refusal is not None:
            raise refusal

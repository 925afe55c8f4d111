"""The few llama.cpp C calls the engine needs, wrapped so the rest never touches ctypes.

``NativeModel`` owns one model and one context. Every method runs on the engine's decode thread
(llama.cpp contexts are not thread-safe); tokenizing only reads the vocabulary and is safe from
any thread once the model is loaded.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)

# llama.cpp's "pick a random seed" value.
RANDOM_SEED = 0xFFFFFFFF

# Sampling knobs we do not expose: llama.cpp's server defaults.
TOP_K = 40
MIN_P = 0.05


class EngineError(RuntimeError):
    """The model could not be loaded or run."""


@functools.cache
def llama_cpp() -> Any:
    """The llama_cpp module, imported on first use so the rest of the mesh runs without it."""
    try:
        import llama_cpp as module
        import llama_cpp._utils as utils
    except ImportError as error:  # pragma: no cover - depends on the install
        raise EngineError(
            "llama-cpp-python is not installed; `pip install llama-cpp-python`"
        ) from error
    # llama_cpp opens /dev/null twice at import and never closes it, which shows up as
    # ResourceWarnings at exit; close them once nothing can load a model any more.
    for name in ("outnull_file", "errnull_file"):
        handle = getattr(utils, name, None)
        if handle is not None:
            atexit.register(handle.close)
    module.llama_backend_init()
    _silence_logs(module)
    return module


_LOG_CALLBACKS: list[Any] = []
_GGML_LOG_ERROR = 4


def _silence_logs(module: Any) -> None:
    """Keep llama.cpp's errors (as our log lines) and drop its chatter and warnings."""

    def forward(level: int, text: bytes, user_data: Any) -> None:
        if level == _GGML_LOG_ERROR and text:
            _log.warning("llama.cpp: %s", text.decode("utf-8", errors="replace").rstrip())

    callback = module.llama_log_callback(forward)
    module.llama_log_set(callback, ctypes.c_void_p(0))
    # Keep the callback alive as long as the library may call it.
    _LOG_CALLBACKS.append(callback)


@dataclass(frozen=True, slots=True)
class ContextShape:
    """How the one context is laid out.

    ``kv_tokens`` cells are shared by all ``sequences`` (a unified cache): a running sequence
    takes what it needs and idle ones keep their prefix until the space is wanted.
    """

    kv_tokens: int
    sequences: int
    batch: int
    threads: int
    gpu_layers: int


class Sampler:
    """A native sampler chain for one sequence: top-k, top-p, min-p, temperature, then a draw.

    Temperature 0 leaves only the most likely token (greedy). The chain lives in C; no
    per-token Python work touches the vocabulary.
    """

    def __init__(self, *, temperature: float, top_p: float, seed: int) -> None:
        lib = llama_cpp()
        self._lib = lib
        self._chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        for stage in (
            lib.llama_sampler_init_top_k(TOP_K),
            lib.llama_sampler_init_top_p(top_p, 1),
            lib.llama_sampler_init_min_p(MIN_P, 1),
            lib.llama_sampler_init_temp(temperature),
            lib.llama_sampler_init_dist(seed),
        ):
            lib.llama_sampler_chain_add(self._chain, stage)

    def sample(self, ctx: Any, output_index: int) -> int:
        """Draw from the logits of batch row ``output_index`` (also records the token)."""
        return int(self._lib.llama_sampler_sample(self._chain, ctx, output_index))

    def free(self) -> None:
        if self._chain is not None:
            self._lib.llama_sampler_free(self._chain)
            self._chain = None


class NativeModel:
    """One GGUF model and one llama context serving several sequences."""

    def __init__(self, path: Path, shape: ContextShape) -> None:
        lib = llama_cpp()
        self._lib = lib
        self.shape = shape
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = shape.gpu_layers
        self.model = lib.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise EngineError(f"llama.cpp could not load {path} (not a GGUF model?)")
        params = lib.llama_context_default_params()
        params.n_ctx = shape.kv_tokens
        params.n_batch = shape.batch
        params.n_ubatch = shape.batch
        params.n_seq_max = shape.sequences
        params.n_threads = shape.threads
        params.n_threads_batch = shape.threads
        # One pool of cells for every sequence, and full-size sliding-window caches so a kept
        # prefix can be extended later (a trimmed sliding window could not be).
        params.kv_unified = True
        params.swa_full = True
        params.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            self.model = None
            raise EngineError(
                f"llama.cpp could not create a context of {shape.kv_tokens} tokens for {path}"
            )
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.memory = lib.llama_get_memory(self.ctx)
        self.bos = int(lib.llama_vocab_bos(self.vocab))
        self.eos = int(lib.llama_vocab_eos(self.vocab))
        self.metadata = _metadata(lib, self.model)
        self._batch = lib.llama_batch_init(shape.batch, 0, 1)

    def close(self) -> None:
        lib = self._lib
        if self.ctx:
            lib.llama_batch_free(self._batch)
            lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            lib.llama_model_free(self.model)
            self.model = None

    @property
    def supports_gpu(self) -> bool:
        return bool(self._lib.llama_supports_gpu_offload())

    # Tokens -------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Tokens of ``text``; ``special``: markers such as ``<end_of_turn>`` become their
        special tokens (only for text we wrote: in user text they must stay characters)."""
        return _tokenize(self._lib, self.vocab, text, add_bos=add_bos, special=special)

    def token_bytes(self, token: int) -> bytes:
        """Bytes of one token as generated text (special tokens render as nothing)."""
        size = 64
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = self._lib.llama_token_to_piece(self.vocab, token, buffer, size, 0, False)
            if n >= 0:
                return bytes(buffer.raw[:n])
            size = -n

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    def token_text(self, token: int) -> str:
        return _token_text(self._lib, self.vocab, token)

    # Decoding -----------------------------------------------------------------------------

    def decode(self, rows: Sequence[tuple[int, int, int, bool]]) -> int:
        """Decode one batch of ``(token, position, sequence, wants_logits)`` rows.

        Returns llama_decode's status: 0 done, 1 no room in the cache, other values errors.
        """
        batch = self._batch
        for i, (token, pos, seq, logits) in enumerate(rows):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(rows)
        return int(self._lib.llama_decode(self.ctx, batch))

    def forget(self, seq: int, from_pos: int = -1) -> bool:
        """Drop a sequence's cells from ``from_pos`` on (-1: all of them)."""
        return bool(self._lib.llama_memory_seq_rm(self.memory, seq, max(from_pos, -1), -1))

    def sampler(self, *, temperature: float, top_p: float, seed: int) -> Sampler:
        return Sampler(temperature=temperature, top_p=top_p, seed=seed)


def _tokenize(lib: Any, vocab: Any, text: str, *, add_bos: bool, special: bool) -> list[int]:
    data = text.encode("utf-8")
    size = len(data) + 2
    while True:
        buffer = (ctypes.c_int32 * size)()
        n = lib.llama_tokenize(vocab, data, len(data), buffer, size, add_bos, special)
        if n >= 0:
            return list(buffer[:n])
        size = -n


def _token_text(lib: Any, vocab: Any, token: int) -> str:
    if token < 0:
        return ""
    raw = lib.llama_vocab_get_text(vocab, token)
    return raw.decode("utf-8", errors="replace") if raw else ""


def _metadata(lib: Any, model: Any) -> dict[str, str]:
    """The GGUF file's metadata as text (the chat template is one of its values)."""
    result: dict[str, str] = {}
    buffer = ctypes.create_string_buffer(1 << 20)  # chat templates can be long
    for index in range(lib.llama_model_meta_count(model)):
        if lib.llama_model_meta_key_by_index(model, index, buffer, len(buffer)) < 0:
            continue
        key = buffer.value.decode("utf-8", errors="replace")
        if lib.llama_model_meta_val_str_by_index(model, index, buffer, len(buffer)) < 0:
            continue
        result[key] = buffer.value.decode("utf-8", errors="replace")
    return result


def join_segments(
    tokenize: Callable[..., list[int]], bos: int, segments: Sequence[tuple[str, bool]]
) -> list[int]:
    """Tokens of a prompt made of ``(text, trusted)`` segments, BOS first.

    Special tokens are parsed in trusted text only (a chat template's turn markers); text that
    users, history or memory wrote is tokenized as plain text, so it cannot forge them.
    ``tokenize`` is a vocabulary's ``tokenize`` (the engine's model or a ``NativeVocab``).
    """
    tokens: list[int] = []
    for text, trusted in segments:
        tokens += tokenize(text, add_bos=not tokens, special=trusted)
    # Chat templates often write the BOS token themselves; never feed it twice.
    if len(tokens) >= 2 and tokens[0] == bos and tokens[1] == bos:
        tokens = tokens[1:]
    return tokens


class NativeVocab:
    """A GGUF model's vocabulary and metadata only (no weights, no context): what the gateway
    needs to count a prompt's tokens exactly as the agents will. Safe from any thread."""

    def __init__(self, path: Path) -> None:
        lib = llama_cpp()
        self._lib = lib
        params = lib.llama_model_default_params()
        params.vocab_only = True
        self.model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise EngineError(f"llama.cpp could not read the vocabulary of {path} (not GGUF?)")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.bos = int(lib.llama_vocab_bos(self.vocab))
        self.eos = int(lib.llama_vocab_eos(self.vocab))
        self.metadata = _metadata(lib, self.model)

    def close(self) -> None:
        if self.model:
            self._lib.llama_model_free(self.model)
            self.model = None

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        return _tokenize(self._lib, self.vocab, text, add_bos=add_bos, special=special)

    def token_text(self, token: int) -> str:
        return _token_text(self._lib, self.vocab, token)

    def tokenize_segments(self, segments: Sequence[tuple[str, bool]]) -> list[int]:
        return join_segments(self.tokenize, self.bos, segments)

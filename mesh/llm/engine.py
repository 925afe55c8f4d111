"""llama.cpp behind an asyncio interface: one token at a time, cancellable between tokens.

llama.cpp calls block, so each generation runs on a worker thread owned by the engine and hands
its pieces to the event loop through a bounded queue; a slow consumer therefore pauses
generation instead of growing memory. A llama context serves one generation at a time: the
engine keeps ``slots`` contexts and a generation waits for a free one.

Usage::

    async with LlamaEngine(path, n_ctx=2048, n_threads=2, n_gpu_layers=0) as engine:
        async with engine.generate(prompt, SamplingOptions(max_tokens=64)) as generation:
            async for piece in generation:
                print(piece.text, end="")
        print(generation.finish_reason)
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import ctypes
import enum
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

# Re-exported: ``mesh.llm`` offers it beside the engine whose results carry it.
from mesh.generation import FinishReason as FinishReason
from mesh.lifecycle import AsyncStartStop
from mesh.llm.text import StopMatcher, Utf8Decoder

log = logging.getLogger(__name__)

# llama.cpp's "pick a random seed" value.
RANDOM_SEED = 0xFFFFFFFF

# Sampling knobs we do not expose: llama.cpp's server defaults.
_TOP_K = 40
_MIN_P = 0.05

_QUEUE_SIZE = 32
_PUT_POLL_S = 0.05


class Device(enum.Enum):
    CPU = "CPU"
    GPU = "GPU"


class EngineError(RuntimeError):
    """The model could not be loaded or run."""


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """Options of one generation; validated by the caller."""

    max_tokens: int
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Piece:
    """Text of one generated token (``tokens == 1``) or of held text released at the end.

    ``text`` may be empty: a token that ends inside a multi-byte character, or text held back
    because it may be the start of a stop sequence.
    """

    text: str
    tokens: int


@dataclass(frozen=True, slots=True)
class _Done:
    reason: FinishReason
    error: str | None = None


class Generation:
    """One running generation; iterate for pieces, then read the result attributes.

    Obtain it from ``LlamaEngine.generate`` (an async context manager that cleans up).
    """

    def __init__(self, prompt: str | Sequence[int], options: SamplingOptions) -> None:
        self._prompt = prompt
        self.options = options
        self._cancel = threading.Event()
        # Pieces waiting for the consumer; ``_room`` bounds them (the end marker needs no room).
        self._queue: asyncio.Queue[Piece | _Done] = asyncio.Queue()
        self._room = threading.Semaphore(_QUEUE_SIZE)
        self._ended = False
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None

    def cancel(self) -> None:
        """Stop before the next token; safe to call from any thread, any number of times."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Piece:
        if self._ended:
            raise StopAsyncIteration
        if self._cancel.is_set():
            self._end(FinishReason.CANCELLED)
            raise StopAsyncIteration
        item = await self._queue.get()
        # A cancel that arrived while we waited wins over a piece already produced.
        if self._cancel.is_set():
            self._end(FinishReason.CANCELLED)
            raise StopAsyncIteration
        if isinstance(item, _Done):
            self._end(item.reason, item.error)
            raise StopAsyncIteration
        self._room.release()
        self.completion_tokens += item.tokens
        return item

    def _end(self, reason: FinishReason, error: str | None = None) -> None:
        self._ended = True
        self.finish_reason = reason
        self.error = error


class _Slot:
    """One llama context and the thread that drives it."""

    def __init__(self, llama: Any, executor: concurrent.futures.ThreadPoolExecutor) -> None:
        self.llama = llama
        self.executor = executor


class LlamaEngine(AsyncStartStop):
    """A GGUF model loaded with llama.cpp, serving ``slots`` generations at a time.

    Args:
        model_path: the .gguf file.
        n_ctx: context window in tokens (prompt plus reply).
        n_threads: CPU threads per generation.
        n_gpu_layers: layers to offload to a GPU (-1 for all; 0 keeps everything on the CPU).
        seed: sampling seed for generations that do not set one; None means random.
        slots: concurrent generations; each slot holds its own llama context.
        min_token_interval_s: the least time between two tokens of one generation; 0 (the
            default) decodes as fast as the model can. A pace for demos and for client tests
            that need a fast test model to stream at a real model's speed; a cancel still
            stops the generation at once.
    """

    def __init__(
        self,
        model_path: Path | str,
        *,
        n_ctx: int = 2048,
        n_threads: int = 2,
        n_gpu_layers: int = 0,
        seed: int | None = None,
        slots: int = 1,
        n_batch: int = 512,
        min_token_interval_s: float = 0.0,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        if min_token_interval_s < 0:
            raise ValueError("min_token_interval_s must be >= 0")
        self.model_path = Path(model_path)
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.n_gpu_layers = n_gpu_layers
        self.seed = seed
        self.total_slots = slots
        self.min_token_interval_s = min_token_interval_s
        self._n_batch = n_batch
        self._slots: list[_Slot] = []
        self._free: asyncio.Queue[_Slot] | None = None
        self._vocab: Any = None
        self._eos = -1
        self._bos = -1
        self.metadata: dict[str, str] = {}
        self.device = Device.CPU

    @property
    def model_name(self) -> str:
        return self.model_path.name

    @property
    def free_slots(self) -> int:
        return self._free.qsize() if self._free is not None else 0

    @property
    def chat_template(self) -> str | None:
        """The model's Jinja chat template from its GGUF metadata, if it has one."""
        return self.metadata.get("tokenizer.chat_template") or None

    @property
    def bos_text(self) -> str:
        return self._token_text(self._bos)

    @property
    def eos_text(self) -> str:
        return self._token_text(self._eos)

    async def start(self) -> None:
        """Load the model (in a thread: it can take seconds)."""
        if self._slots:
            return
        if not self.model_path.is_file():
            raise EngineError(f"model file {self.model_path} does not exist or is not a file")
        self._free = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for index in range(self.total_slots):
            executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"llama-slot-{index}"
            )
            try:
                llama = await loop.run_in_executor(executor, self._load)
            except BaseException:
                executor.shutdown(wait=False)
                await self.stop()
                raise
            slot = _Slot(llama, executor)
            self._slots.append(slot)
            self._free.put_nowait(slot)
        first = self._slots[0].llama
        llama_cpp = _llama_cpp()
        self._vocab = llama_cpp.llama_model_get_vocab(first.model)
        self._eos = int(first.token_eos())
        self._bos = int(first.token_bos())
        self.metadata = dict(first.metadata)
        gpu = self.n_gpu_layers != 0 and bool(llama_cpp.llama_supports_gpu_offload())
        self.device = Device.GPU if gpu else Device.CPU
        log.info(
            "loaded %s: n_ctx=%d threads=%d gpu_layers=%d device=%s slots=%d",
            self.model_name,
            self.n_ctx,
            self.n_threads,
            self.n_gpu_layers,
            self.device.value,
            self.total_slots,
        )

    def _load(self) -> Any:
        llama_cpp = _llama_cpp()
        try:
            return llama_cpp.Llama(
                model_path=str(self.model_path),
                n_ctx=self.n_ctx,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                n_gpu_layers=self.n_gpu_layers,
                n_batch=min(self._n_batch, self.n_ctx),
                seed=RANDOM_SEED if self.seed is None else self.seed,
                verbose=False,
            )
        except (ValueError, RuntimeError) as error:
            raise EngineError(f"llama.cpp could not load {self.model_path}: {error}") from error

    async def stop(self) -> None:
        """Free the contexts; waits for running generations' threads to let go first."""
        slots, self._slots = self._slots, []
        for slot in slots:
            await asyncio.get_running_loop().run_in_executor(slot.executor, slot.llama.close)
            slot.executor.shutdown(wait=True)
        self._free = None

    # Tokens -------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Tokens of a prompt as the model sees it: BOS first, special tokens parsed."""
        llama = self._any_llama()
        tokens: list[int] = llama.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        # Chat templates often write the BOS token themselves; never feed it twice.
        if len(tokens) >= 2 and tokens[0] == self._bos and tokens[1] == self._bos:
            tokens = tokens[1:]
        return tokens

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def token_bytes(self, token: int) -> bytes:
        """Bytes of one token as generated text (special tokens render as nothing)."""
        llama_cpp = _llama_cpp()
        size = 64
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, size, 0, False)
            if n >= 0:
                return bytes(buffer.raw[:n])
            size = -n

    def is_end_of_generation(self, token: int) -> bool:
        return bool(_llama_cpp().llama_vocab_is_eog(self._vocab, token))

    def _token_text(self, token: int) -> str:
        if token < 0 or self._vocab is None:
            return ""
        raw = _llama_cpp().llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def _any_llama(self) -> Any:
        if not self._slots:
            raise EngineError("the engine is not started")
        return self._slots[0].llama

    # Generation ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def generate(
        self, prompt: str | Sequence[int], options: SamplingOptions
    ) -> AsyncIterator[Generation]:
        """Generate from ``prompt`` (text or tokens); waits for a free slot first.

        Leaving the block cancels the generation if it is still running and waits for its
        thread, so the slot is free again afterwards.
        """
        if self._free is None:
            raise EngineError("the engine is not started")
        slot = await self._free.get()
        generation = Generation(prompt, options)
        loop = asyncio.get_running_loop()
        try:
            worker = loop.run_in_executor(slot.executor, self._run, slot, generation, loop)
            try:
                yield generation
            finally:
                generation.cancel()
                # The thread notices the cancel within one token (or one put poll).
                await asyncio.shield(worker)
        finally:
            if self._free is not None:
                self._free.put_nowait(slot)

    def _run(self, slot: _Slot, generation: Generation, loop: asyncio.AbstractEventLoop) -> None:
        """Thread body: decode tokens and hand pieces to the loop until done or cancelled."""

        last_put = 0.0

        def put(item: Piece) -> bool:
            nonlocal last_put
            if self.min_token_interval_s > 0:
                # The pace: waiting on the cancel event keeps a cancel immediate.
                wait_s = last_put + self.min_token_interval_s - time.monotonic()
                if wait_s > 0 and generation._cancel.wait(wait_s):
                    return False
            # Wait for room without involving the loop, so a busy loop does not slow decoding.
            while not generation._room.acquire(timeout=_PUT_POLL_S):
                if generation.cancelled:
                    return False
            loop.call_soon_threadsafe(generation._queue.put_nowait, item)
            last_put = time.monotonic()
            return True

        try:
            done = self._generate_tokens(slot.llama, generation, put)
        except Exception as error:
            log.exception("generation failed")
            done = _Done(FinishReason.ERROR, f"generation failed: {error}")
        with contextlib.suppress(RuntimeError):  # the loop may be gone at shutdown
            loop.call_soon_threadsafe(generation._queue.put_nowait, done)

    def _generate_tokens(
        self, llama: Any, generation: Generation, put: Callable[[Piece], bool]
    ) -> _Done:
        options = generation.options
        prompt = generation._prompt
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        generation.prompt_tokens = len(tokens)
        room = self.n_ctx - len(tokens)
        if room <= 0:
            return _Done(
                FinishReason.ERROR,
                f"the prompt has {len(tokens)} tokens; the context holds {self.n_ctx}",
            )
        limit = min(options.max_tokens, room)
        if limit <= 0:
            return _Done(FinishReason.LENGTH)
        seed = options.seed if options.seed is not None else self.seed
        llama.set_seed(RANDOM_SEED if seed is None else seed)
        decoder = Utf8Decoder()
        stopper = StopMatcher(options.stop)
        produced = 0
        stream: Iterator[int] = llama.generate(
            tokens,
            top_k=_TOP_K,
            top_p=options.top_p,
            min_p=_MIN_P,
            temp=options.temperature,
            repeat_penalty=1.0,
        )
        try:
            for token in stream:
                if generation.cancelled:
                    return _Done(FinishReason.CANCELLED)
                if self.is_end_of_generation(token):
                    emit, matched = stopper.feed(decoder.flush())
                    tail = emit if matched else emit + stopper.flush()
                    if tail and not put(Piece(tail, 0)):
                        return _Done(FinishReason.CANCELLED)
                    return _Done(FinishReason.STOP_SEQUENCE if matched else FinishReason.STOP)
                produced += 1
                emit, matched = stopper.feed(decoder.feed(self.token_bytes(token)))
                if matched:
                    if not put(Piece(emit, 1)):
                        return _Done(FinishReason.CANCELLED)
                    return _Done(FinishReason.STOP_SEQUENCE)
                if produced >= limit:
                    rest, matched = stopper.feed(decoder.flush())
                    emit += rest if matched else rest + stopper.flush()
                    if not put(Piece(emit, 1)):
                        return _Done(FinishReason.CANCELLED)
                    return _Done(FinishReason.STOP_SEQUENCE if matched else FinishReason.LENGTH)
                if not put(Piece(emit, 1)):
                    return _Done(FinishReason.CANCELLED)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        # llama.generate only ends on its own when the context is full.
        return _Done(FinishReason.LENGTH)


@functools.cache
def _llama_cpp() -> Any:
    """The llama_cpp module, imported on first use so the rest of the mesh runs without it."""
    try:
        import llama_cpp
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
    return llama_cpp

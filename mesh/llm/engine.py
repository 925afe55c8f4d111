"""llama.cpp behind an asyncio interface: many generations in one context, batched.

One llama context serves up to ``slots`` generations at once (continuous batching). A single
decode thread owns the context. Each step it builds one batch from

- the last sampled token of every running generation (one row each), and
- up to ``prefill_chunk`` prompt tokens of generations still reading their prompt,

decodes it, and samples each generation's next token with its own native sampler chain. New
generations join between steps; a long prompt is read in chunks across several steps so the
running ones keep producing tokens meanwhile. A larger chunk reads prompts faster (fewer,
fuller matrix products) but makes the running streams wait longer for that step.

A finished generation's cells stay in the cache (``mesh.llm.kv``): the next prompt that starts
the same way (a conversation's next turn) continues from there instead of reading it again.

Pieces reach the event loop through a per-generation queue bounded by ``_QUEUE_SIZE``: a slow
consumer pauses its own generation, never the others.

Usage::

    async with LlamaEngine(path, n_ctx=2048, n_threads=2, slots=4) as engine:
        async with engine.generate(prompt, SamplingOptions(max_tokens=64)) as generation:
            async for piece in generation:
                print(piece.text, end="")
        print(generation.finish_reason)
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from mesh.generation import FinishReason as FinishReason
from mesh.lifecycle import AsyncStartStop
from mesh.llm import metrics
from mesh.llm.kv import SequencePool
from mesh.llm.native import (
    RANDOM_SEED,
    ContextShape,
    EngineError,
    NativeModel,
    Sampler,
    join_segments,
)
from mesh.llm.sequence import Piece, TokenReader

__all__ = [
    "RANDOM_SEED",
    "Device",
    "EngineError",
    "FinishReason",
    "Generation",
    "LlamaEngine",
    "Piece",
    "SamplingOptions",
]

log = logging.getLogger(__name__)

_QUEUE_SIZE = 32
# Idle sequences kept for prefix reuse, per running slot (their cells are bounded separately).
_IDLE_SEQUENCES_PER_SLOT = 3


class Device(enum.Enum):
    CPU = "CPU"
    GPU = "GPU"


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """Options of one generation; validated by the caller."""

    max_tokens: int
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Done:
    reason: FinishReason
    error: str | None = None


class Generation:
    """One generation; iterate for pieces, then read the result attributes.

    Obtain it from ``LlamaEngine.generate`` (an async context manager that cleans up).
    ``cached_tokens`` of the ``prompt_tokens`` were found in the cache and not read again.
    """

    def __init__(self, options: SamplingOptions, wake: threading.Event) -> None:
        self.options = options
        self._wake = wake
        self._cancel = threading.Event()
        # Pieces waiting for the consumer; ``_room`` bounds them (the end marker needs no room).
        self._queue: asyncio.Queue[Piece | _Done] = asyncio.Queue()
        self._room = threading.Semaphore(_QUEUE_SIZE)
        self._ended = False
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None

    def cancel(self) -> None:
        """Stop before the next token; safe to call from any thread, any number of times."""
        self._cancel.set()
        self._wake.set()

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
        self._wake.set()  # its sequence may have been paused for room
        self.completion_tokens += item.tokens
        return item

    def _end(self, reason: FinishReason, error: str | None = None) -> None:
        self._ended = True
        self.finish_reason = reason
        self.error = error


@dataclass(eq=False)
class _Work:
    """A generation as the decode thread tracks it."""

    generation: Generation
    loop: asyncio.AbstractEventLoop
    released: asyncio.Future[None]
    prompt: list[int]
    reserve: int  # cells it may grow to: prompt plus reply
    reader: TokenReader
    seed: int
    submitted_at: float
    seq: int = -1
    sampler: Sampler | None = None
    cells: list[int] = field(default_factory=list)  # tokens in its cache cells, by position
    pending: list[int] = field(default_factory=list)  # to feed: prompt rest, then last sample
    reading_prompt: bool = True
    feeding: int = 0  # tokens of ``pending`` in the batch being decoded
    holds_room: bool = False
    due: float = 0.0  # the pace: not fed again before this time

    def emit(self, item: Piece | _Done) -> None:
        with contextlib.suppress(RuntimeError):  # the loop may be gone at shutdown
            self.loop.call_soon_threadsafe(self.generation._queue.put_nowait, item)


class LlamaEngine(AsyncStartStop):
    """A GGUF model in one llama.cpp context, serving ``slots`` generations in one batch.

    Args:
        model_path: the .gguf file.
        n_ctx: context window of one generation in tokens (prompt plus reply).
        n_threads: CPU threads for decoding.
        n_gpu_layers: layers to offload to a GPU (-1 for all; 0 keeps everything on the CPU).
        seed: sampling seed for generations that do not set one; None means random.
        slots: generations decoded together; more wait for a free one.
        prefill_chunk: prompt tokens read per step (see the module docstring for the trade).
        kv_cache_tokens: cache cells for all sequences, running and idle; at least
            ``n_ctx * slots`` so every slot can fill its window (the default).
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
        prefill_chunk: int = 512,
        kv_cache_tokens: int | None = None,
        min_token_interval_s: float = 0.0,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        if min_token_interval_s < 0:
            raise ValueError("min_token_interval_s must be >= 0")
        if kv_cache_tokens is not None and kv_cache_tokens < n_ctx * slots:
            raise ValueError(
                f"kv_cache_tokens must be at least n_ctx * slots ({n_ctx * slots}) so every "
                "slot can fill its window"
            )
        self.model_path = Path(model_path)
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.n_gpu_layers = n_gpu_layers
        self.seed = seed
        self.total_slots = slots
        self.prefill_chunk = prefill_chunk
        self.kv_cache_tokens = kv_cache_tokens or n_ctx * slots
        self.min_token_interval_s = min_token_interval_s
        self.metadata: dict[str, str] = {}
        self.device = Device.CPU
        self._native: NativeModel | None = None
        self._pool: SequencePool | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._incoming: list[_Work] = []
        self._stopping = False
        # Decode-thread state (read elsewhere only as counts).
        self._waiting: deque[_Work] = deque()
        self._running: list[_Work] = []

    @property
    def model_name(self) -> str:
        return self.model_path.name

    @property
    def free_slots(self) -> int:
        if self._native is None:
            return 0
        busy = len(self._running) + len(self._waiting) + len(self._incoming)
        return max(0, self.total_slots - busy)

    @property
    def waiting(self) -> int:
        return len(self._waiting) + len(self._incoming)

    @property
    def chat_template(self) -> str | None:
        """The model's Jinja chat template from its GGUF metadata, if it has one."""
        return self.metadata.get("tokenizer.chat_template") or None

    @property
    def bos_text(self) -> str:
        return self._model().token_text(self._model().bos)

    @property
    def eos_text(self) -> str:
        return self._model().token_text(self._model().eos)

    def _model(self) -> NativeModel:
        if self._native is None:
            raise EngineError("the engine is not started")
        return self._native

    # Lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model (in a thread: it can take seconds) and start the decode thread."""
        if self._native is not None:
            return
        if not self.model_path.is_file():
            raise EngineError(f"model file {self.model_path} does not exist or is not a file")
        from mesh.llm.native import llama_cpp

        sequences = min(
            int(llama_cpp().llama_max_parallel_sequences()),
            self.total_slots * (1 + _IDLE_SEQUENCES_PER_SLOT),
        )
        shape = ContextShape(
            kv_tokens=self.kv_cache_tokens,
            sequences=sequences,
            batch=self.prefill_chunk + self.total_slots,
            threads=self.n_threads,
            gpu_layers=self.n_gpu_layers,
        )
        native = await asyncio.to_thread(NativeModel, self.model_path, shape)
        self._native = native
        self._pool = SequencePool(
            sequences=sequences, running=self.total_slots, cells=self.kv_cache_tokens
        )
        self.metadata = native.metadata
        gpu = self.n_gpu_layers != 0 and native.supports_gpu
        self.device = Device.GPU if gpu else Device.CPU
        self._stopping = False
        self._thread = threading.Thread(target=self._decode_loop, name="llama-decode", daemon=True)
        self._thread.start()
        log.info(
            "loaded %s: n_ctx=%d slots=%d kv_cache=%d threads=%d gpu_layers=%d device=%s",
            self.model_name,
            self.n_ctx,
            self.total_slots,
            self.kv_cache_tokens,
            self.n_threads,
            self.n_gpu_layers,
            self.device.value,
        )

    async def stop(self) -> None:
        """Cancel what still runs, stop the decode thread and free the model."""
        native, thread = self._native, self._thread
        if native is None:
            return
        with self._lock:
            self._stopping = True
        self._wake.set()
        if thread is not None:
            await asyncio.to_thread(thread.join)
        self._thread = None
        self._native = None
        await asyncio.to_thread(native.close)

    # Tokens -------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Tokens of a prompt as the model sees it: BOS first, special tokens parsed."""
        return self.tokenize_segments(((text, True),))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def tokenize_segments(self, segments: Sequence[tuple[str, bool]]) -> list[int]:
        """Tokens of a prompt made of ``(text, trusted)`` segments, BOS first.

        Special tokens are parsed in trusted text only (a chat template's turn markers); text
        that users, history or memory wrote is tokenized as plain text, so it cannot forge them.
        """
        model = self._model()
        return join_segments(model.tokenize, model.bos, segments)

    def count_segments(self, segments: Sequence[tuple[str, bool]]) -> int:
        return len(self.tokenize_segments(segments))

    def token_bytes(self, token: int) -> bytes:
        return self._model().token_bytes(token)

    def is_end_of_generation(self, token: int) -> bool:
        return self._model().is_end_of_generation(token)

    # Generation ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def generate(
        self, prompt: str | Sequence[int], options: SamplingOptions
    ) -> AsyncIterator[Generation]:
        """Generate from ``prompt`` (text or tokens); it joins the batch when a slot is free.

        Leaving the block cancels the generation if it is still running and waits until the
        decode thread has let go of it.
        """
        if self._native is None or self._stopping:
            raise EngineError("the engine is not started")
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        generation = Generation(options, self._wake)
        generation.prompt_tokens = len(tokens)
        room = self.n_ctx - len(tokens)
        if not tokens or room <= 0:
            detail = f"the prompt has {len(tokens)} tokens; the context holds {self.n_ctx}"
            generation._queue.put_nowait(_Done(FinishReason.ERROR, detail))
            yield generation
            return
        limit = min(options.max_tokens, room)
        if limit <= 0:
            generation._queue.put_nowait(_Done(FinishReason.LENGTH))
            yield generation
            return
        loop = asyncio.get_running_loop()
        seed = options.seed if options.seed is not None else self.seed
        work = _Work(
            generation=generation,
            loop=loop,
            released=loop.create_future(),
            prompt=tokens,
            reserve=len(tokens) + limit,
            reader=TokenReader(limit, options.stop),
            seed=RANDOM_SEED if seed is None else seed,
            submitted_at=time.monotonic(),
        )
        with self._lock:
            if self._stopping:
                raise EngineError("the engine is stopping")
            self._incoming.append(work)
        self._wake.set()
        try:
            yield generation
        finally:
            generation.cancel()
            await asyncio.shield(work.released)

    # The decode thread ----------------------------------------------------------------------

    def _decode_loop(self) -> None:
        native, pool = self._native, self._pool
        assert native is not None and pool is not None
        labels = metrics.Labels(self.model_name)
        while True:
            self._wake.clear()
            with self._lock:
                incoming, self._incoming = self._incoming, []
                stopping = self._stopping
            self._waiting.extend(incoming)
            if stopping:
                for work in [*self._running, *self._waiting]:
                    self._finish(work, FinishReason.CANCELLED)
                self._waiting.clear()
                return
            try:
                # Cancelled generations go first: the slots they free are for those waiting.
                for work in [w for w in self._running if w.generation.cancelled]:
                    self._finish(work, FinishReason.CANCELLED)
                self._admit(native, pool, labels)
                now = time.monotonic()
                rows, outputs = self._plan(now)
                labels.observe_state(len(self._running), self.waiting, pool)
                if not rows:
                    self._wake.wait(self._idle_timeout(now))
                    continue
                labels.batch(len(rows))
                status = native.decode(rows)
                if status == 1 and pool.cached_tokens:
                    # No room: give up every kept prefix and try once more.
                    for seq in pool.evict_idle():
                        native.forget(seq)
                    status = native.decode(rows)
                if status != 0:
                    self._fail_batch(native, f"llama_decode returned {status}")
                    continue
                for work in self._running:
                    if work.feeding:
                        work.cells.extend(work.pending[: work.feeding])
                        del work.pending[: work.feeding]
                        work.feeding = 0
                for work, row in outputs:
                    assert work.sampler is not None
                    self._on_token(native, work, work.sampler.sample(native.ctx, row))
            except Exception as error:  # a broken model must not leave generations hanging
                log.exception("decode step failed")
                self._fail_all(native, f"generation failed: {error}")

    def _admit(self, native: NativeModel, pool: SequencePool, labels: metrics.Labels) -> None:
        """Give waiting generations a sequence, in arrival order, while slots and cells last."""
        while self._waiting:
            work = self._waiting[0]
            if work.generation.cancelled:
                self._waiting.popleft()
                self._finish(work, FinishReason.CANCELLED)
                continue
            claim = pool.claim(work.prompt, work.reserve)
            if claim is None:
                return
            self._waiting.popleft()
            for seq in claim.drop:
                native.forget(seq)
            keep = claim.keep
            if not native.forget(claim.seq, keep):
                # This cache cannot cut a sequence short (e.g. recurrent models): start over.
                native.forget(claim.seq)
                keep = 0
            work.seq = claim.seq
            work.cells = work.prompt[:keep]
            work.pending = work.prompt[keep:]
            work.generation.cached_tokens = keep
            options = work.generation.options
            work.sampler = native.sampler(
                temperature=options.temperature, top_p=options.top_p, seed=work.seed
            )
            self._running.append(work)
            labels.admitted(len(work.prompt), keep, time.monotonic() - work.submitted_at)

    def _plan(self, now: float) -> tuple[list[tuple[int, int, int, bool]], list[tuple[_Work, int]]]:
        """This step's batch rows ``(token, position, sequence, logits)`` and which rows sample."""
        rows: list[tuple[int, int, int, bool]] = []
        outputs: list[tuple[_Work, int]] = []
        # Running generations first: one row each, so they never wait behind a prompt.
        for work in self._running:
            if work.reading_prompt or work.due > now or not self._take_room(work):
                continue
            rows.append((work.pending[0], len(work.cells), work.seq, True))
            work.feeding = 1
            outputs.append((work, len(rows) - 1))
        budget = self.prefill_chunk
        for work in self._running:
            if not work.reading_prompt or budget <= 0:
                continue
            chunk = work.pending[:budget]
            last = len(chunk) == len(work.pending)
            if last and not self._take_room(work):
                continue
            start = len(work.cells)
            for i, token in enumerate(chunk):
                rows.append((token, start + i, work.seq, last and i == len(chunk) - 1))
            work.feeding = len(chunk)
            budget -= len(chunk)
            if last:
                outputs.append((work, len(rows) - 1))
        return rows, outputs

    @staticmethod
    def _take_room(work: _Work) -> bool:
        """Reserve queue room for the piece the next token makes; a full queue pauses it."""
        if not work.holds_room:
            work.holds_room = work.generation._room.acquire(blocking=False)
        return work.holds_room

    def _idle_timeout(self, now: float) -> float | None:
        """How long the thread may sleep: until the earliest paced generation is due.

        Generations waiting for queue room are woken by their consumer instead.
        """
        due = [w.due for w in self._running if not w.reading_prompt and w.due > now]
        return max(0.0, min(due) - now) if due else None

    def _on_token(self, native: NativeModel, work: _Work, token: int) -> None:
        work.reading_prompt = False
        if native.is_end_of_generation(token):
            outcome = work.reader.end_of_generation()
        else:
            outcome = work.reader.token(native.token_bytes(token))
        if outcome.piece is not None:
            work.emit(outcome.piece)  # uses the room taken for this token
        else:
            work.generation._room.release()
        work.holds_room = False
        if outcome.finished is not None:
            self._finish(work, outcome.finished)
            return
        work.pending = [token]
        if self.min_token_interval_s:
            work.due = time.monotonic() + self.min_token_interval_s

    def _finish(self, work: _Work, reason: FinishReason, error: str | None = None) -> None:
        if work.holds_room:
            work.generation._room.release()
            work.holds_room = False
        work.emit(_Done(reason, error))
        if work in self._running:
            self._running.remove(work)
        if work.seq >= 0 and self._pool is not None:
            self._pool.release(work.seq, work.cells)
        if work.sampler is not None:
            work.sampler.free()
            work.sampler = None
        with contextlib.suppress(RuntimeError):
            work.loop.call_soon_threadsafe(_resolve, work.released)

    def _fail_batch(self, native: NativeModel, error: str) -> None:
        """A step failed: end every generation in it with the error; their cells are dropped."""
        for work in [w for w in self._running if w.feeding]:
            native.forget(work.seq)
            work.cells = []
            self._finish(work, FinishReason.ERROR, error)

    def _fail_all(self, native: NativeModel, error: str) -> None:
        """Something unexpected broke: end every generation rather than retry it forever."""
        for work in self._running:
            work.feeding = 1
        self._fail_batch(native, error)
        while self._waiting:
            self._finish(self._waiting.popleft(), FinishReason.ERROR, error)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)

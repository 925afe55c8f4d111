"""Row ``batching``: N concurrent conversations on llama-server, on our engine and on the mesh.

For each N (1, 4, 8, 16 by default) three sides run one after the other, never at once (the
machine's cores are the thing being shared):

- **engine**: ``mesh.llm.LlamaEngine(..., slots=N)`` in this process, N concurrent
  ``generate`` calls: the engine's ceiling, with no mesh around it.
- **llama-server** (the anchor): built from the llama.cpp vendored in the pinned
  llama-cpp-python sdist (``python -m bench.llama_server build``), started with ``-np N
  --cont-batching`` on a loopback port and driven by N concurrent streaming ``/completion``
  requests. A machine without the binary gets a line that says how to build it; CI never
  builds it.
- **mesh**: ``mesh.launcher.Mesh`` (what ``make up`` starts) with one agent configured for N
  concurrent sequences, N new conversations through the gateway's ``StreamTurn``.

All sides get the same model file, threads, per-sequence context, sampling (top-k 40, top-p,
min-p 0.05, temperature, one seed per stream), the same prompt tokens and the same reply
lengths. Each stream's prompt is the agent's own first-turn prompt for a distinct user
message, so the engine and llama-server receive exactly the tokens the agent would build; the
messages (and seeds) are chosen, before any side is timed, among those whose reply on the
engine runs the full reply length, so every stream of a round decodes to the end. The
engine and the mesh share their sampling code, so with the same seed they write the same reply;
llama-server samples with llama.cpp's own chain, so each of its streams is told to generate
exactly as many tokens as the engine's stream with the same prompt and seed did (ignoring
end-of-generation and stop strings), and both do the same work. Prompt caching is alike: each
llama-server slot, like each engine context, reuses the prefix its last prompt shares with the
next (the chat template's few tokens here); neither keeps a cache in host memory.

Per side and N: aggregate tok/s (every stream's generated tokens over the wall time from the
requests' start to the last stream's end, prefill included), TTFT p50/p99 (from the common
start to each stream's first token) and inter-token latency p50/p99 (gaps between one stream's
consecutive tokens). Small N repeat in rounds so every N has at least ``MIN_SAMPLES`` streams.

A multi-turn row follows: one conversation of ``TURNS`` turns through the mesh, TTFT of turn 1
vs the last turn, and whether the agent reported prefix-cache (KV reuse) hits meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from chat.common.v1 import common_pb2
from chat.gateway.v1 import gateway_pb2, gateway_service_pb2_grpc
from chat.persister.v1 import persister_pb2, persister_service_pb2_grpc
from grpc import aio

from bench import llama_server
from bench.common import (
    MISS,
    NOT_APPLICABLE,
    PASS,
    Context,
    Row,
    free_port,
    p50_p99,
    require_normal_finish,
    verdict,
)
from bench.generation import choose_model
from mesh.auth import add_key_to_file
from mesh.launcher import Mesh, MeshConfig
from mesh.llm import LlamaEngine, SamplingOptions
from services.agent.prompt import PromptBuilder, PromptRequest
from services.agent.settings import AgentSettings

STREAMS = (1, 4, 8, 16)
QUICK_STREAMS = (1, 2)
MAX_TOKENS = 64
QUICK_MAX_TOKENS = 8
THREADS = 2
N_CTX = 2048  # per sequence; llama-server gets N times this, split over its N slots
QUICK_N_CTX = 512
MIN_SAMPLES = 8  # N below this repeat in rounds until they have this many streams
TURNS = 10
QUICK_TURNS = 3
TEMPERATURE = 0.8
TOP_P = 0.95
TOP_K = 40  # the engine's fixed values; llama-server is told the same
MIN_P = 0.05
BASE_SEED = 1010
TURN_TIMEOUT_S = 900.0

THROUGHPUT_TARGET = 1.0  # x llama-server's aggregate tok/s, at every N
TTFT_P99_MARGIN_MS = 50.0  # over llama-server's TTFT p99
SINGLE_STREAM_TARGET = 0.95  # mesh at N=1, x the direct engine at N=1
TURN_RATIO_TARGET = 1.5  # last turn's TTFT over turn 1's, with KV reuse

# Distinct first messages, so no two streams share a prompt beyond the template's few tokens
# and their continuations differ.
TOPICS = (
    "how tides work",
    "the history of the printing press",
    "why bread rises",
    "how bees find flowers",
    "the water cycle",
    "how a bicycle stays upright",
    "the life of a star",
    "how vaccines train the immune system",
    "why leaves change colour in autumn",
    "how a steam engine works",
    "the migration of arctic terns",
    "how compilers turn code into machine instructions",
    "the rules of chess",
    "how coral reefs form",
    "why the moon has phases",
    "how glass is made",
    "the invention of the telephone",
    "how volcanoes erupt",
    "why cats purr",
    "how a lighthouse keeper lived",
    "the building of the pyramids",
    "how rainbows appear",
    "the way rivers shape valleys",
    "how maps were drawn before satellites",
)


FORMS = (
    "Write a long, detailed essay about {}.",
    "Explain {} step by step, in at least five paragraphs.",
)
CANDIDATES_PER_PROMPT = 4  # candidates tried per prompt wanted before settling for shorter ones


def candidate(index: int) -> tuple[str, int]:
    """User message and seed of candidate ``index``: every topic in every form, then again
    with other seeds."""
    topic = TOPICS[index % len(TOPICS)]
    form = FORMS[(index // len(TOPICS)) % len(FORMS)]
    return form.format(topic), BASE_SEED + index


MULTI_TURN_TEXTS = (
    "Let's plan a trip to a small mountain village. Where should I start?",
    "What should I pack for the first day?",
    "How do I get there by train?",
    "What food should I try there?",
    "Suggest a short hike for the second day.",
    "What if it rains that day?",
    "Recommend a museum or a local craft to see.",
    "How much money should I budget per day?",
    "What is a polite phrase to learn in the local language?",
    "Summarise the plan we made in a few lines.",
)


@dataclass
class Stream:
    """One stream as its caller saw it; times are from the round's common start."""

    ttft_ms: float
    gaps_ms: list[float]
    tokens: int
    end_ms: float


@dataclass
class Level:
    """One side at one N: every stream of every round."""

    side: str
    n: int
    streams: list[Stream] = field(default_factory=list)
    wall_s: float = 0.0
    rounds: int = 0
    load: float = 0.0

    def add_round(self, streams: Sequence[Stream]) -> None:
        self.streams.extend(streams)
        self.wall_s += max(s.end_ms for s in streams) / 1000
        self.rounds += 1

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.streams)

    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def ttft(self) -> tuple[float, float]:
        return p50_p99([s.ttft_ms for s in self.streams])

    def itl(self) -> tuple[float, float]:
        gaps = [g for s in self.streams for g in s.gaps_ms]
        return p50_p99(gaps) if gaps else (0.0, 0.0)

    def summary(self) -> str:
        t50, t99 = self.ttft()
        i50, i99 = self.itl()
        per_stream = self.tokens / len(self.streams) if self.streams else 0.0
        return (
            f"{self.tokens_per_s():.1f} tok/s ({per_stream:.0f} tok/stream); "
            f"TTFT p50 {t50:.0f} / p99 {t99:.0f} ms; "
            f"ITL p50 {i50:.1f} / p99 {i99:.1f} ms"
        )

    def metrics(self, prefix: str) -> dict[str, float]:
        t50, t99 = self.ttft()
        i50, i99 = self.itl()
        return {
            f"{prefix}_tokens_per_s": self.tokens_per_s(),
            f"{prefix}_ttft_p50_ms": t50,
            f"{prefix}_ttft_p99_ms": t99,
            f"{prefix}_itl_p50_ms": i50,
            f"{prefix}_itl_p99_ms": i99,
            f"{prefix}_tokens": float(self.tokens),
            f"{prefix}_streams": float(len(self.streams)),
            f"{prefix}_wall_s": self.wall_s,
        }


@dataclass(frozen=True)
class Plan:
    """Sizes and settings of one run of the row."""

    streams: tuple[int, ...]
    max_tokens: int
    threads: int
    n_ctx: int
    turns: int
    quick: bool

    def rounds(self, n: int) -> int:
        return 1 if self.quick else max(1, math.ceil(MIN_SAMPLES / n))


@dataclass(frozen=True)
class Prompt:
    """One stream's first turn: the user's message and seed, and the agent's prompt for it."""

    user: str
    seed: int
    text: str
    tokens: tuple[int, ...]
    stop: tuple[str, ...]


class Clock:
    """Arrival times of one stream's tokens, from a shared start."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.first = 0.0
        self.last = 0.0
        self.gaps_ms: list[float] = []

    def arrived(self) -> None:
        now = time.perf_counter()
        if not self.first:
            self.first = now
        else:
            self.gaps_ms.append((now - self.last) * 1000)
        self.last = now

    def stream(self, tokens: int) -> Stream:
        if not self.first:
            raise RuntimeError("the stream produced no tokens")
        return Stream(
            ttft_ms=(self.first - self.start) * 1000,
            gaps_ms=self.gaps_ms,
            tokens=tokens,
            end_ms=(time.perf_counter() - self.start) * 1000,
        )


# -- prompts ----------------------------------------------------------------------------------


async def choose_prompts(
    ctx: Context, model: Path, plan: Plan, count: int
) -> tuple[list[Prompt], int]:
    """``count`` distinct first turns whose replies run the full ``plan.max_tokens`` on the
    engine, and how many of them do.

    With this model most replies end early (an end-of-generation token or the prompt format's
    stop strings), at lengths that differ per stream; a round then ends with one long stream
    decoding alone, which hides what batching gains. So the row keeps (message, seed) pairs
    whose reply runs the whole length; the mesh, sampling like the engine, writes the same
    replies. When too few candidates qualify, shorter ones fill the rest.
    """
    full: list[Prompt] = []
    short: list[Prompt] = []
    tried = 0
    async with LlamaEngine(model, n_ctx=plan.n_ctx, n_threads=plan.threads) as engine:
        builder = PromptBuilder(
            count_tokens=engine.count_segments,
            n_ctx=engine.n_ctx,
            chat_template=engine.chat_template,
            bos_token=engine.bos_text,
            eos_token=engine.eos_text,
        )
        while len(full) < count and tried < CANDIDATES_PER_PROMPT * count:
            user, seed = candidate(tried)
            tried += 1
            built = builder.build(PromptRequest(user_text=user), plan.max_tokens)
            prompt = Prompt(
                user, seed, built.text, tuple(engine.tokenize_segments(built.segments)), built.stop
            )
            async with engine.generate(list(prompt.tokens), _options(plan, prompt)) as generation:
                async for _ in generation:
                    pass
            whole = generation.completion_tokens >= plan.max_tokens
            (full if whole else short).append(prompt)
    ctx.progress(f"batching: {len(full)} of {tried} candidates reply with all {plan.max_tokens}")
    return (full + short)[:count], min(len(full), count)


# -- llama-server -----------------------------------------------------------------------------


class LlamaServer:
    """A llama-server child process with ``n`` slots on a free loopback port."""

    def __init__(self, binary: Path, model: Path, plan: Plan, n: int, log: Path) -> None:
        self.binary = binary
        self.model = model
        self.plan = plan
        self.n = n
        self.log = log
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, session: aiohttp.ClientSession, timeout_s: float = 120.0) -> None:
        self.port = free_port()
        threads = str(self.plan.threads)
        args = [
            str(self.binary),
            "--model", str(self.model),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--parallel", str(self.n),
            "--cont-batching",
            "--threads", threads,
            "--threads-batch", threads,
            "--ctx-size", str(self.plan.n_ctx * self.n),
            # As the engine loads llama.cpp: 512-token batches, no flash attention, a full-size
            # sliding-window KV cache (llama.cpp's context default, which the engine keeps).
            "--batch-size", "512",
            "--flash-attn", "off",
            "--swa-full",
            # No prompt cache in host memory (the engine has none); each slot still reuses the
            # prefix its last prompt shares with the next, as the engine's contexts do.
            "--cache-ram", "0",
            "--no-webui",
        ]  # fmt: skip
        with self.log.open("ab") as sink:
            self.process = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=sink
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                raise RuntimeError(
                    f"llama-server exited with {self.process.returncode}; see {self.log}"
                )
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{self.url}/health") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"llama-server did not become healthy in {timeout_s:.0f} s")

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def complete(
        self,
        session: aiohttp.ClientSession,
        prompt: Prompt,
        tokens: int,
        start: float,
    ) -> Stream:
        """Stream exactly ``tokens`` tokens: no end-of-generation token or stop string ends
        it early (see :func:`server_level`)."""
        body = {
            "prompt": list(prompt.tokens),
            "n_predict": tokens,
            "ignore_eos": True,
            "stream": True,
            "temperature": TEMPERATURE,
            "top_k": TOP_K,
            "top_p": TOP_P,
            "min_p": MIN_P,
            "repeat_penalty": 1.0,
            "seed": prompt.seed,
            "cache_prompt": True,
        }
        clock = Clock(start)
        final: dict[str, Any] | None = None
        async with session.post(f"{self.url}/completion", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"llama-server answered {response.status}")
            # Server-sent events: one "data: {...}" line per token, the last one with "stop".
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data: dict[str, Any] = json.loads(line[5:])
                if data.get("stop"):
                    final = data
                    if data.get("content"):
                        clock.arrived()
                    break
                clock.arrived()
        if final is None:
            raise RuntimeError("llama-server's stream ended without a final event")
        return clock.stream(int(final.get("tokens_predicted", len(clock.gaps_ms) + 1)))


async def server_level(
    ctx: Context,
    binary: Path,
    model: Path,
    plan: Plan,
    n: int,
    prompts: Sequence[Prompt],
    lengths: Sequence[int],
) -> Level:
    """llama-server at ``n``; stream ``k`` generates ``lengths[k]`` tokens.

    Its sampler chain is llama.cpp's own, so with the same seed its text (and where an
    end-of-generation token or a stop string would fall) differs from the engine's. Each stream
    therefore generates exactly as many tokens as the engine's stream with the same prompt and
    seed did, so both sides do the same work and the batch shrinks at the same moments.
    """
    level = Level("llama-server", n, load=os.getloadavg()[0])
    timeout = aiohttp.ClientTimeout(total=TURN_TIMEOUT_S)
    # A new connection per request: the server may close a kept-alive one as it is reused.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        server = LlamaServer(binary, model, plan, n, ctx.path("batching") / f"llama-server-{n}.log")
        try:
            await server.start(session)
            # Warm-up, not recorded: first-call costs (page faults, buffers).
            warm = prompts[-1]
            await server.complete(session, warm, 4, time.perf_counter())
            for r in range(plan.rounds(n)):
                start = time.perf_counter()
                streams = await asyncio.gather(
                    *(
                        server.complete(session, prompts[r * n + i], lengths[r * n + i], start)
                        for i in range(n)
                    )
                )
                level.add_round(streams)
        finally:
            await server.stop()
    return level


# -- the engine, directly ---------------------------------------------------------------------


def _options(plan: Plan, prompt: Prompt, max_tokens: int | None = None) -> SamplingOptions:
    return SamplingOptions(
        max_tokens=plan.max_tokens if max_tokens is None else max_tokens,
        temperature=TEMPERATURE,
        top_p=TOP_P,
        seed=prompt.seed,
        stop=prompt.stop,
    )


async def _engine_stream(
    engine: LlamaEngine, prompt: Prompt, options: SamplingOptions, start: float
) -> Stream:
    clock = Clock(start)
    tokens = 0
    async with engine.generate(list(prompt.tokens), options) as generation:
        async for piece in generation:
            if piece.tokens:
                clock.arrived()
                tokens += piece.tokens
    if generation.error:
        raise RuntimeError(f"the engine failed: {generation.error}")
    return clock.stream(tokens)


async def engine_level(model: Path, plan: Plan, n: int, prompts: Sequence[Prompt]) -> Level:
    level = Level("engine", n, load=os.getloadavg()[0])
    async with LlamaEngine(model, n_ctx=plan.n_ctx, n_threads=plan.threads, slots=n) as engine:
        warm = prompts[-1]
        await _engine_stream(engine, warm, _options(plan, warm, 4), time.perf_counter())
        for r in range(plan.rounds(n)):
            start = time.perf_counter()
            streams = await asyncio.gather(
                *(
                    _engine_stream(
                        engine,
                        prompts[r * n + i],
                        _options(plan, prompts[r * n + i]),
                        start,
                    )
                    for i in range(n)
                )
            )
            level.add_round(streams)
    return level


# -- the mesh ---------------------------------------------------------------------------------


def parallel_setting() -> str:
    """The agent's field for concurrent sequences: ``parallel`` once the batched engine has
    it, ``slots`` (one llama context each) before."""
    names = {f.name for f in dataclasses.fields(AgentSettings)}
    return "parallel" if "parallel" in names else "slots"


class MeshSide:
    """A mesh with one agent set for ``parallel`` sequences, and a key per stream."""

    def __init__(self, ctx: Context, model: Path, plan: Plan, parallel: int) -> None:
        # Every stream's key is written before the gateway starts, which reads the file then.
        self.ctx = ctx
        self.plan = plan
        self.parallel = parallel
        state = ctx.path(f"batching-mesh-{parallel}")
        self.keys_file = state / "api-keys.json"
        # A fresh tenant per stream: recall runs but finds nothing, so the prompt is the
        # first-turn prompt the other sides get. One warm-up per level, one multi-turn tenant.
        wanted = sum(plan.rounds(n) * n + 1 for n in plan.streams) + 1
        self._keys = [
            add_key_to_file(self.keys_file, f"bench-batching-{i}", rate_per_s=1000.0, burst=1000)
            for i in range(wanted)
        ]
        knob = parallel_setting()
        self.variable = f"{AgentSettings.var(knob)}={parallel}"
        self.mesh = Mesh(
            MeshConfig(
                state_dir=state,
                model_path=model,
                api_keys_file=self.keys_file,
                pg_dsn=ctx.database(f"batching_{parallel}"),
                n_ctx=plan.n_ctx,
                agent_threads=plan.threads,
                extra_env=AgentSettings.env_for(**{knob: parallel}),
            )
        )
        self.channel: aio.Channel | None = None
        self.stub: Any = None

    def new_key(self) -> str:
        return self._keys.pop()

    async def __aenter__(self) -> MeshSide:
        self.ctx.progress(f"batching: starting the mesh ({self.variable})")
        await asyncio.to_thread(self.mesh.start, timeout_s=300.0)
        self.channel = aio.insecure_channel(self.mesh.gateway_addr)
        self.stub = gateway_service_pb2_grpc.GatewayServiceStub(self.channel)  # type: ignore[no-untyped-call]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.channel is not None:
            await self.channel.close()
        await asyncio.to_thread(self.mesh.stop)

    async def flush(self) -> None:
        """Persist finished turns outside the timings, so their writes do not overlap the next
        round and the next turn of a conversation sees its whole history."""
        async with self.mesh.channel(self.mesh.persister_addr, "persister") as channel:
            stub = persister_service_pb2_grpc.PersisterServiceStub(channel)  # type: ignore[no-untyped-call]
            await stub.Flush(persister_pb2.FlushRequest(), timeout=60)

    async def turn(
        self, key: str, text: str, seed: int, start: float, conversation_id: str = ""
    ) -> tuple[Stream, str, int]:
        """One turn: the stream, its conversation and its prompt's token count."""
        request = gateway_pb2.StreamTurnRequest(
            start=gateway_pb2.StartTurn(
                conversation_id=conversation_id,
                text=text,
                options=common_pb2.GenerationOptions(
                    max_tokens=self.plan.max_tokens, temperature=TEMPERATURE, top_p=TOP_P, seed=seed
                ),
            )
        )
        clock = Clock(start)
        finished: gateway_pb2.TurnFinished | None = None
        call = self.stub.StreamTurn(request, metadata=(("x-api-key", key),), timeout=TURN_TIMEOUT_S)
        async for frame in call:
            kind = frame.WhichOneof("frame")
            if kind == "accepted" and not conversation_id:
                conversation_id = frame.accepted.conversation_id
            elif kind == "token":
                clock.arrived()
            elif kind == "finished":
                finished = frame.finished
                break
        call.cancel()
        finished = require_normal_finish(finished)
        usage = finished.usage
        return clock.stream(usage.completion_tokens), conversation_id, usage.prompt_tokens

    async def level(self, plan: Plan, n: int, prompts: Sequence[Prompt]) -> Level:
        level = Level("mesh", n, load=os.getloadavg()[0])
        warm = prompts[-1]
        await self.turn(self.new_key(), warm.user, warm.seed, time.perf_counter())
        await self.flush()
        for r in range(plan.rounds(n)):
            keys = [self.new_key() for _ in range(n)]
            start = time.perf_counter()
            results = await asyncio.gather(
                *(
                    self.turn(keys[i], prompts[r * n + i].user, prompts[r * n + i].seed, start)
                    for i in range(n)
                )
            )
            level.add_round([stream for stream, _, _ in results])
            await self.flush()
        return level

    async def prefix_cache_hits(self) -> float | None:
        """The agent's prefix-cache hit counter, or None while it exports none."""
        agents = self.mesh.agents
        if not agents:
            return None
        url = f"http://127.0.0.1:{agents[0].metrics_port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            text = await response.text()
        values = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if "prefix_cache_hits" in line and not line.startswith("#") and "_created" not in line
        ]
        return sum(values) if values else None

    async def multi_turn(self, turns: int) -> tuple[list[float], list[int], float | None]:
        """TTFT and prompt tokens of each turn of one conversation, and prefix-cache hits."""
        key = self.new_key()
        before = await self.prefix_cache_hits()
        ttfts: list[float] = []
        prompt_tokens: list[int] = []
        conversation = ""
        for k in range(turns):
            text = MULTI_TURN_TEXTS[k % len(MULTI_TURN_TEXTS)]
            stream, conversation, prompt = await self.turn(
                key, text, BASE_SEED + k, time.perf_counter(), conversation
            )
            ttfts.append(stream.ttft_ms)
            prompt_tokens.append(prompt)
            await self.flush()
        after = await self.prefix_cache_hits()
        hits = None if after is None else after - (before or 0.0)
        return ttfts, prompt_tokens, hits


# -- rows -------------------------------------------------------------------------------------


def _mark(ok: bool) -> str:
    return PASS if ok else MISS


def level_rows(
    n: int,
    subject: Level,
    anchor: Level | None,
    engine_single: Level | None,
    missing: str,
    note: str,
) -> Row:
    metrics = subject.metrics(subject.side)
    parts: list[str] = []
    targets_ok: list[bool] = []
    if anchor is not None:
        metrics.update(anchor.metrics("server"))
        ratio = subject.tokens_per_s() / anchor.tokens_per_s() if anchor.tokens_per_s() else 0.0
        ttft_add = subject.ttft()[1] - anchor.ttft()[1]
        tput_ok, ttft_ok = ratio >= THROUGHPUT_TARGET, ttft_add <= TTFT_P99_MARGIN_MS
        targets_ok += [tput_ok, ttft_ok]
        parts += [
            f"{ratio:.2f}x llama-server tok/s ({_mark(tput_ok)})",
            f"TTFT p99 {ttft_add:+.0f} ms ({_mark(ttft_ok)})",
        ]
        metrics["ratio_vs_server"] = ratio
        metrics["ttft_p99_added_ms"] = ttft_add
        baseline = f"llama-server {anchor.summary()}"
    else:
        baseline = missing
    if engine_single is not None and engine_single.tokens_per_s() > 0:
        scale = subject.tokens_per_s() / engine_single.tokens_per_s()
        metrics["ratio_vs_engine_n1"] = scale
        parts.append(f"{scale:.2f}x engine N=1")
    return Row(
        row="batching",
        variant=f"N={n} {subject.side} (load {subject.load:.1f})",
        baseline=baseline,
        subject=f"{subject.side} {subject.summary()}",
        comparison="; ".join(parts),
        target=f">= {THROUGHPUT_TARGET:.2f}x tok/s; TTFT p99 <= +{TTFT_P99_MARGIN_MS:.0f} ms",
        verdict=verdict(all(targets_ok)) if targets_ok else NOT_APPLICABLE,
        metrics=metrics,
        note=note,
    )


def single_stream_row(engine: Level, mesh: Level, note: str) -> Row:
    ratio = mesh.tokens_per_s() / engine.tokens_per_s() if engine.tokens_per_s() else 0.0
    return Row(
        row="batching",
        variant="single stream: mesh vs engine",
        baseline=f"engine {engine.tokens_per_s():.1f} tok/s",
        subject=f"mesh {mesh.tokens_per_s():.1f} tok/s",
        comparison=f"{ratio:.3f}x",
        target=f">= {SINGLE_STREAM_TARGET:.2f}x",
        verdict=verdict(ratio >= SINGLE_STREAM_TARGET) if engine.tokens_per_s() else NOT_APPLICABLE,
        metrics={
            "engine_tokens_per_s": engine.tokens_per_s(),
            "mesh_tokens_per_s": mesh.tokens_per_s(),
            "ratio": ratio,
        },
        note=note,
    )


def multi_turn_row(
    ttfts: Sequence[float], prompt_tokens: Sequence[int], hits: float | None, note: str
) -> Row:
    first, last = ttfts[0], ttfts[-1]
    ratio = last / first if first > 0 else 0.0
    reuse = (
        "the agent exports no prefix-cache metric"
        if hits is None
        else f"prefix-cache hits {hits:.0f}" + ("" if hits > 0 else ": no KV reuse")
    )
    metrics = {
        "turns": float(len(ttfts)),
        "turn1_ttft_ms": first,
        "last_turn_ttft_ms": last,
        "ratio": ratio,
        "turn1_prompt_tokens": float(prompt_tokens[0]),
        "last_turn_prompt_tokens": float(prompt_tokens[-1]),
    }
    if hits is not None:
        metrics["prefix_cache_hits"] = hits
    return Row(
        row="batching",
        variant=f"multi-turn: turn 1 vs turn {len(ttfts)} (mesh)",
        baseline=f"turn 1 TTFT {first:.0f} ms ({prompt_tokens[0]} prompt tokens)",
        subject=f"turn {len(ttfts)} TTFT {last:.0f} ms ({prompt_tokens[-1]} prompt tokens)",
        comparison=f"{ratio:.2f}x; {reuse}",
        target=f"<= {TURN_RATIO_TARGET:.1f}x with KV reuse",
        verdict=verdict(ratio <= TURN_RATIO_TARGET) if first > 0 else NOT_APPLICABLE,
        metrics=metrics,
        note=note + "; TTFT per turn (ms): " + ", ".join(f"{t:.0f}" for t in ttfts),
    )


async def run(
    ctx: Context,
    *,
    model: Path | None,
    streams: Sequence[int] | None,
    threads: int | None,
    max_tokens: int | None,
) -> list[Row]:
    plan = Plan(
        streams=tuple(streams or (QUICK_STREAMS if ctx.quick else STREAMS)),
        max_tokens=max_tokens or (QUICK_MAX_TOKENS if ctx.quick else MAX_TOKENS),
        threads=threads or THREADS,
        n_ctx=QUICK_N_CTX if ctx.quick else N_CTX,
        turns=QUICK_TURNS if ctx.quick else TURNS,
        quick=ctx.quick,
    )
    model_path, model_name = choose_model(ctx, model)
    binary = llama_server.find_binary()
    missing = f"llama-server not built: run {llama_server.BUILD_COMMAND}"
    if binary is None:
        ctx.progress(f"batching: {missing}; measuring the engine and the mesh only")
    most = max(plan.rounds(n) * n for n in plan.streams)
    ctx.progress(f"batching: choosing {most + 1} prompts with {model_name}")
    prompts, whole = await choose_prompts(ctx, model_path, plan, most + 1)
    note = (
        f"{model_name}; {plan.threads} threads; {plan.max_tokens} new tokens; {whole} of "
        f"{len(prompts)} prompts reply with all of them on the engine; n_ctx {plan.n_ctx} per "
        f"sequence; agent setting {parallel_setting()}"
    )

    levels: dict[tuple[str, int], Level] = {}
    multi: tuple[list[float], list[int], float | None] | None = None
    # Quick runs share one mesh (set for the largest N) to stay within the smoke test's time;
    # full runs start one per N, as a user would configure it.
    shared = MeshSide(ctx, model_path, plan, max(plan.streams)) if ctx.quick else None
    async with contextlib.AsyncExitStack() as stack:
        if shared is not None:
            await stack.enter_async_context(shared)
        for n in plan.streams:
            ctx.progress(f"batching: N={n} engine")
            engine = levels["engine", n] = await engine_level(model_path, plan, n, prompts)
            if binary is not None:
                ctx.progress(f"batching: N={n} llama-server")
                lengths = [stream.tokens for stream in engine.streams]
                levels["llama-server", n] = await server_level(
                    ctx, binary, model_path, plan, n, prompts, lengths
                )
            ctx.progress(f"batching: N={n} mesh")
            if shared is not None:
                levels["mesh", n] = await shared.level(plan, n, prompts)
                continue
            async with MeshSide(ctx, model_path, plan, n) as side:
                levels["mesh", n] = await side.level(plan, n, prompts)
                if multi is None:
                    ctx.progress(f"batching: {plan.turns} turns of one conversation")
                    multi = await side.multi_turn(plan.turns)
        if shared is not None:
            multi = await shared.multi_turn(plan.turns)

    single = levels.get(("engine", 1))
    rows: list[Row] = []
    for n in plan.streams:
        anchor = levels.get(("llama-server", n))
        for name in ("engine", "mesh"):
            rows.append(level_rows(n, levels[name, n], anchor, single, missing, note))
        # Same seeds and sampling code: the mesh's replies should be the engine's, token counts
        # included; fewer matches mean the two sides did different work.
        pairs = zip(levels["engine", n].streams, levels["mesh", n].streams, strict=True)
        rows[-1].metrics["same_length_as_engine"] = sum(a.tokens == b.tokens for a, b in pairs)
    if single is not None and ("mesh", 1) in levels:
        rows.append(single_stream_row(single, levels["mesh", 1], note))
    if binary is None:
        rows.append(
            Row(
                row="batching",
                variant="llama-server (the anchor)",
                baseline=missing,
                subject="not measured",
                comparison="a benchmark peer CI never builds",
                target="",
                verdict=NOT_APPLICABLE,
                metrics={"llama_server_built": 0.0},
                note=note,
            )
        )
    if multi is not None:
        rows.append(multi_turn_row(*multi, note=note))
    return rows


__all__ = ["run"]

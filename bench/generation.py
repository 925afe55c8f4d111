"""Rows ``ttft`` and ``throughput``: a direct llama.cpp generation vs a turn through the mesh.

Both sides use the same model file, prompt text, sampling options and seed, and the same
llama.cpp settings (context, threads), so with the same seed they produce the same tokens; the
row records whether they did. The direct side is ``mesh.llm.engine.LlamaEngine`` in this process
(the agent's own engine: the same sampling code, so seeds match); the mesh side is ``StreamTurn``
on a gateway of a ``mesh.launcher.Mesh``: gateway -> request log -> agent (history, recall,
prompt, llama.cpp) -> token log -> gateway -> client.

The two never generate at once (the machine has two cores and each uses both): runs alternate,
direct-first and mesh-first in turn, so drift in the machine's load hits both sides alike. After
each mesh turn the persister is flushed (outside the timings), so its writes and the memory
service's indexing of the finished turn do not run during the next direct generation.

Each mesh turn uses a fresh tenant: recall then runs (its cost is in the mesh's time) but finds
nothing, so the prompt stays exactly the direct one instead of growing with recalled turns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from chat.common.v1 import common_pb2
from chat.gateway.v1 import gateway_pb2, gateway_service_pb2_grpc
from chat.persister.v1 import persister_pb2, persister_service_pb2_grpc
from grpc import aio

from bench.common import (
    NOT_APPLICABLE,
    ROOT,
    Context,
    Row,
    median,
    p50_p99,
    require_normal_finish,
    verdict,
)
from mesh.auth import add_key_to_file
from mesh.launcher import Mesh, MeshConfig
from mesh.llm.engine import LlamaEngine, SamplingOptions
from services.agent.prompt import PromptBuilder, PromptRequest

PROMPT = "Explain in a few sentences why the sky looks blue during the day."
TEMPERATURE = 0.8
TOP_P = 0.95
BASE_SEED = 4242
N_CTX = 2048
THREADS = 2

TTFT_TARGET_P50_MS = 15.0
TTFT_TARGET_P99_MS = 30.0
THROUGHPUT_TARGET = 0.95


@dataclass
class Sample:
    """What one generation looked like from its caller's side."""

    ttft_ms: float
    gaps_ms: list[float]
    pieces: int
    total_ms: float
    text: str
    # Mesh turns only: where the time to the first token went (see ``mesh_run``).
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        # Tokens after the first over the time they took: generation speed, not prompt time.
        span_s = sum(self.gaps_ms) / 1000
        return (self.pieces - 1) / span_s if self.pieces > 1 and span_s > 0 else 0.0


@dataclass
class Series:
    name: str
    samples: list[Sample] = field(default_factory=list)

    def ttft(self) -> tuple[float, float]:
        return p50_p99([s.ttft_ms for s in self.samples])

    def gaps(self) -> tuple[float, float]:
        return p50_p99([g for s in self.samples for g in s.gaps_ms])

    def tokens_per_s(self) -> float:
        return median([s.decode_tokens_per_s for s in self.samples])

    def part(self, name: str) -> float:
        return median([s.parts[name] for s in self.samples if name in s.parts])


def choose_model(ctx: Context, model: Path | None) -> tuple[Path, str]:
    """The model file and how the table names it."""
    from mesh.llm.tiny_model import ensure_tiny_model

    if model is not None:
        return model.absolute(), model.name
    if not ctx.quick:
        from mesh.llm.models import ModelNotInstalled, default_model_path

        try:
            return default_model_path(), "gemma-3-270m (Q4_K_M)"
        except ModelNotInstalled as error:
            ctx.progress(f"{error}; using the tiny test model")
    return ensure_tiny_model(ROOT / ".state" / "models"), "tiny random-weight test model"


@dataclass(frozen=True)
class Prompt:
    text: str
    tokens: tuple[int, ...]  # as the agent feeds them: template markers special, user text plain
    stop: tuple[str, ...]  # what the prompt format needs (the agent adds the same ones)


def build_prompt(engine: LlamaEngine) -> Prompt:
    """The prompt exactly as the agent builds it for a first turn with nothing recalled."""
    builder = PromptBuilder(
        count_tokens=engine.count_segments,
        n_ctx=engine.n_ctx,
        chat_template=engine.chat_template,
        bos_token=engine.bos_text,
        eos_token=engine.eos_text,
    )
    built = builder.build(PromptRequest(user_text=PROMPT), 4096)
    return Prompt(built.text, tuple(engine.tokenize_segments(built.segments)), built.stop)


async def direct_run(engine: LlamaEngine, prompt: Prompt, max_tokens: int, seed: int) -> Sample:
    options = SamplingOptions(
        max_tokens=max_tokens, temperature=TEMPERATURE, top_p=TOP_P, seed=seed, stop=prompt.stop
    )
    pieces: list[str] = []
    gaps: list[float] = []
    started = time.perf_counter()
    first = last = 0.0
    async with engine.generate(prompt.tokens, options) as generation:
        async for piece in generation:
            now = time.perf_counter()
            if not pieces:
                first = now
            else:
                gaps.append((now - last) * 1000)
            last = now
            pieces.append(piece.text)
    if not pieces:
        raise RuntimeError(f"the direct generation produced nothing ({generation.error})")
    return Sample(
        (first - started) * 1000, gaps, len(pieces), (last - started) * 1000, "".join(pieces)
    )


async def mesh_run(
    stub: gateway_service_pb2_grpc.GatewayServiceStub,
    api_key: str,
    max_tokens: int,
    seed: int,
    timeout_s: float,
) -> Sample:
    request = gateway_pb2.StreamTurnRequest(
        start=gateway_pb2.StartTurn(
            text=PROMPT,
            options=common_pb2.GenerationOptions(
                max_tokens=max_tokens, temperature=TEMPERATURE, top_p=TOP_P, seed=seed
            ),
        )
    )
    pieces: list[str] = []
    gaps: list[float] = []
    finished: gateway_pb2.TurnFinished | None = None
    started = time.perf_counter()
    first = last = accepted = 0.0
    call = stub.StreamTurn(request, metadata=(("x-api-key", api_key),), timeout=timeout_s)
    async for frame in call:
        kind = frame.WhichOneof("frame")
        if kind == "accepted" and not accepted:
            accepted = time.perf_counter()
        elif kind == "token":
            now = time.perf_counter()
            if not pieces:
                first = now
            else:
                gaps.append((now - last) * 1000)
            last = now
            pieces.append(frame.token.text)
        elif kind == "finished":
            finished = frame.finished
            break
    call.cancel()
    finished = require_normal_finish(finished)
    if not pieces:
        raise RuntimeError("the mesh turn produced no tokens")
    timings = finished.timings
    # The agent's timings count from the gateway's acceptance: TTFT = accept + queued (until an
    # agent claimed the turn) + retrieval (history and recall) + the rest (prompt, llama.cpp's
    # prompt processing and first token, the token's way back through log and gateway).
    parts = {
        "accept_ms": (accepted - started) * 1000,
        "queued_ms": timings.queued_ms,
        "retrieval_ms": timings.retrieval_ms,
        "agent_first_token_ms": timings.time_to_first_token_ms,
    }
    return Sample(
        (first - started) * 1000, gaps, len(pieces), (last - started) * 1000, "".join(pieces), parts
    )


async def _flush_persister(mesh: Mesh) -> None:
    async with mesh.channel(mesh.persister_addr, "persister") as channel:
        stub = persister_service_pb2_grpc.PersisterServiceStub(channel)  # type: ignore[no-untyped-call]
        await stub.Flush(persister_pb2.FlushRequest(), timeout=60)


async def measure_profile(
    ctx: Context,
    engine: LlamaEngine,
    prompt: Prompt,
    model_path: Path,
    profile: str,
    runs: int,
    max_tokens: int,
) -> tuple[Series, Series]:
    """Direct and mesh series for one log profile (``embedded`` or ``kafka``)."""
    bootstrap = await ctx.kafka_bootstrap() if profile == "kafka" else ""
    state = ctx.path(f"mesh-{profile}")
    keys_file = state / "api-keys.json"
    # One tenant per turn (plus the warm-up): see the module docstring.
    keys = [
        add_key_to_file(keys_file, f"bench-{profile}-{i}", rate_per_s=1000.0, burst=1000)
        for i in range(runs + 1)
    ]
    config = MeshConfig(
        state_dir=state,
        model_path=model_path,
        api_keys_file=keys_file,
        log_driver=profile,
        kafka_bootstrap=bootstrap,
        pg_dsn=ctx.database(f"mesh_{profile}"),
        n_ctx=N_CTX,
        agent_threads=THREADS,
    )
    mesh = Mesh(config)
    ctx.progress(f"ttft: starting the mesh ({profile} log)")
    direct, through_mesh = Series("direct"), Series(f"mesh ({profile})")
    try:
        await asyncio.to_thread(mesh.start, timeout_s=180.0)
        async with aio.insecure_channel(mesh.gateway_addr) as channel:
            stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)  # type: ignore[no-untyped-call]
            timeout_s = 120.0
            # Warm-up, not recorded: first-call costs (connections, caches, page faults).
            await direct_run(engine, prompt, max_tokens, BASE_SEED)
            await mesh_run(stub, keys[0], max_tokens, BASE_SEED, timeout_s)
            await _flush_persister(mesh)
            for i in range(runs):
                seed = BASE_SEED + 1 + i
                ctx.progress(f"ttft: {profile} run {i + 1}/{runs}")
                order = ("direct", "mesh") if i % 2 == 0 else ("mesh", "direct")
                for side in order:
                    if side == "direct":
                        direct.samples.append(await direct_run(engine, prompt, max_tokens, seed))
                    else:
                        through_mesh.samples.append(
                            await mesh_run(stub, keys[i + 1], max_tokens, seed, timeout_s)
                        )
                        await _flush_persister(mesh)
                        await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(mesh.stop)
    return direct, through_mesh


def rows_for(
    profile: str, direct: Series, through_mesh: Series, model_name: str, max_tokens: int
) -> list[Row]:
    d50, d99 = direct.ttft()
    m50, m99 = through_mesh.ttft()
    dg50, dg99 = direct.gaps()
    mg50, mg99 = through_mesh.gaps()
    same = sum(
        1 for a, b in zip(direct.samples, through_mesh.samples, strict=True) if a.text == b.text
    )
    runs = len(direct.samples)
    note = (
        f"{model_name}; {runs} runs of {max_tokens} tokens max; "
        f"identical output in {same}/{runs} seed pairs"
    )
    add50, add99 = m50 - d50, m99 - d99
    ttft = Row(
        row="ttft",
        variant=f"mesh ({profile} log)",
        baseline=f"direct TTFT p50 {d50:.1f} / p99 {d99:.1f} ms; ITL {dg50:.1f} / {dg99:.1f}",
        subject=f"mesh TTFT p50 {m50:.1f} / p99 {m99:.1f} ms; ITL {mg50:.1f} / {mg99:.1f}",
        comparison=f"TTFT {add50:+.1f} ms p50, {add99:+.1f} ms p99",
        target=f"<= +{TTFT_TARGET_P50_MS:.0f} ms p50, <= +{TTFT_TARGET_P99_MS:.0f} ms p99",
        verdict=verdict(add50 <= TTFT_TARGET_P50_MS and add99 <= TTFT_TARGET_P99_MS),
        metrics={
            "runs": runs,
            "direct_ttft_p50_ms": d50,
            "direct_ttft_p99_ms": d99,
            "mesh_ttft_p50_ms": m50,
            "mesh_ttft_p99_ms": m99,
            "added_ttft_p50_ms": add50,
            "added_ttft_p99_ms": add99,
            "direct_itl_p50_ms": dg50,
            "direct_itl_p99_ms": dg99,
            "mesh_itl_p50_ms": mg50,
            "mesh_itl_p99_ms": mg99,
            "identical_outputs": same,
            "mesh_accept_p50_ms": through_mesh.part("accept_ms"),
            "mesh_queued_p50_ms": through_mesh.part("queued_ms"),
            "mesh_retrieval_p50_ms": through_mesh.part("retrieval_ms"),
            "mesh_agent_first_token_p50_ms": through_mesh.part("agent_first_token_ms"),
        },
        note=note
        + (
            f"; mesh TTFT p50 parts: accept {through_mesh.part('accept_ms'):.1f} ms, queued "
            f"{through_mesh.part('queued_ms'):.1f}, history+recall "
            f"{through_mesh.part('retrieval_ms'):.1f}, agent's first token at "
            f"{through_mesh.part('agent_first_token_ms'):.1f} after acceptance"
        ),
    )
    d_tps, m_tps = direct.tokens_per_s(), through_mesh.tokens_per_s()
    ratio = m_tps / d_tps if d_tps > 0 else 0.0
    direct_tokens = median([float(s.pieces) for s in direct.samples])
    mesh_tokens = median([float(s.pieces) for s in through_mesh.samples])
    throughput = Row(
        row="throughput",
        variant=f"mesh ({profile} log)",
        baseline=f"direct {d_tps:.1f} tok/s",
        subject=f"mesh {m_tps:.1f} tok/s",
        comparison=f"{ratio:.3f}x",
        target=f">= {THROUGHPUT_TARGET:.2f}x",
        verdict=verdict(ratio >= THROUGHPUT_TARGET) if d_tps > 0 else NOT_APPLICABLE,
        metrics={
            "runs": runs,
            "direct_tokens_per_s": d_tps,
            "mesh_tokens_per_s": m_tps,
            "ratio": ratio,
            "direct_tokens_median": direct_tokens,
            "mesh_tokens_median": mesh_tokens,
        },
        note=f"{model_name}; decode rate: tokens after the first / their time, median of runs",
    )
    return [ttft, throughput]


async def run(
    ctx: Context, *, kafka: bool, model: Path | None, runs: int | None, max_tokens: int | None
) -> list[Row]:
    model_path, model_name = choose_model(ctx, model)
    n_runs = runs or (3 if ctx.quick else 12)
    n_tokens = max_tokens or (16 if ctx.quick else 96)
    ctx.progress(f"ttft: loading {model_name} ({model_path.name}) for the direct side")
    rows: list[Row] = []
    async with LlamaEngine(model_path, n_ctx=N_CTX, n_threads=THREADS) as engine:
        prompt = build_prompt(engine)
        profiles: Sequence[str] = ("embedded", "kafka") if kafka else ("embedded",)
        for profile in profiles:
            direct, through_mesh = await measure_profile(
                ctx, engine, prompt, model_path, profile, n_runs, n_tokens
            )
            rows += rows_for(profile, direct, through_mesh, model_name, n_tokens)
    return rows


__all__ = ["run"]

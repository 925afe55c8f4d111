"""Row ``http``: a streamed chat completion over HTTP/SSE vs ``StreamTurn`` over gRPC.

Both go to the same gateway of one mesh, with the same prompt, options and seed, and runs
alternate (gRPC first, then HTTP first) so the machine's drift hits both alike. TTFT is from
sending the request to the first token (the first SSE chunk with content; the role chunk the
API sends at acceptance does not count), ITL the gaps between later tokens. Each turn has a
fresh tenant and conversation, as in the ``ttft`` row, so prompts stay the same size. The
difference is what the HTTP face adds: JSON parsing, its checks, SSE framing.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
from chat.gateway.v1 import gateway_service_pb2_grpc
from grpc import aio

from bench.common import Context, Row, verdict
from bench.generation import (
    BASE_SEED,
    N_CTX,
    PROMPT,
    TEMPERATURE,
    THREADS,
    TOP_P,
    Sample,
    Series,
    _flush_persister,
    choose_model,
    mesh_run,
)
from mesh.auth import add_key_to_file
from mesh.launcher import Mesh, MeshConfig

TTFT_TARGET_P50_MS = 5.0


async def http_run(
    session: aiohttp.ClientSession,
    url: str,
    api_key: str,
    model: str,
    max_tokens: int,
    seed: int,
) -> Sample:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
        "seed": seed,
        "stream": True,
    }
    pieces: list[str] = []
    gaps: list[float] = []
    first = last = 0.0
    finish = None
    started = time.perf_counter()
    async with session.post(
        url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {api_key}"},
    ) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            content = choice["delta"].get("content")
            if content is not None and ("role" not in choice["delta"]):
                now = time.perf_counter()
                if not pieces:
                    first = now
                else:
                    gaps.append((now - last) * 1000)
                last = now
                pieces.append(content)
            finish = choice["finish_reason"] or finish
    if finish not in ("stop", "length") or not pieces:
        raise RuntimeError(f"the HTTP turn did not finish normally ({finish}, {len(pieces)})")
    return Sample(
        (first - started) * 1000, gaps, len(pieces), (last - started) * 1000, "".join(pieces)
    )


async def run(
    ctx: Context, *, model: Path | None, runs: int | None, max_tokens: int | None
) -> list[Row]:
    model_path, model_name = choose_model(ctx, model)
    n_runs = runs or (3 if ctx.quick else 12)
    n_tokens = max_tokens or (16 if ctx.quick else 48)
    state = ctx.path("mesh-http")
    keys_file = state / "api-keys.json"
    keys = [
        add_key_to_file(keys_file, f"bench-http-{i}", rate_per_s=1000.0, burst=1000)
        for i in range(2 * n_runs + 2)
    ]
    config = MeshConfig(
        state_dir=state,
        model_path=model_path,
        api_keys_file=keys_file,
        pg_dsn=ctx.database("mesh_http"),
        n_ctx=N_CTX,
        agent_threads=THREADS,
    )
    mesh = Mesh(config)
    grpc_side, http_side = Series("grpc"), Series("http")
    ctx.progress("http: starting the mesh")
    try:
        await asyncio.to_thread(mesh.start, timeout_s=180.0)
        url = mesh.gateway_http_urls[0]
        async with (
            aio.insecure_channel(mesh.gateway_addr) as channel,
            aiohttp.ClientSession() as session,
        ):
            stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)  # type: ignore[no-untyped-call]
            model_id = model_path.name
            # Warm-up, not recorded.
            await mesh_run(stub, keys[0], n_tokens, BASE_SEED, 120.0)
            await http_run(session, url, keys[1], model_id, n_tokens, BASE_SEED)
            await _flush_persister(mesh)
            for i in range(n_runs):
                seed = BASE_SEED + 1 + i
                ctx.progress(f"http: run {i + 1}/{n_runs}")
                order = ("grpc", "http") if i % 2 == 0 else ("http", "grpc")
                for side in order:
                    if side == "grpc":
                        grpc_side.samples.append(
                            await mesh_run(stub, keys[2 + 2 * i], n_tokens, seed, 120.0)
                        )
                    else:
                        http_side.samples.append(
                            await http_run(session, url, keys[3 + 2 * i], model_id, n_tokens, seed)
                        )
                    await _flush_persister(mesh)
                    await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(mesh.stop)
    g50, g99 = grpc_side.ttft()
    h50, h99 = http_side.ttft()
    gi50, gi99 = grpc_side.gaps()
    hi50, hi99 = http_side.gaps()
    same = sum(
        1 for a, b in zip(grpc_side.samples, http_side.samples, strict=True) if a.text == b.text
    )
    added50, added99 = h50 - g50, h99 - g99
    return [
        Row(
            row="http",
            variant="chat completions (SSE)",
            baseline=f"gRPC StreamTurn TTFT p50 {g50:.1f} / p99 {g99:.1f} ms; "
            f"ITL {gi50:.1f} / {gi99:.1f}",
            subject=f"HTTP/SSE TTFT p50 {h50:.1f} / p99 {h99:.1f} ms; ITL {hi50:.1f} / {hi99:.1f}",
            comparison=f"TTFT {added50:+.1f} ms p50, {added99:+.1f} ms p99; "
            f"ITL {hi50 - gi50:+.1f} ms p50",
            target=f"<= +{TTFT_TARGET_P50_MS:.0f} ms p50",
            verdict=verdict(added50 <= TTFT_TARGET_P50_MS),
            metrics={
                "runs": n_runs,
                "grpc_ttft_p50_ms": g50,
                "grpc_ttft_p99_ms": g99,
                "http_ttft_p50_ms": h50,
                "http_ttft_p99_ms": h99,
                "added_ttft_p50_ms": added50,
                "added_ttft_p99_ms": added99,
                "grpc_itl_p50_ms": gi50,
                "grpc_itl_p99_ms": gi99,
                "http_itl_p50_ms": hi50,
                "http_itl_p99_ms": hi99,
                "identical_outputs": same,
            },
            note=f"{model_name}; {n_runs} runs per side of {n_tokens} tokens max; identical "
            f"output in {same}/{n_runs} seed pairs",
        )
    ]


__all__ = ["http_run", "run"]

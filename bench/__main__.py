"""``python -m bench``: run the side-by-side benchmarks, print the table, write JSON.

python -m bench                       # every row, full sizes (minutes)
python -m bench --quick               # tiny sizes, seconds (what the smoke test runs)
python -m bench --only relay --only log
python -m bench --kafka --es          # add the Kafka and Elasticsearch variants
python -m bench --only batching       # N concurrent conversations vs llama-server (build it
                                      # first: python -m bench.llama_server build)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import ROOT, Context, Progress, Row, machine

ROWS = ("ttft", "throughput", "http", "relay", "log", "persistence", "recall", "batching")
DEFAULT_OUT = ROOT / "artifacts" / "bench.json"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas: {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    return values


def _rows(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown row {unknown[0]!r}; rows: {', '.join(ROWS)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument(
        "--only",
        type=_rows,
        action="append",
        metavar="ROW",
        help=f"run only these rows (repeat or comma-separate): {', '.join(ROWS)}",
    )
    parser.add_argument("--kafka", action="store_true", help="also measure the Kafka log")
    parser.add_argument("--es", action="store_true", help="also measure Elasticsearch recall")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument(
        "--model", type=Path, default=None, help="GGUF model for ttft/throughput/batching"
    )
    parser.add_argument("--runs", type=int, default=None, help="generation runs per side")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per generation")
    parser.add_argument(
        "--relay-streams",
        type=_int_list,
        default=None,
        metavar="N,N",
        help="relay concurrency levels (default 1,100,1000)",
    )
    parser.add_argument("--persist-rows", type=int, default=None, help="rows per persistence round")
    parser.add_argument(
        "--recall-sizes",
        type=_int_list,
        default=None,
        metavar="N,N",
        help="chunk counts for recall (default 10000,100000)",
    )
    parser.add_argument(
        "--batching-streams",
        type=_int_list,
        default=None,
        metavar="N,N",
        help="concurrent conversations for batching (default 1,4,8,16)",
    )
    parser.add_argument(
        "--batching-threads", type=int, default=None, help="llama.cpp threads for batching (2)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser.parse_args(argv)


class LoadSampler:
    """The machine's 1-minute load average, sampled through the run."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.samples: list[float] = [os.getloadavg()[0]]
        self._every_s = every_s
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._every_s)
            self.samples.append(os.getloadavg()[0])

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self.samples.append(os.getloadavg()[0])
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def summary(self) -> dict[str, float]:
        return {
            "min": min(self.samples),
            "mean": sum(self.samples) / len(self.samples),
            "max": max(self.samples),
        }


async def run_rows(
    args: argparse.Namespace, ctx: Context, selected: list[str]
) -> tuple[list[Row], dict[str, str], dict[str, float]]:
    rows: list[Row] = []
    errors: dict[str, str] = {}
    loads: dict[str, float] = {}

    async def family(names: Sequence[str], job: Any) -> None:
        wanted = [n for n in names if n in selected]
        if not wanted:
            return
        key = "+".join(wanted)
        loads[key] = os.getloadavg()[0]
        try:
            produced: list[Row] = await job
        except Exception as error:
            ctx.progress(f"{key} failed: {error!r}")
            errors[key] = "".join(traceback.format_exception(error))[-4000:]
            return
        rows.extend(r for r in produced if r.row in wanted)

    # Coroutines are created only for selected families (an unawaited one would warn).
    if {"ttft", "throughput"} & set(selected):
        from bench import generation

        await family(
            ("ttft", "throughput"),
            generation.run(
                ctx,
                kafka=args.kafka,
                model=args.model,
                runs=args.runs,
                max_tokens=args.max_tokens,
            ),
        )
    if "http" in selected:
        from bench import openai_http

        await family(
            ("http",),
            openai_http.run(ctx, model=args.model, runs=args.runs, max_tokens=args.max_tokens),
        )
    if "relay" in selected:
        from bench import relay

        await family(("relay",), relay.run(ctx, concurrency=args.relay_streams))
    if "log" in selected:
        from bench import log_hop

        await family(("log",), log_hop.run(ctx, kafka=args.kafka))
    if "persistence" in selected:
        from bench import persistence

        await family(("persistence",), persistence.run(ctx, rows=args.persist_rows))
    if "recall" in selected:
        from bench import recall

        await family(("recall",), recall.run(ctx, es=args.es, sizes=args.recall_sizes))
    if "batching" in selected:
        from bench import batching

        await family(
            ("batching",),
            batching.run(
                ctx,
                model=args.model,
                streams=args.batching_streams,
                threads=args.batching_threads,
                max_tokens=args.max_tokens,
            ),
        )
    return rows, errors, loads


def render_table(rows: Sequence[Row]) -> str:
    header = ("row", "variant", "baseline", "subject", "comparison", "target", "result")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = (r.row, r.variant, r.baseline, r.subject, r.comparison, r.target, r.verdict)
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


async def main_async(args: argparse.Namespace) -> int:
    selected = [name for group in (args.only or [list(ROWS)]) for name in group]
    # pgserver's platformdirs warns at import without it; mesh.pg sets the same fallback.
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    progress = Progress(quiet=args.quiet)
    ctx = Context(quick=args.quick, progress=progress, keep=args.keep)
    sampler = LoadSampler()
    started = time.monotonic()
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    progress(f"rows: {', '.join(selected)}; scratch in {ctx.root}")
    sampler.start()
    try:
        rows, errors, loads = await run_rows(args, ctx, selected)
    finally:
        await sampler.stop()
        await asyncio.to_thread(ctx.close)
    result = {
        "started_at": started_at,
        "duration_s": time.monotonic() - started,
        "quick": args.quick,
        "selected": selected,
        "options": {"kafka": args.kafka, "es": args.es},
        "machine": machine(),
        "load_average_1m": sampler.summary(),
        "load_at_row_start": loads,
        "rows": [
            {**r.to_json(), "metrics": {k: _finite(v) for k, v in r.metrics.items()}} for r in rows
        ],
        "errors": errors,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    info = result["machine"]
    load = result["load_average_1m"]
    print(
        f"{info['cpu_model']}, {info['cpus']} CPUs, {info['memory_gib']} GiB; "
        f"1-min load during the run: min {load['min']:.2f}, mean {load['mean']:.2f}, "
        f"max {load['max']:.2f}"
    )
    print(render_table(rows))
    for key, error in errors.items():
        print(f"\n{key} FAILED:\n{error}", file=sys.stderr)
    print(f"\nresults: {args.out}", file=sys.stderr)
    return 1 if errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())

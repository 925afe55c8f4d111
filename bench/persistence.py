"""Row ``persistence``: the persister's batched token writes (COPY into a staging table, then
one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``) vs one ``INSERT`` per row.

The batched path is the persister's own (``services.persister.store``); the per-row baseline
and the timing are ``bench.token_writes``. Both run on a fresh database of the run's
PostgreSQL; the two methods alternate round by round so drift hits both alike.
"""

from __future__ import annotations

from bench.common import Context, Row, verdict
from bench.token_writes import bench

TARGET_SPEEDUP = 10.0


async def run(ctx: Context, *, rows: int | None = None) -> list[Row]:
    count = rows or (500 if ctx.quick else 20_000)
    repeat = 1 if ctx.quick else 3
    dsn = ctx.database("persistence")
    ctx.progress(f"persistence: {count} token rows x {repeat} rounds, batched vs per-row")
    results = dict(await bench(dsn, count, repeat))
    batched_s = results["write_tokens_batched"]
    per_row_s = results["write_tokens_per_row"]
    speedup = per_row_s / batched_s if batched_s > 0 else 0.0
    batched_rate, per_row_rate = count / batched_s, count / per_row_s
    return [
        Row(
            row="persistence",
            variant=f"{count:,} token rows",
            baseline=f"one INSERT per row {per_row_rate:,.0f} rows/s",
            subject=f"batched (COPY) {batched_rate:,.0f} rows/s",
            comparison=f"{speedup:.1f}x",
            target=f">= {TARGET_SPEEDUP:.0f}x",
            verdict=verdict(speedup >= TARGET_SPEEDUP),
            metrics={
                "rows": count,
                "rounds": repeat,
                "batched_rows_per_s": batched_rate,
                "per_row_rows_per_s": per_row_rate,
                "batched_s": batched_s,
                "per_row_s": per_row_s,
                "speedup": speedup,
            },
            note="median of rounds; fresh turn ids every round, so every row is a real insert",
        )
    ]


__all__ = ["run"]

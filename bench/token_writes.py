"""Batched (COPY + INSERT ... SELECT) vs one-INSERT-per-row token writes, side by side.

    python -m bench.token_writes [--rows 20000] [--repeat 3]

Uses ``MESH_PG_DSN`` when set, otherwise a throwaway PostgreSQL (pgserver) removed afterwards.
Rows get fresh turn ids each round (so every row is a real insert) and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import psycopg

from mesh.settings import PostgresSettings
from services.persister.model import TokenEvent
from services.persister.store import Conn, create_schema, write_tokens_batched

Writer = Callable[[Conn, Sequence[TokenEvent]], Awaitable[int]]


async def write_tokens_per_row(conn: Conn, rows: Sequence[TokenEvent]) -> int:
    """The baseline: one INSERT (one round trip) per row, in one transaction."""
    inserted = 0
    async with conn.transaction(), conn.cursor() as cur:
        for row in rows:
            await cur.execute(
                "INSERT INTO tokens (turn_id, seq, text) VALUES (%s, %s, %s) "
                "ON CONFLICT (turn_id, seq) DO NOTHING",
                (row.turn_id, row.seq, row.text),
            )
            inserted += max(cur.rowcount, 0)
    return inserted


def make_rows(count: int, tokens_per_turn: int = 200) -> list[TokenEvent]:
    prefix = secrets.token_hex(4)
    return [
        TokenEvent(f"bench-{prefix}-{i // tokens_per_turn}", i % tokens_per_turn + 1, " token")
        for i in range(count)
    ]


async def _time(conn: Conn, writer: Writer, count: int) -> float:
    rows = make_rows(count)
    started = time.perf_counter()
    inserted = await writer(conn, rows)
    elapsed = time.perf_counter() - started
    if inserted != count:
        raise RuntimeError(f"{writer.__name__} inserted {inserted} of {count} rows")
    await conn.execute("DELETE FROM tokens WHERE turn_id LIKE 'bench-%'")
    return elapsed


async def bench(dsn: str, count: int, repeat: int) -> list[tuple[str, float]]:
    """Median seconds per method; the methods alternate so drift hits both alike."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await create_schema(conn)
        writers: list[Writer] = [write_tokens_batched, write_tokens_per_row]
        await _time(conn, write_tokens_batched, min(count, 1000))  # warm up the session
        times: dict[str, list[float]] = {w.__name__: [] for w in writers}
        for _ in range(repeat):
            for writer in writers:
                times[writer.__name__].append(await _time(conn, writer, count))
    return [(name, statistics.median(values)) for name, values in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    dsn = PostgresSettings.value_from_env("pg_dsn", os.environ).reveal()
    server = None
    tmp = Path(tempfile.mkdtemp(prefix="persister-bench-"))
    if not dsn:
        tmp.chmod(0o755)  # pgserver runs the server as its own user when we are root
        os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pgserver.postgres_server import get_server

            # "delete": a throwaway server, stopped and removed with its last handle.
            server = get_server(tmp / "pg", cleanup_mode="delete")
        dsn = str(server.get_uri())
    try:
        results = asyncio.run(bench(dsn, args.rows, args.repeat))
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    slowest = max(seconds for _, seconds in results)
    print(f"{'method':<24}{'rows':>8}{'seconds':>10}{'rows/s':>12}{'speedup':>9}")
    for name, seconds in results:
        print(
            f"{name:<24}{args.rows:>8}{seconds:>10.3f}{args.rows / seconds:>12,.0f}"
            f"{slowest / seconds:>8.1f}x"
        )


if __name__ == "__main__":
    main()

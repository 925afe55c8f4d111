"""``python -m bench.disk_use``: disk bytes per turn in the embedded log and in PostgreSQL.

Starts the whole mesh as users do (the launcher: embedded log, embedded PostgreSQL with pgvector
memory, mutual TLS), with the tiny model the project generates, runs turns through the gateway,
waits until every turn is stored and indexed, and measures what the turns added: the log's
records (payload and file), and each PostgreSQL table with its indexes and TOAST
(``pg_total_relation_size``). It prints the bytes per turn and per token, and extrapolates to a
million turns. The figures in docs/operators.md come from this.

    python -m bench.disk_use --turns 300 --max-tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
from chat.gateway.v1 import gateway_pb2, gateway_service_pb2_grpc

from bench.common import ROOT
from mesh.auth import add_key_to_file
from mesh.launcher import Mesh, MeshConfig
from mesh.llm.tiny_model import ensure_tiny_model

TABLES = ("conversations", "messages", "tokens", "memory_outbox", "memory_chunks")
USER_TEXT = (
    "Could you remind me what we decided about the quarterly report, who is writing which "
    "section, and when the draft is due? Please keep the answer short."
)


@dataclass
class Sizes:
    log_records: int
    log_payload: int
    log_file: int
    tables: dict[str, int]
    rows: dict[str, int]


def measure(log_path: Path, dsn: str) -> Sizes:
    conn = sqlite3.connect(str(log_path), timeout=30)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        records, payload = conn.execute(
            "SELECT count(*), coalesce(sum(length(key) + length(value)"
            " + coalesce(length(headers), 0)), 0) FROM records"
        ).fetchone()
    finally:
        conn.close()
    files = sum(
        Path(str(log_path) + s).stat().st_size
        for s in ("", "-wal")
        if Path(str(log_path) + s).exists()
    )
    tables: dict[str, int] = {}
    rows: dict[str, int] = {}
    with psycopg.connect(dsn, autocommit=True) as pg:
        for table in TABLES:
            found = pg.execute("SELECT to_regclass(%s)", (table,)).fetchone()
            if found is None or found[0] is None:
                continue
            pg.execute(f"VACUUM ANALYZE {table}")
            size = pg.execute("SELECT pg_total_relation_size(%s)", (table,)).fetchone()
            count = pg.execute(f"SELECT count(*) FROM {table}").fetchone()
            tables[table] = int(size[0]) if size else 0
            rows[table] = int(count[0]) if count else 0
    return Sizes(int(records), int(payload), files, tables, rows)


async def run_turns(addr: str, key: str, turns: int, conversations: int, parallel: int) -> int:
    """Run ``turns`` turns over ``conversations`` conversations; returns the tokens streamed."""
    tokens = 0
    conv_ids: list[str] = [""] * conversations
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(turns):
        queue.put_nowait(i)
    locks = [asyncio.Lock() for _ in range(conversations)]
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)  # type: ignore[no-untyped-call]

        async def worker() -> None:
            nonlocal tokens
            while not queue.empty():
                i = queue.get_nowait()
                c = i % conversations
                async with locks[c]:
                    call = stub.StreamTurn(
                        gateway_pb2.StreamTurnRequest(
                            start=gateway_pb2.StartTurn(
                                conversation_id=conv_ids[c], text=f"{USER_TEXT} ({i})"
                            )
                        ),
                        metadata=(("x-api-key", key),),
                        timeout=300,
                    )
                    async for frame in call:
                        kind = frame.WhichOneof("frame")
                        if kind == "accepted":
                            conv_ids[c] = frame.accepted.conversation_id
                        elif kind == "token":
                            tokens += 1
                        elif kind == "token_run":
                            tokens += len(frame.token_run.texts)

        await asyncio.gather(*(worker() for _ in range(parallel)))
    return tokens


def wait_stored(dsn: str, messages: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(dsn, autocommit=True) as pg:
        while time.monotonic() < deadline:
            stored = pg.execute("SELECT count(*) FROM messages").fetchone()
            queued = pg.execute("SELECT count(*) FROM memory_outbox").fetchone()
            if stored and queued and stored[0] >= messages and queued[0] == 0:
                return
            time.sleep(0.5)
    raise TimeoutError(f"{messages} messages were not stored and indexed in {timeout_s}s")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.disk_use")
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--conversations", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--parallel", type=int, default=4)
    args = parser.parse_args()

    model = ensure_tiny_model(ROOT / ".state" / "models")
    with tempfile.TemporaryDirectory(prefix="mesh-disk-") as tmp:
        state = Path(tmp)
        keys = state / "api-keys.json"
        key = add_key_to_file(keys, "bench", rate_per_s=1000.0, burst=1000)
        mesh = Mesh(
            MeshConfig(
                state_dir=state,
                model_path=model,
                api_keys_file=keys,
                n_ctx=2048,
                extra_env={
                    "MESH_AGENT_DEFAULT_MAX_TOKENS": str(args.max_tokens),
                    "MESH_AGENT_PARALLEL": str(args.parallel),
                },
            )
        )
        mesh.start(timeout_s=300)
        try:
            log_path = state / "log" / "mesh-log.sqlite3"
            dsn = mesh.pg_dsn
            warm = args.conversations  # one turn per conversation first: schema, pages, indexes
            asyncio.run(run_turns(mesh.gateway_addr, key, warm, args.conversations, args.parallel))
            wait_stored(dsn, 2 * warm)
            before = measure(log_path, dsn)
            tokens = asyncio.run(
                run_turns(mesh.gateway_addr, key, args.turns, args.conversations, args.parallel)
            )
            wait_stored(dsn, 2 * (warm + args.turns))
            after = measure(log_path, dsn)
        finally:
            mesh.stop()

    n = args.turns
    per_turn_tokens = tokens / n
    print(f"{n} turns over {args.conversations} conversations, {per_turn_tokens:.1f} tokens/turn")
    print(f"user message {len(USER_TEXT) + 6} chars; tiny model, max {args.max_tokens} tokens")
    print()
    print(f"{'where':<28}{'bytes/turn':>12}{'bytes/token':>13}{'GB per 1M turns':>17}")

    def line(name: str, delta: int) -> None:
        per = delta / n
        print(f"{name:<28}{per:>12,.0f}{per / per_turn_tokens:>13,.1f}{per * 1e6 / 1e9:>17,.2f}")

    line("log: record payload", after.log_payload - before.log_payload)
    line("log: SQLite file", after.log_file - before.log_file)
    print(f"  (log records per turn: {(after.log_records - before.log_records) / n:.1f})")
    pg_total = 0
    for table in TABLES:
        if table in after.tables:
            delta = after.tables[table] - before.tables.get(table, 0)
            pg_total += delta
            line(f"pg: {table}", delta)
    line("pg: total", pg_total)


if __name__ == "__main__":
    main()

"""The persister on the real embedded log and a real PostgreSQL.

Records are appended to the log by the test itself (as gateway and agents would), the persister
runs in-process behind its real gRPC server (one test runs ``python -m services.persister``),
and the results are checked over gRPC and with SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from chat.common.v1 import common_pb2, conversation_pb2
from chat.events.v1 import events_pb2
from chat.memory.v1 import memory_pb2, memory_service_pb2_grpc
from chat.persister.v1 import persister_pb2, persister_service_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from bench.token_writes import write_tokens_per_row
from mesh.log import TURN_EVENTS, TURN_REQUESTS, partition_for
from mesh.log.embedded import EmbeddedLog
from mesh.server import channel
from mesh.turn_ids import new_turn_ref
from services.persister.codec import decode
from services.persister.core import Persister
from services.persister.memory_client import MemoryIndexer
from services.persister.model import BatchPlan, BatchResult, TokenEvent
from services.persister.server import PersisterDeps, build_server
from services.persister.settings import PersisterSettings
from services.persister.store import (
    PgStore,
    create_schema,
    write_tokens_batched,
)

pytestmark = pytest.mark.integration

PARTITIONS = 4
ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def open_embedded(path: Path) -> EmbeddedLog:
    # Short leases so a stopped persister's partitions move to the next one quickly.
    return EmbeddedLog(path, session_timeout_s=1.0, heartbeat_interval_s=0.2)


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[EmbeddedLog]:
    async with open_embedded(tmp_path / "log.sqlite3") as opened:
        await opened.ensure_topic(TURN_REQUESTS, PARTITIONS)
        await opened.ensure_topic(TURN_EVENTS, PARTITIONS)
        yield opened


class Writer:
    """Appends records the way the gateway and the agents do."""

    def __init__(self, log: EmbeddedLog) -> None:
        self.log = log

    async def request(
        self, conv: str, text: str, *, tenant: str = "acme", at: datetime = T0, turn: str = ""
    ) -> str:
        p = partition_for(conv.encode(), PARTITIONS)
        if not turn:
            turn = str(
                new_turn_ref(
                    p,
                    await self.log.end_offset(TURN_REQUESTS, p),
                    await self.log.end_offset(TURN_EVENTS, p),
                )
            )
        msg = events_pb2.TurnRequested(
            turn_id=turn,
            conversation_id=conv,
            tenant_id=tenant,
            user_text=text,
            accepted_at=at,
            events_partition=p,
        )
        await self.log.append(TURN_REQUESTS, p, conv.encode(), msg.SerializeToString())
        return turn

    def _event(self, conv: str, event: events_pb2.TurnEvent) -> asyncio.Future[int]:
        p = partition_for(conv.encode(), PARTITIONS)
        return self.log.append(TURN_EVENTS, p, conv.encode(), event.SerializeToString())

    async def tokens(
        self,
        conv: str,
        turn: str,
        pieces: list[str],
        *,
        tenant: str = "acme",
        first: int = 1,
        attempt: int = 0,
    ) -> None:
        for seq, piece in enumerate(pieces, start=first):
            self._event(
                conv,
                events_pb2.TurnEvent(
                    token=events_pb2.TokenEmitted(
                        turn_id=turn,
                        seq=seq,
                        text=piece,
                        conversation_id=conv,
                        tenant_id=tenant,
                        attempt=attempt,
                    )
                ),
            )
        await self.log.flush()

    async def started(self, conv: str, turn: str, attempt: int, *, tenant: str = "acme") -> None:
        self._event(
            conv,
            events_pb2.TurnEvent(
                started=events_pb2.TurnStarted(
                    turn_id=turn, conversation_id=conv, tenant_id=tenant, attempt=attempt
                )
            ),
        )
        await self.log.flush()

    async def finish(
        self,
        conv: str,
        turn: str,
        last_seq: int,
        *,
        tenant: str = "acme",
        reason: int = common_pb2.FINISH_REASON_STOP,
        attempt: int = 0,
    ) -> None:
        self._event(
            conv,
            events_pb2.TurnEvent(
                finished=events_pb2.TurnFinished(
                    turn_id=turn,
                    finish_reason=reason,  # type: ignore[arg-type]
                    conversation_id=conv,
                    tenant_id=tenant,
                    last_seq=last_seq,
                    model="tiny",
                    attempt=attempt,
                )
            ),
        )
        await self.log.flush()

    async def turn(
        self, conv: str, text: str, pieces: list[str], *, tenant: str = "acme", at: datetime = T0
    ) -> str:
        turn = await self.request(conv, text, tenant=tenant, at=at)
        self._event(
            conv,
            events_pb2.TurnEvent(
                started=events_pb2.TurnStarted(
                    turn_id=turn, conversation_id=conv, tenant_id=tenant, agent_id="a1"
                )
            ),
        )
        await self.tokens(conv, turn, pieces, tenant=tenant)
        await self.finish(conv, turn, len(pieces), tenant=tenant)
        return turn


@dataclass
class Running:
    persister: Persister
    store: PgStore
    stub: persister_service_pb2_grpc.PersisterServiceStub


@contextlib.asynccontextmanager
async def persister_running(
    pg_dsn: str,
    log: EmbeddedLog,
    *,
    store: PgStore | None = None,
    memory: Any = None,
    member: str = "p1",
    **options: Any,
) -> AsyncIterator[Running]:
    settings = PersisterSettings(port=0)
    store = store or PgStore(pg_dsn)
    async with store:
        persister = Persister(
            log=log,
            store=store,
            decode=decode,
            partitions=PARTITIONS,
            memory=memory,
            member_id=member,
            **{"batch_size": 500, "linger_s": 0.02, "barrier_timeout_s": 10.0, **options},
        )
        async with persister:
            deps = PersisterDeps(persister=persister)
            server, port = build_server(settings, deps)
            await server.start()
            try:
                async with channel(f"127.0.0.1:{port}") as ch:
                    yield Running(
                        persister, store, persister_service_pb2_grpc.PersisterServiceStub(ch)
                    )
            finally:
                await server.stop(None)


def counts(pg_dsn: str) -> dict[str, int]:
    """Rows per table; "tokens" counts the token rows of running turns and the tokens kept as
    lengths on assembled messages (whose rows are deleted), so each stored token counts once."""
    with psycopg.connect(pg_dsn) as conn:
        found = {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
            for table in ("conversations", "messages", "tokens")
        }
        assembled = conn.execute(
            "SELECT coalesce(sum(cardinality(token_lengths)), 0) FROM messages"
        ).fetchone()
    found["tokens"] += int(assembled[0])  # type: ignore[index]
    return found


def error_reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no rich status on {error.code()}: {error.details()}"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    raise AssertionError("no ErrorInfo in status")


async def committed(log: EmbeddedLog) -> dict[tuple[str, int], int]:
    return {
        (t, p): await log.committed(t, "persister", p)
        for t in (TURN_REQUESTS, TURN_EVENTS)
        for p in range(PARTITIONS)
    }


async def ends(log: EmbeddedLog) -> dict[tuple[str, int], int]:
    return {
        (t, p): await log.end_offset(t, p)
        for t in (TURN_REQUESTS, TURN_EVENTS)
        for p in range(PARTITIONS)
    }


async def until(check: Callable[[], Any], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------------------


async def test_turns_are_assembled_and_served(pg_dsn: str, log: EmbeddedLog) -> None:
    w = Writer(log)
    first = await w.turn("conv-1", "Explain   the mesh\nplease", ["The ", "mesh ", "works."])
    second = await w.turn("conv-1", "And then?", ["Then ", "done."], at=T0 + timedelta(seconds=9))
    await w.turn("conv-2", "Other chat", ["ok"], at=T0 + timedelta(seconds=5))
    # A small page size makes reads walk several keyset pages.
    async with persister_running(pg_dsn, log, message_page_size=3) as run:
        flushed = await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
        assert flushed.rows_written == 6 + 6  # messages + tokens

        got = await run.stub.GetConversation(
            persister_pb2.GetConversationRequest(tenant_id="acme", conversation_id="conv-1"),
            timeout=10,
        )
        conv = got.conversation
        assert conv.title == "Explain the mesh please"
        assert [(m.turn_id, m.role, m.text) for m in conv.messages] == [
            (first, conversation_pb2.ROLE_USER, "Explain   the mesh\nplease"),
            (first, conversation_pb2.ROLE_ASSISTANT, "The mesh works."),
            (second, conversation_pb2.ROLE_USER, "And then?"),
            (second, conversation_pb2.ROLE_ASSISTANT, "Then done."),
        ]
        assert conv.messages[1].finish_reason == common_pb2.FINISH_REASON_STOP
        assert conv.messages[0].create_time.ToDatetime(tzinfo=UTC) == T0
        assert conv.create_time.ToDatetime(tzinfo=UTC) == T0
        assert conv.update_time.ToDatetime(tzinfo=UTC) >= T0 + timedelta(seconds=9)

        streamed = [
            r.message.text
            async for r in run.stub.ListMessages(
                persister_pb2.ListMessagesRequest(tenant_id="acme", conversation_id="conv-1"),
                timeout=10,
            )
        ]
        assert streamed == [m.text for m in conv.messages]

        # A prompt's history read: only the newest messages, still oldest first.
        newest = await run.stub.GetConversation(
            persister_pb2.GetConversationRequest(
                tenant_id="acme", conversation_id="conv-1", last_messages=3
            ),
            timeout=10,
        )
        assert [m.text for m in newest.conversation.messages] == streamed[-3:]
        assert newest.conversation.title == conv.title

        stats = await run.stub.GetStats(persister_pb2.GetStatsRequest(), timeout=5)
        assert stats.events_consumed == 3 + 3 + 3 + 6  # requests, started, finished, tokens
        assert (stats.messages_written, stats.tokens_written) == (6, 6)
        assert stats.duplicates_ignored == 0 and stats.pending_events == 0
        assert stats.batches_committed >= 1

        # Offsets were committed up to the end of the log.
        assert await committed(log) == await ends(log)


async def test_assistant_message_stored_before_its_request_is_put_in_place(
    pg_dsn: str, log: EmbeddedLog
) -> None:
    # The two topics are consumed independently: a turn's TurnFinished may be stored before
    # its TurnRequested. Once the request arrives, the turn sorts by its acceptance time.
    w = Writer(log)
    later = await w.turn("conv-o", "second question", ["second answer"], at=T0 + timedelta(hours=1))
    async with persister_running(pg_dsn, log) as run:
        await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
        early = str(new_turn_ref(0, 0, 0))
        await w.tokens("conv-o", early, ["first answer"])
        await w.finish("conv-o", early, 1)
        await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
        await w.request("conv-o", "first question", at=T0, turn=early)
        got = await run.stub.GetConversation(
            persister_pb2.GetConversationRequest(
                tenant_id="acme", conversation_id="conv-o", consistent=True
            ),
            timeout=15,
        )
    conv = got.conversation
    assert [(m.turn_id, m.text) for m in conv.messages] == [
        (early, "first question"),
        (early, "first answer"),
        (later, "second question"),
        (later, "second answer"),
    ]
    assert conv.title == "first question"
    assert conv.create_time.ToDatetime(tzinfo=UTC) == T0


async def test_list_conversations_pages_newest_first(pg_dsn: str, log: EmbeddedLog) -> None:
    w = Writer(log)
    for i in range(5):
        await w.request(f"conv-{i}", f"title {i}", at=T0 + timedelta(seconds=i))
    await w.request("other", "not mine", tenant="globex", at=T0 + timedelta(seconds=99))
    async with persister_running(pg_dsn, log) as run:
        await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
        seen: list[str] = []
        token = ""
        for _ in range(5):
            page = await run.stub.ListConversations(
                persister_pb2.ListConversationsRequest(
                    tenant_id="acme", page_size=2, page_token=token
                ),
                timeout=10,
            )
            seen += [c.title for c in page.conversations]
            assert all(not c.messages for c in page.conversations)
            token = page.next_page_token
            if not token:
                break
        assert seen == ["title 4", "title 3", "title 2", "title 1", "title 0"]
        default = await run.stub.ListConversations(
            persister_pb2.ListConversationsRequest(tenant_id="acme"), timeout=10
        )
        assert len(default.conversations) == 5 and default.next_page_token == ""


async def test_replaying_the_log_changes_nothing(
    pg_dsn: str, log: EmbeddedLog, tmp_path: Path
) -> None:
    w = Writer(log)
    turn = await w.turn("conv-r", "hello", ["a", "b", "c"])
    async with persister_running(pg_dsn, log) as run:
        await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
    before = counts(pg_dsn)
    assert before == {"conversations": 1, "messages": 2, "tokens": 3}
    with psycopg.connect(pg_dsn) as conn:
        # Assembled: the lengths are on the message, the token rows are gone.
        assert conn.execute("SELECT count(*) FROM tokens").fetchone() == (0,)

    # The same events again on the same log (a gateway retry, an agent replaying its turn)...
    await w.request("conv-r", "hello", turn=turn)
    await w.tokens("conv-r", turn, ["a", "b", "c"])
    await w.finish("conv-r", turn, 3)
    async with persister_running(pg_dsn, log, member="p2") as run:
        flushed = await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
        stats = await run.stub.GetStats(persister_pb2.GetStatsRequest(), timeout=5)
    assert flushed.rows_written == 0
    assert stats.duplicates_ignored == 5
    assert counts(pg_dsn) == before
    with psycopg.connect(pg_dsn) as conn:
        # The replayed tokens of the assembled turn were not stored again.
        assert conn.execute("SELECT count(*) FROM tokens").fetchone() == (0,)

    # ...and the whole log consumed again from offset 0 by a fresh group (a new log file).
    async with open_embedded(tmp_path / "replay.sqlite3") as fresh:
        await fresh.ensure_topic(TURN_REQUESTS, PARTITIONS)
        await fresh.ensure_topic(TURN_EVENTS, PARTITIONS)
        for topic in (TURN_REQUESTS, TURN_EVENTS):
            for p in range(PARTITIONS):
                for record in await log.read_range(topic, p, 0, await log.end_offset(topic, p)):
                    fresh.append(topic, p, record.key, record.value)
        await fresh.flush()
        async with persister_running(pg_dsn, fresh, member="p3") as run:
            flushed = await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
        assert flushed.rows_written == 0
    assert counts(pg_dsn) == before


async def test_duplicate_seq_first_in_log_order_wins(pg_dsn: str, log: EmbeddedLog) -> None:
    w = Writer(log)
    turn = await w.request("conv-d", "q")
    await w.tokens("conv-d", turn, ["one ", "two "])
    # A zombie agent re-emits seq 2 with other text in the same batch...
    await w.tokens("conv-d", turn, ["TWO "], first=2)
    async with persister_running(pg_dsn, log) as run:
        await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
        # ...and again in a later batch, with seq 3 and a second TurnFinished thrown in.
        await w.tokens("conv-d", turn, ["DEUX ", "three"], first=2)
        await w.finish("conv-d", turn, 3)
        await w.finish("conv-d", turn, 1, reason=common_pb2.FINISH_REASON_ERROR)
        await w.tokens("conv-d", turn, ["late"], first=4)
        got = await run.stub.GetConversation(
            persister_pb2.GetConversationRequest(
                tenant_id="acme", conversation_id="conv-d", consistent=True
            ),
            timeout=15,
        )
    assistant = got.conversation.messages[1]
    assert assistant.text == "one two three"
    assert assistant.finish_reason == common_pb2.FINISH_REASON_STOP


async def test_a_zombies_records_after_a_takeover_are_not_stored(
    pg_dsn: str, log: EmbeddedLog
) -> None:
    w = Writer(log)
    conv = "conv-zombie"
    turn = await w.request(conv, "q")
    await w.started(conv, turn, attempt=1)
    await w.tokens(conv, turn, ["one "], attempt=1)
    await w.started(conv, turn, attempt=2)  # the takeover: it read "one " and goes on from seq 2
    # The first agent's late token lands after it, in the same batch...
    await w.tokens(conv, turn, ["ZOMBIE "], first=2, attempt=1)
    async with persister_running(pg_dsn, log) as run:
        await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
        # ...then in a batch of its own (the database's attempt row fences them off)...
        await w.tokens(conv, turn, ["LATE "], first=3, attempt=1)
        await w.finish(conv, turn, 3, attempt=1)
        await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
        # ...and in a batch with the new owner's records (their attempt fences them off).
        await w.tokens(conv, turn, ["AGAIN "], first=2, attempt=1)
        await w.tokens(conv, turn, ["two ", "three"], first=2, attempt=2)
        await w.finish(conv, turn, 3, attempt=2, reason=common_pb2.FINISH_REASON_LENGTH)
        got = await run.stub.GetConversation(
            persister_pb2.GetConversationRequest(
                tenant_id="acme", conversation_id=conv, consistent=True
            ),
            timeout=15,
        )
    assistant = got.conversation.messages[1]
    assert assistant.text == "one two three"
    assert assistant.finish_reason == common_pb2.FINISH_REASON_LENGTH
    with psycopg.connect(pg_dsn) as conn:
        left = conn.execute("SELECT count(*) FROM turn_attempts").fetchone()
    assert left == (0,)  # settled once the message was assembled


async def test_flush_returns_only_after_rows_are_visible(pg_dsn: str, log: EmbeddedLog) -> None:
    w = Writer(log)
    # A long linger: without the barrier pushing the batch out, the rows would not be there yet.
    async with persister_running(pg_dsn, log, linger_s=30.0) as run:
        await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
        for i in range(3):
            turn = await w.turn(f"conv-f{i}", f"q{i}", ["x", "y"])
            started = asyncio.get_running_loop().time()
            await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
            assert asyncio.get_running_loop().time() - started < 5
            with psycopg.connect(pg_dsn) as conn:
                row = conn.execute(
                    "SELECT text FROM messages WHERE turn_id = %s AND role = 2", (turn,)
                ).fetchone()
            assert row == ("xy",)
        # consistent=true reads its own writes right after the append.
        turn = await w.request("conv-f0", "one more", at=T0 + timedelta(minutes=1))
        got = await run.stub.GetConversation(
            persister_pb2.GetConversationRequest(
                tenant_id="acme", conversation_id="conv-f0", consistent=True
            ),
            timeout=15,
        )
        assert got.conversation.messages[-1].turn_id == turn
        # Caught up: the barrier is cheap.
        started = asyncio.get_running_loop().time()
        for _ in range(20):
            await run.stub.Flush(persister_pb2.FlushRequest(), timeout=5)
        assert (asyncio.get_running_loop().time() - started) / 20 < 0.1


class GatedStore(PgStore):
    """Writes only once ``gate`` is set."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self.gate = asyncio.Event()
        self.attempts = 0

    async def write_batch(self, plan: BatchPlan) -> BatchResult:
        self.attempts += 1
        await self.gate.wait()
        return await super().write_batch(plan)


class FailingStore(PgStore):
    """Fails the first ``fail`` writes as a database outage would."""

    def __init__(self, dsn: str, fail: int) -> None:
        super().__init__(dsn)
        self.fail = fail

    async def write_batch(self, plan: BatchPlan) -> BatchResult:
        if self.fail:
            self.fail -= 1
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return await super().write_batch(plan)


@dataclass
class StuckMemory:
    """Remember that never returns: the persister dies between DB commit and offset commit."""

    calls: list[str] = field(default_factory=list)

    async def remember(self, *, tenant_id: str, conversation_id: str, text: str, request_id: str):  # type: ignore[no-untyped-def]
        self.calls.append(request_id)
        await asyncio.Event().wait()


async def test_offsets_are_committed_only_after_the_database(pg_dsn: str, log: EmbeddedLog) -> None:
    w = Writer(log)
    turn = await w.turn("conv-o", "hi", ["a", "b"])
    zero = dict.fromkeys(await ends(log), 0)

    # 1. Stopped while the database write is pending: nothing written, nothing committed.
    gated = GatedStore(pg_dsn)
    async with persister_running(pg_dsn, log, store=gated) as run:
        await until(lambda: gated.attempts > 0, what="a batch write")
        await until(lambda: run.persister.stats().pending_events == 5, what="all records read")
        assert await committed(log) == zero
        with pytest.raises(grpc.aio.AioRpcError) as behind:
            await run.stub.Flush(persister_pb2.FlushRequest(), timeout=2)
        assert behind.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED or (
            behind.value.code() == grpc.StatusCode.UNAVAILABLE
        )
    assert counts(pg_dsn)["messages"] == 0
    assert await committed(log) == zero

    # 2. Stopped after the database commit but before the offset commit (while the batch gives
    # memory its head start, and memory hangs).
    stuck = StuckMemory()
    async with persister_running(pg_dsn, log, memory=stuck, member="p2", memory_wait_s=60):
        await until(lambda: stuck.calls, what="Remember")
        assert counts(pg_dsn) == {"conversations": 1, "messages": 2, "tokens": 2}
        assert await committed(log) == zero
    assert await committed(log) == zero

    # 3. The next persister gets every record again; the replay adds nothing.
    async with persister_running(pg_dsn, log, member="p3") as run:
        await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
        stats = run.persister.stats()
        assert stats.events_consumed == 5 and stats.duplicates_ignored == 4
    assert counts(pg_dsn) == {"conversations": 1, "messages": 2, "tokens": 2}
    assert await committed(log) == await ends(log)
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(
            "SELECT text FROM messages WHERE turn_id = %s AND role = 2", (turn,)
        ).fetchone() == ("ab",)


async def test_database_outage_is_retried(pg_dsn: str, log: EmbeddedLog) -> None:
    w = Writer(log)
    await w.turn("conv-x", "hi", ["a"])
    async with persister_running(
        pg_dsn, log, store=FailingStore(pg_dsn, fail=3), retry_max_s=0.05
    ) as run:
        await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
    assert counts(pg_dsn) == {"conversations": 1, "messages": 2, "tokens": 1}
    assert await committed(log) == await ends(log)


async def test_tenants_are_isolated(pg_dsn: str, log: EmbeddedLog) -> None:
    w = Writer(log)
    await w.turn("shared-id", "acme secret", ["acme answer"], tenant="acme")
    await w.turn("shared-id", "globex question", ["globex answer"], tenant="globex")
    await w.turn("acme-only", "private", ["x"], tenant="acme")
    async with persister_running(pg_dsn, log) as run:
        await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
        for tenant, texts in (
            ("acme", ["acme secret", "acme answer"]),
            ("globex", ["globex question", "globex answer"]),
        ):
            got = await run.stub.GetConversation(
                persister_pb2.GetConversationRequest(tenant_id=tenant, conversation_id="shared-id"),
                timeout=10,
            )
            assert [m.text for m in got.conversation.messages] == texts
        # Another tenant's conversation reads exactly like a missing one.
        for conv in ("acme-only", "never-existed"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await run.stub.GetConversation(
                    persister_pb2.GetConversationRequest(tenant_id="globex", conversation_id=conv),
                    timeout=10,
                )
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert error_reason(caught.value) == "CONVERSATION_NOT_FOUND"
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                async for _ in run.stub.ListMessages(
                    persister_pb2.ListMessagesRequest(tenant_id="globex", conversation_id=conv),
                    timeout=10,
                ):
                    pass
            assert streamed.value.code() == grpc.StatusCode.NOT_FOUND
        page = await run.stub.ListConversations(
            persister_pb2.ListConversationsRequest(tenant_id="globex"), timeout=10
        )
        assert [c.conversation_id for c in page.conversations] == ["shared-id"]


async def test_bad_inputs_are_invalid_argument(pg_dsn: str, log: EmbeddedLog) -> None:
    async with persister_running(pg_dsn, log) as run:
        bad_requests: list[tuple[Any, str]] = [
            (
                run.stub.GetConversation(
                    persister_pb2.GetConversationRequest(conversation_id="c"), timeout=5
                ),
                "TENANT_ID_MISSING",
            ),
            (
                run.stub.GetConversation(
                    persister_pb2.GetConversationRequest(tenant_id="acme", consistent=True),
                    timeout=5,
                ),
                "CONVERSATION_ID_MISSING",
            ),
            (
                run.stub.GetConversation(
                    persister_pb2.GetConversationRequest(
                        tenant_id="acme", conversation_id="c", consistent_before_turn_id="t1"
                    ),
                    timeout=5,
                ),
                "TURN_ID_MALFORMED",
            ),
            (
                run.stub.GetConversation(
                    persister_pb2.GetConversationRequest(
                        tenant_id="acme", conversation_id="c", last_messages=-1
                    ),
                    timeout=5,
                ),
                "LAST_MESSAGES_INVALID",
            ),
            (
                run.stub.ListConversations(persister_pb2.ListConversationsRequest(), timeout=5),
                "TENANT_ID_MISSING",
            ),
            (
                run.stub.ListConversations(
                    persister_pb2.ListConversationsRequest(tenant_id="acme", page_size=101),
                    timeout=5,
                ),
                "PAGE_SIZE_OUT_OF_RANGE",
            ),
            (
                run.stub.ListConversations(
                    persister_pb2.ListConversationsRequest(tenant_id="acme", page_size=-1),
                    timeout=5,
                ),
                "PAGE_SIZE_OUT_OF_RANGE",
            ),
            (
                run.stub.ListConversations(
                    persister_pb2.ListConversationsRequest(tenant_id="acme", page_token="%%%"),
                    timeout=5,
                ),
                "PAGE_TOKEN_INVALID",
            ),
        ]
        for call, reason in bad_requests:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, reason
            assert error_reason(caught.value) == reason
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            async for _ in run.stub.ListMessages(
                persister_pb2.ListMessagesRequest(tenant_id="acme"), timeout=5
            ):
                pass
        assert streamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


class FlakyMemory(memory_service_pb2_grpc.MemoryServiceServicer):
    """Answers UNAVAILABLE ``fail`` times, then records Remember calls."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.calls: list[memory_pb2.RememberRequest] = []

    async def Remember(self, request: memory_pb2.RememberRequest, context: Any) -> Any:
        if self.fail:
            self.fail -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        self.calls.append(request)
        return memory_pb2.RememberResponse(chunks_stored=1)


async def test_finished_turns_are_remembered_before_offsets_commit(
    pg_dsn: str, log: EmbeddedLog
) -> None:
    memory = FlakyMemory(fail=2)
    server = grpc.aio.server()
    memory_service_pb2_grpc.add_MemoryServiceServicer_to_server(memory, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        w = Writer(log)
        turn = await w.turn("conv-m", "what is 2+2?", ["4"])
        await w.turn("conv-m", "fail", [], at=T0 + timedelta(seconds=1))  # no tokens: still kept
        async with MemoryIndexer(f"127.0.0.1:{port}", initial_backoff_s=0.01) as indexer:
            async with persister_running(pg_dsn, log, memory=indexer) as run:
                await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
        remembered = {c.request_id: c for c in memory.calls}
        assert remembered[turn].text == "user: what is 2+2?\nassistant: 4"
        assert (remembered[turn].tenant_id, remembered[turn].conversation_id) == (
            "acme",
            "conv-m",
        )
        assert len(remembered) == 2
    finally:
        await server.stop(None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_service_process_serves_and_drains_on_sigterm(
    pg_dsn: str, log: EmbeddedLog, tmp_path: Path
) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen" / "python")]),
        "MESH_PERSISTER_PORT": str(port),
        "MESH_PERSISTER_METRICS_PORT": "-1",
        "MESH_PERSISTER_GRACE_S": "5",
        "MESH_PERSISTER_LINGER_MS": "20000",  # only the drain can write the last batch
        "MESH_PG_DSN": pg_dsn,
        "MESH_MEMORY_ADDR": "",
        "MESH_LOG_PATH": str(log.path),
        "MESH_LOG_PARTITIONS": str(PARTITIONS),
        "MESH_LOG_SESSION_TIMEOUT_S": "1",
        "MESH_LOG_HEARTBEAT_INTERVAL_S": "0.2",
        "MESH_STATE_DIR": str(tmp_path / "state"),
    }
    out = (tmp_path / "persister.log").open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 - starting it is quick; waits go to a thread
        [sys.executable, "-m", "services.persister"],
        env=env,
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:
        async with channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            try:
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=30, wait_for_ready=True
                )
            except grpc.aio.AioRpcError as error:
                raise AssertionError(
                    f"persister did not start: {error.code()}; "
                    f"log:\n{(tmp_path / 'persister.log').read_text()}"
                ) from error
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = persister_service_pb2_grpc.PersisterServiceStub(ch)
            w = Writer(log)
            await w.turn("conv-p", "hello", ["hi ", "there"])
            got = await stub.GetConversation(
                persister_pb2.GetConversationRequest(
                    tenant_id="acme", conversation_id="conv-p", consistent=True
                ),
                timeout=15,
            )
            assert [m.text for m in got.conversation.messages] == ["hello", "hi there"]

            # Records consumed but held by the long linger are written by the drain.
            await w.turn("conv-p", "bye", ["ciao"], at=T0 + timedelta(seconds=1))

            async def consumed_all() -> bool:
                stats = await stub.GetStats(persister_pb2.GetStatsRequest(), timeout=5)
                return stats.events_consumed == 9 and stats.pending_events == 4

            await until(consumed_all, what="the second turn to be consumed")
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        assert code == 0, (tmp_path / "persister.log").read_text()
        assert counts(pg_dsn)["messages"] == 4
        assert await committed(log) == await ends(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        out.close()


async def test_token_writers_agree_and_first_duplicate_wins(pg_dsn: str) -> None:
    rows = [TokenEvent("t1", 1, "a"), TokenEvent("t1", 2, "b"), TokenEvent("t1", 2, "B")]
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await create_schema(conn)
        assert await write_tokens_batched(conn, rows) == 2
        assert await write_tokens_batched(conn, rows) == 0
        assert await write_tokens_per_row(conn, [*rows, TokenEvent("t2", 1, "c")]) == 1
        cur = await conn.execute("SELECT turn_id, seq, text FROM tokens ORDER BY 1, 2")
        assert await cur.fetchall() == [("t1", 1, "a"), ("t1", 2, "b"), ("t2", 1, "c")]


async def test_memory_down_does_not_hold_up_persistence(pg_dsn: str, log: EmbeddedLog) -> None:
    """Memory unreachable: batches, history and offsets go on; the finished turns wait in the
    outbox table and reach memory once it is back, on the same address."""
    port = _free_port()
    w = Writer(log)
    turns = [await w.turn(f"conv-down-{i}", f"question {i}", ["an", "swer"]) for i in range(3)]
    async with MemoryIndexer(f"127.0.0.1:{port}", attempts=1) as indexer:
        async with persister_running(
            pg_dsn, log, memory=indexer, memory_wait_s=1.0, retry_max_s=0.5
        ) as run:
            started = asyncio.get_running_loop().time()
            await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
            assert asyncio.get_running_loop().time() - started < 5
            assert await committed(log) == await ends(log)
            got = await run.stub.GetConversation(
                persister_pb2.GetConversationRequest(
                    tenant_id="acme", conversation_id="conv-down-0", consistent=True
                ),
                timeout=5,
            )
            assert [m.text for m in got.conversation.messages] == ["question 0", "answer"]
            with psycopg.connect(pg_dsn) as conn:
                queued = {r[0] for r in conn.execute("SELECT turn_id FROM memory_outbox")}
            assert set(turns) <= queued

            memory = FlakyMemory(fail=0)
            server = grpc.aio.server()
            memory_service_pb2_grpc.add_MemoryServiceServicer_to_server(memory, server)
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            try:
                await until(
                    lambda: set(turns) <= {c.request_id for c in memory.calls},
                    what="the queued turns reaching memory",
                    timeout_s=30,
                )
            finally:
                await server.stop(None)
    with psycopg.connect(pg_dsn) as conn:
        left = {r[0] for r in conn.execute("SELECT turn_id FROM memory_outbox")}
    assert not set(turns) & left

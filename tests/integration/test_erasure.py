"""Erasure (issue 12): deleting a conversation or a tenant, proven on real storage.

The persister runs in-process on the real embedded log and a real PostgreSQL; memory is the real
service process, on pgvector and on Elasticsearch. After an erasure every text column of every
PostgreSQL table is searched for the erased text, memory is asked to recall it, records still on
the log are replayed through a persister, and the log file is scanned byte by byte once
retention has run.
"""

from __future__ import annotations

import asyncio
import io
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from chat.memory.v1 import memory_pb2, memory_service_pb2_grpc
from chat.persister.v1 import persister_pb2, persister_service_pb2_grpc

from mesh.cli import main as cli_main
from mesh.errors import Unavailable
from mesh.launcher import client_env
from mesh.log import TURN_EVENTS, TURN_REQUESTS
from mesh.log.embedded import EmbeddedLog
from mesh.server import channel
from mesh.tls import channel_credentials, load_identity
from services.persister.codec import decode
from services.persister.core import Persister
from services.persister.memory_client import MemoryIndexer
from services.persister.server import PersisterDeps, build_server
from services.persister.settings import PersisterSettings
from services.persister.store import PgStore
from tests.fixtures.postgres import create_database
from tests.integration.test_memory_service import start_memory_service, stop
from tests.integration.test_mesh_tls import Memory, Pki
from tests.integration.test_mesh_tls import memory as memory  # noqa: F401 - fixture
from tests.integration.test_mesh_tls import pki as pki  # noqa: F401 - fixture
from tests.integration.test_persister import (
    PARTITIONS,
    T0,
    Writer,
    error_reason,
    open_embedded,
    persister_running,
    until,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[EmbeddedLog]:
    async with open_embedded(tmp_path / "log.sqlite3") as opened:
        await opened.ensure_topic(TURN_REQUESTS, PARTITIONS)
        await opened.ensure_topic(TURN_EVENTS, PARTITIONS)
        yield opened


@pytest.fixture(params=["pgvector", "elasticsearch"])
def memory_db_and_addr(
    request: pytest.FixtureRequest, pg_server_dsn: str, tmp_path: Path
) -> Iterator[tuple[str, str]]:
    """A memory service process: (its PostgreSQL DSN, its address)."""
    env: dict[str, str] = {}
    if request.param == "elasticsearch":
        env = {
            "MESH_MEMORY_BACKEND": "elasticsearch",
            "MESH_ES_URL": request.getfixturevalue("elasticsearch_url"),
            "MESH_MEMORY_ES_INDEX_PREFIX": f"erase-{uuid.uuid4().hex[:8]}",
            # HTTPS and the elastic user's password, as in the scale profile.
            **client_env(request.getfixturevalue("elasticsearch_server")),
        }
    dsn = create_database(pg_server_dsn, prefix="erase_memory")
    service = start_memory_service(dsn, tmp_path / "memory.log", **env)
    try:
        yield dsn, f"127.0.0.1:{service.port}"
    finally:
        stop(service)


def assert_audited(dsn: str, tenant: str, conversation: str, *, messages: int) -> None:
    """The erasure is in the append-only audit trail, which refuses edits."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT action, detail FROM audit_events WHERE tenant_id = %s AND conversation_id = %s",
            (tenant, conversation),
        ).fetchall()
        assert [(action, detail["messages"]) for action, detail in rows] == [
            ("conversation-erased", messages)
        ]
        for statement in ("UPDATE audit_events SET action = 'x'", "DELETE FROM audit_events"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(statement)
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("TRUNCATE audit_events")


def found_in_postgres(dsn: str, needle: str) -> list[str]:
    """``table.column`` of every text column of every table that holds ``needle``."""
    hits = []
    with psycopg.connect(dsn) as conn:
        columns = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND data_type IN ('text', 'character varying')"
        ).fetchall()
        for table, column in columns:
            row = conn.execute(
                f'SELECT count(*) FROM "{table}" WHERE "{column}" LIKE %s', (f"%{needle}%",)
            ).fetchone()
            if row and row[0]:
                hits.append(f"{table}.{column}")
    return hits


async def recall(stub: memory_service_pb2_grpc.MemoryServiceStub, tenant: str, query: str) -> str:
    reply = await stub.Recall(
        memory_pb2.RecallRequest(tenant_id=tenant, query=query, top_k=20), timeout=15
    )
    return " | ".join(c.text for c in reply.chunks)


def raw_log(path: Path) -> bytes:
    return b"".join(
        Path(str(path) + suffix).read_bytes()
        for suffix in ("", "-wal")
        if Path(str(path) + suffix).exists()
    )


async def test_deleted_conversation_is_gone_from_postgres_memory_and_the_log(
    pg_dsn: str, log: EmbeddedLog, memory_db_and_addr: tuple[str, str]
) -> None:
    memory_dsn, memory_addr = memory_db_and_addr
    erased = f"quokka{uuid.uuid4().hex[:10]}"  # only in the conversation that is deleted
    kept = f"wombat{uuid.uuid4().hex[:10]}"  # in the tenant's other conversation
    theirs = f"numbat{uuid.uuid4().hex[:10]}"  # another tenant's conversation with the same id
    w = Writer(log)
    t1 = await w.turn("c-del", f"remember {erased} please", [f"noted {erased}", " ok"])
    await w.turn("c-del", "and a second turn", ["two"], at=T0 + timedelta(seconds=1))
    await w.turn("c-keep", f"keep {kept}", ["kept"], at=T0 + timedelta(seconds=2))
    await w.turn("c-del", f"hello {theirs}", ["theirs"], tenant="globex")

    async with (
        MemoryIndexer(memory_addr, attempts=1) as indexer,
        channel(memory_addr) as memory_channel,
    ):
        memory = memory_service_pb2_grpc.MemoryServiceStub(memory_channel)
        async with persister_running(pg_dsn, log, memory=indexer, forgetter=indexer) as run:
            await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)

            async def indexed() -> bool:
                return erased in await recall(memory, "acme", erased) and kept in await recall(
                    memory, "acme", kept
                )

            await until(indexed, 20, "the turns indexed into memory")
            assert found_in_postgres(pg_dsn, erased)  # the scan can see it

            reply = await run.stub.DeleteConversation(
                persister_pb2.DeleteConversationRequest(tenant_id="acme", conversation_id="c-del"),
                timeout=30,
            )
            c = reply.counts
            assert (c.conversations, c.messages, c.tokens) == (1, 4, 3)
            assert c.chunks >= 2 and not reply.already_deleted

            assert found_in_postgres(pg_dsn, erased) == []
            assert found_in_postgres(memory_dsn, erased) == []
            assert_audited(pg_dsn, "acme", "c-del", messages=4)
            assert erased not in await recall(memory, "acme", erased)
            assert kept in await recall(memory, "acme", kept)
            assert theirs in await recall(memory, "globex", theirs)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await run.stub.GetConversation(
                    persister_pb2.GetConversationRequest(tenant_id="acme", conversation_id="c-del"),
                    timeout=15,
                )
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            other = await run.stub.GetConversation(
                persister_pb2.GetConversationRequest(tenant_id="globex", conversation_id="c-del"),
                timeout=15,
            )
            assert len(other.conversation.messages) == 2

            # Records that reach the log after the delete, of turns accepted before it: a
            # zombie agent's tokens and finish of an erased turn, and a request of that time.
            await w.tokens("c-del", t1, [f"late {erased}"], first=10)
            await w.finish("c-del", t1, 10)
            await w.request("c-del", f"late request {erased}", at=T0 + timedelta(seconds=3))
            await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
            assert found_in_postgres(pg_dsn, erased) == []

            again = await run.stub.DeleteConversation(
                persister_pb2.DeleteConversationRequest(tenant_id="acme", conversation_id="c-del"),
                timeout=30,
            )
            assert again.already_deleted
            assert (again.counts.conversations, again.counts.messages) == (0, 0)

        # A new persister that consumes the whole log again does not bring it back.
        conn = sqlite3.connect(str(log.path), timeout=30)
        with conn:
            conn.execute("UPDATE offsets SET committed = 0 WHERE grp = 'persister'")
        conn.close()
        async with persister_running(pg_dsn, log, member="p2") as run:
            await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
            assert found_in_postgres(pg_dsn, erased) == []
            assert sorted(found_in_postgres(pg_dsn, kept)) == [
                "conversations.title",
                "messages.text",
            ]

    # The log's copies go with retention: make every record older than the limit.
    assert erased.encode() in raw_log(log.path)
    conn = sqlite3.connect(str(log.path), timeout=30)
    with conn:
        conn.execute("UPDATE records SET ts_ms = ?", (int(time.time() * 1000) - 200 * 3_600_000,))
    conn.close()
    pruned = await log.enforce_retention(max_age_s=168 * 3600)
    assert pruned.records > 0
    assert erased.encode() not in raw_log(log.path)


async def test_delete_refuses_bad_ids_other_tenants_and_unfinished_turns(
    pg_dsn: str, log: EmbeddedLog
) -> None:
    w = Writer(log)
    await w.turn("c-1", "finished turn", ["done"])
    running = await w.request("c-1", "still generating", at=T0 + timedelta(seconds=1))
    await w.tokens("c-1", running, ["partial"])
    async with persister_running(pg_dsn, log) as run:
        delete = run.stub.DeleteConversation
        for request, code, reason in [
            (
                persister_pb2.DeleteConversationRequest(conversation_id="c-1"),
                grpc.StatusCode.INVALID_ARGUMENT,
                "TENANT_ID_MISSING",
            ),
            (
                persister_pb2.DeleteConversationRequest(tenant_id="acme"),
                grpc.StatusCode.INVALID_ARGUMENT,
                "CONVERSATION_ID_MISSING",
            ),
            (
                persister_pb2.DeleteConversationRequest(tenant_id="globex", conversation_id="c-1"),
                grpc.StatusCode.NOT_FOUND,
                "CONVERSATION_NOT_FOUND",
            ),
            (
                persister_pb2.DeleteConversationRequest(tenant_id="acme", conversation_id="c-9"),
                grpc.StatusCode.NOT_FOUND,
                "CONVERSATION_NOT_FOUND",
            ),
            (
                persister_pb2.DeleteConversationRequest(tenant_id="acme", conversation_id="c-1"),
                grpc.StatusCode.FAILED_PRECONDITION,
                "TURN_IN_PROGRESS",
            ),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await delete(request, timeout=30)
            assert (caught.value.code(), error_reason(caught.value)) == (code, reason), request
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await run.stub.EraseTenant(persister_pb2.EraseTenantRequest(), timeout=30)
        assert error_reason(caught.value) == "TENANT_ID_MISSING"
        # The refusals changed nothing; the other tenant's attempt did not erase it either.
        got = await run.stub.GetConversation(
            persister_pb2.GetConversationRequest(tenant_id="acme", conversation_id="c-1"),
            timeout=15,
        )
        assert len(got.conversation.messages) == 3

        # Once the turn finished, the delete goes through.
        await w.finish("c-1", running, 1)
        reply = await delete(
            persister_pb2.DeleteConversationRequest(tenant_id="acme", conversation_id="c-1"),
            timeout=30,
        )
        assert (reply.counts.messages, reply.counts.tokens) == (4, 2)


async def test_forced_delete_drops_the_running_turns_later_records(
    pg_dsn: str, log: EmbeddedLog
) -> None:
    w = Writer(log)
    running = await w.request("c-f", "generating secret-zz1")
    await w.tokens("c-f", running, ["secret-zz1 "])
    async with persister_running(pg_dsn, log) as run:
        reply = await run.stub.DeleteConversation(
            persister_pb2.DeleteConversationRequest(
                tenant_id="acme", conversation_id="c-f", force=True
            ),
            timeout=30,
        )
        assert (reply.counts.messages, reply.counts.tokens) == (1, 1)
        # The agent goes on and finishes after the delete (its finish is newer than the erasure).
        await w.tokens("c-f", running, ["more secret-zz1"], first=2)
        await w.finish("c-f", running, 2)
        await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
        assert found_in_postgres(pg_dsn, "secret-zz1") == []
        stats = await run.stub.GetStats(persister_pb2.GetStatsRequest(), timeout=5)
        assert stats.duplicates_ignored == 0


async def test_erase_tenant_and_a_new_start_afterwards(pg_dsn: str, log: EmbeddedLog) -> None:
    w = Writer(log)
    await w.turn("c-a", "tenant text alpha-q7", ["a"])
    await w.turn("c-b", "tenant text beta-q7", ["b"], at=T0 + timedelta(seconds=1))
    unfinished = await w.request("c-b", "unfinished gamma-q7", at=T0 + timedelta(seconds=2))
    await w.turn("c-a", "other tenant delta-q7", ["d"], tenant="globex")
    async with persister_running(pg_dsn, log) as run:
        reply = await run.stub.EraseTenant(
            persister_pb2.EraseTenantRequest(tenant_id="acme"), timeout=30
        )
        assert (reply.counts.conversations, reply.counts.messages) == (2, 5)
        for text in ("alpha-q7", "beta-q7", "gamma-q7"):
            assert found_in_postgres(pg_dsn, text) == [], text
        assert found_in_postgres(pg_dsn, "delta-q7")
        # The erased tenant's unfinished turn ends later: nothing of it is stored.
        await w.tokens("c-b", unfinished, ["late gamma-q7"])
        await w.finish("c-b", unfinished, 1)
        # A turn accepted after the erasure starts a new conversation.
        fresh = datetime.now(UTC) + timedelta(seconds=5)
        await w.turn("c-new", "fresh start epsilon-q7", ["e"], at=fresh)
        await run.stub.Flush(persister_pb2.FlushRequest(), timeout=15)
        assert found_in_postgres(pg_dsn, "gamma-q7") == []
        listed = await run.stub.ListConversations(
            persister_pb2.ListConversationsRequest(tenant_id="acme"), timeout=15
        )
        assert [c.conversation_id for c in listed.conversations] == ["c-new"]
        # Erasing twice is fine.
        again = await run.stub.EraseTenant(
            persister_pb2.EraseTenantRequest(tenant_id="acme"), timeout=30
        )
        assert again.counts.conversations == 1


# -- who may erase ----------------------------------------------------------------------------


async def test_only_gateways_and_operators_delete_and_only_operators_erase_tenants(
    pg_dsn: str, log: EmbeddedLog, pki: Pki, tmp_path: Path
) -> None:
    w = Writer(log)
    for conversation in ("c-1", "c-2", "c-3"):
        await w.turn(conversation, f"text of {conversation}", ["ok"])
    store = PgStore(pg_dsn)
    async with (
        store,
        Persister(
            log=log, store=store, decode=decode, partitions=PARTITIONS, member_id="p-tls"
        ) as persister,
    ):
        deps = PersisterDeps(persister=persister)
        server, port = build_server(PersisterSettings(port=0, tls=pki.tls("persister")), deps)
        await server.start()
        addr = f"127.0.0.1:{port}"

        def dial_as(name: str) -> grpc.aio.Channel:
            identity = load_identity(pki.certs.ca_cert, pki.certs.cert(name), pki.certs.key(name))
            return channel(addr, credentials=channel_credentials(identity), server_name="persister")

        def delete(conversation: str) -> persister_pb2.DeleteConversationRequest:
            return persister_pb2.DeleteConversationRequest(
                tenant_id="acme", conversation_id=conversation
            )

        try:
            for name in ("agent", "memory", "persister"):
                async with dial_as(name) as ch:
                    stub = persister_service_pb2_grpc.PersisterServiceStub(ch)
                    with pytest.raises(grpc.aio.AioRpcError) as denied:
                        await stub.DeleteConversation(delete("c-1"), timeout=15)
                    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
                    with pytest.raises(grpc.aio.AioRpcError) as denied:
                        await stub.EraseTenant(
                            persister_pb2.EraseTenantRequest(tenant_id="acme"), timeout=15
                        )
                    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
            async with dial_as("gateway") as ch:
                stub = persister_service_pb2_grpc.PersisterServiceStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await stub.EraseTenant(
                        persister_pb2.EraseTenantRequest(tenant_id="acme"), timeout=15
                    )
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
                # The denied calls erased nothing.
                await stub.GetConversation(
                    persister_pb2.GetConversationRequest(
                        tenant_id="acme", conversation_id="c-3", consistent=True
                    ),
                    timeout=15,
                )
                listed = await stub.ListConversations(
                    persister_pb2.ListConversationsRequest(tenant_id="acme"), timeout=15
                )
                assert len(listed.conversations) == 3
                reply = await stub.DeleteConversation(delete("c-1"), timeout=15)
                assert reply.counts.messages == 2

            # The operator's command, over mutual TLS with the operator certificate.
            env = {
                "MESH_TLS_CA": str(pki.certs.ca_cert),
                "MESH_TLS_CERT": str(pki.certs.cert("operator")),
                "MESH_TLS_KEY": str(pki.certs.key("operator")),
            }
            out, err = io.StringIO(), io.StringIO()
            argv = ["erase", "--tenant", "acme", "--conversation", "c-2", "--persister", addr]
            rc = await asyncio.to_thread(cli_main, argv, environ=env, out=out, err=err)
            assert rc == 0, err.getvalue()
            assert "conversation c-2 of tenant acme: 1 conversations, 2 messages" in out.getvalue()
            out = io.StringIO()
            argv = ["erase", "--tenant", "acme", "--persister", addr]
            rc = await asyncio.to_thread(cli_main, argv, environ=env, out=out, err=err)
            assert rc == 0, err.getvalue()
            assert "erased tenant acme: 1 conversations, 2 messages" in out.getvalue()
            # As another identity the command is refused, saying why.
            env["MESH_TLS_CERT"] = str(pki.certs.cert("agent"))
            env["MESH_TLS_KEY"] = str(pki.certs.key("agent"))
            err = io.StringIO()
            rc = await asyncio.to_thread(cli_main, argv, environ=env, out=out, err=err)
            assert rc == 1 and "PERMISSION_DENIED" in err.getvalue()
            rc = await asyncio.to_thread(
                cli_main, ["erase", "--tenant", "", "--persister", addr], environ=env, err=err
            )
            assert rc == 1 and "--tenant is required" in err.getvalue()
        finally:
            await server.stop(None)
    assert found_in_postgres(pg_dsn, "text of c-") == []


async def test_the_persister_may_ask_memory_to_forget_and_an_agent_may_not(
    pki: Pki, memory: Memory
) -> None:
    async with MemoryIndexer(memory.addr, tls=pki.tls("persister")) as indexer:
        assert await indexer.forget(tenant_id="t", conversation_id="c") == 0
    async with MemoryIndexer(memory.addr, tls=pki.tls("agent")) as indexer:
        with pytest.raises(Unavailable):
            await indexer.forget(tenant_id="t", conversation_id="c")


class ForgetfulMemory(memory_service_pb2_grpc.MemoryServiceServicer):
    """Answers Forget with UNAVAILABLE ``fail`` times, then counts the calls."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.forgot: list[tuple[str, str]] = []

    async def Remember(self, request: memory_pb2.RememberRequest, context: Any) -> Any:
        return memory_pb2.RememberResponse(chunks_stored=1)

    async def Forget(self, request: memory_pb2.ForgetRequest, context: Any) -> Any:
        if self.fail:
            self.fail -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down for a moment")
        self.forgot.append((request.tenant_id, request.conversation_id))
        return memory_pb2.ForgetResponse(chunks_deleted=2)


async def test_memory_down_fails_the_delete_after_the_rows_and_a_retry_finishes_it(
    pg_dsn: str, log: EmbeddedLog
) -> None:
    memory = ForgetfulMemory(fail=3)  # the client tries three times per call
    server = grpc.aio.server()
    memory_service_pb2_grpc.add_MemoryServiceServicer_to_server(memory, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    w = Writer(log)
    await w.turn("c-m", "forget me later", ["ok"])
    try:
        async with (
            MemoryIndexer(f"127.0.0.1:{port}", attempts=1, initial_backoff_s=0.01) as indexer,
            persister_running(pg_dsn, log, memory=indexer, forgetter=indexer) as run,
        ):
            request = persister_pb2.DeleteConversationRequest(
                tenant_id="acme", conversation_id="c-m"
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await run.stub.DeleteConversation(request, timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_reason(caught.value) == "MEMORY_UNAVAILABLE"
            assert found_in_postgres(pg_dsn, "forget me later") == []  # the rows went first
            reply = await run.stub.DeleteConversation(request, timeout=30)
            assert reply.already_deleted and reply.counts.chunks == 2
            assert memory.forgot == [("acme", "c-m")]
    finally:
        await server.stop(None)

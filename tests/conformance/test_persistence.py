"""One behavioural suite for the persister's storage on every PostgreSQL it may be given.

Each test runs against the embedded server (pgserver, Unix socket) and against the system's
standalone PostgreSQL server (Debian's packages, TCP with a password: the "any DSN" path of the
scale-out profile, marked ``infra``). The persister only ever sees a DSN, so the behaviours
below must not depend on which server is behind it: idempotent batched writes, first writer
wins on a duplicate seq, assistant messages assembled from tokens, tenant-scoped reads, paging.

Batches are built the way the persister builds them: real ``chat.events.v1`` records decoded by
``services.persister.codec.decode`` and assembled by ``batch.assemble``. The service-level
behaviours (gRPC, offsets, outages, draining) are in tests/integration/test_persister.py.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from chat.common.v1 import common_pb2
from chat.events.v1 import events_pb2

from mesh.errors import NotFound
from mesh.generation import FinishReason
from mesh.log import TURN_EVENTS, TURN_REQUESTS, Record, partition_for
from mesh.turn_ids import new_turn_ref
from services.persister.batch import assemble
from services.persister.codec import decode
from services.persister.core import Persister
from services.persister.model import EPOCH, BatchPlan, BatchResult, MessageCursor, Role
from services.persister.store import PgStore
from tests.fixtures.postgres import create_database
from tests.integration.test_persister import (
    Writer,
    committed,
    counts,
    ends,
    open_embedded,
    persister_running,
)

pytestmark = pytest.mark.integration

PARTITIONS = 4
T0 = datetime(2025, 6, 1, 8, 30, 0, 123456, tzinfo=UTC)


@pytest.fixture(params=["pgserver", pytest.param("debian", marks=pytest.mark.infra)])
def dsn(request: pytest.FixtureRequest) -> str:
    """A fresh, empty database on the embedded server or on the Debian server."""
    if request.param == "debian":
        return create_database(request.getfixturevalue("debian_pg_server_dsn"), prefix="conf")
    dsn_: str = request.getfixturevalue("pg_dsn")
    return dsn_


@pytest.fixture
async def store(dsn: str) -> AsyncIterator[PgStore]:
    async with PgStore(dsn) as started:
        yield started


class _NoLog:
    """Stands in for the log: the reads under test (not ``consistent``) never touch it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a plain read used the log ({name})")


def reader(store: PgStore, *, message_page_size: int = 256) -> Persister:
    """The persister core's read path over ``store``, without consuming anything."""
    return Persister(
        log=_NoLog(),  # type: ignore[arg-type]
        store=store,
        decode=decode,
        partitions=PARTITIONS,
        member_id="reader",
        message_page_size=message_page_size,
    )


def ms(at: datetime) -> int:
    return (at - EPOCH) // timedelta(milliseconds=1)


class Events:
    """Records as the persister consumes them: real protobuf payloads, offsets in log order."""

    def __init__(self) -> None:
        self._offsets: dict[tuple[str, int], int] = defaultdict(int)

    def _record(self, topic: str, conv: str, value: bytes, at: datetime) -> Record:
        partition = partition_for(conv.encode(), PARTITIONS)
        offset = self._offsets[(topic, partition)]
        self._offsets[(topic, partition)] += 1
        return Record(topic, partition, offset, conv.encode(), value, ms(at))

    def request(
        self, conv: str, text: str, *, tenant: str = "acme", at: datetime = T0, turn: str = ""
    ) -> tuple[str, Record]:
        turn = turn or str(new_turn_ref(partition_for(conv.encode(), PARTITIONS), 0, 0))
        message = events_pb2.TurnRequested(
            turn_id=turn,
            conversation_id=conv,
            tenant_id=tenant,
            user_text=text,
            accepted_at=at,
            events_partition=partition_for(conv.encode(), PARTITIONS),
        )
        return turn, self._record(TURN_REQUESTS, conv, message.SerializeToString(), at)

    def token(
        self, conv: str, turn: str, seq: int, text: str, *, tenant: str = "acme", at: datetime = T0
    ) -> Record:
        event = events_pb2.TurnEvent(
            token=events_pb2.TokenEmitted(
                turn_id=turn, seq=seq, text=text, conversation_id=conv, tenant_id=tenant
            )
        )
        return self._record(TURN_EVENTS, conv, event.SerializeToString(), at)

    def finish(
        self,
        conv: str,
        turn: str,
        last_seq: int,
        *,
        tenant: str = "acme",
        reason: int = common_pb2.FINISH_REASON_STOP,
        at: datetime = T0,
    ) -> Record:
        event = events_pb2.TurnEvent(
            finished=events_pb2.TurnFinished(
                turn_id=turn,
                finish_reason=reason,  # type: ignore[arg-type]
                conversation_id=conv,
                tenant_id=tenant,
                last_seq=last_seq,
                model="tiny",
            )
        )
        return self._record(TURN_EVENTS, conv, event.SerializeToString(), at)

    def turn(
        self,
        conv: str,
        text: str,
        pieces: list[str],
        *,
        tenant: str = "acme",
        at: datetime = T0,
    ) -> tuple[str, list[Record]]:
        """A whole turn: request, tokens 1..n, finished one second after acceptance."""
        turn, request = self.request(conv, text, tenant=tenant, at=at)
        done = at + timedelta(seconds=1)
        tokens = [
            self.token(conv, turn, seq, piece, tenant=tenant, at=done)
            for seq, piece in enumerate(pieces, start=1)
        ]
        return turn, [
            request,
            *tokens,
            self.finish(conv, turn, len(pieces), tenant=tenant, at=done),
        ]


def plan(records: Iterable[Record]) -> BatchPlan:
    return assemble(records, decode)


async def write(store: PgStore, records: Iterable[Record]) -> BatchResult:
    return await store.write_batch(plan(records))


async def messages(store: PgStore, conv: str, tenant: str = "acme") -> list[tuple[str, Role, str]]:
    found = await reader(store).get_conversation(tenant, conv)
    return [(m.turn_id, m.role, m.text) for m in found.messages]


# ---------------------------------------------------------------------------------------------


async def test_a_batch_assembles_messages_from_tokens(store: PgStore) -> None:
    events = Events()
    # Multi-byte text on purpose: both servers must store UTF-8 exactly (no locale surprises).
    first, turn_1 = events.turn("conv-1", "Grüße   aus\nKöln 🙂", ["Hallo", " 🙂", " Welt", "."])
    second, turn_2 = events.turn(
        "conv-1", "and then?", ["then ", "done"], at=T0 + timedelta(seconds=30)
    )
    other, turn_3 = events.turn("conv-2", "x" * 100, ["ok"], at=T0 + timedelta(seconds=5))
    # Tokens of one turn may sit in any order within a batch: the message joins them by seq.
    batch = [*turn_1, turn_2[0], *reversed(turn_2[1:3]), turn_2[3], *turn_3]

    result = await write(store, batch)

    assert (result.user_messages_inserted, result.tokens_inserted) == (3, 7)
    assert result.assistant_messages_inserted == 3
    finished = {f.turn_id: f for f in result.finished}
    assert finished[first].user_text == "Grüße   aus\nKöln 🙂"
    assert finished[first].assistant_text == "Hallo 🙂 Welt."
    assert (finished[first].tenant_id, finished[first].conversation_id) == ("acme", "conv-1")
    assert finished[second].assistant_text == "then done"
    assert finished[other].finish_reason == FinishReason.STOP

    conversation = await reader(store).get_conversation("acme", "conv-1")
    assert conversation.title == "Grüße aus Köln 🙂"
    assert conversation.created_at == T0  # microseconds and UTC survive the round trip
    # Finish times are log timestamps (milliseconds); the last answer bumped the conversation.
    finished_ms = T0.replace(microsecond=123000)
    assert conversation.updated_at == finished_ms + timedelta(seconds=31)
    assert [(m.turn_id, m.role, m.text) for m in conversation.messages] == [
        (first, Role.USER, "Grüße   aus\nKöln 🙂"),
        (first, Role.ASSISTANT, "Hallo 🙂 Welt."),
        (second, Role.USER, "and then?"),
        (second, Role.ASSISTANT, "then done"),
    ]
    assert [m.accepted_at for m in conversation.messages] == [
        T0,
        T0,
        T0 + timedelta(seconds=30),
        T0 + timedelta(seconds=30),
    ]
    assert conversation.messages[1].finish_reason == FinishReason.STOP
    assert conversation.messages[1].created_at == finished_ms + timedelta(seconds=1)
    long_title = (await reader(store).get_conversation("acme", "conv-2")).title
    assert long_title == "x" * 60 + "…"
    assert await store.count_rows() == {"conversations": 2, "messages": 6, "tokens": 7}


async def test_replaying_batches_writes_nothing_twice(store: PgStore) -> None:
    events = Events()
    turn, records = events.turn("conv-r", "hello", ["a", "b", "c"])
    first = await write(store, records)
    assert first.rows_inserted == 1 + 3 + 1
    before = await store.count_rows()

    # The same records again (redelivered after a crash before the offset commit)...
    again = await write(store, records)
    assert (again.rows_inserted, again.messages_inserted, again.tokens_inserted) == (0, 0, 0)
    # ...still report the finished turn, so memory indexing (idempotent) is redone too.
    assert [f.turn_id for f in again.finished] == [turn]
    assert again.finished[0].assistant_text == "abc"
    # ...and split differently across batches, record by record.
    for record in records:
        assert (await write(store, [record])).rows_inserted == 0
    assert await store.count_rows() == before
    assert await messages(store, "conv-r") == [
        (turn, Role.USER, "hello"),
        (turn, Role.ASSISTANT, "abc"),
    ]


async def test_first_writer_wins_on_duplicate_seq(store: PgStore) -> None:
    events = Events()
    turn, request = events.request("conv-d", "go")
    # Batch 1: seq 2 twice in one batch (a zombie agent's duplicate): the first in log order wins.
    batch_1 = [
        request,
        events.token("conv-d", turn, 1, "one "),
        events.token("conv-d", turn, 2, "two "),
        events.token("conv-d", turn, 2, "TWO! "),
    ]
    result = await write(store, batch_1)
    assert result.tokens_inserted == 2
    assert plan(batch_1).in_batch_duplicates == 1
    # Batch 2: seq 2 again with other text (already stored: kept as is), then the rest, a late
    # token past the turn's last seq, and two TurnFinished records (the first one counts).
    batch_2 = [
        events.token("conv-d", turn, 2, "deux "),
        events.token("conv-d", turn, 3, "three"),
        events.finish("conv-d", turn, 3),
        events.token("conv-d", turn, 4, " late"),
        events.finish("conv-d", turn, 4, reason=common_pb2.FINISH_REASON_ERROR),
    ]
    result = await write(store, batch_2)
    assert (result.tokens_inserted, result.assistant_messages_inserted) == (2, 1)
    assert [(f.assistant_text, f.finish_reason) for f in result.finished] == [
        ("one two three", FinishReason.STOP)
    ]
    # Batch 3: a second finish in a later batch changes nothing either.
    result = await write(store, [events.finish("conv-d", turn, 4, reason=4)])
    assert result.assistant_messages_inserted == 0
    found = await reader(store).get_conversation("acme", "conv-d")
    assistant = found.messages[-1]
    assert (assistant.text, assistant.finish_reason) == ("one two three", FinishReason.STOP)
    # The late token past last_seq went with the turn's rows when the message was assembled.
    assert await store.count_rows() == {"conversations": 1, "messages": 2, "tokens": 3}


async def test_concurrent_writers_store_each_row_once(dsn: str) -> None:
    # Two persister members overlap during a rebalance: both start on a fresh database at once
    # (the schema is created under a lock) and write overlapping batches concurrently.
    events = Events()
    turns = [events.turn(f"conv-{i}", f"q{i}", [f"a{i}", f"b{i}"]) for i in range(20)]
    records = [record for _, turn_records in turns for record in turn_records]
    stores = [PgStore(dsn), PgStore(dsn)]
    await asyncio.gather(*(s.start() for s in stores))
    try:

        async def write_all(store: PgStore, order: list[Record]) -> int:
            inserted = 0
            for start in range(0, len(order), 16):
                chunk = order[start : start + 16]
                for attempt in range(5):
                    try:
                        inserted += (await write(store, chunk)).rows_inserted
                        break
                    except psycopg.errors.DeadlockDetected:
                        # The persister retries a failed batch the same way.
                        if attempt == 4:
                            raise
                        await asyncio.sleep(0.05)
            return inserted

        half = len(records) // 2
        rotated = records[half:] + records[:half]
        inserted = await asyncio.gather(
            write_all(stores[0], records), write_all(stores[1], rotated)
        )
        # Each user message, token and assistant message exactly once, by one of the two.
        assert sum(inserted) == 20 * (1 + 2 + 1)
        assert await stores[0].count_rows() == {
            "conversations": 20,
            "messages": 40,
            "tokens": 40,
        }
        assert await messages(stores[1], "conv-7") == [
            (turns[7][0], Role.USER, "q7"),
            (turns[7][0], Role.ASSISTANT, "a7b7"),
        ]
    finally:
        await asyncio.gather(*(s.stop() for s in stores))


async def test_reads_are_scoped_to_the_tenant(store: PgStore) -> None:
    events = Events()
    acme, acme_records = events.turn("shared", "acme secret", ["acme answer"], tenant="acme")
    globex, globex_records = events.turn(
        "shared",
        "globex question",
        ["globex answer"],
        tenant="globex",
        at=T0 + timedelta(seconds=1),
    )
    _, private = events.turn("acme-only", "private", ["x"], tenant="acme")
    await write(store, [*acme_records, *globex_records, *private])

    assert [m[2] for m in await messages(store, "shared", "acme")] == [
        "acme secret",
        "acme answer",
    ]
    assert [m[2] for m in await messages(store, "shared", "globex")] == [
        "globex question",
        "globex answer",
    ]
    persister = reader(store)
    for conv in ("acme-only", "never-existed"):
        # Another tenant's conversation reads exactly like a missing one.
        with pytest.raises(NotFound) as caught:
            await persister.get_conversation("globex", conv)
        assert caught.value.reason == "CONVERSATION_NOT_FOUND"
        with pytest.raises(NotFound):
            async for _ in persister.list_messages("globex", conv):
                pass
    page = await persister.list_conversations("globex", 0, "")
    assert [c.conversation_id for c in page.conversations] == ["shared"]
    assert await store.list_messages("globex", "acme-only", after=None, limit=10) == []
    mine = await persister.list_conversations("acme", 0, "")
    assert {c.conversation_id for c in mine.conversations} == {"shared", "acme-only"}
    assert acme != globex


async def test_paging_walks_every_row_once_in_order(store: PgStore) -> None:
    events = Events()
    records: list[Record] = []
    # Seven conversations, three of them updated at the very same instant: keyset paging must
    # break the tie by id, neither skipping nor repeating a row at a page boundary.
    for i in range(7):
        at = T0 + timedelta(seconds=min(i, 4))
        _, request = events.request(f"conv-{i}", f"title {i}", at=at)
        records.append(request)
    # One conversation with many turns, two accepted at the same instant.
    turns = []
    for i in range(5):
        at = T0 + timedelta(minutes=i if i != 3 else 2)
        turn, turn_records = events.turn("long", f"q{i}", [f"a{i}"], at=at)
        turns.append((turn, at))
        records += turn_records
    await write(store, records)

    persister = reader(store, message_page_size=3)
    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = await persister.list_conversations("acme", 2, token)
        assert len(page.conversations) <= 2
        seen += [c.conversation_id for c in page.conversations]
        token = page.next_page_token
        if not token:
            break
    assert token == "", "paging did not end"
    ties = sorted(["conv-4", "conv-5", "conv-6"], reverse=True)
    assert seen[:1] == ["long"]
    assert seen[1:] == [*ties, "conv-3", "conv-2", "conv-1", "conv-0"]

    # Messages come back page by page (3 per page here), in acceptance order, ties by turn id.
    expected = sorted(turns, key=lambda t: (t[1], t[0]))
    got = [m async for m in persister.list_messages("acme", "long")]
    assert [(m.turn_id, m.role) for m in got] == [
        (turn, role) for turn, _ in expected for role in (Role.USER, Role.ASSISTANT)
    ]
    conversation = await persister.get_conversation("acme", "long")
    assert [m.text for m in conversation.messages] == [m.text for m in got]
    # The store's own cursor: everything after a message, nothing repeated.
    after = MessageCursor(got[3].accepted_at, got[3].turn_id, int(got[3].role))
    rest = await store.list_messages("acme", "long", after=after, limit=100)
    assert [(m.turn_id, m.role) for m in rest] == [(m.turn_id, m.role) for m in got[4:]]


async def test_the_persister_pipeline_lands_the_log_in_either_server(
    dsn: str, tmp_path: Path
) -> None:
    # The whole core (consume, assemble, write, commit offsets) over the embedded log, then the
    # same log replayed into the same database by a new member: nothing changes.
    async with open_embedded(tmp_path / "log.sqlite3") as log:
        await log.ensure_topic(TURN_REQUESTS, PARTITIONS)
        await log.ensure_topic(TURN_EVENTS, PARTITIONS)
        writer = Writer(log)
        turn = await writer.turn("conv-p", "über", ["ä", "ö", "ü"])
        await writer.turn("conv-q", "second", ["x"], tenant="globex")
        async with persister_running(dsn, log) as run:
            await run.persister.barrier(15)
            assert counts(dsn) == {"conversations": 2, "messages": 4, "tokens": 4}
            found = await run.persister.get_conversation("acme", "conv-p", consistent=True)
            assert [m.text for m in found.messages] == ["über", "äöü"]
            assert found.messages[0].turn_id == turn
        assert await committed(log) == await ends(log)
        before = counts(dsn)
        await writer.turn("conv-p", "again", ["y"], at=T0 + timedelta(hours=1))
        async with persister_running(dsn, log, member="p2") as run:
            await run.persister.barrier(15)
    assert counts(dsn) == {
        "conversations": before["conversations"],
        "messages": before["messages"] + 2,
        "tokens": before["tokens"] + 1,
    }

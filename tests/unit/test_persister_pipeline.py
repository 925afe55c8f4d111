"""The persister's pipeline on an in-memory log and store: batching, ordering of commits,
retries and the flush barrier (no servers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest

from mesh.errors import InvalidArgument, NotFound, Unavailable
from mesh.generation import FinishReason
from mesh.log import TURN_EVENTS, TURN_REQUESTS, Record
from mesh.turn_ids import TurnRef
from services.persister import codec
from services.persister.core import Persister
from services.persister.model import (
    BatchPlan,
    BatchResult,
    Conversation,
    ConversationCursor,
    FinishedTurn,
    Message,
    MessageCursor,
    Role,
)
from tests.unit.test_persister_core import Log as RecordMaker

PARTITIONS = 2


class MemLog:
    """A single-member in-memory log with the EventLog surface the persister uses."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, int], list[Record]] = {}
        self.commits: dict[tuple[str, int], int] = {}
        self.grown = asyncio.Event()
        self.journal: list[str] = []

    async def ensure_topic(self, topic: str, partitions: int) -> None:
        for p in range(partitions):
            self.records.setdefault((topic, p), [])

    def add(self, record: Record) -> Record:
        part = self.records[(record.topic, record.partition)]
        placed = Record(
            record.topic, record.partition, len(part), record.key, record.value, record.timestamp_ms
        )
        part.append(placed)
        self.grown.set()
        return placed

    async def partition_count(self, topic: str) -> int:
        return sum(1 for t, _ in self.records if t == topic)

    async def end_offset(self, topic: str, partition: int) -> int:
        return len(self.records[(topic, partition)])

    async def committed(self, topic: str, group: str, partition: int) -> int:
        return self.commits.get((topic, partition), 0)

    def consumer(self, topic: str, group: str, member_id: str) -> MemConsumer:
        return MemConsumer(self, topic)


class MemConsumer:
    def __init__(self, log: MemLog, topic: str) -> None:
        self.log = log
        self.topic = topic

    async def __aiter__(self) -> AsyncIterator[Record]:
        positions = {
            p: self.log.commits.get((t, p), 0) for (t, p) in self.log.records if t == self.topic
        }
        while True:
            got = False
            for p in sorted(positions):
                part = self.log.records[(self.topic, p)]
                while positions[p] < len(part):
                    record = part[positions[p]]
                    positions[p] += 1
                    got = True
                    yield record
            if not got:
                self.log.grown.clear()
                try:
                    await asyncio.wait_for(self.log.grown.wait(), 0.01)
                except TimeoutError:
                    pass

    async def commit(self, record: Record) -> None:
        key = (record.topic, record.partition)
        self.log.commits[key] = max(self.log.commits.get(key, 0), record.offset + 1)
        self.log.journal.append(f"commit {record.topic}/{record.partition}@{record.offset}")

    def assignment(self) -> frozenset[int]:
        return frozenset(range(PARTITIONS))

    async def close(self) -> None:
        return None


@dataclass
class MemStore:
    """First-writer-wins tables in dicts; ``fail`` makes the next writes raise."""

    journal: list[str]
    fail: int = 0
    conversations: dict[tuple[str, str], Conversation] = field(default_factory=dict)
    messages: dict[tuple[str, int], tuple[str, str, Message]] = field(default_factory=dict)
    tokens: dict[tuple[str, int], str] = field(default_factory=dict)
    batches: list[int] = field(default_factory=list)
    gate: asyncio.Event | None = None
    outbox: dict[str, FinishedTurn] = field(default_factory=dict)  # turns queued for memory

    async def write_batch(self, plan: BatchPlan) -> BatchResult:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            self.fail -= 1
            self.journal.append("write failed")
            raise ConnectionError("database is down")
        self.batches.append(plan.events)
        for c in plan.conversations:
            self.conversations.setdefault(
                (c.tenant_id, c.conversation_id),
                Conversation(c.conversation_id, c.title, c.created_at, c.updated_at),
            )
        users = 0
        for u in plan.user_messages:
            if (u.turn_id, 1) not in self.messages:
                users += 1
                msg = Message(u.turn_id, Role.USER, u.text, u.accepted_at, 0, u.accepted_at)
                self.messages[(u.turn_id, 1)] = (u.tenant_id, u.conversation_id, msg)
        toks = 0
        for t in plan.tokens:
            if (t.turn_id, t.seq) not in self.tokens:
                toks += 1
                self.tokens[(t.turn_id, t.seq)] = t.text
        assistants = 0
        finished = []
        for f in plan.finishes:
            if (f.turn_id, 2) not in self.messages:
                assistants += 1
                text = "".join(
                    self.tokens[(f.turn_id, s)]
                    for s in range(1, f.last_seq + 1)
                    if (f.turn_id, s) in self.tokens
                )
                user = self.messages.get((f.turn_id, 1))
                accepted = user[2].accepted_at if user else f.finished_at
                msg = Message(
                    f.turn_id, Role.ASSISTANT, text, f.finished_at, f.finish_reason, accepted
                )
                self.messages[(f.turn_id, 2)] = (f.tenant_id, f.conversation_id, msg)
            _, _, stored = self.messages[(f.turn_id, 2)]
            user = self.messages.get((f.turn_id, 1))
            finished.append(
                FinishedTurn(
                    f.turn_id,
                    f.tenant_id,
                    f.conversation_id,
                    user[2].text if user else None,
                    stored.text,
                    stored.finish_reason,
                )
            )
        for turn in finished:
            if turn.finish_reason != FinishReason.ERROR:
                self.outbox.setdefault(turn.turn_id, turn)
        self.journal.append(f"write {plan.events}")
        return BatchResult(users, toks, assistants, finished)

    async def pending_memory(self, limit: int) -> list[FinishedTurn]:
        return list(self.outbox.values())[:limit]

    async def memory_indexed(self, turn_ids: Sequence[str]) -> None:
        for turn_id in turn_ids:
            self.outbox.pop(turn_id, None)

    async def get_conversation(self, tenant_id: str, conversation_id: str) -> Conversation | None:
        return self.conversations.get((tenant_id, conversation_id))

    async def list_messages(
        self, tenant_id: str, conversation_id: str, *, after: MessageCursor | None, limit: int
    ) -> list[Message]:
        rows = sorted(
            (m for t, c, m in self.messages.values() if (t, c) == (tenant_id, conversation_id)),
            key=lambda m: (m.accepted_at, m.turn_id, int(m.role)),
        )
        if after is not None:
            rows = [
                m
                for m in rows
                if (m.accepted_at, m.turn_id, int(m.role))
                > (after.accepted_at, after.turn_id, after.role)
            ]
        return rows[:limit]

    async def last_messages(
        self, tenant_id: str, conversation_id: str, limit: int
    ) -> list[Message]:
        everything = await self.list_messages(tenant_id, conversation_id, after=None, limit=10**9)
        return everything[-limit:]

    async def list_conversations(
        self, tenant_id: str, *, after: ConversationCursor | None, limit: int
    ) -> list[Conversation]:
        rows = sorted(
            (c for (t, _), c in self.conversations.items() if t == tenant_id),
            key=lambda c: (c.updated_at, c.conversation_id),
            reverse=True,
        )
        if after is not None:
            rows = [
                c
                for c in rows
                if (c.updated_at, c.conversation_id) < (after.updated_at, after.conversation_id)
            ]
        return rows[:limit]


@dataclass
class MemMemory:
    journal: list[str]
    calls: list[tuple[str, str, str, str]] = field(default_factory=list)

    async def remember(
        self, *, tenant_id: str, conversation_id: str, text: str, request_id: str
    ) -> None:
        self.calls.append((tenant_id, conversation_id, text, request_id))
        self.journal.append(f"remember {request_id}")


@dataclass
class Rig:
    log: MemLog
    store: MemStore
    memory: MemMemory
    make: RecordMaker

    def persister(self, **kwargs: object) -> Persister:
        options: dict[str, object] = {
            "batch_size": 500,
            "linger_s": 0.01,
            "barrier_timeout_s": 2.0,
        }
        options.update(kwargs)
        return Persister(
            log=self.log,  # type: ignore[arg-type]
            store=self.store,
            decode=codec.decode,
            partitions=PARTITIONS,
            memory=self.memory,
            member_id="m1",
            **options,  # type: ignore[arg-type]
        )

    def turn(self, turn: str, text: str, tokens: list[str], *, tenant: str = "a") -> None:
        self.log.add(self.make.request(turn, text, tenant=tenant))
        for seq, piece in enumerate(tokens, start=1):
            self.log.add(self.make.token(turn, seq, piece))
        self.log.add(self.make.finish(turn, len(tokens)))


@pytest.fixture
async def rig() -> Rig:
    log = MemLog()
    await log.ensure_topic(TURN_REQUESTS, PARTITIONS)
    await log.ensure_topic(TURN_EVENTS, PARTITIONS)
    return Rig(log, MemStore(log.journal), MemMemory(log.journal), RecordMaker())


async def test_turn_is_written_remembered_then_committed(rig: Rig) -> None:
    rig.turn("t1", "hi", ["Hel", "lo"])
    async with rig.persister() as persister:
        await asyncio.wait_for(persister.barrier(), 5)
        conv = await persister.get_conversation("a", "c1")
    assert [(m.role, m.text) for m in conv.messages] == [
        (Role.USER, "hi"),
        (Role.ASSISTANT, "Hello"),
    ]
    assert rig.memory.calls == [("a", "c1", "user: hi\nassistant: Hello", "t1")]
    journal = rig.log.journal
    writes = [i for i, e in enumerate(journal) if e.startswith("write")]
    remember = journal.index("remember t1")
    commits = [i for i, e in enumerate(journal) if e.startswith("commit")]
    assert commits and writes
    assert max(writes) < remember < min(commits)


async def test_batches_respect_batch_size(rig: Rig) -> None:
    for i in range(5):
        rig.turn(f"t{i}", "q", ["a", "b"])  # 4 records per turn, 20 in all
    async with rig.persister(batch_size=6, linger_s=0.5) as persister:
        await asyncio.wait_for(persister.barrier(), 5)
        stats = persister.stats()
    assert sum(rig.store.batches) == 20
    assert max(rig.store.batches) <= 6
    assert stats.events_consumed == 20
    assert stats.messages_written == 10
    assert stats.tokens_written == 10
    assert stats.pending_events == 0


async def test_linger_gathers_records_into_one_batch(rig: Rig) -> None:
    async with rig.persister(batch_size=1000, linger_s=0.3):
        await asyncio.sleep(0.05)
        rig.turn("t1", "q", ["a"])
        await asyncio.sleep(0.05)
        rig.turn("t2", "q", ["b"])
        for _ in range(100):
            if rig.store.batches:
                break
            await asyncio.sleep(0.02)
    assert rig.store.batches[0] == 6


async def test_failed_write_commits_nothing_and_is_retried(rig: Rig) -> None:
    rig.store.fail = 2
    rig.turn("t1", "hi", ["x"])
    async with rig.persister(retry_max_s=0.05) as persister:
        await asyncio.wait_for(persister.barrier(), 5)
    journal = rig.log.journal
    assert journal[:2] == ["write failed", "write failed"]
    first_commit = next(i for i, e in enumerate(journal) if e.startswith("commit"))
    assert first_commit > journal.index("write 3")
    assert rig.log.commits == {(TURN_REQUESTS, 0): 1, (TURN_EVENTS, 0): 2}


async def test_replay_after_restart_changes_nothing(rig: Rig) -> None:
    rig.turn("t1", "hi", ["x", "y"])
    async with rig.persister() as persister:
        await asyncio.wait_for(persister.barrier(), 5)
    # Forget the commits: the next persister sees every record again.
    rig.log.commits.clear()
    before = (dict(rig.store.messages), dict(rig.store.tokens))
    async with rig.persister() as persister:
        await asyncio.wait_for(persister.barrier(), 5)
        stats = persister.stats()
    assert (rig.store.messages, rig.store.tokens) == before
    assert stats.messages_written == 0 and stats.tokens_written == 0
    assert stats.duplicates_ignored == 4


async def test_barrier_is_immediate_when_caught_up(rig: Rig) -> None:
    rig.turn("t1", "hi", ["x"])
    async with rig.persister() as persister:
        assert await asyncio.wait_for(persister.barrier(), 5) == 3
        started = asyncio.get_running_loop().time()
        assert await persister.barrier() == 0
        assert asyncio.get_running_loop().time() - started < 0.05


async def test_barrier_waits_for_records_appended_before_it(rig: Rig) -> None:
    async with rig.persister(linger_s=5.0) as persister:
        await persister.barrier()
        rig.turn("t1", "hi", ["x"])
        # The long linger would hold the batch; the barrier must push it out now.
        rows = await asyncio.wait_for(persister.barrier(), 2)
        assert rows == 3
        assert ("t1", 2) in rig.store.messages


async def test_barrier_before_a_turn_does_not_wait_for_that_turn(rig: Rig) -> None:
    rig.turn("t1", "hi", ["x"])  # an earlier turn: request 0, events 0-1 on partition 0
    async with rig.persister(barrier_timeout_s=0.3) as persister:
        await asyncio.wait_for(persister.barrier(), 5)
        rig.store.gate = asyncio.Event()  # from now on nothing gets written
        rig.log.add(rig.make.request("t2", "next"))
        t2 = TurnRef(partition=0, request_start=1, events_start=2, nonce="0" * 16)
        # The agent about to generate t2 reads history consistent up to t2, at once.
        assert await asyncio.wait_for(persister.barrier(before=t2), 1) == 0
        conversation = await persister.get_conversation("a", "c1", before=t2)
        assert [m.text for m in conversation.messages] == ["hi", "x"]
        # A plain consistent read still needs t2's request, which cannot be written now.
        with pytest.raises(Unavailable):
            await persister.get_conversation("a", "c1", consistent=True)
        # A later turn's read does wait for t2, which was logged before it.
        t3 = TurnRef(partition=0, request_start=2, events_start=2, nonce="1" * 16)
        with pytest.raises(Unavailable):
            await persister.barrier(before=t3)
        rig.store.gate.set()
        await asyncio.wait_for(persister.barrier(before=t3), 5)


async def test_barrier_times_out_with_unavailable(rig: Rig) -> None:
    rig.store.gate = asyncio.Event()
    rig.turn("t1", "hi", ["x"])
    async with rig.persister(barrier_timeout_s=0.2) as persister:
        with pytest.raises(Unavailable) as caught:
            await persister.barrier()
        assert caught.value.reason == "PERSISTER_BEHIND"
        with pytest.raises(Unavailable):
            await persister.get_conversation("a", "c1", consistent=True)
        rig.store.gate.set()
        await asyncio.wait_for(persister.barrier(), 5)


async def test_barrier_counts_commits_of_other_members(rig: Rig) -> None:
    rig.turn("t1", "hi", ["x"])
    # Another member already committed everything: nothing to wait for.
    rig.log.commits.update({(TURN_REQUESTS, 0): 1, (TURN_EVENTS, 0): 2})
    async with rig.persister() as persister:
        assert await asyncio.wait_for(persister.barrier(), 1) == 0


async def test_drain_writes_and_commits_what_was_consumed(rig: Rig) -> None:
    persister = rig.persister(linger_s=10.0)
    await persister.start()
    try:
        rig.turn("t1", "hi", ["x"])
        for _ in range(200):
            if persister.stats().events_consumed == 3:
                break
            await asyncio.sleep(0.01)
        assert persister.stats().pending_events == 3
        await asyncio.wait_for(persister.drain(), 5)
        assert persister.stats().pending_events == 0
        assert rig.log.commits == {(TURN_REQUESTS, 0): 1, (TURN_EVENTS, 0): 2}
    finally:
        await persister.stop()


async def test_reads_validate_and_hide_other_tenants(rig: Rig) -> None:
    rig.turn("t1", "secret", ["x"], tenant="a")
    async with rig.persister() as persister:
        await asyncio.wait_for(persister.barrier(), 5)
        with pytest.raises(NotFound) as caught:
            await persister.get_conversation("b", "c1")
        assert caught.value.reason == "CONVERSATION_NOT_FOUND"
        with pytest.raises(NotFound):
            [m async for m in persister.list_messages("b", "c1")]
        assert (await persister.list_conversations("b", 0, "")).conversations == []
        with pytest.raises(InvalidArgument) as empty:
            await persister.get_conversation("", "c1")
        assert empty.value.reason == "TENANT_ID_MISSING"
        with pytest.raises(InvalidArgument):
            await persister.get_conversation("a", "")
        for size in (-1, 101):
            with pytest.raises(InvalidArgument) as bad:
                await persister.list_conversations("a", size, "")
            assert bad.value.field == "page_size"
        with pytest.raises(InvalidArgument):
            await persister.list_conversations("a", 10, "garbage!")


async def test_error_turns_are_not_remembered(rig: Rig) -> None:
    rig.log.add(rig.make.request("t1", "hi"))
    rig.log.add(rig.make.finish("t1", 0, reason=5))
    async with rig.persister() as persister:
        await asyncio.wait_for(persister.barrier(), 5)
    assert rig.memory.calls == []
    assert rig.store.messages[("t1", 2)][2].text == ""


@dataclass
class DownMemory:
    """Memory that is down: every Remember fails (as MemoryIndexer does once its tries run out)."""

    calls: int = 0
    up: bool = False
    remembered: list[str] = field(default_factory=list)

    async def remember(
        self, *, tenant_id: str, conversation_id: str, text: str, request_id: str
    ) -> None:
        self.calls += 1
        if not self.up:
            raise ConnectionError("memory is down")
        self.remembered.append(request_id)


async def test_memory_down_never_holds_up_the_batches(rig: Rig) -> None:
    """Persistence, history and offsets go on while memory is down; the turns wait in the
    outbox and reach memory once it is back."""
    memory = DownMemory()
    rig.memory = memory  # type: ignore[assignment]
    async with rig.persister(memory_wait_s=0.5, retry_max_s=0.2) as persister:
        for i in range(5):
            rig.turn(f"t{i}", "hi", ["a"])
            await asyncio.wait_for(persister.barrier(), 5)
            conv = await persister.get_conversation("a", "c1")
            assert len(conv.messages) == 2 * (i + 1)
        # Once the breaker opened, batches stopped waiting for memory at all.
        started = asyncio.get_running_loop().time()
        rig.turn("t-last", "hi", ["a"])
        await asyncio.wait_for(persister.barrier(), 5)
        assert asyncio.get_running_loop().time() - started < 0.5
        assert set(rig.store.outbox) == {"t0", "t1", "t2", "t3", "t4", "t-last"}
        memory.up = True
        for _ in range(100):
            if not rig.store.outbox:
                break
            await asyncio.sleep(0.1)
        assert rig.store.outbox == {}
        assert sorted(memory.remembered) == ["t-last", "t0", "t1", "t2", "t3", "t4"]

"""The gateway core and hub over a real embedded log on a temporary file (no gRPC servers).

The test plays the agent: it appends TurnStarted / TokenEmitted / TurnFinished records itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
from chat.events.v1 import events_pb2
from prometheus_client import REGISTRY

from mesh import turnlog
from mesh.auth import Principal, RateLimiter, hash_key
from mesh.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from mesh.generation import FinishReason
from mesh.log import TURN_EVENTS, TURN_REQUESTS, LogSettings, partition_for
from mesh.log.embedded import EmbeddedLog
from services.gateway.core import GatewayCore
from services.gateway.model import (
    Accepted,
    CancelFrame,
    CreditFrame,
    EmptyFrame,
    FinishedOut,
    Frame,
    FrameError,
    Output,
    ResumeFrame,
    StartFrame,
    StartRequest,
    TokenOut,
    TokenRunOut,
    TurnInfo,
)
from services.gateway.settings import GatewaySettings
from services.gateway.turn_stream import TurnStream

ACME = Principal("acme", hash_key("acme-key"))
GLOBEX = Principal("globex", hash_key("globex-key"))
STEP_TIMEOUT_S = 10.0


class KnownConversations:
    """Conversations the fake directory knows, per tenant (the persister's answer)."""

    def __init__(self) -> None:
        self.known: set[tuple[str, str]] = set()
        self.asked: list[tuple[str, str]] = []

    async def require_conversation(self, tenant_id: str, conversation_id: str) -> None:
        self.asked.append((tenant_id, conversation_id))
        if (tenant_id, conversation_id) not in self.known:
            raise NotFound("no such conversation", reason="CONVERSATION_NOT_FOUND")


class Agent:
    """Appends a turn's events to the log, like an agent would."""

    def __init__(self, log: EmbeddedLog, turn: TurnStream | TurnInfo, attempt: int = 0) -> None:
        info = turn.info if isinstance(turn, TurnStream) else turn
        self.attempt = attempt
        self.log = log
        self.turn_id = info.turn_id
        self.key = info.conversation_id.encode()
        self.partition = info.partition

    def _append(self, event: events_pb2.TurnEvent) -> asyncio.Future[int]:
        return self.log.append(TURN_EVENTS, self.partition, self.key, event.SerializeToString())

    async def started(self) -> None:
        await self._append(
            events_pb2.TurnEvent(
                started=events_pb2.TurnStarted(turn_id=self.turn_id, attempt=self.attempt)
            )
        )

    async def tokens(self, seqs: Iterable[int], tag: str = "") -> None:
        futures = [
            self._append(
                events_pb2.TurnEvent(
                    token=events_pb2.TokenEmitted(
                        turn_id=self.turn_id, seq=seq, text=f"{tag}{seq} ", attempt=self.attempt
                    )
                )
            )
            for seq in seqs
        ]
        await asyncio.gather(*futures)

    async def finished(self, reason: int = 1, last_seq: int = 0, model: str = "tiny") -> None:
        await self._append(
            events_pb2.TurnEvent(
                finished=events_pb2.TurnFinished(
                    turn_id=self.turn_id,
                    finish_reason=reason,
                    last_seq=last_seq,
                    model=model,
                    attempt=self.attempt,
                )
            )
        )


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[EmbeddedLog]:
    async with EmbeddedLog(tmp_path / "log.sqlite3") as opened:
        yield opened


def make_settings(tmp_path: Path, **changes: object) -> GatewaySettings:
    base = GatewaySettings(log=LogSettings(path=tmp_path / "log.sqlite3"), queue_poll_s=0.05)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def conversations() -> KnownConversations:
    return KnownConversations()


@pytest.fixture
async def core(
    tmp_path: Path, log: EmbeddedLog, conversations: KnownConversations
) -> AsyncIterator[GatewayCore]:
    async with GatewayCore(
        make_settings(tmp_path), log=log, conversations=conversations
    ) as started:
        yield started


async def collect(stream: AsyncIterator[Output], *, until_finished: bool = True) -> list[Output]:
    out: list[Output] = []

    async def run() -> None:
        async for item in stream:
            out.append(item)
            if until_finished and isinstance(item, FinishedOut):
                return

    await asyncio.wait_for(run(), STEP_TIMEOUT_S)
    return out


def tokens(outputs: list[Output]) -> list[tuple[int, str]]:
    return [(o.seq, o.text) for o in outputs if isinstance(o, TokenOut)]


def finished(outputs: list[Output]) -> FinishedOut:
    last = outputs[-1]
    assert isinstance(last, FinishedOut), outputs[-3:]
    return last


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"service": "gateway", **labels}) or 0.0


async def test_tokens_arrive_in_order_and_the_finish_ends_the_stream(
    core: GatewayCore, log: EmbeddedLog
) -> None:
    waiting = sample("mesh_queue_depth")
    ttft = sample("mesh_time_to_first_token_seconds_count", model="tiny")
    gaps = sample("mesh_inter_token_latency_seconds_count", model="tiny")
    turns = sample("mesh_turns_total", finish_reason="stop")
    turn = await core.start_turn(ACME, StartRequest("", "hello"))
    assert sample("mesh_queue_depth") == waiting + 1
    assert turn.info.partition == partition_for(turn.info.conversation_id.encode(), 4)
    agent = Agent(log, turn)
    await agent.started()
    await agent.tokens(range(1, 51))
    await agent.finished(last_seq=50)
    outputs = await collect(core.follow(turn))
    assert isinstance(outputs[0], Accepted)
    assert outputs[0].turn_id == turn.turn_id
    assert tokens(outputs) == [(seq, f"{seq} ") for seq in range(1, 51)]
    done = finished(outputs)
    assert done.finish_reason is FinishReason.STOP
    assert done.last_seq == 50
    assert done.timings is not None and done.timings.total_ms > 0
    assert core.hub.subscriber_count() == 0
    assert sample("mesh_queue_depth") == waiting
    assert sample("mesh_time_to_first_token_seconds_count", model="tiny") == ttft + 1
    assert sample("mesh_inter_token_latency_seconds_count", model="tiny") == gaps + 49
    assert sample("mesh_turns_total", finish_reason="stop") == turns + 1


async def test_the_request_is_logged_with_the_turn(core: GatewayCore, log: EmbeddedLog) -> None:
    turn = await core.start_turn(ACME, StartRequest("", "what is up?", request_id="r-1"))
    records = await log.read_range(
        TURN_REQUESTS, turn.info.partition, turn.info.request_offset, turn.info.request_offset + 1
    )
    request = events_pb2.TurnRequested.FromString(records[0].value)
    assert request.turn_id == turn.turn_id
    assert request.tenant_id == "acme"
    assert request.user_text == "what is up?"
    assert request.request_id == "r-1"
    assert request.events_partition == turn.info.partition
    assert request.events_start_offset == turn.info.events_start
    assert records[0].key == turn.info.conversation_id.encode()
    turn.close()


async def test_replays_and_zombie_duplicates_are_dropped_first_record_wins(
    core: GatewayCore, log: EmbeddedLog
) -> None:
    turn = await core.start_turn(ACME, StartRequest("", "hi"))
    agent = Agent(log, turn)
    await agent.started()
    await agent.tokens([1, 2], "a")
    await agent.tokens([2, 3, 1], "b")  # a second agent re-emitting
    await agent.tokens([3, 4], "a")
    await agent.finished(last_seq=4)
    outputs = await collect(core.follow(turn))
    assert tokens(outputs) == [(1, "a1 "), (2, "a2 "), (3, "b3 "), (4, "a4 ")]


async def test_a_zombies_records_after_a_newer_attempt_started_are_ignored(
    core: GatewayCore, log: EmbeddedLog
) -> None:
    turn = await core.start_turn(ACME, StartRequest("", "hi"))
    first, second = Agent(log, turn, attempt=1), Agent(log, turn, attempt=2)
    await first.started()
    await first.tokens([1, 2], "a")
    await second.started()  # the takeover: it read seqs 1-2 before continuing
    await first.tokens([3], "a")  # the zombie's late records land after it
    await first.finished(last_seq=3)
    await second.tokens([3, 4], "b")
    await second.finished(reason=2, last_seq=4)
    outputs = await collect(core.follow(turn))
    assert tokens(outputs) == [(1, "a1 "), (2, "a2 "), (3, "b3 "), (4, "b4 ")]
    assert finished(outputs).finish_reason is FinishReason.LENGTH
    assert core.hub.has_ended(turn.turn_id)


async def test_tokens_ahead_of_a_gap_wait_for_it(core: GatewayCore, log: EmbeddedLog) -> None:
    turn = await core.start_turn(ACME, StartRequest("", "hi"))
    agent = Agent(log, turn)
    await agent.tokens([1, 3, 4, 2, 5])
    await agent.finished(last_seq=5)
    outputs = await collect(core.follow(turn))
    assert [seq for seq, _ in tokens(outputs)] == [1, 2, 3, 4, 5]


async def test_only_the_first_finish_counts(core: GatewayCore, log: EmbeddedLog) -> None:
    turn = await core.start_turn(ACME, StartRequest("", "hi"))
    agent = Agent(log, turn)
    await agent.tokens([1])
    await agent.finished(reason=1, last_seq=1)
    await agent.tokens([2])
    await agent.finished(reason=2, last_seq=2)
    outputs = await collect(core.follow(turn))
    assert tokens(outputs) == [(1, "1 ")]
    assert finished(outputs).finish_reason is FinishReason.STOP


async def test_cancel_of_a_queued_turn_ends_it_at_once(core: GatewayCore) -> None:
    turn = await core.start_turn(ACME, StartRequest("", "hi"))
    assert await core.cancel_turn(ACME, turn.turn_id) == turn.turn_id
    outputs = await collect(core.follow(turn))
    done = finished(outputs)
    assert done.finish_reason is FinishReason.CANCELLED
    assert done.last_seq == 0


async def test_cancel_of_a_generating_turn_waits_for_the_agent(
    core: GatewayCore, log: EmbeddedLog
) -> None:
    turn = await core.start_turn(ACME, StartRequest("", "hi"))
    agent = Agent(log, turn)
    await agent.started()
    await agent.tokens([1, 2])
    await core.cancel(turn.info)
    await agent.tokens([3])  # the one token in flight when the cancel arrived
    await agent.finished(reason=4, last_seq=3)
    outputs = await collect(core.follow(turn))
    assert [seq for seq, _ in tokens(outputs)] == [1, 2, 3]
    assert finished(outputs).finish_reason is FinishReason.CANCELLED


async def cancels_on_log(log: EmbeddedLog, info: TurnInfo) -> int:
    end = await log.end_offset(TURN_EVENTS, info.partition)
    records = await log.read_range(TURN_EVENTS, info.partition, 0, end)
    events = [events_pb2.TurnEvent.FromString(r.value) for r in records]
    return sum(1 for e in events if e.cancelled.turn_id == info.turn_id)


async def test_cancel_is_idempotent(
    tmp_path: Path, core: GatewayCore, log: EmbeddedLog, conversations: KnownConversations
) -> None:
    # A running turn: concurrent and repeated cancels log one TurnCancelled.
    running = await core.start_turn(ACME, StartRequest("", "hi"))
    await asyncio.gather(*(core.cancel_turn(ACME, running.turn_id) for _ in range(5)))
    await core.cancel(running.info)
    assert await cancels_on_log(log, running.info) == 1
    # A finished turn: nothing at all, and still OK.
    done = await core.start_turn(ACME, StartRequest("", "hi"))
    agent = Agent(log, done)
    await agent.started()
    await agent.finished(last_seq=0)
    await collect(core.follow(done))
    for _ in range(20):
        assert await core.cancel_turn(ACME, done.turn_id) == done.turn_id
    assert await cancels_on_log(log, done.info) == 0
    # Another gateway that never saw either turn reads their ends from the log.
    async with GatewayCore(make_settings(tmp_path), log=log, conversations=conversations) as other:
        for info in (running.info, done.info):
            await other.cancel_turn(ACME, info.turn_id)
            await other.cancel_turn(ACME, info.turn_id)
        assert await cancels_on_log(log, running.info) == 1
        assert await cancels_on_log(log, done.info) == 0
    running.close()


async def test_a_slow_subscriber_falls_back_to_the_log_without_gaps(
    tmp_path: Path, log: EmbeddedLog, conversations: KnownConversations
) -> None:
    settings = make_settings(tmp_path, subscriber_buffer=8)
    async with GatewayCore(settings, log=log, conversations=conversations) as core:
        turn = await core.start_turn(ACME, StartRequest("", "hi"))
        fast = await core.resume_turn(ACME, turn.turn_id, 0)
        agent = Agent(log, turn)
        await agent.started()
        fast_outputs = asyncio.create_task(collect(core.follow(fast)))
        await agent.tokens(range(1, 301))
        await agent.finished(last_seq=300)
        # The fast reader finishes while the slow one has not read anything yet.
        fast_result = await fast_outputs
        assert [seq for seq, _ in tokens(fast_result)] == list(range(1, 301))
        assert turn.sub.lagging and turn.sub.overflows >= 1
        outputs = await collect(core.follow(turn))
        assert [seq for seq, _ in tokens(outputs)] == list(range(1, 301))
        assert finished(outputs).last_seq == 300


async def test_resume_replays_history_after_seq_then_goes_live(
    core: GatewayCore, log: EmbeddedLog
) -> None:
    turn = await core.start_turn(ACME, StartRequest("", "hi"))
    agent = Agent(log, turn)
    await agent.started()
    await agent.tokens(range(1, 11))
    turn.close()  # the client went away
    resumed = await core.resume_turn(ACME, turn.turn_id, 4)
    received: list[Output] = []

    async def follow() -> None:
        async for item in core.follow(resumed):
            received.append(item)

    task = asyncio.create_task(follow())
    for _ in range(200):
        if len(tokens(received)) >= 6:
            break
        await asyncio.sleep(0.01)
    assert [seq for seq, _ in tokens(received)] == list(range(5, 11))
    await agent.tokens(range(9, 16))  # overlaps the history: duplicates must not show
    await agent.finished(last_seq=15)
    await asyncio.wait_for(task, STEP_TIMEOUT_S)
    assert isinstance(received[0], Accepted) and received[0].queue_position == 0
    assert [seq for seq, _ in tokens(received)] == list(range(5, 16))
    assert finished(received).last_seq == 15


async def test_resume_of_a_finished_turn_replays_it(core: GatewayCore, log: EmbeddedLog) -> None:
    turn = await core.start_turn(ACME, StartRequest("", "hi"))
    agent = Agent(log, turn)
    await agent.tokens(range(1, 4))
    await agent.finished(last_seq=3)
    await collect(core.follow(turn))
    core._known = type(core._known)(10)  # forget it: the lookup must scan the log
    outputs = await collect(core.follow(await core.resume_turn(ACME, turn.turn_id, 0)))
    assert [seq for seq, _ in tokens(outputs)] == [1, 2, 3]


def runs(outputs: list[Output]) -> list[TokenRunOut]:
    assert not any(isinstance(o, TokenOut) for o in outputs), "a coalescing stream got a Token"
    return [o for o in outputs if isinstance(o, TokenRunOut)]


def run_tokens(outputs: list[Output]) -> list[tuple[int, str]]:
    return [(run.first_seq + i, text) for run in runs(outputs) for i, text in enumerate(run.texts)]


async def test_a_coalescing_resume_sends_a_finished_turn_in_few_runs(
    core: GatewayCore, log: EmbeddedLog
) -> None:
    turn = await core.start_turn(ACME, StartRequest("", "hi"))
    agent = Agent(log, turn)
    await agent.tokens(range(1, 601))
    await agent.finished(last_seq=600)
    await collect(core.follow(turn))
    resumed = await core.resume_turn(ACME, turn.turn_id, 100, coalesce=True)
    outputs = await collect(core.follow(resumed))
    assert run_tokens(outputs) == [(seq, f"{seq} ") for seq in range(101, 601)]
    # Everything was on the log already: runs are as full as the cap allows.
    assert len(runs(outputs)) <= 4, [len(r.texts) for r in runs(outputs)]
    assert max(len(r.texts) for r in runs(outputs)) <= 256
    assert finished(outputs).last_seq == 600


async def test_a_coalescing_start_streams_live_tokens_in_runs(
    core: GatewayCore, log: EmbeddedLog
) -> None:
    turn = await core.start_turn(ACME, StartRequest("", "hello", coalesce_tokens=True))
    agent = Agent(log, turn)
    received: list[Output] = []

    async def follow() -> None:
        async for item in core.follow(turn):
            received.append(item)

    task = asyncio.create_task(follow())
    await agent.started()
    await agent.tokens([1])  # alone: a run of one, sent without waiting for company
    for _ in range(200):
        if run_tokens(received):
            break
        await asyncio.sleep(0.01)
    assert run_tokens(received) == [(1, "1 ")]
    await agent.tokens(range(2, 41))
    await agent.finished(last_seq=40)
    await asyncio.wait_for(task, STEP_TIMEOUT_S)
    assert run_tokens(received) == [(seq, f"{seq} ") for seq in range(1, 41)]
    assert len(runs(received)) < 40
    assert finished(received).last_seq == 40


async def test_resume_refuses_other_tenants_and_unknown_turns(core: GatewayCore) -> None:
    turn = await core.start_turn(ACME, StartRequest("", "hi"))
    turn.close()
    with pytest.raises(NotFound) as other:
        await core.resume_turn(GLOBEX, turn.turn_id, 0)
    assert other.value.reason == "TURN_NOT_FOUND"
    core._known = type(core._known)(10)
    with pytest.raises(NotFound):
        await core.resume_turn(GLOBEX, turn.turn_id, 0)
    with pytest.raises(NotFound):
        await core.cancel_turn(GLOBEX, turn.turn_id)
    forged = turn.turn_id[:-16] + "0123456789abcdef"
    with pytest.raises(NotFound):
        await core.resume_turn(ACME, forged, 0)
    with pytest.raises(NotFound):
        await core.resume_turn(ACME, "t99.0.0.0123456789abcdef", 0)
    with pytest.raises(InvalidArgument) as malformed:
        await core.resume_turn(ACME, "not-a-turn", 0)
    assert malformed.value.reason == "TURN_ID_MALFORMED"
    with pytest.raises(InvalidArgument) as negative:
        await core.resume_turn(ACME, turn.turn_id, -1)
    assert negative.value.reason == "AFTER_SEQ_INVALID"


async def test_queue_position_counts_turns_ahead_until_started(
    core: GatewayCore, log: EmbeddedLog
) -> None:
    conversation = "c-queue"
    core._conversations.known.add(("acme", conversation))  # type: ignore[attr-defined]
    partition = partition_for(conversation.encode(), core.partitions)
    for _ in range(3):  # three turns of the same tenant ahead, not yet claimed by any agent
        await log.append(TURN_REQUESTS, partition, conversation.encode(), queued_request("acme"))
    turn = await core.start_turn(ACME, StartRequest(conversation, "hi"))
    received: list[Output] = []

    async def follow() -> None:
        async for item in core.follow(turn):
            received.append(item)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.2)
    first = received[0]
    assert isinstance(first, Accepted) and first.queue_position == 3
    agent = Agent(log, turn)
    await agent.started()
    await agent.tokens([1])
    await agent.finished(last_seq=1)
    await asyncio.wait_for(task, STEP_TIMEOUT_S)
    positions = [o.queue_position for o in received if isinstance(o, Accepted)]
    assert positions == [3, 0]


def queued_request(tenant: str) -> bytes:
    return turnlog.encode(
        turnlog.TurnRequested(
            turn_id=f"queued-{tenant}", conversation_id="c-other", tenant_id=tenant, user_text="x"
        )
    )


async def test_queue_position_is_fair_across_tenants(core: GatewayCore, log: EmbeddedLog) -> None:
    """Another tenant's burst ahead costs a single turn one place, not the whole burst."""
    conversation = "c-fair"
    core._conversations.known.add(("globex", conversation))  # type: ignore[attr-defined]
    partition = partition_for(conversation.encode(), core.partitions)
    for _ in range(20):
        await log.append(TURN_REQUESTS, partition, b"k", queued_request("acme"))
    turn = await core.start_turn(GLOBEX, StartRequest(conversation, "hi"))
    first = await anext(aiter(core.follow(turn)))
    assert isinstance(first, Accepted) and first.queue_position == 1
    turn.close()


async def test_a_full_queue_refuses_new_turns_with_retry_info(
    tmp_path: Path, log: EmbeddedLog, conversations: KnownConversations
) -> None:
    conversation = "c-full"
    conversations.known.add(("acme", conversation))
    async with GatewayCore(
        make_settings(tmp_path, max_queued_turns=3), log=log, conversations=conversations
    ) as small:
        partition = partition_for(conversation.encode(), small.partitions)
        for _ in range(3):
            await log.append(TURN_REQUESTS, partition, b"k", queued_request("acme"))
        with pytest.raises(ResourceExhausted) as full:
            await small.start_turn(ACME, StartRequest(conversation, "hi"))
        assert full.value.reason == "QUEUE_FULL"
        assert full.value.retry_after_s is not None and full.value.retry_after_s > 0
        assert "3 turns are already waiting" in str(full.value)


async def test_unknown_conversation_is_not_found(core: GatewayCore) -> None:
    with pytest.raises(NotFound) as missing:
        await core.start_turn(ACME, StartRequest("nope", "hi"))
    assert missing.value.reason == "CONVERSATION_NOT_FOUND"


async def test_the_directory_is_asked_once_per_conversation_and_tenant(
    core: GatewayCore, conversations: KnownConversations
) -> None:
    minted = await core.start_turn(ACME, StartRequest("", "first"))
    minted.close()
    conversation = minted.info.conversation_id
    (await core.start_turn(ACME, StartRequest(conversation, "second"))).close()
    assert conversations.asked == []  # minted here and logged: it exists
    with pytest.raises(NotFound):
        await core.start_turn(GLOBEX, StartRequest(conversation, "not yours"))
    conversations.known.add(("acme", "c-old"))
    for _ in range(3):
        (await core.start_turn(ACME, StartRequest("c-old", "again"))).close()
    assert conversations.asked == [("globex", conversation), ("acme", "c-old")]


async def test_same_request_id_returns_the_same_turn(core: GatewayCore) -> None:
    first = await core.start_turn(ACME, StartRequest("", "hi", request_id="once"))
    again = await core.start_turn(ACME, StartRequest("", "hi", request_id="once"))
    other_tenant = await core.start_turn(GLOBEX, StartRequest("", "hi", request_id="once"))
    assert again.turn_id == first.turn_id and not again.owner
    assert other_tenant.turn_id != first.turn_id
    for turn in (first, again, other_tenant):
        turn.close()


async def test_concurrent_retries_with_one_request_id_make_one_turn(core: GatewayCore) -> None:
    turns = await asyncio.gather(
        *(core.start_turn(ACME, StartRequest("", "hi", request_id="burst")) for _ in range(5))
    )
    assert len({turn.turn_id for turn in turns}) == 1
    for turn in turns:
        turn.close()


async def test_rate_limit_counts_turn_starts(
    tmp_path: Path, log: EmbeddedLog, conversations: KnownConversations
) -> None:
    limiter = RateLimiter(0.5, 2)
    async with GatewayCore(
        make_settings(tmp_path), log=log, conversations=conversations, limiter=limiter
    ) as core:
        for _ in range(2):
            (await core.start_turn(ACME, StartRequest("", "hi"))).close()
        with pytest.raises(ResourceExhausted) as limited:
            await core.start_turn(ACME, StartRequest("", "hi"))
        assert limited.value.reason == "RATE_LIMITED"
        assert limited.value.retry_after_s is not None and 0 < limited.value.retry_after_s <= 2
        (await core.start_turn(GLOBEX, StartRequest("", "hi"))).close()


async def test_draining_refuses_new_turns(core: GatewayCore) -> None:
    core.begin_drain()
    with pytest.raises(Unavailable) as draining:
        await core.start_turn(ACME, StartRequest("", "hi"))
    assert draining.value.reason == "DRAINING"


async def test_stream_slots_are_bounded(
    tmp_path: Path, log: EmbeddedLog, conversations: KnownConversations
) -> None:
    async with GatewayCore(
        make_settings(tmp_path, max_streams=2), log=log, conversations=conversations
    ) as core:
        with core.stream_slot("acme"), core.stream_slot("globex"):
            with pytest.raises(ResourceExhausted) as full:
                with core.stream_slot("initech"):
                    pass
            assert full.value.reason == "TOO_MANY_STREAMS"
            assert full.value.retry_after_s is not None
        with core.stream_slot("acme"):
            assert core.open_streams == 1


async def test_a_tenant_cannot_hold_every_stream_slot(
    tmp_path: Path, log: EmbeddedLog, conversations: KnownConversations
) -> None:
    settings = make_settings(tmp_path, max_streams=5, max_streams_per_tenant=2)
    async with GatewayCore(settings, log=log, conversations=conversations) as core:
        with core.stream_slot("acme"), core.stream_slot("acme"):
            with pytest.raises(ResourceExhausted) as own:
                with core.stream_slot("acme"):
                    pass
            assert own.value.reason == "TENANT_STREAM_LIMIT"
            assert own.value.quota_subject == "tenant:acme"
            assert own.value.retry_after_s is not None
            assert "MAX_STREAMS_PER_TENANT=2" in own.value.message
            assert core.tenant_streams("acme") == 2
            # Another tenant still gets its streams.
            with core.stream_slot("globex"), core.stream_slot("globex"):
                assert core.open_streams == 4
        assert core.tenant_streams("acme") == 0 and core.open_streams == 0


async def test_a_tenant_gets_only_its_share_of_a_partition_queue(
    tmp_path: Path, log: EmbeddedLog, conversations: KnownConversations
) -> None:
    conversation = "c-share"
    conversations.known.update({("acme", conversation), ("globex", conversation)})
    settings = make_settings(tmp_path, max_queued_turns=10, max_queued_turns_per_tenant=3)
    async with GatewayCore(settings, log=log, conversations=conversations) as core:
        partition = partition_for(conversation.encode(), core.partitions)
        for _ in range(3):
            await log.append(TURN_REQUESTS, partition, b"k", queued_request("acme"))
        with pytest.raises(ResourceExhausted) as share:
            await core.start_turn(ACME, StartRequest(conversation, "hi"))
        assert share.value.reason == "TENANT_QUEUE_FULL"
        assert share.value.quota_subject == "tenant:acme"
        assert share.value.retry_after_s is not None and share.value.retry_after_s > 0
        assert "3 unfinished turns" in share.value.message
        assert "MAX_QUEUED_TURNS_PER_TENANT=3" in share.value.message
        turn = await core.start_turn(GLOBEX, StartRequest(conversation, "hi"))
        turn.close()


async def test_concurrent_starts_cannot_overrun_the_tenant_share(
    tmp_path: Path, log: EmbeddedLog, conversations: KnownConversations
) -> None:
    """The share holds between queue reads: a burst of starts gets exactly what is left."""
    conversation = "c-burst"
    conversations.known.add(("acme", conversation))
    settings = make_settings(
        tmp_path, max_queued_turns_per_tenant=2, queue_poll_s=60.0, rate_burst=100
    )
    async with GatewayCore(settings, log=log, conversations=conversations) as core:
        results = await asyncio.gather(
            *(core.start_turn(ACME, StartRequest(conversation, f"hi {i}")) for i in range(6)),
            return_exceptions=True,
        )
        accepted = [r for r in results if isinstance(r, TurnStream)]
        refused = [r for r in results if isinstance(r, ResourceExhausted)]
        assert (len(accepted), len(refused)) == (2, 4), results
        assert {r.reason for r in refused} == {"TENANT_QUEUE_FULL"}
        # Sequential starts after the burst still see the two (the cached read does not).
        with pytest.raises(ResourceExhausted):
            await core.start_turn(ACME, StartRequest(conversation, "later"))
        for turn in accepted:
            turn.close()


# -- the Chat session ----------------------------------------------------------------------------


class Frames:
    """The client side of a Chat session: frames go in, outputs come out."""

    def __init__(self, core: GatewayCore, principal: Principal = ACME) -> None:
        self._queue: asyncio.Queue[Frame | None] = asyncio.Queue()
        self.outputs: asyncio.Queue[Output] = asyncio.Queue()
        self._task = asyncio.create_task(self._run(core, principal))

    async def _frames(self) -> AsyncIterator[Frame]:
        while (frame := await self._queue.get()) is not None:
            yield frame

    async def _run(self, core: GatewayCore, principal: Principal) -> None:
        async for output in core.chat_session(principal).run(self._frames()):
            await self.outputs.put(output)

    def send(self, frame: Frame) -> None:
        self._queue.put_nowait(frame)

    async def next(self) -> Output:
        return await asyncio.wait_for(self.outputs.get(), STEP_TIMEOUT_S)

    async def next_error(self) -> FrameError:
        output = await self.next()
        assert isinstance(output, FrameError), output
        return output

    async def nothing_for(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        assert self.outputs.empty(), self.outputs.get_nowait()

    async def close(self) -> None:
        self._queue.put_nowait(None)
        await asyncio.wait_for(self._task, STEP_TIMEOUT_S)


async def test_chat_frames_before_a_start_are_reported_and_the_stream_stays_usable(
    core: GatewayCore, log: EmbeddedLog
) -> None:
    chat = Frames(core)
    chat.send(CreditFrame(10))
    assert (await chat.next_error()).error.reason == "NO_ACTIVE_TURN"
    chat.send(CancelFrame())
    assert (await chat.next_error()).error.reason == "NO_ACTIVE_TURN"
    chat.send(EmptyFrame())
    assert (await chat.next_error()).error.reason == "FRAME_EMPTY"
    chat.send(StartFrame(StartRequest("", "")))
    assert (await chat.next_error()).error.reason == "TEXT_EMPTY"
    chat.send(StartFrame(StartRequest("", "hello")))
    accepted = await chat.next()
    assert isinstance(accepted, Accepted)
    chat.send(StartFrame(StartRequest("", "again")))
    busy = await chat.next_error()
    assert busy.error.reason == "TURN_IN_PROGRESS" and busy.turn_id == accepted.turn_id
    chat.send(CreditFrame(0))
    assert (await chat.next_error()).error.reason == "CREDIT_INVALID"
    chat.send(ResumeFrame("t0.0.0.zz", 0))
    assert (await chat.next_error()).error.reason == "TURN_IN_PROGRESS"
    chat.send(CancelFrame())
    done = await chat.next()
    assert isinstance(done, FinishedOut) and done.finish_reason is FinishReason.CANCELLED
    # The stream goes on: a second turn.
    chat.send(StartFrame(StartRequest("", "second")))
    second = await chat.next()
    assert isinstance(second, Accepted) and second.turn_id != accepted.turn_id
    chat.send(CancelFrame(second.turn_id))
    assert isinstance(await chat.next(), FinishedOut)
    await chat.close()


async def chat_with_ten_logged_tokens(
    core: GatewayCore, log: EmbeddedLog, start: StartRequest
) -> Frames:
    """A Chat session that started a turn whose ten tokens and finish are already logged."""
    chat = Frames(core)
    chat.send(StartFrame(start))
    accepted = await chat.next()
    assert isinstance(accepted, Accepted)
    info = core._known.get(accepted.turn_id)
    assert info is not None
    agent = Agent(log, info)
    await agent.started()
    await agent.tokens(range(1, 11))
    await agent.finished(last_seq=10)
    return chat


async def test_chat_credit_window_holds_tokens_back(
    tmp_path: Path, log: EmbeddedLog, conversations: KnownConversations
) -> None:
    async with GatewayCore(
        make_settings(tmp_path, initial_window=3), log=log, conversations=conversations
    ) as core:
        chat = await chat_with_ten_logged_tokens(core, log, StartRequest("", "hello"))
        got = [await chat.next() for _ in range(3)]
        assert [o.seq for o in got if isinstance(o, TokenOut)] == [1, 2, 3]
        await chat.nothing_for(0.2)
        chat.send(CreditFrame(5))
        got = [await chat.next() for _ in range(5)]
        assert [o.seq for o in got if isinstance(o, TokenOut)] == [4, 5, 6, 7, 8]
        await chat.nothing_for(0.1)
        chat.send(CreditFrame(100))
        rest = [await chat.next() for _ in range(3)]
        assert [o.seq for o in rest if isinstance(o, TokenOut)] == [9, 10]
        assert isinstance(rest[-1], FinishedOut)
        await chat.close()


async def test_chat_runs_respect_the_credit_window(
    tmp_path: Path, log: EmbeddedLog, conversations: KnownConversations
) -> None:
    async with GatewayCore(
        make_settings(tmp_path, initial_window=3), log=log, conversations=conversations
    ) as core:
        start = StartRequest("", "hello", coalesce_tokens=True)
        chat = await chat_with_ten_logged_tokens(core, log, start)
        got: list[Output] = []
        while sum(len(r.texts) for r in runs(got)) < 3:
            got.append(await chat.next())
        assert run_tokens(got) == [(1, "1 "), (2, "2 "), (3, "3 ")]
        await chat.nothing_for(0.2)
        chat.send(CreditFrame(100))
        rest: list[Output] = []
        while not rest or not isinstance(rest[-1], FinishedOut):
            rest.append(await chat.next())
        assert [seq for seq, _ in run_tokens(rest)] == list(range(4, 11))
        await chat.close()


async def test_chat_resume_frame_attaches_to_a_turn(core: GatewayCore, log: EmbeddedLog) -> None:
    turn = await core.start_turn(ACME, StartRequest("", "hello"))
    agent = Agent(log, turn)
    await agent.tokens(range(1, 6))
    await agent.finished(last_seq=5)
    turn.close()
    chat = Frames(core)
    chat.send(ResumeFrame(turn.turn_id, 2))
    outputs = [await chat.next() for _ in range(5)]
    assert isinstance(outputs[0], Accepted)
    assert [o.seq for o in outputs if isinstance(o, TokenOut)] == [3, 4, 5]
    assert isinstance(outputs[-1], FinishedOut)
    other = Frames(core, GLOBEX)
    other.send(ResumeFrame(turn.turn_id, 0))
    assert (await other.next_error()).error.reason == "TURN_NOT_FOUND"
    await chat.close()
    await other.close()


async def test_chat_half_close_lets_the_running_turn_finish(
    core: GatewayCore, log: EmbeddedLog
) -> None:
    chat = Frames(core)
    chat.send(StartFrame(StartRequest("", "hello")))
    accepted = await chat.next()
    assert isinstance(accepted, Accepted)
    info = core._known.get(accepted.turn_id)
    assert info is not None
    closing = asyncio.create_task(chat.close())
    agent = Agent(log, info)
    await agent.tokens([1, 2])
    await agent.finished(last_seq=2)
    await closing
    outputs = [chat.outputs.get_nowait() for _ in range(chat.outputs.qsize())]
    assert [o.seq for o in outputs if isinstance(o, TokenOut)] == [1, 2]
    assert isinstance(outputs[-1], FinishedOut)


async def test_a_key_with_a_stream_limit_leaves_its_tenants_other_keys_their_streams(
    tmp_path: Path, log: EmbeddedLog, conversations: KnownConversations
) -> None:
    settings = make_settings(tmp_path, max_streams=10, max_streams_per_tenant=4)
    limited = Principal("acme", hash_key("acme-limited"), max_streams=1)
    async with GatewayCore(settings, log=log, conversations=conversations) as core:
        with core.stream_slot("acme", limited):
            with pytest.raises(ResourceExhausted) as own:
                with core.stream_slot("acme", limited):
                    pass
            assert own.value.reason == "KEY_STREAM_LIMIT"
            assert own.value.quota_subject == f"key:{limited.key_id}"
            assert own.value.retry_after_s is not None
            # The refusal held nothing: the tenant's other keys get the rest of its share.
            assert core.tenant_streams("acme") == 1
            with core.stream_slot("acme", ACME), core.stream_slot("acme", ACME):
                with core.stream_slot("acme", ACME):
                    with pytest.raises(ResourceExhausted) as tenant:
                        with core.stream_slot("acme", ACME):
                            pass
                    assert tenant.value.reason == "TENANT_STREAM_LIMIT"
        # Closed streams give the key its slot back.
        with core.stream_slot("acme", limited):
            assert core.open_streams == 1


async def test_a_key_refused_by_its_tenants_limit_keeps_no_slot(
    tmp_path: Path, log: EmbeddedLog, conversations: KnownConversations
) -> None:
    settings = make_settings(tmp_path, max_streams=10, max_streams_per_tenant=1)
    limited = Principal("acme", hash_key("acme-limited"), max_streams=1)
    async with GatewayCore(settings, log=log, conversations=conversations) as core:
        with core.stream_slot("acme", ACME):
            with pytest.raises(ResourceExhausted) as tenant:
                with core.stream_slot("acme", limited):
                    pass
            assert tenant.value.reason == "TENANT_STREAM_LIMIT"
        with core.stream_slot("acme", limited):  # its key slot was given back
            pass

"""The whole mesh end to end: four real service processes, real PostgreSQL, real llama.cpp
(the tiny generated model), the embedded log. Each test talks to the gateway like a client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import grpc
import pytest
from chat.common.v1 import common_pb2, conversation_pb2
from chat.events.v1 import events_pb2
from chat.gateway.v1 import gateway_pb2

from mesh.log import TURN_EVENTS
from mesh.log.embedded import EmbeddedLog
from mesh.turn_ids import parse_turn_id
from tests.fixtures.mesh import RunningMesh
from tests.integration.grpc_helpers import (
    ChatSession,
    TurnResult,
    auth,
    error_reason,
    gateway,
    retry_delay_s,
    rich_status,
    start_request,
    stream_turn,
)

pytestmark = pytest.mark.integration

FINISHED_NORMALLY = {common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP}


@pytest.fixture
def stub(running_mesh: RunningMesh) -> Iterator[object]:
    with grpc.insecure_channel(running_mesh.gateway_addr) as channel:
        yield gateway(channel)


def assert_gap_free(result: TurnResult, first: int = 1) -> None:
    assert result.seqs == list(range(first, first + len(result.seqs))), result.seqs


def turn_events(running_mesh: RunningMesh, turn_id: str) -> list[events_pb2.TurnEvent]:
    """Every record of a turn on the event log, in log order."""
    ref = parse_turn_id(turn_id)

    async def read() -> list[events_pb2.TurnEvent]:
        async with EmbeddedLog(running_mesh.state_dir / "log" / "mesh-log.sqlite3") as log:
            end = await log.end_offset(TURN_EVENTS, ref.partition)
            records = await log.read_range(TURN_EVENTS, ref.partition, ref.events_start, end)
        events = []
        for record in records:
            event = events_pb2.TurnEvent()
            event.ParseFromString(record.value)
            kind = event.WhichOneof("event")
            if getattr(event, kind).turn_id == turn_id:
                events.append(event)
        return events

    return asyncio.run(read())


def test_full_turn_streams_gap_free_tokens(running_mesh: RunningMesh, stub: object) -> None:
    result = stream_turn(
        stub, running_mesh.api_key, start_request("Hello there", max_tokens=12, seed=7)
    )
    assert result.turn_id and result.conversation_id
    assert result.tokens, "no tokens streamed"
    assert_gap_free(result)
    assert result.finished is not None
    assert result.finished.finish_reason in FINISHED_NORMALLY
    assert result.finished.last_seq == len(result.tokens)
    assert result.finished.usage.completion_tokens == len(result.tokens)
    assert result.finished.usage.prompt_tokens > 0
    assert result.finished.timings.time_to_first_token_ms > 0
    assert result.finished.timings.total_ms >= result.finished.timings.time_to_first_token_ms


def test_chat_stream_runs_consecutive_turns(running_mesh: RunningMesh, stub: object) -> None:
    session = ChatSession(stub, running_mesh.api_key)  # type: ignore[arg-type]
    try:
        conversation = ""
        for text in ("first question", "second question"):
            session.send(
                gateway_pb2.ChatRequest(start=start_request(text, conversation, max_tokens=6))
            )
            result = TurnResult()
            while result.finished is None:
                result.add(session.next())
            conversation = result.conversation_id
            assert_gap_free(result)
        history = stub.GetConversation(  # type: ignore[attr-defined]
            gateway_pb2.GetConversationRequest(conversation_id=conversation),
            metadata=auth(running_mesh.api_key),
        ).conversation
        assert [m.role for m in history.messages] == [
            conversation_pb2.ROLE_USER,
            conversation_pb2.ROLE_ASSISTANT,
            conversation_pb2.ROLE_USER,
            conversation_pb2.ROLE_ASSISTANT,
        ]
    finally:
        session.close()


def test_cancel_stops_generation_within_one_token(running_mesh: RunningMesh, stub: object) -> None:
    session = ChatSession(stub, running_mesh.api_key)  # type: ignore[arg-type]
    try:
        session.send(
            gateway_pb2.ChatRequest(start=start_request("talk for a long time", max_tokens=2000))
        )
        result = TurnResult()
        while len(result.tokens) < 3:
            result.add(session.next())
        session.send(gateway_pb2.ChatRequest(cancel=gateway_pb2.CancelTurn(turn_id=result.turn_id)))
        while result.finished is None:
            result.add(session.next())
    finally:
        session.close()
    assert result.finished.finish_reason == common_pb2.FINISH_REASON_CANCELLED
    assert result.finished.last_seq < 2000
    assert_gap_free(result)
    # On the log: the turn ends cancelled, and once the agent saw the cancel it emitted at most
    # one more token (how many were emitted while the cancel travelled the log depends on the
    # model's speed, not on the agent).
    events = turn_events(running_mesh, result.turn_id)
    kinds = [event.WhichOneof("event") for event in events]
    assert "cancelled" in kinds
    finished = [e.finished for e in events if e.WhichOneof("event") == "finished"]
    assert finished and finished[0].finish_reason == common_pb2.FINISH_REASON_CANCELLED
    assert finished[0].cancel_seen_at_seq >= 3
    assert finished[0].last_seq - finished[0].cancel_seen_at_seq <= 1, finished[0]
    assert kinds[-1] == "finished"


def test_dropped_client_resumes_without_gap_or_duplicate(
    running_mesh: RunningMesh, stub: object
) -> None:
    call = stub.StreamTurn(  # type: ignore[attr-defined]
        gateway_pb2.StreamTurnRequest(
            start=start_request("tell me a story", max_tokens=40, seed=3)
        ),
        metadata=auth(running_mesh.api_key),
        timeout=60,
    )
    first = TurnResult()
    for frame in call:
        first.add(frame)
        if len(first.tokens) == 5:
            break
    call.cancel()  # the client drops mid-turn
    resumed = TurnResult()
    for frame in stub.ResumeTurn(  # type: ignore[attr-defined]
        gateway_pb2.ResumeTurnRequest(turn_id=first.turn_id, after_seq=5),
        metadata=auth(running_mesh.api_key),
        timeout=60,
    ):
        resumed.add(frame)
    assert first.seqs == [1, 2, 3, 4, 5]
    assert_gap_free(resumed, first=6)
    assert resumed.finished is not None
    assert resumed.finished.last_seq == 5 + len(resumed.tokens)
    # A full replay from 0 gives exactly the same text.
    replay = TurnResult()
    for frame in stub.ResumeTurn(  # type: ignore[attr-defined]
        gateway_pb2.ResumeTurnRequest(turn_id=first.turn_id, after_seq=0),
        metadata=auth(running_mesh.api_key),
        timeout=60,
    ):
        replay.add(frame)
    assert replay.text == first.text + resumed.text


def test_coalescing_streams_carry_the_same_tokens_in_fewer_frames(
    running_mesh: RunningMesh, stub: object
) -> None:
    start = start_request("coalesce me", max_tokens=40, seed=5)
    start.coalesce_tokens = True
    live = stream_turn(stub, running_mesh.api_key, start)
    assert live.finished is not None
    assert_gap_free(live)
    assert live.finished.last_seq == len(live.tokens) > 10, live.finished
    # The finished turn is all on the log: a coalescing replay needs a single frame for it.
    replay = TurnResult()
    for frame in stub.ResumeTurn(  # type: ignore[attr-defined]
        gateway_pb2.ResumeTurnRequest(turn_id=live.turn_id, after_seq=0, coalesce_tokens=True),
        metadata=auth(running_mesh.api_key),
        timeout=60,
    ):
        assert frame.WhichOneof("frame") != "token", "a coalescing stream got a Token frame"
        replay.add(frame)
    assert [(t.seq, t.text) for t in replay.tokens] == [(t.seq, t.text) for t in live.tokens]
    assert replay.token_frames == 1, replay.token_frames
    # The same through a Chat stream's resume frame, from the middle.
    session = ChatSession(stub, running_mesh.api_key)  # type: ignore[arg-type]
    try:
        session.send(
            gateway_pb2.ChatRequest(
                resume=gateway_pb2.ResumeTurn(
                    turn_id=live.turn_id, after_seq=10, coalesce_tokens=True
                )
            )
        )
        tail = TurnResult()
        while tail.finished is None:
            tail.add(session.next())
    finally:
        session.close()
    assert [(t.seq, t.text) for t in tail.tokens] == [(t.seq, t.text) for t in live.tokens[10:]]
    assert tail.token_frames == 1


def test_persisted_conversation_equals_stream(running_mesh: RunningMesh, stub: object) -> None:
    result = stream_turn(
        stub, running_mesh.api_key, start_request("persist me", max_tokens=20, seed=11)
    )
    deadline = time.monotonic() + 20
    while True:
        conversation = stub.GetConversation(  # type: ignore[attr-defined]
            gateway_pb2.GetConversationRequest(conversation_id=result.conversation_id),
            metadata=auth(running_mesh.api_key),
        ).conversation
        if len(conversation.messages) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    user, assistant = conversation.messages
    assert user.role == conversation_pb2.ROLE_USER and user.text == "persist me"
    assert assistant.role == conversation_pb2.ROLE_ASSISTANT
    assert assistant.text == result.text
    assert assistant.turn_id == result.turn_id


def test_fact_from_earlier_turn_is_recalled_into_later_prompt(
    running_mesh: RunningMesh, stub: object
) -> None:
    fact = "my locker code is zebra4711"
    stream_turn(
        stub, running_mesh.api_key, start_request(f"Please remember: {fact}.", max_tokens=4)
    )
    # A new conversation: the fact can only come from memory, not from history.
    later = stream_turn(
        stub, running_mesh.api_key, start_request("What is my locker code zebra4711?", max_tokens=4)
    )
    prompts = [
        json.loads(line)
        for line in (running_mesh.state_dir / "prompts.jsonl").read_text().splitlines()
    ]
    prompt = next(p["prompt"] for p in prompts if p["turn_id"] == later.turn_id)
    assert fact in prompt
    # Tenant isolation: the other tenant asking the same never gets the fact.
    other = stream_turn(
        stub,
        running_mesh.other_api_key,
        start_request("What is my locker code zebra4711?", max_tokens=4),
    )
    prompts = [
        json.loads(line)
        for line in (running_mesh.state_dir / "prompts.jsonl").read_text().splitlines()
    ]
    other_prompt = next(p["prompt"] for p in prompts if p["turn_id"] == other.turn_id)
    assert fact not in other_prompt


# -- bad input --------------------------------------------------------------------------------


def expect_error(call: object, code: grpc.StatusCode, reason: str | None = None) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        result = call()  # type: ignore[operator]
        if hasattr(result, "__iter__"):
            list(result)
    error = caught.value
    assert error.code() == code, (error.code(), error.details())  # type: ignore[attr-defined]
    assert error.details()  # type: ignore[attr-defined]
    if reason is not None:
        assert error_reason(rich_status(error)) == reason


@pytest.mark.parametrize(
    ("start", "reason"),
    [
        (start_request(""), "TEXT_EMPTY"),
        (start_request("x" * 20_000), "TEXT_TOO_LONG"),
        (start_request("hi", max_tokens=-1), None),
        (start_request("hi", temperature=3.0), None),
        (start_request("hi", top_p=0.0), None),
    ],
)
def test_invalid_start_is_invalid_argument(
    running_mesh: RunningMesh, stub: object, start: gateway_pb2.StartTurn, reason: str | None
) -> None:
    expect_error(
        lambda: stream_turn(stub, running_mesh.api_key, start),
        grpc.StatusCode.INVALID_ARGUMENT,
        reason,
    )


def test_unknown_and_foreign_conversation_are_not_found(
    running_mesh: RunningMesh, stub: object
) -> None:
    mine = stream_turn(stub, running_mesh.api_key, start_request("mine", max_tokens=2))
    for key, conversation in (
        (running_mesh.api_key, "c-does-not-exist"),
        (running_mesh.other_api_key, mine.conversation_id),
    ):
        expect_error(
            lambda key=key, conversation=conversation: stream_turn(
                stub, key, start_request("hi", conversation, max_tokens=2)
            ),
            grpc.StatusCode.NOT_FOUND,
            "CONVERSATION_NOT_FOUND",
        )
        expect_error(
            lambda key=key, conversation=conversation: stub.GetConversation(  # type: ignore[attr-defined]
                gateway_pb2.GetConversationRequest(conversation_id=conversation),
                metadata=auth(key),
            ),
            grpc.StatusCode.NOT_FOUND,
        )
    listed = stub.ListConversations(  # type: ignore[attr-defined]
        gateway_pb2.ListConversationsRequest(page_size=100),
        metadata=auth(running_mesh.other_api_key),
    )
    assert mine.conversation_id not in {c.conversation_id for c in listed.conversations}


def test_unknown_foreign_and_malformed_turns(running_mesh: RunningMesh, stub: object) -> None:
    mine = stream_turn(stub, running_mesh.api_key, start_request("turn", max_tokens=2))
    ref = parse_turn_id(mine.turn_id)
    unknown = f"t{ref.partition}.{ref.request_start}.{ref.events_start}.0000000000000000"
    cases = [
        (running_mesh.other_api_key, mine.turn_id, grpc.StatusCode.NOT_FOUND),
        (running_mesh.api_key, unknown, grpc.StatusCode.NOT_FOUND),
        (running_mesh.api_key, "not-a-turn", grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for key, turn_id, code in cases:
        expect_error(
            lambda key=key, turn_id=turn_id: stub.ResumeTurn(  # type: ignore[attr-defined]
                gateway_pb2.ResumeTurnRequest(turn_id=turn_id), metadata=auth(key), timeout=20
            ),
            code,
        )
        expect_error(
            lambda key=key, turn_id=turn_id: stub.CancelTurn(  # type: ignore[attr-defined]
                gateway_pb2.CancelTurnRequest(turn_id=turn_id), metadata=auth(key), timeout=20
            ),
            code,
        )


def test_missing_and_invalid_api_key(running_mesh: RunningMesh, stub: object) -> None:
    expect_error(
        lambda: stub.StreamTurn(gateway_pb2.StreamTurnRequest(start=start_request("hi"))),  # type: ignore[attr-defined]
        grpc.StatusCode.UNAUTHENTICATED,
        "API_KEY_MISSING",
    )
    expect_error(
        lambda: stream_turn(stub, "not-a-real-key", start_request("hi")),
        grpc.StatusCode.UNAUTHENTICATED,
        "API_KEY_INVALID",
    )


def test_rate_limit_is_resource_exhausted_with_retry_info(
    running_mesh: RunningMesh, stub: object
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        for _ in range(5):  # burst 2 at 0.2 turns/s
            stream_turn(stub, running_mesh.limited_api_key, start_request("hi", max_tokens=1))
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    status = rich_status(error)
    assert error_reason(status) == "RATE_LIMITED"
    delay = retry_delay_s(status)
    assert delay is not None and delay > 0


def test_malformed_frame_order_on_chat_stream(running_mesh: RunningMesh, stub: object) -> None:
    session = ChatSession(stub, running_mesh.api_key)  # type: ignore[arg-type]
    try:
        session.send(gateway_pb2.ChatRequest(cancel=gateway_pb2.CancelTurn()))
        frame = session.next()
        assert frame.WhichOneof("frame") == "error"
        assert frame.error.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert error_reason(frame.error.status) == "NO_ACTIVE_TURN"
        # The stream stays usable: a start, then a second start while the first runs.
        session.send(gateway_pb2.ChatRequest(start=start_request("one", max_tokens=50)))
        session.send(gateway_pb2.ChatRequest(start=start_request("two", max_tokens=2)))
        result, errors = TurnResult(), []
        while result.finished is None:
            frame = session.next()
            if frame.WhichOneof("frame") == "error":
                errors.append(frame.error.status)
            else:
                result.add(frame)
        assert [error_reason(s) for s in errors] == ["TURN_IN_PROGRESS"]
        assert_gap_free(result)
    finally:
        session.close()

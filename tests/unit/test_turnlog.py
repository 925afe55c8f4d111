"""The turn log's shared model (mesh.turnlog): codec round trips, wire format, duplicates rule."""

from __future__ import annotations

import pytest
from chat.common.v1 import common_pb2
from chat.events.v1 import events_pb2
from google.rpc import status_pb2

from mesh.errors import MeshError, to_status_proto
from mesh.generation import FinishReason, GenerationOptions, TokenUsage, TurnTimings
from mesh.turnlog import (
    Attempts,
    FirstWins,
    TokenEmitted,
    TurnCancelled,
    TurnFinished,
    TurnRequested,
    TurnStarted,
    UndecodableRecord,
    decode_events,
    decode_request,
    encode,
)


def test_log_records_round_trip() -> None:
    requested = TurnRequested(
        turn_id="t1.2.3.0123456789abcdef",
        conversation_id="c",
        tenant_id="acme",
        user_text="hi",
        options=GenerationOptions(max_tokens=3),
        request_id="r",
        accepted_at_ns=1_700_000_000_000_000_000,
        events_start_offset=3,
        events_partition=1,
    )
    value = encode(requested)
    assert decode_request(value) == requested
    with pytest.raises(UndecodableRecord):
        decode_request(b"\xff\xff")
    message = events_pb2.TurnRequested.FromString(value)
    assert message.accepted_at.seconds == 1_700_000_000 and message.options.max_tokens == 3
    cancelled = decode_events(encode(TurnCancelled("t", "c", "acme")))
    assert cancelled == [TurnCancelled("t", "c", "acme")]
    token = events_pb2.TurnEvent(token=events_pb2.TokenEmitted(turn_id="t", seq=4, text="x"))
    assert decode_events(token.SerializeToString(), turns={"other"}) == []
    [view] = decode_events(token.SerializeToString(), turns={"t"})
    assert isinstance(view, TokenEmitted) and (view.seq, view.text) == (4, "x")
    error = status_pb2.Status(code=13, message="boom")
    finished = events_pb2.TurnEvent(
        finished=events_pb2.TurnFinished(turn_id="t", finish_reason=5, last_seq=4, error=error)
    )
    [done] = decode_events(finished.SerializeToString())
    assert isinstance(done, TurnFinished) and done.finish_reason == FinishReason.ERROR
    assert status_pb2.Status.FromString(done.error_status).message == "boom"
    with pytest.raises(UndecodableRecord):
        decode_events(b"\xff\xff\xff")
    assert decode_events(b"") == []


def test_request_without_accepted_at_reads_as_none() -> None:
    value = events_pb2.TurnRequested(turn_id="t").SerializeToString()
    assert decode_request(value) == TurnRequested("t")
    assert not events_pb2.TurnRequested.FromString(encode(TurnRequested("t"))).HasField(
        "accepted_at"
    )


@pytest.mark.parametrize(
    "event",
    [
        TurnStarted("t", "c", "a", "agent-1", 2, 40, 3),
        TokenEmitted("t", 7, "wo", "c", "a"),
        TokenEmitted("t", 1, ""),
        TurnCancelled("t", "c", "a"),
        TurnFinished("t"),
        TurnFinished(
            "t",
            FinishReason.CANCELLED,
            TokenUsage(5, 6),
            TurnTimings(1.0, 2.0, 3.0, 4.5),
            to_status_proto(MeshError("boom", reason="GENERATION_FAILED")).SerializeToString(),
            "c",
            "a",
            6,
            "tiny",
            5,
        ),
    ],
)
def test_every_event_round_trips(event: object) -> None:
    value = encode(event)  # type: ignore[arg-type]
    assert decode_events(value) == [event]
    assert decode_events(value, turns={"t"}) == [event]
    assert decode_events(value, turns=()) == []


def test_wire_format_matches_the_proto() -> None:
    # The bytes every earlier version of the services wrote for these events.
    usage = TokenUsage(2, 3)
    timings = TurnTimings(1.0, 2.0, 3.0, 4.0)
    status = to_status_proto(MeshError("boom", reason="GENERATION_FAILED"))
    expected = events_pb2.TurnEvent(
        finished=events_pb2.TurnFinished(
            turn_id="t",
            finish_reason=5,
            usage=common_pb2.TokenUsage(prompt_tokens=2, completion_tokens=3),
            timings=common_pb2.TurnTimings(
                queued_ms=1.0, retrieval_ms=2.0, time_to_first_token_ms=3.0, total_ms=4.0
            ),
            error=status,
            conversation_id="c",
            tenant_id="a",
            last_seq=3,
            model="m",
        )
    ).SerializeToString()
    event = TurnFinished(
        "t", FinishReason.ERROR, usage, timings, status.SerializeToString(), "c", "a", 3, "m"
    )
    assert encode(event) == expected
    # Usage and timings are written even when zero: readers have always found them set.
    bare = events_pb2.TurnEvent.FromString(encode(TurnFinished("t"))).finished
    assert bare.HasField("usage") and bare.HasField("timings") and not bare.HasField("error")
    assert encode(TokenEmitted("t", 1, "a", "c", "x")) == (
        events_pb2.TurnEvent(
            token=events_pb2.TokenEmitted(
                turn_id="t", seq=1, text="a", conversation_id="c", tenant_id="x"
            )
        ).SerializeToString()
    )


def test_finish_reason_newer_than_this_code_survives() -> None:
    value = events_pb2.TurnEvent(
        finished=events_pb2.TurnFinished(turn_id="t", finish_reason=42)  # type: ignore[arg-type]
    ).SerializeToString()
    [done] = decode_events(value)
    assert isinstance(done, TurnFinished) and done.finish_reason == 42
    assert events_pb2.TurnEvent.FromString(encode(done)).finished.finish_reason == 42


def test_first_record_per_key_wins() -> None:
    tokens: FirstWins[tuple[str, int], str] = FirstWins()
    assert tokens.offer(("t", 1), "first")
    assert not tokens.offer(("t", 1), "zombie")
    assert tokens.offer(("t", 2), "second")
    assert tokens.offer(("u", 1), "other turn")
    assert tokens == {("t", 1): "first", ("t", 2): "second", ("u", 1): "other turn"}
    assert list(tokens.values()) == ["first", "second", "other turn"]


def test_a_newer_attempt_fences_off_the_older_ones_records_after_it() -> None:
    attempts = Attempts()
    assert attempts.admit(TokenEmitted("t", 1, "old", attempt=0))  # records from before attempts
    assert attempts.admit(TurnStarted("t", attempt=1))
    assert attempts.admit(TokenEmitted("t", 2, "a", attempt=1))
    assert attempts.admit(TurnStarted("t", attempt=2))
    assert not attempts.admit(TokenEmitted("t", 3, "zombie", attempt=1))
    assert not attempts.admit(TurnFinished("t", last_seq=3, attempt=1))
    assert attempts.admit(TokenEmitted("t", 3, "b", attempt=2))
    assert attempts.admit(TokenEmitted("u", 1, "other turn", attempt=1))
    assert attempts.admit(TurnStarted("t", attempt=1))  # a late start never lowers it
    assert not attempts.admit(TokenEmitted("t", 4, "zombie", attempt=1))
    assert attempts.admit(TurnFinished("t", last_seq=3, attempt=2))
    assert attempts.admit(TurnCancelled("t"))


def test_attempts_survive_the_codec() -> None:
    for event in (
        TurnStarted("t", attempt=3),
        TokenEmitted("t", 1, "x", attempt=3),
        TurnFinished("t", attempt=3),
    ):
        assert decode_events(encode(event)) == [event]


def test_a_record_of_several_tokens_reads_as_one_event_per_token() -> None:
    grouped = TokenEmitted("t", 7, "a", "c", "acme", more=("b", "c"))
    assert decode_events(encode(grouped)) == [
        TokenEmitted("t", 7, "a", "c", "acme"),
        TokenEmitted("t", 8, "b", "c", "acme"),
        TokenEmitted("t", 9, "c", "c", "acme"),
    ]
    assert decode_events(encode(grouped), turns={"other"}) == []


def test_context_skipped_round_trips() -> None:
    done = TurnFinished("t", FinishReason.STOP, context_skipped=(("recall", "circuit_open"),))
    assert decode_events(encode(done)) == [done]

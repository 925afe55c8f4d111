"""Batch assembly, titles, page tokens and event decoding of the persister (no servers)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from chat.common.v1 import common_pb2
from chat.events.v1 import events_pb2
from google.protobuf import timestamp_pb2

from mesh import turnlog
from mesh.errors import InvalidArgument
from mesh.log import TURN_EVENTS, TURN_REQUESTS, Record
from services.persister import codec
from services.persister.batch import assemble, make_title
from services.persister.model import (
    ConversationCursor,
    FinishedTurn,
    TokenEvent,
    TurnEnd,
    UserTurn,
    utc_from_ms,
)
from services.persister.outbox import remember_text
from services.persister.page_tokens import decode_page_token, encode_page_token
from services.persister.settings import PersisterSettings

T0 = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


class Log:
    """Builds records as a real log would number them."""

    def __init__(self) -> None:
        self.next: dict[tuple[str, int], int] = {}

    def record(self, topic: str, value: bytes, partition: int = 0, ts_ms: int = 1_000) -> Record:
        offset = self.next.get((topic, partition), 0)
        self.next[(topic, partition)] = offset + 1
        return Record(topic, partition, offset, b"c", value, ts_ms)

    def request(
        self, turn: str, text: str, *, conv: str = "c1", tenant: str = "a", at: datetime = T0
    ) -> Record:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(at)
        msg = events_pb2.TurnRequested(
            turn_id=turn, conversation_id=conv, tenant_id=tenant, user_text=text, accepted_at=stamp
        )
        return self.record(TURN_REQUESTS, msg.SerializeToString())

    def token(self, turn: str, seq: int, text: str, partition: int = 0) -> Record:
        event = events_pb2.TurnEvent(
            token=events_pb2.TokenEmitted(
                turn_id=turn, seq=seq, text=text, conversation_id="c1", tenant_id="a"
            )
        )
        return self.record(TURN_EVENTS, event.SerializeToString(), partition)

    def finish(self, turn: str, last_seq: int, *, reason: int = 1, ts_ms: int = 2_000) -> Record:
        event = events_pb2.TurnEvent(
            finished=events_pb2.TurnFinished(
                turn_id=turn,
                finish_reason=reason,  # type: ignore[arg-type]
                conversation_id="c1",
                tenant_id="a",
                last_seq=last_seq,
            )
        )
        return self.record(TURN_EVENTS, event.SerializeToString(), ts_ms=ts_ms)

    def started(self, turn: str) -> Record:
        event = events_pb2.TurnEvent(started=events_pb2.TurnStarted(turn_id=turn))
        return self.record(TURN_EVENTS, event.SerializeToString())


def test_decode_request_token_and_finish() -> None:
    log = Log()
    user = codec.decode(log.request("t1", "hello"))
    assert user == [UserTurn("t1", "c1", "a", "hello", T0, 0)]
    assert codec.decode(log.token("t1", 3, "x")) == [TokenEvent("t1", 3, "x")]
    end = codec.decode(log.finish("t1", 3, reason=common_pb2.FINISH_REASON_LENGTH, ts_ms=1500))
    assert len(end) == 1 and isinstance(end[0], TurnEnd)
    assert dataclasses.replace(end[0], event=b"") == TurnEnd(
        "t1", "c1", "a", 2, 3, utc_from_ms(1500)
    )
    # The record as logged is kept, for a resume served from PostgreSQL.
    (kept,) = turnlog.decode_events(end[0].event)
    assert isinstance(kept, turnlog.TurnFinished) and kept.last_seq == 3


def test_decode_expands_a_record_of_several_tokens() -> None:
    grouped = turnlog.TokenEmitted("t1", 4, "a", "c1", "a", more=("b", "c"))
    record = Record(TURN_EVENTS, 0, 9, b"c1", turnlog.encode(grouped), 1000)
    assert codec.decode(record) == [
        TokenEvent("t1", 4, "a"),
        TokenEvent("t1", 5, "b"),
        TokenEvent("t1", 6, "c"),
    ]


def test_decode_skips_what_is_not_stored_and_garbage() -> None:
    log = Log()
    assert codec.decode(log.started("t1")) == []
    assert codec.decode(log.record(TURN_EVENTS, b"\xff\xff\xff")) == []
    assert codec.decode(log.record(TURN_REQUESTS, b"\x0a")) == []
    # A request without a tenant can never be stored under one.
    assert codec.decode(log.request("t1", "hi", tenant="")) == []
    assert codec.decode(log.token("t1", 0, "x")) == []


def test_decode_replaces_nul_which_postgres_cannot_store() -> None:
    [event] = codec.decode(Log().token("t1", 1, "a\x00b"))
    assert isinstance(event, TokenEvent)
    assert event.text == "a\ufffdb"


def test_request_without_accepted_at_uses_the_record_time() -> None:
    msg = events_pb2.TurnRequested(turn_id="t", conversation_id="c", tenant_id="a", user_text="x")
    [event] = codec.decode(Record(TURN_REQUESTS, 0, 0, b"c", msg.SerializeToString(), 1234))
    assert isinstance(event, UserTurn)
    assert event.accepted_at == datetime(1970, 1, 1, 0, 0, 1, 234000, tzinfo=UTC)


def test_accepted_at_reads_as_protobuf_does() -> None:
    stamp = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=123_456_789)
    msg = events_pb2.TurnRequested(
        turn_id="t", conversation_id="c", tenant_id="a", user_text="x", accepted_at=stamp
    )
    [event] = codec.decode(Record(TURN_REQUESTS, 0, 0, b"c", msg.SerializeToString(), 1234))
    assert isinstance(event, UserTurn)
    assert event.accepted_at == stamp.ToDatetime(tzinfo=UTC)
    assert event.accepted_at.tzinfo is UTC


def test_utc_from_ms_is_exact() -> None:
    assert utc_from_ms(1_700_000_000_123) == datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)


def test_assemble_builds_rows_and_last_records() -> None:
    log = Log()
    records = [
        log.request("t1", "What is a mesh?"),
        log.token("t1", 1, "A "),
        log.token("t1", 2, "net."),
        log.started("t1"),
        log.finish("t1", 2),
    ]
    plan = assemble(records, codec.decode)
    assert plan.events == 5
    assert [(m.turn_id, m.text) for m in plan.user_messages] == [("t1", "What is a mesh?")]
    assert [(t.seq, t.text) for t in plan.tokens] == [(1, "A "), (2, "net.")]
    assert [(f.turn_id, f.last_seq, f.finish_reason) for f in plan.finishes] == [("t1", 2, 1)]
    assert [(c.conversation_id, c.title) for c in plan.conversations] == [("c1", "What is a mesh?")]
    assert {k: r.offset for k, r in plan.last_records.items()} == {
        (TURN_REQUESTS, 0): 0,
        (TURN_EVENTS, 0): 3,
    }
    assert plan.in_batch_duplicates == 0


def test_assemble_first_in_log_order_wins_within_a_batch() -> None:
    log = Log()
    records = [
        log.token("t1", 1, "first"),
        log.token("t1", 1, "zombie"),
        log.request("t1", "q"),
        log.request("t1", "q again"),
        log.finish("t1", 1, reason=1),
        log.finish("t1", 1, reason=5),
    ]
    plan = assemble(records, codec.decode)
    assert [t.text for t in plan.tokens] == ["first"]
    assert [m.text for m in plan.user_messages] == ["q"]
    assert [f.finish_reason for f in plan.finishes] == [1]
    assert plan.in_batch_duplicates == 3


def test_assemble_conversation_takes_title_of_earliest_turn_and_latest_update() -> None:
    log = Log()
    later = T0 + timedelta(seconds=5)
    records = [log.request("t2", "second", at=later), log.request("t1", "first", at=T0)]
    plan = assemble(records, codec.decode)
    (conv,) = plan.conversations
    assert (conv.title, conv.created_at, conv.updated_at) == ("first", T0, later)


def test_assemble_keeps_tenants_apart() -> None:
    log = Log()
    plan = assemble(
        [log.request("t1", "x", tenant="a"), log.request("t2", "y", tenant="b")], codec.decode
    )
    assert sorted((c.tenant_id, c.title) for c in plan.conversations) == [("a", "x"), ("b", "y")]


def test_make_title() -> None:
    assert make_title("  hello\n  world ") == "hello world"
    long = "word " * 40
    title = make_title(long)
    assert title.endswith("…")
    assert len(title) <= 61
    assert not title[:-1].endswith(" ")
    unbroken = "x" * 100
    assert make_title(unbroken) == "x" * 60 + "…"


def test_remember_text() -> None:
    turn = FinishedTurn("t", "a", "c", "hi", "hello", 1)
    assert remember_text(turn) == "user: hi\nassistant: hello"
    assert remember_text(FinishedTurn("t", "a", "c", None, "hello", 1)) == "assistant: hello"


def test_page_token_round_trip() -> None:
    cursor = ConversationCursor(T0, "conv/é")
    assert decode_page_token(encode_page_token(cursor)) == cursor


@pytest.mark.parametrize(
    "token",
    [
        "not base64!",
        "bm90IGpzb24",
        "e30",
        "WzEsMiwzXQ",
        "WyJ4IiwiYyJd",
        "W3RydWUsImMiXQ",
        "x" * 3000,
        "WzEsICJhXHUwMDAwYiJd",  # [1, "a\u0000b"]: a NUL would reach PostgreSQL
    ],
)
def test_malformed_page_tokens_are_invalid_argument(token: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        decode_page_token(token)
    assert caught.value.reason == "PAGE_TOKEN_INVALID"
    assert caught.value.field == "page_token"


def test_settings_from_env() -> None:
    settings = PersisterSettings.from_env(
        {
            "MESH_PERSISTER_PORT": "0",
            "MESH_PERSISTER_BATCH_SIZE": "7",
            "MESH_PERSISTER_LINGER_MS": "5",
            "MESH_PG_DSN": "postgresql://u:secret@h/db",
            "MESH_MEMORY_ADDR": "127.0.0.1:1",
            "MESH_LOG_PARTITIONS": "2",
            "MESH_STATE_DIR": "/tmp/state",
        }
    )
    assert (settings.port, settings.batch_size, settings.linger_ms) == (0, 7, 5)
    assert settings.memory_addr == "127.0.0.1:1"
    assert settings.log.partitions == 2
    assert str(settings.embedded_pg_dir) == "/tmp/state/postgres"
    assert "secret" not in repr(settings)
    defaults = PersisterSettings.from_env({})
    assert (defaults.host, defaults.port, defaults.batch_size, defaults.linger_ms) == (
        "127.0.0.1",
        50054,
        500,
        50,
    )
    # MESH_MEMORY_ADDR means one thing to every service: unset is the default address, empty
    # turns indexing off.
    assert defaults.memory_addr == "127.0.0.1:50053"
    assert PersisterSettings.from_env({"MESH_MEMORY_ADDR": ""}).memory_addr == ""

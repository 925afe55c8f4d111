"""Resume and cancel through the persister's LookupTurn, on a real persister and PostgreSQL.

A finished turn is served from PostgreSQL with exactly the frames a log read gives, with no read
of the log; an id the persister has applied past costs no log scan; an assembled turn keeps no
token rows, and its text and tokens stay exact. Each test compares with a gateway that reads the
log only (``lookup=False``), the path before LookupTurn.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from chat.gateway.v1 import gateway_pb2
from chat.persister.v1 import persister_pb2, persister_service_pb2_grpc
from grpc import aio

from mesh import turnlog
from mesh.generation import FinishReason, TokenUsage, TurnTimings
from mesh.log import TURN_EVENTS, TURN_REQUESTS
from mesh.log.embedded import EmbeddedLog
from mesh.turn_ids import new_turn_ref, parse_turn_id
from tests.integration.test_gateway_persister import spawn_persister
from tests.integration.test_gateway_service import (
    Gateway,
    Keys,
    expect_error,
    first_frame,
    gateway_settings,
    md,
    read_until_finished,
    run_gateway,
)
from tests.integration.test_gateway_service import agent_log as agent_log  # noqa: F401 - fixture
from tests.integration.test_gateway_service import keys as keys  # noqa: F401 - fixture
from tests.integration.test_gateway_service import log_path as log_path  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

# Multi-byte and astral characters: the stored lengths are code points on both sides.
TEXTS = ["Bonjour", " à", " toi", " 🙂", "", " — fin.", " ok"]
USAGE = TokenUsage(prompt_tokens=11, completion_tokens=len(TEXTS))
TIMINGS = TurnTimings(queued_ms=1.5, retrieval_ms=2.0, time_to_first_token_ms=30.0, total_ms=90.0)


class Mesh:
    def __init__(self, lookup: Gateway, plain: Gateway, persister: Any, log: EmbeddedLog) -> None:
        self.lookup = lookup  # resumes through LookupTurn
        self.plain = plain  # reads the log only
        self.persister = persister
        self.log = log

    async def flush(self) -> None:
        await self.persister.Flush(persister_pb2.FlushRequest(), timeout=15)


@pytest.fixture
async def mesh(
    log_path: Path,  # noqa: F811
    keys: Keys,  # noqa: F811
    pg_dsn: str,
    tmp_path: Path,
    agent_log: EmbeddedLog,  # noqa: F811
) -> AsyncIterator[Mesh]:
    async with (
        spawn_persister(log_path, pg_dsn, tmp_path) as persister_addr,
        run_gateway(gateway_settings(log_path, keys, persister_addr)) as lookup,
        run_gateway(gateway_settings(log_path, keys, persister_addr), lookup=False) as plain,
        aio.insecure_channel(persister_addr) as channel,
    ):
        stub = persister_service_pb2_grpc.PersisterServiceStub(channel)  # type: ignore[no-untyped-call]
        yield Mesh(lookup, plain, stub, agent_log)


async def finish_turn(
    mesh: Mesh, key: str, *, texts: list[str] = TEXTS, reason: int = FinishReason.STOP
) -> gateway_pb2.TurnAccepted:
    """A turn started through the gateway and played to its end on the log, as an agent would."""
    call = mesh.lookup.stub.StreamTurn(
        gateway_pb2.StreamTurnRequest(start=gateway_pb2.StartTurn(text="question")),
        metadata=md(key),
    )
    accepted = (await first_frame(call)).accepted
    turn, conv = accepted.turn_id, accepted.conversation_id
    partition = parse_turn_id(turn).partition
    events: list[turnlog.TurnEvent] = [turnlog.TurnStarted(turn, conv, "acme", "test-agent")]
    events += [turnlog.TokenEmitted(turn, i + 1, t, conv, "acme") for i, t in enumerate(texts)]
    events.append(
        turnlog.TurnFinished(
            turn,
            reason,
            USAGE,
            TIMINGS,
            conversation_id=conv,
            tenant_id="acme",
            last_seq=len(texts),
            model="tiny",
            context_skipped=(("memory", "MEMORY_UNAVAILABLE"),),
        )
    )
    for event in events:
        await mesh.log.append(TURN_EVENTS, partition, conv.encode(), turnlog.encode(event))
    await read_until_finished(call)
    await mesh.flush()
    return accepted


@contextlib.contextmanager
def log_reads(gateway: Gateway) -> Any:
    """Counts the gateway's reads of the log by topic (catch-up reads of a resumed turn, the
    request scan, the cancel check, queue positions), and fails any new hub subscription."""
    assert gateway.core is not None
    log, hub = gateway.core.log, gateway.core.hub
    reads: Counter[str] = Counter()
    read_range, subscribe = log.read_range, hub.subscribe

    async def counting(topic: str, *args: Any, **kwargs: Any) -> Any:
        reads[topic] += 1
        return await read_range(topic, *args, **kwargs)

    def refused(*args: Any, **kwargs: Any) -> Any:
        reads["subscribe"] += 1
        return subscribe(*args, **kwargs)

    log.read_range = counting  # type: ignore[method-assign]
    hub.subscribe = refused  # type: ignore[method-assign]
    try:
        yield reads
    finally:
        del log.read_range
        del hub.subscribe


async def resume(gateway: Gateway, key: str, turn_id: str, after_seq: int, coalesce: bool) -> list:
    call = gateway.stub.ResumeTurn(
        gateway_pb2.ResumeTurnRequest(
            turn_id=turn_id, after_seq=after_seq, coalesce_tokens=coalesce
        ),
        metadata=md(key),
    )
    return await read_until_finished(call)


async def test_a_finished_turn_resumes_from_postgres_with_the_log_paths_frames(
    mesh: Mesh, keys: Keys, pg_dsn: str
) -> None:
    accepted = await finish_turn(mesh, keys.acme)
    turn = accepted.turn_id
    for after_seq, coalesce in [(0, False), (0, True), (3, False), (5, True), (99, False)]:
        with log_reads(mesh.plain) as plain_reads:
            expected = await resume(mesh.plain, keys.acme, turn, after_seq, coalesce)
        with log_reads(mesh.lookup) as reads:
            served = await resume(mesh.lookup, keys.acme, turn, after_seq, coalesce)
        assert served == expected, (after_seq, coalesce)
        # The log path read the log; the lookup path neither read it nor subscribed.
        assert plain_reads[TURN_EVENTS] + plain_reads["subscribe"] > 0
        assert reads == Counter(), reads
    finished = served[-1].finished
    assert finished.usage.completion_tokens == len(TEXTS)
    assert finished.timings.total_ms == TIMINGS.total_ms
    assert [(s.source, s.reason) for s in finished.context_skipped] == [
        ("memory", "MEMORY_UNAVAILABLE")
    ]
    tokens = [f.token for f in expected if f.WhichOneof("frame") == "token"]
    assert [t.text for t in tokens] == TEXTS[99:]  # after_seq past the end: no token, then end
    full = await resume(mesh.lookup, keys.acme, turn, 0, False)
    assert "".join(f.token.text for f in full if f.WhichOneof("frame") == "token") == "".join(TEXTS)
    assert [f.token.seq for f in full if f.WhichOneof("frame") == "token"] == list(
        range(1, len(TEXTS) + 1)
    )

    # Assembled: the text and the token boundaries are on the message, the token rows are gone.
    with psycopg.connect(pg_dsn) as pg:
        text, lengths = pg.execute(
            "SELECT text, token_lengths FROM messages WHERE turn_id = %s AND role = 2", (turn,)
        ).fetchone()
        left = pg.execute("SELECT count(*) FROM tokens").fetchone()
    assert text == "".join(TEXTS)
    assert lengths == [len(t) for t in TEXTS]
    assert left == (0,)


async def chat_resume(gateway: Gateway, key: str, turn_id: str, after_seq: int) -> list:
    """A Chat stream's frames for a resume, granted credit a few tokens at a time."""
    call = gateway.stub.Chat(metadata=md(key))
    await call.write(
        gateway_pb2.ChatRequest(resume=gateway_pb2.ResumeTurn(turn_id=turn_id, after_seq=after_seq))
    )
    frames = []
    while True:
        await call.write(gateway_pb2.ChatRequest(credit=gateway_pb2.FlowCredit(tokens=2)))
        frame = await asyncio.wait_for(call.read(), 30)
        frames.append(frame)
        if frame.WhichOneof("frame") == "finished":
            break
    await call.done_writing()
    return frames


async def test_a_chat_stream_resumes_a_finished_turn_from_postgres(mesh: Mesh, keys: Keys) -> None:
    accepted = await finish_turn(mesh, keys.acme)
    expected = await chat_resume(mesh.plain, keys.acme, accepted.turn_id, 1)
    with log_reads(mesh.lookup) as reads:
        served = await chat_resume(mesh.lookup, keys.acme, accepted.turn_id, 1)
    assert served == expected and reads == Counter()
    assert [f.token.seq for f in served if f.WhichOneof("frame") == "token"] == list(
        range(2, len(TEXTS) + 1)
    )


async def test_another_tenants_finished_turn_reads_as_missing(mesh: Mesh, keys: Keys) -> None:
    accepted = await finish_turn(mesh, keys.acme)
    with log_reads(mesh.lookup):
        call = mesh.lookup.stub.ResumeTurn(
            gateway_pb2.ResumeTurnRequest(turn_id=accepted.turn_id), metadata=md(keys.globex)
        )
        code, reason, _ = await expect_error(call)
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "TURN_NOT_FOUND")


async def test_late_and_replayed_tokens_of_an_assembled_turn_are_not_stored(
    mesh: Mesh, keys: Keys, pg_dsn: str
) -> None:
    accepted = await finish_turn(mesh, keys.acme)
    turn, conv = accepted.turn_id, accepted.conversation_id
    partition = parse_turn_id(turn).partition
    # A zombie agent's copy of a token, and one past the end, logged after the finish.
    for seq, text in [(2, "zombie"), (len(TEXTS) + 1, "late")]:
        event = turnlog.TokenEmitted(turn, seq, text, conv, "acme")
        await mesh.log.append(TURN_EVENTS, partition, conv.encode(), turnlog.encode(event))
    await mesh.flush()
    with psycopg.connect(pg_dsn) as pg:
        assert pg.execute("SELECT count(*) FROM tokens").fetchone() == (0,)
        (text,) = pg.execute(
            "SELECT text FROM messages WHERE turn_id = %s AND role = 2", (turn,)
        ).fetchone()
    assert text == "".join(TEXTS)
    served = await resume(mesh.lookup, keys.acme, turn, 0, False)
    assert [f.token.text for f in served if f.WhichOneof("frame") == "token"] == TEXTS


async def test_a_running_turn_still_resumes_from_the_log(mesh: Mesh, keys: Keys) -> None:
    call = mesh.lookup.stub.StreamTurn(
        gateway_pb2.StreamTurnRequest(start=gateway_pb2.StartTurn(text="question")),
        metadata=md(keys.acme),
    )
    accepted = (await first_frame(call)).accepted
    turn, conv = accepted.turn_id, accepted.conversation_id
    partition = parse_turn_id(turn).partition
    await mesh.log.append(
        TURN_EVENTS,
        partition,
        conv.encode(),
        turnlog.encode(turnlog.TokenEmitted(turn, 1, "one", conv, "acme")),
    )
    await mesh.flush()
    resumed = mesh.lookup.stub.ResumeTurn(
        gateway_pb2.ResumeTurnRequest(turn_id=turn), metadata=md(keys.acme)
    )
    frames = [await first_frame(resumed), await first_frame(resumed)]
    assert frames[1].token.text == "one"
    finished = turnlog.TurnFinished(
        turn, FinishReason.STOP, conversation_id=conv, tenant_id="acme", last_seq=1
    )
    await mesh.log.append(TURN_EVENTS, partition, conv.encode(), turnlog.encode(finished))
    assert (await read_until_finished(resumed))[-1].finished.last_seq == 1
    await read_until_finished(call)


async def test_cancelling_a_finished_turn_reads_no_log_and_appends_nothing(
    mesh: Mesh, keys: Keys
) -> None:
    accepted = await finish_turn(mesh, keys.acme)
    partition = parse_turn_id(accepted.turn_id).partition
    end = await mesh.log.end_offset(TURN_EVENTS, partition)
    with log_reads(mesh.plain) as plain_reads:
        await mesh.plain.stub.CancelTurn(
            gateway_pb2.CancelTurnRequest(turn_id=accepted.turn_id), metadata=md(keys.acme)
        )
    with log_reads(mesh.lookup) as reads:
        await mesh.lookup.stub.CancelTurn(
            gateway_pb2.CancelTurnRequest(turn_id=accepted.turn_id), metadata=md(keys.acme)
        )
    assert plain_reads[TURN_EVENTS] > 0 and reads == Counter()
    assert await mesh.log.end_offset(TURN_EVENTS, partition) == end


async def test_a_forged_id_with_an_old_offset_costs_no_log_scan(mesh: Mesh, keys: Keys) -> None:
    # Another tenant's requests fill the partition the forged id points into.
    requests = 3000
    partition = 0
    start = await mesh.log.end_offset(TURN_REQUESTS, partition)
    events_start = await mesh.log.end_offset(TURN_EVENTS, partition)
    appends = []
    for i in range(requests):
        ref = new_turn_ref(partition, start + i, events_start)
        value = turnlog.encode(
            turnlog.TurnRequested(str(ref), f"conv-{i % 50}", "globex", "filler")
        )
        appends.append(mesh.log.append(TURN_REQUESTS, partition, b"k", value))
    await asyncio.gather(*appends)
    await mesh.flush()
    forged = str(new_turn_ref(partition, start, events_start))
    timings = {}
    for name, gateway in [("plain", mesh.plain), ("lookup", mesh.lookup)]:
        with log_reads(gateway) as reads:
            began = time.perf_counter()
            call = gateway.stub.ResumeTurn(
                gateway_pb2.ResumeTurnRequest(turn_id=forged), metadata=md(keys.acme)
            )
            code, reason, _ = await expect_error(call)
            timings[name] = time.perf_counter() - began
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "TURN_NOT_FOUND")
        if name == "plain":
            assert reads[TURN_REQUESTS] >= requests // 500  # scanned, 500 records a read
        else:
            assert reads == Counter(), reads  # one primary-key read in the persister
    print(f"forged id NOT_FOUND: log scan {timings['plain']:.3f}s, lookup {timings['lookup']:.3f}s")


async def test_a_database_from_before_migrates_and_keeps_its_token_rows(pg_dsn: str) -> None:
    from datetime import UTC, datetime

    from services.persister import store as pg_store
    from services.persister.turn_lookup import TurnLookup, TurnState

    old_schema = pg_store.SCHEMA.split("-- Added after the first release")[0]
    turn = str(new_turn_ref(0, 0, 0))
    now = datetime.now(UTC)
    with psycopg.connect(pg_dsn, autocommit=True) as pg:
        pg.execute(old_schema)
        for role, text in [(1, "question"), (2, "ab")]:
            pg.execute(
                "INSERT INTO messages (turn_id, role, conversation_id, tenant_id, text, "
                "created_at, accepted_at) VALUES (%s, %s, 'c', 'acme', %s, %s, %s)",
                (turn, role, text, now, now),
            )
        for seq, text in [(1, "a"), (2, "b")]:
            pg.execute("INSERT INTO tokens VALUES (%s, %s, %s)", (turn, seq, text))
    async with pg_store.PgStore(pg_dsn) as store:
        stored = await store.lookup_turn(turn)

        async def applied(partition: int) -> int:
            return 0

        answer = await TurnLookup(store=store, applied=applied).lookup("acme", turn, 0)
    assert stored is not None and stored.finished and stored.request_offset == -1
    assert stored.token_lengths is None and stored.finish_event is None
    # Served from the log instead, as before; the old rows stay as they were.
    assert answer.state is TurnState.FINISHED and not answer.tokens_complete
    with psycopg.connect(pg_dsn) as pg:
        assert pg.execute("SELECT count(*) FROM tokens").fetchone() == (2,)

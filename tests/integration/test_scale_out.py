"""The scale-out profile end to end: 2 gateways and 2 agents over a real Kafka, memory on
Elasticsearch, the persister on a standalone PostgreSQL server, Envoy in front.

Clients talk to the gateways (and through Envoy) like any client; the tests then check what
happened on the Kafka log itself and in PostgreSQL. Every turn a test streams goes into the
module's ledger, and the last test checks that each one was persisted exactly as streamed.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest
from chat.common.v1 import common_pb2, conversation_pb2
from chat.events.v1 import events_pb2
from chat.gateway.v1 import gateway_pb2

from mesh.launcher import Mesh, MeshConfig, scale_config
from mesh.log import TURN_EVENTS
from mesh.turn_ids import parse_turn_id
from tests.fixtures.scale import SESSION_TIMEOUT_S, ScaleMesh
from tests.integration.grpc_helpers import TurnResult, auth, gateway, start_request, stream_turn

pytestmark = [pytest.mark.integration, pytest.mark.infra]

FINISHED_NORMALLY = {common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP}


@dataclass(frozen=True)
class Streamed:
    """What a client received of one turn, to compare with PostgreSQL at the end."""

    turn_id: str
    conversation_id: str
    api_key: str
    text: str
    last_seq: int


@pytest.fixture(scope="module")
def ledger() -> dict[str, Streamed]:
    return {}


def record(ledger: dict[str, Streamed], result: TurnResult, key: str, text: str = "") -> None:
    assert result.finished is not None, f"turn {result.turn_id} did not finish"
    ledger[result.turn_id] = Streamed(
        result.turn_id,
        result.conversation_id,
        key,
        text or result.text,
        result.finished.last_seq,
    )


@pytest.fixture(scope="module")
def stubs(scale_mesh: ScaleMesh) -> Iterator[dict[str, object]]:
    """Gateway stubs by name: each gateway directly, and ``envoy`` (native gRPC via Envoy)."""
    mesh = scale_mesh.mesh
    assert len(mesh.gateway_addrs) == 2 and mesh.envoy is not None
    targets = {f"gateway-{i + 1}": addr for i, addr in enumerate(mesh.gateway_addrs)}
    targets["envoy"] = mesh.envoy.addr
    channels = {name: grpc.insecure_channel(addr) for name, addr in targets.items()}
    try:
        yield {name: gateway(channel) for name, channel in channels.items()}
    finally:
        for channel in channels.values():
            channel.close()


def assert_gap_free(result: TurnResult, first: int = 1) -> None:
    assert result.seqs == list(range(first, first + len(result.seqs))), result.seqs


def turn_events(scale: ScaleMesh, turn_id: str) -> list[events_pb2.TurnEvent]:
    """Every record of a turn on the Kafka event topic, in log order."""
    from mesh.log.kafka import KafkaLog  # the scale extra (confluent-kafka)

    ref = parse_turn_id(turn_id)

    async def read() -> list[events_pb2.TurnEvent]:
        async with KafkaLog(scale.kafka_bootstrap, config=scale.kafka_config) as log:
            end = await log.end_offset(TURN_EVENTS, ref.partition)
            records = await log.read_range(TURN_EVENTS, ref.partition, ref.events_start, end)
        events = []
        for item in records:
            event = events_pb2.TurnEvent.FromString(item.value)
            kind = event.WhichOneof("event")
            if kind is not None and getattr(event, kind).turn_id == turn_id:
                events.append(event)
        return events

    return asyncio.run(read())


def started_by(events: list[events_pb2.TurnEvent]) -> list[tuple[str, int]]:
    """(agent id, resumed after seq) of each TurnStarted, in log order."""
    return [
        (e.started.agent_id, e.started.resumed_after_seq)
        for e in events
        if e.WhichOneof("event") == "started"
    ]


def wait_agents_settled(scale: ScaleMesh, agents: int = 2, timeout_s: float = 60) -> None:
    """Wait until the agents' group is stable with ``agents`` members that each own some of the
    request partitions: an agent started a moment ago may still be joining, and a rebalance
    hands the turns in flight on a moved partition to their new owner (fencing)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": scale.kafka_bootstrap, **scale.kafka_config})
    deadline = time.monotonic() + timeout_s
    seen: object = None
    while time.monotonic() < deadline:
        group = admin.describe_consumer_groups(["agents"])["agents"].result(timeout=10)
        members = group.members or []
        owned = [
            {tp.partition for tp in (m.assignment.topic_partitions if m.assignment else [])}
            for m in members
        ]
        seen = (str(group.state), owned)
        if len(members) == agents and all(owned) and "STABLE" in str(group.state).upper():
            return
        time.sleep(0.2)
    raise AssertionError(f"the agents' group did not settle: {seen}")


def prompts(scale: ScaleMesh) -> list[dict[str, str]]:
    lines = scale.prompt_log.read_text().splitlines() if scale.prompt_log.exists() else []
    return [json.loads(line) for line in lines]


# ---------------------------------------------------------------------------------------------


def test_scale_profile_starts_only_servers_without_an_address(tmp_path: Path) -> None:
    # No servers needed: which servers a config would start, and how the CLI builds it.
    paths = {"state_dir": tmp_path, "model_path": tmp_path / "m.gguf", "api_keys_file": tmp_path}
    nothing_given = scale_config(**paths, environ={})
    assert (nothing_given.gateways, nothing_given.agents, nothing_given.envoy) == (2, 2, True)
    # Two agents on one machine split its cores instead of spinning on the same ones.
    assert nothing_given.agent_threads == max(1, (os.cpu_count() or 1) // 2)
    assert scale_config(**paths, environ={}, agents=1).agent_threads == (os.cpu_count() or 1)
    servers = Mesh(nothing_given)._servers_to_start()
    assert [name for name, _ in servers] == ["postgres", "kafka", "elasticsearch"]
    # Each with TLS, from the project CA the services use (and credentials, see docs).
    for name, server in servers:
        tls = getattr(server, "tls", None)
        assert tls is not None, name
        assert tls.ca == tmp_path / "certs" / "ca.pem" and tls.cert.name == f"{name}.pem"
    plaintext = scale_config(**paths, environ={}, server_tls=False)
    assert all(getattr(s, "tls", 0) is None for _, s in Mesh(plaintext)._servers_to_start())
    clusters = {
        "MESH_KAFKA_BOOTSTRAP": "kafka-1:9092,kafka-2:9092",
        "MESH_ES_URL": "http://es:9200",
        "MESH_PG_DSN": "postgresql://mesh@db:5432/mesh",
        "MESH_LOG_PARTITIONS": "12",
    }
    existing = scale_config(**paths, environ=clusters)
    assert Mesh(existing)._servers_to_start() == []
    assert (existing.kafka_bootstrap, existing.partitions) == ("kafka-1:9092,kafka-2:9092", 12)
    env = Mesh(existing).base_env()
    assert env["MESH_LOG_DRIVER"] == "kafka" and env["MESH_MEMORY_BACKEND"] == "elasticsearch"
    assert env["MESH_PG_DSN"] == clusters["MESH_PG_DSN"]
    assert env["MESH_ES_URL"] == clusters["MESH_ES_URL"]
    # The embedded profile starts none of them (pgserver is started separately).
    embedded = MeshConfig(**paths)
    assert Mesh(embedded)._servers_to_start() == []
    # The command line: the profile's defaults, with counts overridden.
    parser_args = [
        "--profile", "scale", "--model", str(tmp_path / "m.gguf"),
        "--state-dir", str(tmp_path), "--agents", "3",
    ]  # fmt: skip
    from mesh import launcher

    config = launcher._config_from_args(launcher._parser().parse_args(parser_args))
    assert (config.agents, config.gateways, config.log_driver) == (3, 2, "kafka")
    assert config.server_tls
    args = launcher._parser().parse_args([*parser_args, "--no-server-tls"])
    assert not launcher._config_from_args(args).server_tls


def test_envoy_serves_the_page_and_both_gateways_are_healthy(scale_mesh: ScaleMesh) -> None:
    url = scale_mesh.mesh.envoy_url
    with urllib.request.urlopen(f"{url}/", timeout=10) as response:
        assert response.status == 200
        assert "<html" in response.read().decode().lower()
    assert scale_mesh.mesh.envoy is not None
    admin = scale_mesh.mesh.envoy.metrics_port
    deadline = time.monotonic() + 20
    health: dict[str, bool] = {}
    while time.monotonic() < deadline:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{admin}/clusters?format=json", timeout=5
        ) as response:
            clusters = json.loads(response.read())
        health = {
            f"{h['address']['socket_address']['address']}:"
            f"{h['address']['socket_address']['port_value']}": not h.get("health_status", {}).get(
                "failed_active_health_check", False
            )
            for c in clusters["cluster_statuses"]
            if c["name"] == "gateway"
            for h in c.get("host_statuses", [])
        }
        if set(health) == set(scale_mesh.mesh.gateway_addrs) and all(health.values()):
            return
        time.sleep(0.3)
    raise AssertionError(f"Envoy does not see both gateways healthy: {health}")


def test_concurrent_conversations_are_served_by_both_agents(
    scale_mesh: ScaleMesh, stubs: dict[str, object], ledger: dict[str, Streamed]
) -> None:
    # New conversations land on random partitions, two per agent; a few rounds of four
    # concurrent turns make it practically certain both agents get some (1 - 2 * 2^-12).
    entry_points = ["gateway-1", "gateway-2", "envoy", "gateway-1"]
    key = scale_mesh.api_key
    agents: dict[str, str] = {}
    with ThreadPoolExecutor(len(entry_points)) as pool:
        for round_ in range(3):
            futures = [
                pool.submit(
                    stream_turn,
                    stubs[name],
                    key,
                    start_request(f"round {round_} question {i}", max_tokens=8, seed=i),
                    90,
                )
                for i, name in enumerate(entry_points)
            ]
            for future in futures:
                result = future.result(timeout=120)
                assert_gap_free(result)
                assert result.finished is not None
                assert result.finished.finish_reason in FINISHED_NORMALLY
                assert result.finished.last_seq == len(result.tokens) > 0
                record(ledger, result, key)
                [(agent, resumed)] = started_by(turn_events(scale_mesh, result.turn_id))
                assert resumed == 0
                agents[result.turn_id] = agent
            if len(set(agents.values())) == 2:
                break
    assert set(agents.values()) == {"agent-1", "agent-2"}, agents


def test_client_dropped_on_one_gateway_resumes_on_the_other(
    scale_mesh: ScaleMesh, stubs: dict[str, object], ledger: dict[str, Streamed]
) -> None:
    key = scale_mesh.api_key
    call = stubs["gateway-1"].StreamTurn(  # type: ignore[attr-defined]
        gateway_pb2.StreamTurnRequest(start=start_request("tell me a story", max_tokens=40)),
        metadata=auth(key),
        timeout=90,
    )
    first = TurnResult()
    for frame in call:
        first.add(frame)
        if len(first.tokens) == 5:
            break
    call.cancel()  # the client drops mid-turn and reconnects to the other gateway
    resumed = TurnResult()
    for frame in stubs["gateway-2"].ResumeTurn(  # type: ignore[attr-defined]
        gateway_pb2.ResumeTurnRequest(turn_id=first.turn_id, after_seq=5),
        metadata=auth(key),
        timeout=90,
    ):
        resumed.add(frame)
    assert first.seqs == [1, 2, 3, 4, 5]
    assert_gap_free(resumed, first=6)
    assert resumed.finished is not None
    assert resumed.finished.last_seq == 5 + len(resumed.tokens) == 40
    # A full replay from the other gateway gives exactly what the client pieced together.
    replay = TurnResult()
    for frame in stubs["gateway-2"].ResumeTurn(  # type: ignore[attr-defined]
        gateway_pb2.ResumeTurnRequest(turn_id=first.turn_id, after_seq=0),
        metadata=auth(key),
        timeout=90,
    ):
        replay.add(frame)
    assert replay.text == first.text + resumed.text
    replay.conversation_id = replay.conversation_id or first.conversation_id
    replay.turn_id = first.turn_id
    record(ledger, replay, key)


def test_fact_is_recalled_through_elasticsearch_into_a_later_prompt(
    scale_mesh: ScaleMesh, stubs: dict[str, object], ledger: dict[str, Streamed]
) -> None:
    fact = "my bike lock code is walrus2718"
    key, other_key = scale_mesh.api_key, scale_mesh.other_api_key
    told = stream_turn(
        stubs["gateway-1"], key, start_request(f"Please remember: {fact}.", max_tokens=4), 90
    )
    record(ledger, told, key)
    # A new conversation, on the other gateway: the fact can only come from memory.
    later = stream_turn(
        stubs["gateway-2"],
        key,
        start_request("What is my bike lock code walrus2718?", max_tokens=4),
        90,
    )
    record(ledger, later, key)
    other = stream_turn(
        stubs["envoy"],
        other_key,
        start_request("What is my bike lock code walrus2718?", max_tokens=4),
        90,
    )
    record(ledger, other, other_key)
    by_turn = {p["turn_id"]: p["prompt"] for p in prompts(scale_mesh)}
    assert fact in by_turn[later.turn_id]
    # Tenant isolation: the other tenant asking the same never gets the fact.
    assert fact not in by_turn[other.turn_id]


def test_agent_killed_mid_turn_is_taken_over_without_gap_or_duplicate(
    scale_mesh: ScaleMesh, stubs: dict[str, object], ledger: dict[str, Streamed]
) -> None:
    mesh = scale_mesh.mesh
    wait_agents_settled(scale_mesh)
    key = scale_mesh.api_key
    # Long enough to be mid-turn when the kill lands, whether the tiny model makes 20 or 300
    # tokens a second on this machine right now.
    max_tokens = 400
    call = stubs["gateway-1"].StreamTurn(  # type: ignore[attr-defined]
        gateway_pb2.StreamTurnRequest(
            start=start_request("a long answer please", max_tokens=max_tokens, seed=5)
        ),
        metadata=auth(key),
        timeout=150,
    )
    result = TurnResult()
    frames = iter(call)
    while not result.tokens:
        result.add(next(frames))
    # The agent wrote its prompt before the first token: the quickest way to know which it is.
    [victim] = {p["agent_id"] for p in prompts(scale_mesh) if p["turn_id"] == result.turn_id}
    [service] = [s for s in mesh.agents if s.name == victim]
    killed_at = time.monotonic()
    service.kill()  # SIGKILL: no drain, no commit, the producer's queue is lost
    survivors = {s.name for s in mesh.agents if s.process.poll() is None}
    for frame in frames:  # the original stream carries on from the other agent
        result.add(frame)
    takeover_s = time.monotonic() - killed_at

    assert result.finished is not None, "the stream ended without TurnFinished"
    assert result.finished.finish_reason in FINISHED_NORMALLY
    assert_gap_free(result)
    assert result.finished.last_seq == len(result.tokens)

    events = turn_events(scale_mesh, result.turn_id)
    starts = started_by(events)
    assert len(starts) == 2, starts
    (first_agent, first_resume), (second_agent, second_resume) = starts
    assert first_agent == victim and first_resume == 0
    assert second_agent in survivors and second_agent != victim
    # The survivor continued after what the log held when it took over: mid-turn, not a redo.
    assert 1 <= second_resume < result.finished.last_seq
    # A record may carry several consecutive tokens (more_texts).
    seqs = [
        e.token.seq + i
        for e in events
        if e.WhichOneof("event") == "token"
        for i in range(1 + len(e.token.more_texts))
    ]
    assert seqs == list(range(1, result.finished.last_seq + 1)), "gap or duplicate on the log"
    assert [e.WhichOneof("event") for e in events].count("finished") == 1
    # The survivor's prompt carried the text generated before the crash.
    resumed_prompt = [
        p
        for p in prompts(scale_mesh)
        if p["turn_id"] == result.turn_id and p["agent_id"] == second_agent
    ]
    assert resumed_prompt, "the survivor left no prompt for the turn"
    tokens_before = "".join(t.text for t in result.tokens[:second_resume])
    assert tokens_before.strip()[-20:] in resumed_prompt[0]["prompt"]
    # Any gateway replays the turn identically.
    replay = TurnResult()
    for frame in stubs["gateway-2"].ResumeTurn(  # type: ignore[attr-defined]
        gateway_pb2.ResumeTurnRequest(turn_id=result.turn_id), metadata=auth(key), timeout=60
    ):
        replay.add(frame)
    assert replay.text == result.text
    record(ledger, result, key)
    print(f"takeover after SIGKILL: the turn finished {takeover_s:.1f}s after the kill")

    # Back to two agents for whatever runs next.
    mesh.start_agent(timeout_s=120)
    assert sum(s.process.poll() is None for s in mesh.agents) == 2
    wait_agents_settled(scale_mesh)
    assert takeover_s < SESSION_TIMEOUT_S + 60


def test_agent_killed_with_a_batch_in_flight_hands_every_turn_over(
    scale_mesh: ScaleMesh, stubs: dict[str, object], ledger: dict[str, Streamed]
) -> None:
    """On Kafka: eight turns run at once on two batching agents; SIGKILL the agent that holds
    the most. Its turns in flight finish on the survivor, and every turn is gap-free and
    duplicate-free on the log and in the streams."""
    mesh = scale_mesh.mesh
    wait_agents_settled(scale_mesh)
    key = scale_mesh.api_key
    results = [TurnResult() for _ in range(8)]
    errors: list[BaseException] = []

    def run(index: int) -> None:
        start = start_request(f"batch turn {index}", max_tokens=400, seed=20 + index)
        try:
            for frame in stubs[f"gateway-{1 + index % 2}"].StreamTurn(  # type: ignore[attr-defined]
                gateway_pb2.StreamTurnRequest(start=start), metadata=auth(key), timeout=180
            ):
                results[index].add(frame)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while not all(r.tokens for r in results) and not errors and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not errors and all(r.tokens for r in results), "not every turn started generating"
    owner = {
        p["turn_id"]: p["agent_id"]
        for p in prompts(scale_mesh)
        if p["turn_id"] in {r.turn_id for r in results}
    }
    victim = max({owner[r.turn_id] for r in results}, key=list(owner.values()).count)
    moved = [r for r in results if owner[r.turn_id] == victim]
    [service] = [s for s in mesh.agents if s.name == victim]
    service.kill()
    for thread in threads:
        thread.join(180)
    assert not errors, errors
    for result in results:
        assert result.finished is not None, result.turn_id
        assert_gap_free(result)
        assert result.finished.last_seq == len(result.tokens)
        record(ledger, result, key)
    taken_over = 0
    for result in moved:
        events = turn_events(scale_mesh, result.turn_id)
        starts = [agent for agent, _ in started_by(events)]
        assert starts[0] == victim
        taken_over += starts[1:] != []
        seqs = [
            e.token.seq + i
            for e in events
            if e.WhichOneof("event") == "token"
            for i in range(1 + len(e.token.more_texts))
        ]
        assert seqs == list(range(1, result.finished.last_seq + 1)), "gap or duplicate on the log"
    # Several of the victim's turns were mid-generation in its batch when it died.
    assert taken_over >= 2, (taken_over, len(moved))
    mesh.start_agent(timeout_s=120)
    assert sum(s.process.poll() is None for s in mesh.agents) == 2
    wait_agents_settled(scale_mesh)


def test_every_streamed_turn_is_in_postgres_exactly_as_streamed(
    scale_mesh: ScaleMesh, stubs: dict[str, object], ledger: dict[str, Streamed]
) -> None:
    # One turn of this test's own, so the check never runs on an empty ledger.
    own = stream_turn(
        stubs["envoy"], scale_mesh.api_key, start_request("one for the road", max_tokens=6), 90
    )
    record(ledger, own, scale_mesh.api_key)
    for turn in ledger.values():
        deadline = time.monotonic() + 30
        while True:
            # Through the gateway, as a client reads history.
            conversation = (
                stubs["gateway-2"]
                .GetConversation(  # type: ignore[attr-defined]
                    gateway_pb2.GetConversationRequest(conversation_id=turn.conversation_id),
                    metadata=auth(turn.api_key),
                    timeout=30,
                )
                .conversation
            )
            messages = [m for m in conversation.messages if m.turn_id == turn.turn_id]
            if len(messages) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert [m.role for m in messages] == [
            conversation_pb2.ROLE_USER,
            conversation_pb2.ROLE_ASSISTANT,
        ], turn
        assert messages[1].text == turn.text, turn.turn_id

    # And in the database itself: exactly these turns in their conversations, each token once.
    # (Other modules' tests share this mesh and write conversations of their own.)
    conversations = sorted({t.conversation_id for t in ledger.values()})
    turns = sorted(ledger)
    with psycopg.connect(scale_mesh.pg_dsn) as conn:

        def count(query: str, ids: list[str]) -> int:
            return int(conn.execute(query, (ids,)).fetchone()[0])  # type: ignore[index]

        counts = {
            "conversations": count(
                "SELECT count(*) FROM conversations WHERE conversation_id = ANY(%s)", conversations
            ),
            "messages": count(
                "SELECT count(*) FROM messages WHERE conversation_id = ANY(%s)", conversations
            ),
            # Assembled turns keep no token rows, only each token's length on the message.
            "token rows": count("SELECT count(*) FROM tokens WHERE turn_id = ANY(%s)", turns),
        }
        per_turn = dict(
            conn.execute(
                "SELECT turn_id, cardinality(token_lengths) FROM messages "
                "WHERE turn_id = ANY(%s) AND role = 2",
                (turns,),
            ).fetchall()
        )
    assert counts == {
        "conversations": len({t.conversation_id for t in ledger.values()}),
        "messages": 2 * len(ledger),
        "token rows": 0,
    }
    assert per_turn == {t.turn_id: t.last_seq for t in ledger.values()}

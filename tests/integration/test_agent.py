"""The agent as a real process (`python -m services.agent`), tiny model, embedded log.

The test plays gateway and persister/memory: it appends ``TurnRequested`` records and reads the
turn events the agent writes, serves fake persister and memory gRPC services in-process (so it
can see what the agent asked for), and drives the direct ``Generate`` RPC.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from chat.agent.v1 import agent_pb2, agent_service_pb2_grpc
from chat.common.v1 import common_pb2, conversation_pb2
from chat.events.v1 import events_pb2
from chat.memory.v1 import memory_pb2, memory_service_pb2_grpc
from chat.persister.v1 import persister_pb2, persister_service_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from mesh.llm.engine import LlamaEngine
from mesh.llm.tiny_model import ensure_tiny_model
from mesh.log import TURN_EVENTS, TURN_REQUESTS, partition_for
from mesh.log.embedded import EmbeddedLog
from mesh.server import channel
from mesh.turn_ids import new_turn_ref
from services.agent.prompt import ChatMessage, PromptBuilder, PromptRequest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 2
N_CTX = 512
MAX_TOKENS_LIMIT = 1000
STARTUP_S = 60.0
TURN_S = 60.0


# -- fake persister and memory ------------------------------------------------------------------


@dataclass
class Fakes:
    """Conversations the fake persister knows and chunks the fake memory returns."""

    conversations: dict[tuple[str, str], list[tuple[str, str, str]]] = field(default_factory=dict)
    chunks: dict[str, list[str]] = field(default_factory=dict)
    history_calls: list[persister_pb2.GetConversationRequest] = field(default_factory=list)
    recall_calls: list[memory_pb2.RecallRequest] = field(default_factory=list)
    # Tenants whose recall fails with UNAVAILABLE (memory down for them).
    recall_down: set[str] = field(default_factory=set)


class FakePersister(persister_service_pb2_grpc.PersisterServiceServicer):  # type: ignore[misc]
    def __init__(self, fakes: Fakes) -> None:
        self._fakes = fakes

    async def GetConversation(self, request: Any, context: Any) -> Any:
        self._fakes.history_calls.append(request)
        messages = self._fakes.conversations.get((request.tenant_id, request.conversation_id))
        if messages is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such conversation")
        roles = {"user": conversation_pb2.ROLE_USER, "assistant": conversation_pb2.ROLE_ASSISTANT}
        return persister_pb2.GetConversationResponse(
            conversation=conversation_pb2.Conversation(
                conversation_id=request.conversation_id,
                messages=[
                    conversation_pb2.Message(turn_id=turn, role=roles[role], text=text)
                    for turn, role, text in messages
                ],
            )
        )


class FakeMemory(memory_service_pb2_grpc.MemoryServiceServicer):  # type: ignore[misc]
    def __init__(self, fakes: Fakes) -> None:
        self._fakes = fakes

    async def Recall(self, request: Any, context: Any) -> Any:
        self._fakes.recall_calls.append(request)
        if request.tenant_id in self._fakes.recall_down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "memory is down")
        texts = self._fakes.chunks.get(request.tenant_id, [])[: request.top_k]
        return memory_pb2.RecallResponse(
            chunks=[memory_pb2.Chunk(chunk_id=f"c{i}", text=t) for i, t in enumerate(texts)]
        )


@pytest_asyncio.fixture(scope="module")
async def fakes() -> AsyncIterator[tuple[Fakes, str, str]]:
    state = Fakes()
    server = grpc.aio.server()
    persister_service_pb2_grpc.add_PersisterServiceServicer_to_server(FakePersister(state), server)
    memory_service_pb2_grpc.add_MemoryServiceServicer_to_server(FakeMemory(state), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    addr = f"127.0.0.1:{port}"
    yield state, addr, addr
    await server.stop(None)


# -- the agent process --------------------------------------------------------------------------


@dataclass
class AgentProcess:
    process: asyncio.subprocess.Process
    lines: list[str]
    addr: str = ""
    drain: asyncio.Task[None] | None = None

    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    async def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            self.process.kill()
            code = await self.process.wait()
        if self.drain is not None:
            await asyncio.wait_for(self.drain, 10)
        return code


_LISTENING = re.compile(r"agent service listening on ([\d.]+):(\d+)")


async def start_agent(env: dict[str, str], name: str) -> AgentProcess:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.agent",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    agent = AgentProcess(process, [])
    found: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def read() -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            line = raw.decode(errors="replace").rstrip()
            agent.lines.append(f"[{name}] {line}")
            match = _LISTENING.search(line)
            if match and not found.done():
                found.set_result(f"{match[1]}:{match[2]}")
        if not found.done():
            found.set_exception(AssertionError(f"{name} exited before listening"))

    agent.drain = asyncio.create_task(read())
    try:
        agent.addr = await asyncio.wait_for(asyncio.shield(found), STARTUP_S)
    except (TimeoutError, AssertionError) as error:
        await agent.stop(signal.SIGKILL)
        raise AssertionError(f"{name} did not start ({error!r}):\n{agent.output()}") from None
    return agent


def agent_env(
    tmp: Path, model: Path, log_path: Path, *, memory: str, persister: str, agent_id: str
) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen" / "python")]),
        "PYTHONUNBUFFERED": "1",
        "MESH_STATE_DIR": str(tmp / "state"),
        "MESH_AGENT_HOST": "127.0.0.1",
        "MESH_AGENT_PORT": "0",
        "MESH_AGENT_METRICS_PORT": "0",
        "MESH_AGENT_GRACE_S": "1",
        "MESH_AGENT_ID": agent_id,
        "MESH_AGENT_MODEL_PATH": str(model),
        "MESH_AGENT_N_CTX": str(N_CTX),
        "MESH_AGENT_THREADS": "1",
        "MESH_AGENT_DEFAULT_MAX_TOKENS": "12",
        "MESH_AGENT_MAX_TOKENS_LIMIT": str(MAX_TOKENS_LIMIT),
        "MESH_AGENT_DEPENDENCY_TIMEOUT_S": "2",
        "MESH_AGENT_DEPENDENCY_ATTEMPTS": "2",
        "MESH_MEMORY_ADDR": memory,
        "MESH_PERSISTER_ADDR": persister,
        "MESH_LOG_DRIVER": "embedded",
        "MESH_LOG_PATH": str(log_path),
        "MESH_LOG_PARTITIONS": str(PARTITIONS),
        "MESH_LOG_SESSION_TIMEOUT_S": "1",
        "MESH_LOG_HEARTBEAT_INTERVAL_S": "0.2",
    }


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("agent-models"))


@dataclass
class Running:
    agent: AgentProcess
    log: EmbeddedLog
    fakes: Fakes
    channel: grpc.aio.Channel
    model: Path

    @property
    def stub(self) -> agent_service_pb2_grpc.AgentServiceStub:
        return agent_service_pb2_grpc.AgentServiceStub(self.channel)


@pytest_asyncio.fixture(scope="module")
async def running(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Path,
    fakes: tuple[Fakes, str, str],
) -> AsyncIterator[Running]:
    tmp = tmp_path_factory.mktemp("agent")
    state, memory_addr, persister_addr = fakes
    log_path = tmp / "log" / "mesh-log.sqlite3"
    log_path.parent.mkdir(parents=True)
    event_log = EmbeddedLog(log_path, session_timeout_s=1.0, heartbeat_interval_s=0.2)
    await event_log.start()
    await event_log.ensure_topic(TURN_REQUESTS, PARTITIONS)
    await event_log.ensure_topic(TURN_EVENTS, PARTITIONS)
    env = agent_env(
        tmp, tiny_model, log_path, memory=memory_addr, persister=persister_addr, agent_id="agent-1"
    )
    agent = await start_agent(env, "agent-1")
    ch = channel(agent.addr)
    try:
        yield Running(agent, event_log, state, ch, tiny_model)
    finally:
        await ch.close()
        code = await agent.stop()
        await event_log.stop()
        assert code == 0, agent.output()
        assert not any("Traceback" in line for line in agent.lines), agent.output()


# -- helpers --------------------------------------------------------------------------------------


def reason_of(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no rich status on {error!r}"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    raise AssertionError(f"no ErrorInfo in {status}")


def start_frame(
    generation_id: str = "g1", user_text: str = "hello the mesh", **options: Any
) -> agent_pb2.GenerateRequest:
    return agent_pb2.GenerateRequest(
        start=agent_pb2.StartGeneration(
            generation_id=generation_id,
            user_text=user_text,
            options=common_pb2.GenerationOptions(**options),
        )
    )


def cancel_frame(generation_id: str = "g1") -> agent_pb2.GenerateRequest:
    return agent_pb2.GenerateRequest(cancel=agent_pb2.CancelGeneration(generation_id=generation_id))


async def frames(
    items: Sequence[agent_pb2.GenerateRequest], hold: asyncio.Event | None = None
) -> AsyncIterator[agent_pb2.GenerateRequest]:
    for item in items:
        yield item
    if hold is not None:
        await hold.wait()


@dataclass
class Turn:
    turn_id: str
    conversation_id: str
    partition: int
    request_offset: int
    events_start: int


async def new_turn(log: EmbeddedLog, conversation_id: str) -> Turn:
    partition = partition_for(conversation_id.encode(), PARTITIONS)
    request_start = await log.end_offset(TURN_REQUESTS, partition)
    events_start = await log.end_offset(TURN_EVENTS, partition)
    turn_id = str(new_turn_ref(partition, request_start, events_start))
    return Turn(turn_id, conversation_id, partition, -1, events_start)


async def request_turn(
    log: EmbeddedLog,
    turn: Turn,
    text: str,
    *,
    tenant_id: str = "tenant-a",
    **options: Any,
) -> Turn:
    message = events_pb2.TurnRequested(
        turn_id=turn.turn_id,
        conversation_id=turn.conversation_id,
        tenant_id=tenant_id,
        user_text=text,
        options=common_pb2.GenerationOptions(**options),
        events_start_offset=turn.events_start,
        events_partition=turn.partition,
    )
    message.accepted_at.GetCurrentTime()
    offset = await log.append(
        TURN_REQUESTS, turn.partition, turn.conversation_id.encode(), message.SerializeToString()
    )
    turn.request_offset = offset
    return turn


async def append_event(log: EmbeddedLog, turn: Turn, event: events_pb2.TurnEvent) -> int:
    return await log.append(
        TURN_EVENTS, turn.partition, turn.conversation_id.encode(), event.SerializeToString()
    )


def token_event(turn: Turn, seq: int, text: str, attempt: int = 0) -> events_pb2.TurnEvent:
    return events_pb2.TurnEvent(
        token=events_pb2.TokenEmitted(
            turn_id=turn.turn_id,
            seq=seq,
            text=text,
            conversation_id=turn.conversation_id,
            attempt=attempt,
        )
    )


def cancel_event(turn: Turn) -> events_pb2.TurnEvent:
    return events_pb2.TurnEvent(
        cancelled=events_pb2.TurnCancelled(
            turn_id=turn.turn_id, conversation_id=turn.conversation_id
        )
    )


@dataclass
class Seen:
    started: list[events_pb2.TurnStarted] = field(default_factory=list)
    tokens: list[events_pb2.TokenEmitted] = field(default_factory=list)
    finished: events_pb2.TurnFinished | None = None
    # (kind, seq) in log order, for "what came after the cancel" checks.
    order: list[tuple[str, int]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)


async def watch(log: EmbeddedLog, turn: Turn, *, until_tokens: int = 0) -> Seen:
    """Read the turn's events from its start until TurnFinished (or ``until_tokens`` tokens)."""
    seen = Seen()

    async def read() -> None:
        records = log.read(TURN_EVENTS, turn.partition, turn.events_start)
        try:
            async for record in records:
                event = events_pb2.TurnEvent()
                event.ParseFromString(record.value)
                kind = event.WhichOneof("event")
                inner = getattr(event, str(kind))
                if inner.turn_id != turn.turn_id:
                    continue
                if kind == "token":
                    # A record may carry several consecutive tokens (more_texts).
                    token = event.token
                    for i, text in enumerate([token.text, *token.more_texts]):
                        seen.order.append(("token", token.seq + i))
                        one = events_pb2.TokenEmitted()
                        one.CopyFrom(token)
                        del one.more_texts[:]
                        one.seq, one.text = token.seq + i, text
                        seen.tokens.append(one)
                else:
                    seen.order.append((str(kind), 0))
                if kind == "started":
                    seen.started.append(event.started)
                elif kind == "token":
                    if until_tokens and len(seen.tokens) >= until_tokens:
                        return
                elif kind == "finished":
                    seen.finished = event.finished
                    return
        finally:
            await records.aclose()  # type: ignore[attr-defined]

    await asyncio.wait_for(read(), TURN_S)
    return seen


async def watch_now(log: EmbeddedLog, turn: Turn) -> Seen:
    """The turn's events already in the log (no waiting)."""
    seen = Seen()
    end = await log.end_offset(TURN_EVENTS, turn.partition)
    for record in await log.read_range(TURN_EVENTS, turn.partition, turn.events_start, end):
        event = events_pb2.TurnEvent()
        event.ParseFromString(record.value)
        if event.WhichOneof("event") == "finished" and event.finished.turn_id == turn.turn_id:
            seen.finished = event.finished
    return seen


def assert_gap_free(seen: Seen, first: int = 1) -> None:
    seqs = [t.seq for t in seen.tokens]
    assert seqs == list(range(first, first + len(seqs))), seqs


async def until_committed(log: EmbeddedLog, turn: Turn, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await log.committed(TURN_REQUESTS, "agents", turn.partition) > turn.request_offset:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the request of {turn.turn_id} was not committed")


# -- the direct RPCs ------------------------------------------------------------------------------


async def test_health_and_node_info(running: Running) -> None:
    health = health_pb2_grpc.HealthStub(running.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    info = await running.stub.GetNodeInfo(agent_pb2.GetNodeInfoRequest(), timeout=5)
    assert info.agent_id == "agent-1"
    assert info.model.endswith(".gguf")
    assert info.device == agent_pb2.DEVICE_CPU
    assert info.context_size == N_CTX
    assert info.total_slots == 4  # the CPU default of MESH_AGENT_PARALLEL
    assert info.gpu_layers == 0


async def test_generate_streams_tokens_then_finished(running: Running) -> None:
    responses = [
        r
        async for r in running.stub.Generate(
            frames([start_frame(max_tokens=20, seed=4)]), timeout=TURN_S
        )
    ]
    tokens = [r.token for r in responses[:-1]]
    assert all(r.WhichOneof("frame") == "token" for r in responses[:-1])
    assert [t.seq for t in tokens] == list(range(1, 21))
    finished = responses[-1].finished
    assert finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert finished.usage.completion_tokens == 20
    assert finished.usage.prompt_tokens > 0
    assert 0 < finished.time_to_first_token_ms <= finished.total_ms


async def test_generate_defaults_and_history(running: Running) -> None:
    start = start_frame(user_text="and then?")
    start.start.history.add(role="user", text="hello")
    start.start.history.add(role="assistant", text="hi there")
    start.start.context_passages.append("the mesh streams tokens")
    responses = [r async for r in running.stub.Generate(frames([start]), timeout=TURN_S)]
    assert len(responses) == 12 + 1  # MESH_AGENT_DEFAULT_MAX_TOKENS tokens and the end


async def test_cancel_frame_stops_generation(running: Running) -> None:
    outgoing: asyncio.Queue[agent_pb2.GenerateRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[agent_pb2.GenerateRequest]:
        while (item := await outgoing.get()) is not None:
            yield item

    outgoing.put_nowait(start_frame(max_tokens=MAX_TOKENS_LIMIT))
    tokens = 0
    finished = None
    async for response in running.stub.Generate(requests(), timeout=TURN_S):
        if response.WhichOneof("frame") == "token":
            tokens += 1
            assert response.token.seq == tokens
            if tokens == 3:
                outgoing.put_nowait(cancel_frame())
        else:
            finished = response.finished
    outgoing.put_nowait(None)
    assert finished is not None
    assert finished.finish_reason == common_pb2.FINISH_REASON_CANCELLED
    assert finished.usage.completion_tokens == tokens
    # The context had room for hundreds of tokens; the cancel cut the reply short.
    assert 3 <= tokens < N_CTX - 50


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (start_frame(generation_id=""), "GENERATION_ID_MISSING"),
        (start_frame(user_text=""), "USER_TEXT_MISSING"),
        (start_frame(max_tokens=-1), "MAX_TOKENS_INVALID"),
        (start_frame(max_tokens=MAX_TOKENS_LIMIT + 1), "MAX_TOKENS_INVALID"),
        (start_frame(temperature=2.5), "TEMPERATURE_INVALID"),
        (start_frame(temperature=-1.0), "TEMPERATURE_INVALID"),
        (start_frame(top_p=0.0), "TOP_P_INVALID"),
        (start_frame(top_p=1.5), "TOP_P_INVALID"),
        (start_frame(user_text="the " * N_CTX), "PROMPT_TOO_LONG"),
    ],
)
async def test_bad_start_frames_are_invalid_argument(
    running: Running, frame: agent_pb2.GenerateRequest, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in running.stub.Generate(frames([frame]), timeout=10):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(caught.value) == reason


async def test_cancel_before_start_is_failed_precondition(running: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in running.stub.Generate(frames([cancel_frame()]), timeout=10):
            pass
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(caught.value) == "NO_GENERATION"


async def test_second_start_is_invalid_argument(running: Running) -> None:
    hold = asyncio.Event()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in running.stub.Generate(
            frames([start_frame(max_tokens=MAX_TOKENS_LIMIT), start_frame()], hold), timeout=20
        ):
            pass
    hold.set()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(caught.value) == "DUPLICATE_START"


# -- the log worker -------------------------------------------------------------------------------


async def test_turn_from_the_log_streams_gap_free_tokens(running: Running) -> None:
    turn = await new_turn(running.log, "conv-new")
    await request_turn(running.log, turn, "hello the model", max_tokens=15, seed=3)
    seen = await watch(running.log, turn)
    assert len(seen.started) == 1
    started = seen.started[0]
    assert started.agent_id == "agent-1"
    assert started.resumed_after_seq == 0
    assert started.request_partition == turn.partition
    assert started.request_offset == turn.request_offset
    assert_gap_free(seen)
    assert len(seen.tokens) == 15
    assert all(t.conversation_id == "conv-new" and t.tenant_id == "tenant-a" for t in seen.tokens)
    finished = seen.finished
    assert finished is not None
    assert finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert finished.last_seq == 15
    assert finished.usage.completion_tokens == 15
    assert finished.usage.prompt_tokens > 0
    assert finished.model.endswith(".gguf")
    assert finished.tenant_id == "tenant-a" and finished.conversation_id == "conv-new"
    timings = finished.timings
    assert timings.queued_ms >= 0
    assert 0 < timings.time_to_first_token_ms <= timings.total_ms
    assert not finished.HasField("error")
    await until_committed(running.log, turn)
    # A conversation the persister does not know is new: it was asked, and generation went on.
    call = next(c for c in running.fakes.history_calls if c.conversation_id == "conv-new")
    assert call.tenant_id == "tenant-a" and call.consistent


async def test_history_and_recall_reach_the_prompt(running: Running) -> None:
    fakes = running.fakes
    plain = await new_turn(running.log, "conv-plain")
    await request_turn(running.log, plain, "what now", tenant_id="tenant-b", max_tokens=2)
    plain_seen = await watch(running.log, plain)

    rich = await new_turn(running.log, "conv-rich")
    fakes.conversations[("tenant-b", "conv-rich")] = [
        ("t-old", "user", "hello there"),
        ("t-old", "assistant", "general kenobi"),
        (rich.turn_id, "user", "what now"),  # the turn itself: must not be doubled
    ]
    fakes.chunks["tenant-b"] = ["the mesh keeps a durable log", "agents run llama.cpp"]
    await request_turn(running.log, rich, "what now", tenant_id="tenant-b", max_tokens=2)
    rich_seen = await watch(running.log, rich)

    assert plain_seen.finished is not None and rich_seen.finished is not None
    recall = next(c for c in fakes.recall_calls if c.tenant_id == "tenant-b")
    assert recall.query == "what now"
    assert recall.top_k == 4
    history = [c for c in fakes.history_calls if c.conversation_id == "conv-rich"]
    assert history and history[0].tenant_id == "tenant-b" and history[0].consistent
    # The prompt the agent used is exactly: the older exchange, both passages, the question once.
    async with LlamaEngine(running.model, n_ctx=N_CTX, n_threads=1) as engine:
        prompts = PromptBuilder(
            count_tokens=engine.count_segments,
            n_ctx=N_CTX,
            chat_template=engine.chat_template,
            bos_token=engine.bos_text,
        )
        expected_rich = prompts.build(
            PromptRequest(
                user_text="what now",
                history=[
                    ChatMessage("user", "hello there"),
                    ChatMessage("assistant", "general kenobi"),
                ],
                context_passages=fakes.chunks["tenant-b"],
            ),
            2,
        )
        expected_plain = prompts.build(PromptRequest(user_text="what now"), 2)
    assert rich_seen.finished.usage.prompt_tokens == expected_rich.prompt_tokens
    assert plain_seen.finished.usage.prompt_tokens == expected_plain.prompt_tokens
    assert expected_rich.prompt_tokens > expected_plain.prompt_tokens
    del fakes.chunks["tenant-b"]


async def test_takeover_continues_after_the_tokens_in_the_log(running: Running) -> None:
    # A previous agent wrote " say" and " farewell" and died. The tiny model says " friend" after
    # " farewell" and then ends the sequence: that only happens if the text so far is in the
    # prompt, and the seq numbers show where the new agent picked up.
    turn = await new_turn(running.log, "conv-takeover")
    await append_event(
        running.log,
        turn,
        events_pb2.TurnEvent(
            started=events_pb2.TurnStarted(turn_id=turn.turn_id, agent_id="dead-agent")
        ),
    )
    await append_event(running.log, turn, token_event(turn, 1, " say"))
    await append_event(running.log, turn, token_event(turn, 2, " farewell"))
    await request_turn(running.log, turn, "hello", max_tokens=50, seed=1)
    seen = await watch(running.log, turn)
    assert [s.resumed_after_seq for s in seen.started] == [0, 2]
    assert seen.started[1].agent_id == "agent-1"
    # The dead agent wrote no attempt (a record from before attempts): this is attempt 1.
    assert seen.started[1].attempt == 1
    assert {t.attempt for t in seen.tokens if t.seq > 2} == {1}
    assert_gap_free(seen)
    assert seen.text == " say farewell friend"
    assert seen.finished is not None
    assert seen.finished.finish_reason == common_pb2.FINISH_REASON_STOP
    assert seen.finished.last_seq == 3
    assert seen.finished.usage.completion_tokens == 3
    await until_committed(running.log, turn)


async def test_takeover_ignores_a_zombies_records_after_a_newer_attempt(running: Running) -> None:
    # Attempt 1 wrote " say"; attempt 2 took over; attempt 1's late token 2 landed after that
    # TurnStarted and must not count, attempt 2's " farewell" does. The tiny model only says
    # " friend" after " say farewell", so the prompt shows which token 2 the agent kept.
    turn = await new_turn(running.log, "conv-zombie-records")

    def started(attempt: int) -> events_pb2.TurnEvent:
        return events_pb2.TurnEvent(
            started=events_pb2.TurnStarted(
                turn_id=turn.turn_id, agent_id=f"dead-{attempt}", attempt=attempt
            )
        )

    await append_event(running.log, turn, started(1))
    await append_event(running.log, turn, token_event(turn, 1, " say", attempt=1))
    await append_event(running.log, turn, started(2))
    await append_event(running.log, turn, token_event(turn, 2, " goodbye", attempt=1))
    await append_event(running.log, turn, token_event(turn, 2, " farewell", attempt=2))
    await request_turn(running.log, turn, "hello", max_tokens=50, seed=1)
    seen = await watch(running.log, turn)
    assert [s.attempt for s in seen.started] == [1, 2, 3]
    assert [s.resumed_after_seq for s in seen.started][-1] == 2
    mine = [t for t in seen.tokens if t.attempt == 3]
    assert "".join(t.text for t in mine) == " friend"
    assert [t.seq for t in mine] == [3]
    assert seen.finished is not None and seen.finished.attempt == 3
    assert seen.finished.last_seq == 3
    await until_committed(running.log, turn)


async def test_takeover_respects_max_tokens(running: Running) -> None:
    turn = await new_turn(running.log, "conv-takeover-2")
    for seq in range(1, 6):
        await append_event(running.log, turn, token_event(turn, seq, f" w{seq}"))
    await request_turn(running.log, turn, "hello the mesh", max_tokens=8, seed=2)
    seen = await watch(running.log, turn)
    assert_gap_free(seen)
    assert [t.seq for t in seen.tokens] == list(range(1, 9))
    assert seen.finished is not None
    assert seen.finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert seen.finished.last_seq == 8


async def test_turn_cancelled_while_generating(running: Running) -> None:
    turn = await new_turn(running.log, "conv-cancel")
    await request_turn(running.log, turn, "hello the model", max_tokens=MAX_TOKENS_LIMIT)
    first = await watch(running.log, turn, until_tokens=3)
    assert len(first.tokens) >= 3  # a record may carry several tokens
    await append_event(running.log, turn, cancel_event(turn))
    seen = await watch(running.log, turn)
    assert seen.finished is not None
    assert seen.finished.finish_reason == common_pb2.FINISH_REASON_CANCELLED
    assert_gap_free(seen)
    assert seen.finished.last_seq == len(seen.tokens)
    # The reply had room for hundreds of tokens; the cancel cut it short.
    assert seen.finished.last_seq < N_CTX - 50
    await until_committed(running.log, turn)


async def test_turn_cancelled_before_it_was_claimed(running: Running) -> None:
    turn = await new_turn(running.log, "conv-cancel-early")
    await append_event(running.log, turn, cancel_event(turn))
    await request_turn(running.log, turn, "hello", max_tokens=40)
    seen = await watch(running.log, turn)
    assert seen.tokens == []
    assert seen.finished is not None
    assert seen.finished.finish_reason == common_pb2.FINISH_REASON_CANCELLED
    assert seen.finished.last_seq == 0
    await until_committed(running.log, turn)


async def test_finished_turn_is_skipped(running: Running) -> None:
    turn = await new_turn(running.log, "conv-done")
    await append_event(running.log, turn, token_event(turn, 1, "done"))
    await append_event(
        running.log,
        turn,
        events_pb2.TurnEvent(
            finished=events_pb2.TurnFinished(
                turn_id=turn.turn_id,
                finish_reason=common_pb2.FINISH_REASON_STOP,
                last_seq=1,
            )
        ),
    )
    await request_turn(running.log, turn, "hello", max_tokens=40)
    await until_committed(running.log, turn)
    seen = await watch(running.log, turn)
    assert seen.started == []
    assert [t.text for t in seen.tokens] == ["done"]


# -- a crash mid-turn -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["crash", "drain"])
async def test_agent_lost_mid_turn_is_taken_over_by_the_next(
    tmp_path: Path, tiny_model: Path, how: str
) -> None:
    """An agent dies (SIGKILL) or drains with no grace (SIGTERM) mid-turn; the next agent
    continues after the last durable token.

    Memory and persister are not running here: the agents retry, degrade and still generate.
    """
    log_path = tmp_path / "log" / "crash.sqlite3"
    log_path.parent.mkdir()
    event_log = EmbeddedLog(log_path, session_timeout_s=1.0, heartbeat_interval_s=0.2)
    await event_log.start()
    await event_log.ensure_topic(TURN_REQUESTS, PARTITIONS)
    await event_log.ensure_topic(TURN_EVENTS, PARTITIONS)
    unused = "127.0.0.1:9"  # nothing listens there: dependencies are down
    agents: list[AgentProcess] = []
    try:
        env = agent_env(
            tmp_path, tiny_model, log_path, memory=unused, persister=unused, agent_id="crash-a"
        )
        env["MESH_AGENT_GRACE_S"] = "0"
        agents.append(await start_agent(env, "crash-a"))
        turn = await new_turn(event_log, "conv-crash")
        await request_turn(event_log, turn, "hello the model", max_tokens=MAX_TOKENS_LIMIT)
        await watch(event_log, turn, until_tokens=3)
        if how == "crash":
            await agents[0].stop(signal.SIGKILL)
        else:
            assert await agents[0].stop(signal.SIGTERM) == 0, agents[0].output()
            assert "handing back turn" in agents[0].output()
        # Nothing finished the turn and its request is still uncommitted.
        assert (await watch_now(event_log, turn)).finished is None
        committed = await event_log.committed(TURN_REQUESTS, "agents", turn.partition)
        assert committed <= turn.request_offset

        env["MESH_AGENT_ID"] = "crash-b"
        agents.append(await start_agent(env, "crash-b"))
        seen = await watch(event_log, turn)
        assert seen.finished is not None, agents[1].output()
        # Zombie duplicates are impossible here (the first agent is dead), so the log itself
        # must be gap-free across both agents.
        assert_gap_free(seen)
        by_agent = {s.agent_id: s.resumed_after_seq for s in seen.started}
        assert by_agent["crash-a"] == 0
        assert by_agent["crash-b"] >= 3
        assert seen.finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert seen.finished.last_seq == len(seen.tokens)
        assert seen.finished.usage.completion_tokens == len(seen.tokens)
        await until_committed(event_log, turn)
        assert "continuing without it" in agents[1].output()
    finally:
        for agent in agents:
            await agent.stop(signal.SIGKILL)
        await event_log.stop()


async def test_missing_model_is_a_clear_startup_error(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen" / "python")]),
        "MESH_AGENT_MODEL_PATH": str(tmp_path / "missing.gguf"),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.agent",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert b"MESH_AGENT_MODEL_PATH" in out and b"is not a file" in out


async def test_a_turn_generated_without_recall_says_so(
    running: Running, fakes: tuple[Fakes, str, str]
) -> None:
    state, _, _ = fakes
    state.recall_down.add("tenant-down")
    try:
        turn = await new_turn(running.log, "conv-no-recall")
        await request_turn(running.log, turn, "remember?", tenant_id="tenant-down", max_tokens=2)
        seen = await watch(running.log, turn)
    finally:
        state.recall_down.discard("tenant-down")
    assert seen.finished is not None
    skipped = [(s.source, s.reason) for s in seen.finished.context_skipped]
    assert skipped == [("recall", "unavailable")]
    # The turn still ran: it degraded, it did not fail.
    assert seen.finished.finish_reason != common_pb2.FINISH_REASON_ERROR

    healthy = await new_turn(running.log, "conv-with-recall")
    await request_turn(running.log, healthy, "remember?", max_tokens=2)
    seen = await watch(running.log, healthy)
    assert seen.finished is not None and list(seen.finished.context_skipped) == []


# -- fencing and the turn time limit ---------------------------------------------------------------


def _raw_tokens(records: Sequence[Any], turn: Turn) -> tuple[list[int], int]:
    """Every token seq the log holds for ``turn`` (records as written, duplicates included) and
    how many TurnFinished records it has."""
    seqs: list[int] = []
    finished = 0
    for record in records:
        event = events_pb2.TurnEvent()
        event.ParseFromString(record.value)
        kind = event.WhichOneof("event")
        if kind == "token" and event.token.turn_id == turn.turn_id:
            seqs.extend(range(event.token.seq, event.token.seq + 1 + len(event.token.more_texts)))
        elif kind == "finished" and event.finished.turn_id == turn.turn_id:
            finished += 1
    return seqs, finished


async def test_a_stopped_agent_that_lost_its_turn_cannot_append_to_it(
    tmp_path: Path, tiny_model: Path
) -> None:
    """The zombie: an agent stopped (SIGSTOP) mid-turn past its session loses the turn to
    another agent; resumed, its appends are refused by the log (fenced), so the log holds each
    token of the turn exactly once and one TurnFinished."""
    log_path = tmp_path / "log" / "zombie.sqlite3"
    log_path.parent.mkdir()
    event_log = EmbeddedLog(log_path, session_timeout_s=1.0, heartbeat_interval_s=0.2)
    await event_log.start()
    await event_log.ensure_topic(TURN_REQUESTS, PARTITIONS)
    await event_log.ensure_topic(TURN_EVENTS, PARTITIONS)
    unused = "127.0.0.1:9"
    agents: list[AgentProcess] = []
    try:
        env = agent_env(
            tmp_path, tiny_model, log_path, memory=unused, persister=unused, agent_id="zombie-a"
        )
        env["MESH_AGENT_MIN_TOKEN_INTERVAL_MS"] = "50"  # still generating when stopped
        agents.append(await start_agent(env, "zombie-a"))
        turn = await new_turn(event_log, "conv-zombie")
        await request_turn(event_log, turn, "hello the model", max_tokens=120)
        await watch(event_log, turn, until_tokens=5)
        agents[0].process.send_signal(signal.SIGSTOP)
        await asyncio.sleep(1.5)  # past the session: the group forgets the stopped agent
        env = {**env, "MESH_AGENT_ID": "zombie-b"}
        agents.append(await start_agent(env, "zombie-b"))
        await watch(event_log, turn, until_tokens=15)  # b is generating the turn now
        agents[0].process.send_signal(signal.SIGCONT)
        seen = await watch(event_log, turn)
        assert seen.finished is not None
        await until_committed(event_log, turn, timeout_s=30)
        await asyncio.sleep(1.0)  # room for any late append of the zombie
        end = await event_log.end_offset(TURN_EVENTS, turn.partition)
        records = await event_log.read_range(TURN_EVENTS, turn.partition, turn.events_start, end)
        seqs, finished = _raw_tokens(records, turn)
        assert seqs == list(range(1, 121)), "the log holds duplicate or missing tokens"
        assert finished == 1
        output = agents[0].output() + agents[1].output()
        assert "abandoned to its new owner" in output, output
    finally:
        for agent in agents:
            agent.process.send_signal(signal.SIGCONT)
            await agent.stop(signal.SIGKILL)
        await event_log.stop()


async def test_a_turn_past_the_time_limit_is_finished_and_the_next_turn_runs(
    tmp_path: Path, tiny_model: Path
) -> None:
    log_path = tmp_path / "log" / "limit.sqlite3"
    log_path.parent.mkdir()
    event_log = EmbeddedLog(log_path, session_timeout_s=1.0, heartbeat_interval_s=0.2)
    await event_log.start()
    await event_log.ensure_topic(TURN_REQUESTS, PARTITIONS)
    await event_log.ensure_topic(TURN_EVENTS, PARTITIONS)
    unused = "127.0.0.1:9"
    env = agent_env(
        tmp_path, tiny_model, log_path, memory=unused, persister=unused, agent_id="limited"
    )
    env["MESH_AGENT_MIN_TOKEN_INTERVAL_MS"] = "100"  # 1000 tokens would take 100 s
    env["MESH_AGENT_MAX_TURN_SECONDS"] = "2"
    env["MESH_AGENT_DEPENDENCY_ATTEMPTS"] = "1"
    env["MESH_AGENT_DEPENDENCY_TIMEOUT_S"] = "0.2"
    agent = await start_agent(env, "limited")
    try:
        hung = await new_turn(event_log, "conv-limit")
        await request_turn(event_log, hung, "talk for ever", max_tokens=MAX_TOKENS_LIMIT)
        started = time.monotonic()
        seen = await watch(event_log, hung)
        took = time.monotonic() - started
        assert seen.finished is not None
        assert seen.finished.finish_reason == common_pb2.FINISH_REASON_ERROR
        assert seen.finished.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        reasons = []
        for detail in seen.finished.error.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reasons.append(info.reason)
        assert reasons == ["TURN_TIME_LIMIT"]
        assert 0 < len(seen.tokens) < MAX_TOKENS_LIMIT
        assert seen.finished.last_seq == len(seen.tokens)
        assert took < 10, f"the limit of 2 s ended the turn only after {took:.1f} s"
        await until_committed(event_log, hung)
        # The partition is free: the conversation's next turn runs to its end.
        after = await new_turn(event_log, "conv-limit")
        await request_turn(event_log, after, "and now briefly", max_tokens=3)
        seen = await watch(event_log, after)
        assert seen.finished is not None
        assert seen.finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert "ran past its time limit" in agent.output()
    finally:
        await agent.stop(signal.SIGKILL)
        await event_log.stop()

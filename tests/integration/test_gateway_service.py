"""The gateway behind its real gRPC server, on a real embedded log, without agents.

The test plays the agent: it appends TurnStarted / TokenEmitted / TurnFinished records to the
same log file the gateways read. One gateway runs in-process (``build_server``); a second one
runs as ``python -m services.gateway`` on the same log file, for resume-anywhere and drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from chat.common.v1 import common_pb2
from chat.events.v1 import events_pb2
from chat.gateway.v1 import gateway_pb2, gateway_service_pb2_grpc
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mesh.auth import KeyStore, add_key_to_file, hash_key, revoke_key
from mesh.log import TURN_EVENTS, LogSettings
from mesh.log.embedded import EmbeddedLog
from mesh.server import set_serving
from mesh.turn_ids import parse_turn_id
from services.gateway.core import GatewayCore
from services.gateway.persister import PersisterClient
from services.gateway.server import SERVICE_NAME, GatewayDeps, build_server
from services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Keys:
    path: Path
    acme: str
    globex: str


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    path = tmp_path / "api-keys.json"
    return Keys(path, add_key_to_file(path, "acme"), add_key_to_file(path, "globex"))


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "log" / "mesh-log.sqlite3"


@pytest.fixture
async def agent_log(log_path: Path) -> AsyncIterator[EmbeddedLog]:
    """The test's own connection to the log, used to play the agent."""
    async with EmbeddedLog(log_path) as log:
        yield log


def md(key: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", key),)


@dataclass
class Gateway:
    addr: str
    channel: aio.Channel
    stub: Any
    core: GatewayCore | None = None


def gateway_settings(
    log_path: Path, keys: Keys, persister_addr: str, **changes: Any
) -> GatewaySettings:
    base = GatewaySettings(
        port=0,
        api_keys_file=keys.path,
        persister_addr=persister_addr,
        persister_timeout_s=5.0,
        queue_poll_s=0.1,
        log=LogSettings(path=log_path),
    )
    return dataclasses.replace(base, **changes)


@contextlib.asynccontextmanager
async def run_gateway(
    settings: GatewaySettings, *, tls_ca: Path | None = None, lookup: bool = True
) -> AsyncIterator[Gateway]:
    """The gateway in this process, served by its real gRPC server (the test's channel trusts
    ``tls_ca`` when the gateway serves TLS). ``lookup=False``: resume and cancel read the log
    only, as before the persister's LookupTurn (what a served turn is compared with)."""
    async with (
        EmbeddedLog(settings.log.path) as log,
        PersisterClient(settings.persister_addr, timeout_s=settings.persister_timeout_s) as pc,
        GatewayCore(settings, log=log, conversations=pc, turns=pc if lookup else None) as core,
    ):
        deps = GatewayDeps(core=core, persister=pc, keys=KeyStore(settings.api_keys_file))
        server, port = build_server(settings, deps)
        assert deps.health is not None
        await server.start()
        await set_serving(deps.health, [SERVICE_NAME], True)
        addr = f"127.0.0.1:{port}"
        if tls_ca is None:
            channel = aio.insecure_channel(addr)
        else:
            roots = await asyncio.to_thread(tls_ca.read_bytes)
            channel = aio.secure_channel(addr, grpc.ssl_channel_credentials(roots))
        try:
            yield Gateway(addr, channel, gateway_service_pb2_grpc.GatewayServiceStub(channel), core)
        finally:
            await channel.close()
            await server.stop(0)


@pytest.fixture
def closed_addr() -> str:
    """An address where nothing listens (a persister that is down)."""
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
async def gateway(
    log_path: Path, keys: Keys, closed_addr: str, agent_log: EmbeddedLog
) -> AsyncIterator[Gateway]:
    async with run_gateway(gateway_settings(log_path, keys, closed_addr)) as started:
        yield started


async def wait_serving(
    addr: str, process: asyncio.subprocess.Process | None, what: str, log_file: Path | None
) -> None:
    async with aio.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        last = "no answer"
        for _ in range(int(TIMEOUT_S * 10)):
            if process is not None and process.returncode is not None:
                last = f"exited with {process.returncode}"
                break
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = str(reply.status)
            except aio.AioRpcError as error:
                last = f"{error.code().name}: {error.details()}"
            await asyncio.sleep(0.1)
    output = ""
    if log_file is not None:
        output = (await asyncio.to_thread(log_file.read_text, errors="replace"))[-3000:]
    pytest.fail(f"{what} at {addr} never became SERVING ({last}):\n{output}")


_spawned = itertools.count()


@dataclass
class Process:
    addr: str
    process: asyncio.subprocess.Process
    channel: aio.Channel
    stub: Any
    log_file: Path


@contextlib.asynccontextmanager
async def spawn_gateway(
    log_path: Path,
    keys: Keys,
    persister_addr: str,
    tmp_path: Path,
    *,
    port: int = 0,
    **env: str,
) -> AsyncIterator[Process]:
    """``python -m services.gateway`` on the same log file."""
    port = port or free_port()
    environ = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen" / "python")]),
        "PYTHONUNBUFFERED": "1",
        "MESH_STATE_DIR": str(tmp_path / "state"),
        "MESH_LOG_PATH": str(log_path),
        "MESH_GATEWAY_PORT": str(port),
        "MESH_GATEWAY_METRICS_PORT": "-1",
        "MESH_GATEWAY_API_KEYS_FILE": str(keys.path),
        "MESH_GATEWAY_QUEUE_POLL_S": "0.1",
        # No HTTP listener on its fixed default port: several of these run at once.
        "MESH_GATEWAY_HTTP_PORT": "-1",
        "MESH_PERSISTER_ADDR": persister_addr,
        # The tests play the agents on the log, and most run without a persister: a start
        # must not wait for either (tests that check the refusals turn these back on).
        "MESH_GATEWAY_REQUIRE_AGENT": "false",
        "MESH_GATEWAY_REQUIRE_PERSISTER": "false",
        **env,
    }
    log_file = tmp_path / f"gateway-{port}-{next(_spawned)}.log"
    with log_file.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.gateway",
            cwd=ROOT,
            env=environ,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    addr = f"127.0.0.1:{port}"
    channel = aio.insecure_channel(addr)
    try:
        await wait_serving(addr, process, "gateway process", log_file)
        yield Process(
            addr, process, channel, gateway_service_pb2_grpc.GatewayServiceStub(channel), log_file
        )
    finally:
        await channel.close()
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


class AgentPlayer:
    """Appends one turn's events the way an agent would."""

    def __init__(
        self, log: EmbeddedLog, turn_id: str, conversation_id: str, tenant_id: str = "acme"
    ) -> None:
        self.log = log
        self.turn_id = turn_id
        self.conversation_id = conversation_id
        self.tenant_id = tenant_id
        self.key = conversation_id.encode()
        self.partition = parse_turn_id(turn_id).partition

    async def _put(self, event: events_pb2.TurnEvent) -> None:
        await self.log.append(TURN_EVENTS, self.partition, self.key, event.SerializeToString())

    async def started(self) -> None:
        await self._put(
            events_pb2.TurnEvent(
                started=events_pb2.TurnStarted(
                    turn_id=self.turn_id,
                    conversation_id=self.conversation_id,
                    tenant_id=self.tenant_id,
                    agent_id="test-agent",
                )
            )
        )

    async def tokens(self, seqs: Iterable[int]) -> None:
        futures = [
            self.log.append(
                TURN_EVENTS,
                self.partition,
                self.key,
                events_pb2.TurnEvent(
                    token=events_pb2.TokenEmitted(
                        turn_id=self.turn_id,
                        seq=seq,
                        text=f"w{seq} ",
                        conversation_id=self.conversation_id,
                        tenant_id=self.tenant_id,
                    )
                ).SerializeToString(),
            )
            for seq in seqs
        ]
        await asyncio.gather(*futures)

    async def finished(self, last_seq: int, reason: int = common_pb2.FINISH_REASON_STOP) -> None:
        await self._put(
            events_pb2.TurnEvent(
                finished=events_pb2.TurnFinished(
                    turn_id=self.turn_id,
                    finish_reason=reason,
                    last_seq=last_seq,
                    model="m",
                    conversation_id=self.conversation_id,
                    tenant_id=self.tenant_id,
                )
            )
        )


def rich(error: grpc.RpcError) -> tuple[grpc.StatusCode, str, list[Any]]:
    """Code, ErrorInfo reason and the other details of a failed call."""
    assert isinstance(error, aio.AioRpcError)
    status = None
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
    assert status is not None, f"no rich status on {error.code()}: {error.details()}"
    return error.code(), *_reason_and_details(status)


def _reason_and_details(status: status_pb2.Status) -> tuple[str, list[Any]]:
    reason = ""
    details: list[Any] = []
    for packed in status.details:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.RetryInfo,
            error_details_pb2.BadRequest,
        ):
            message = cls()
            if packed.Is(message.DESCRIPTOR):
                packed.Unpack(message)
                if isinstance(message, error_details_pb2.ErrorInfo):
                    reason = message.reason
                else:
                    details.append(message)
    return reason, details


def start_request(text: str = "hello", **options: Any) -> gateway_pb2.StreamTurnRequest:
    return gateway_pb2.StreamTurnRequest(
        start=gateway_pb2.StartTurn(text=text, options=common_pb2.GenerationOptions(**options))
    )


async def first_frame(call: Any) -> Any:
    return await asyncio.wait_for(call.read(), TIMEOUT_S)


async def expect_error(call: Any) -> tuple[grpc.StatusCode, str, list[Any]]:
    """Consume a call (unary awaitable or stream) that must fail; return its rich status."""
    try:
        if hasattr(call, "read"):
            while True:
                frame = await asyncio.wait_for(call.read(), TIMEOUT_S)
                assert frame is not aio.EOF, "the call ended without an error"
        else:
            await asyncio.wait_for(call, TIMEOUT_S)
    except aio.AioRpcError as error:
        return rich(error)
    raise AssertionError("the call succeeded")


async def read_until_finished(call: Any) -> list[Any]:
    frames = []
    while True:
        frame = await asyncio.wait_for(call.read(), TIMEOUT_S)
        assert frame is not aio.EOF, f"stream ended without TurnFinished after {frames[-3:]}"
        frames.append(frame)
        if frame.WhichOneof("frame") == "finished":
            return frames


def seqs(frames: Sequence[Any]) -> list[int]:
    return [f.token.seq for f in frames if f.WhichOneof("frame") == "token"]


# -- tests --------------------------------------------------------------------------------------


async def test_chat_streams_a_turn_in_order(
    gateway: Gateway, keys: Keys, agent_log: EmbeddedLog
) -> None:
    call = gateway.stub.Chat(metadata=md(keys.acme))
    await call.write(gateway_pb2.ChatRequest(start=gateway_pb2.StartTurn(text="hi")))
    accepted = (await first_frame(call)).accepted
    assert accepted.turn_id and accepted.conversation_id
    agent = AgentPlayer(agent_log, accepted.turn_id, accepted.conversation_id)
    await agent.started()
    await agent.tokens(range(1, 101))
    await agent.finished(100)
    frames = await read_until_finished(call)
    assert seqs(frames) == list(range(1, 101))
    assert [f.token.text for f in frames if f.WhichOneof("frame") == "token"][:2] == ["w1 ", "w2 "]
    done = frames[-1].finished
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP and done.last_seq == 100
    await call.done_writing()
    assert await asyncio.wait_for(call.read(), TIMEOUT_S) is aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_chat_frame_errors_keep_the_stream_open(
    gateway: Gateway, keys: Keys, agent_log: EmbeddedLog
) -> None:
    call = gateway.stub.Chat(metadata=md(keys.acme))
    await call.write(gateway_pb2.ChatRequest(credit=gateway_pb2.FlowCredit(tokens=5)))
    error = (await first_frame(call)).error
    assert error.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert _reason_and_details(error.status)[0] == "NO_ACTIVE_TURN"
    await call.write(gateway_pb2.ChatRequest(cancel=gateway_pb2.CancelTurn()))
    assert _reason_and_details((await first_frame(call)).error.status)[0] == "NO_ACTIVE_TURN"
    await call.write(gateway_pb2.ChatRequest(start=gateway_pb2.StartTurn(text="x" * 16_001)))
    too_long = (await first_frame(call)).error.status
    reason, details = _reason_and_details(too_long)
    assert reason == "TEXT_TOO_LONG"
    assert details[0].field_violations[0].field == "start.text"
    await call.write(gateway_pb2.ChatRequest(start=gateway_pb2.StartTurn(text="ok")))
    accepted = (await first_frame(call)).accepted
    await call.write(gateway_pb2.ChatRequest(start=gateway_pb2.StartTurn(text="again")))
    busy = (await first_frame(call)).error
    assert _reason_and_details(busy.status)[0] == "TURN_IN_PROGRESS"
    assert busy.turn_id == accepted.turn_id
    await call.write(gateway_pb2.ChatRequest(cancel=gateway_pb2.CancelTurn()))
    frames = await read_until_finished(call)
    assert frames[-1].finished.finish_reason == common_pb2.FINISH_REASON_CANCELLED
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


async def test_chat_credit_limits_tokens_in_flight(
    log_path: Path, keys: Keys, closed_addr: str, agent_log: EmbeddedLog
) -> None:
    settings = gateway_settings(log_path, keys, closed_addr, initial_window=4)
    async with run_gateway(settings) as gateway:
        call = gateway.stub.Chat(metadata=md(keys.acme))
        await call.write(gateway_pb2.ChatRequest(start=gateway_pb2.StartTurn(text="hi")))
        accepted = (await first_frame(call)).accepted
        agent = AgentPlayer(agent_log, accepted.turn_id, accepted.conversation_id)
        await agent.tokens(range(1, 11))
        await agent.finished(10)
        first = [await first_frame(call) for _ in range(4)]
        assert seqs(first) == [1, 2, 3, 4]
        early = asyncio.ensure_future(call.read())
        await asyncio.sleep(0.3)
        assert not early.done(), "a token was sent without credit"
        await call.write(gateway_pb2.ChatRequest(credit=gateway_pb2.FlowCredit(tokens=100)))
        frames = [await asyncio.wait_for(early, TIMEOUT_S), *await read_until_finished(call)]
        assert seqs(frames) == list(range(5, 11))
        await call.done_writing()


async def test_stream_turn_then_resume_on_another_gateway_process(
    gateway: Gateway,
    keys: Keys,
    agent_log: EmbeddedLog,
    log_path: Path,
    closed_addr: str,
    tmp_path: Path,
) -> None:
    call = gateway.stub.StreamTurn(start_request("tell me"), metadata=md(keys.acme))
    accepted = (await first_frame(call)).accepted
    agent = AgentPlayer(agent_log, accepted.turn_id, accepted.conversation_id)
    await agent.started()
    await agent.tokens(range(1, 31))
    received = []
    while len(seqs(received)) < 17:
        received.append(await first_frame(call))
    call.cancel()  # the client's connection drops after token 17
    last = seqs(received)[-1]
    assert seqs(received) == list(range(1, last + 1))
    async with spawn_gateway(log_path, keys, closed_addr, tmp_path) as other:
        resumed = other.stub.ResumeTurn(
            gateway_pb2.ResumeTurnRequest(turn_id=accepted.turn_id, after_seq=last),
            metadata=md(keys.acme),
        )
        state = (await first_frame(resumed)).accepted
        assert state.turn_id == accepted.turn_id and state.queue_position == 0
        history = [await first_frame(resumed) for _ in range(30 - last)]
        assert seqs(history) == list(range(last + 1, 31))
        await agent.tokens(range(25, 51))  # overlaps what was sent: no duplicates may show
        await agent.finished(50)
        rest = await read_until_finished(resumed)
        assert seqs(received) + seqs(history) + seqs(rest) == list(range(1, 51))
        assert rest[-1].finished.last_seq == 50

        stranger = other.stub.ResumeTurn(
            gateway_pb2.ResumeTurnRequest(turn_id=accepted.turn_id), metadata=md(keys.globex)
        )
        code, reason, _ = await expect_error(stranger)
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "TURN_NOT_FOUND")


async def test_cancel_turn_ends_the_stream_as_cancelled(
    gateway: Gateway, keys: Keys, agent_log: EmbeddedLog
) -> None:
    call = gateway.stub.StreamTurn(start_request(), metadata=md(keys.acme))
    accepted = (await first_frame(call)).accepted
    agent = AgentPlayer(agent_log, accepted.turn_id, accepted.conversation_id)
    await agent.started()
    await agent.tokens([1, 2])
    code, reason, _ = await expect_error(
        gateway.stub.CancelTurn(
            gateway_pb2.CancelTurnRequest(turn_id=accepted.turn_id), metadata=md(keys.globex)
        )
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "TURN_NOT_FOUND")
    reply = await gateway.stub.CancelTurn(
        gateway_pb2.CancelTurnRequest(turn_id=accepted.turn_id), metadata=md(keys.acme)
    )
    assert reply.turn_id == accepted.turn_id
    # The cancel is on the log, for the agent to see.
    records = await agent_log.read_range(
        TURN_EVENTS, agent.partition, 0, await agent_log.end_offset(TURN_EVENTS, agent.partition)
    )
    events = [events_pb2.TurnEvent.FromString(r.value) for r in records]
    assert any(e.cancelled.turn_id == accepted.turn_id for e in events)
    await agent.tokens([3])
    await agent.finished(3, common_pb2.FINISH_REASON_CANCELLED)
    frames = await read_until_finished(call)
    assert seqs(frames) == [1, 2, 3]
    assert frames[-1].finished.finish_reason == common_pb2.FINISH_REASON_CANCELLED


async def test_missing_and_invalid_keys_are_unauthenticated(gateway: Gateway, keys: Keys) -> None:
    for metadata, expected in (((), "API_KEY_MISSING"), (md("mk_wrong"), "API_KEY_INVALID")):
        calls = [
            gateway.stub.StreamTurn(start_request(), metadata=metadata),
            gateway.stub.ResumeTurn(
                gateway_pb2.ResumeTurnRequest(turn_id="t0.0.0.0123456789abcdef"),
                metadata=metadata,
            ),
            gateway.stub.CancelTurn(
                gateway_pb2.CancelTurnRequest(turn_id="t0.0.0.0123456789abcdef"),
                metadata=metadata,
            ),
            gateway.stub.ListConversations(
                gateway_pb2.ListConversationsRequest(), metadata=metadata
            ),
            gateway.stub.Chat(iter([]), metadata=metadata),
        ]
        for call in calls:
            code, reason, _ = await expect_error(call)
            assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, expected)


async def test_health_and_reflection_need_no_key(gateway: Gateway) -> None:
    health = health_pb2_grpc.HealthStub(gateway.channel)
    for service in ("", SERVICE_NAME):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(gateway.channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = []
    async for response in responses:
        names = [s.name for s in response.list_services_response.service]
        break
    assert SERVICE_NAME in names


async def test_rate_limit_returns_retry_info(
    log_path: Path, keys: Keys, closed_addr: str, agent_log: EmbeddedLog
) -> None:
    settings = gateway_settings(log_path, keys, closed_addr, rate_per_s=0.5, rate_burst=2)
    async with run_gateway(settings) as gateway:
        for _ in range(2):
            call = gateway.stub.StreamTurn(start_request(), metadata=md(keys.acme))
            assert (await first_frame(call)).WhichOneof("frame") == "accepted"
            call.cancel()
        code, reason, details = await expect_error(
            gateway.stub.StreamTurn(start_request(), metadata=md(keys.acme))
        )
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
        retry = [d for d in details if isinstance(d, error_details_pb2.RetryInfo)]
        delay = retry[0].retry_delay.seconds + retry[0].retry_delay.nanos / 1e9
        assert 0 < delay <= 2.0
        # On Chat it is an error frame, and the stream stays usable.
        chat = gateway.stub.Chat(metadata=md(keys.acme))
        await chat.write(gateway_pb2.ChatRequest(start=gateway_pb2.StartTurn(text="hi")))
        frame = (await first_frame(chat)).error
        assert _reason_and_details(frame.status)[0] == "RATE_LIMITED"
        await chat.write(gateway_pb2.ChatRequest(credit=gateway_pb2.FlowCredit(tokens=1)))
        assert _reason_and_details((await first_frame(chat)).error.status)[0] == ("NO_ACTIVE_TURN")
        await chat.done_writing()
        # Another tenant's key has its own bucket.
        other = gateway.stub.StreamTurn(start_request(), metadata=md(keys.globex))
        assert (await first_frame(other)).WhichOneof("frame") == "accepted"
        other.cancel()


async def test_stream_limit_is_resource_exhausted(
    log_path: Path, keys: Keys, closed_addr: str, agent_log: EmbeddedLog
) -> None:
    settings = gateway_settings(log_path, keys, closed_addr, max_streams=1)
    async with run_gateway(settings) as gateway:
        held = gateway.stub.StreamTurn(start_request(), metadata=md(keys.acme))
        assert (await first_frame(held)).WhichOneof("frame") == "accepted"
        code, reason, details = await expect_error(
            gateway.stub.StreamTurn(start_request(), metadata=md(keys.acme))
        )
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS")
        assert any(isinstance(d, error_details_pb2.RetryInfo) for d in details)
        held.cancel()


@pytest.mark.parametrize(
    ("request_", "reason", "field"),
    [
        (start_request(""), "TEXT_EMPTY", "start.text"),
        (start_request("x" * 16_001), "TEXT_TOO_LONG", "start.text"),
        (start_request(max_tokens=-1), "MAX_TOKENS_INVALID", "start.options.max_tokens"),
        (start_request(max_tokens=4097), "MAX_TOKENS_INVALID", "start.options.max_tokens"),
        (start_request(temperature=2.5), "TEMPERATURE_INVALID", "start.options.temperature"),
        (start_request(top_p=0.0), "TOP_P_INVALID", "start.options.top_p"),
        (
            start_request(stop_sequences=["s"] * 9),
            "STOP_SEQUENCES_TOO_MANY",
            "start.options.stop_sequences",
        ),
        (
            start_request(stop_sequences=["s" * 65]),
            "STOP_SEQUENCE_TOO_LONG",
            "start.options.stop_sequences[0]",
        ),
        (gateway_pb2.StreamTurnRequest(), "START_MISSING", "start"),
    ],
)
async def test_bad_starts_are_invalid_argument(
    gateway: Gateway,
    keys: Keys,
    request_: gateway_pb2.StreamTurnRequest,
    reason: str,
    field: str,
) -> None:
    code, got_reason, details = await expect_error(
        gateway.stub.StreamTurn(request_, metadata=md(keys.acme))
    )
    assert (code, got_reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    bad = [d for d in details if isinstance(d, error_details_pb2.BadRequest)]
    assert bad and bad[0].field_violations[0].field == field


async def test_other_bad_requests(gateway: Gateway, keys: Keys) -> None:
    cases = [
        (
            gateway.stub.ResumeTurn(
                gateway_pb2.ResumeTurnRequest(turn_id="nope"), metadata=md(keys.acme)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "TURN_ID_MALFORMED",
        ),
        (
            gateway.stub.ResumeTurn(
                gateway_pb2.ResumeTurnRequest(turn_id="t0.0.0.0123456789abcdef", after_seq=-2),
                metadata=md(keys.acme),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "AFTER_SEQ_INVALID",
        ),
        (
            gateway.stub.ResumeTurn(
                gateway_pb2.ResumeTurnRequest(turn_id="t0.0.0.0123456789abcdef"),
                metadata=md(keys.acme),
            ),
            grpc.StatusCode.NOT_FOUND,
            "TURN_NOT_FOUND",
        ),
        (
            gateway.stub.CancelTurn(gateway_pb2.CancelTurnRequest(), metadata=md(keys.acme)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "TURN_ID_MISSING",
        ),
        (
            gateway.stub.GetConversation(
                gateway_pb2.GetConversationRequest(), metadata=md(keys.acme)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "CONVERSATION_ID_MISSING",
        ),
        (
            gateway.stub.ListConversations(
                gateway_pb2.ListConversationsRequest(page_size=101), metadata=md(keys.acme)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "PAGE_SIZE_OUT_OF_RANGE",
        ),
        # The persister is down: a conversation cannot be checked, so the start is refused.
        (
            gateway.stub.StreamTurn(
                gateway_pb2.StreamTurnRequest(
                    start=gateway_pb2.StartTurn(conversation_id="c-1", text="hi")
                ),
                metadata=md(keys.acme),
            ),
            grpc.StatusCode.UNAVAILABLE,
            "PERSISTER_UNAVAILABLE",
        ),
    ]
    for call, code, reason in cases:
        assert (await expect_error(call))[:2] == (code, reason)


async def test_idempotent_start_returns_the_same_turn(gateway: Gateway, keys: Keys) -> None:
    request = gateway_pb2.StreamTurnRequest(
        start=gateway_pb2.StartTurn(text="hi", request_id="req-42")
    )
    first = gateway.stub.StreamTurn(request, metadata=md(keys.acme))
    one = (await first_frame(first)).accepted
    first.cancel()
    second = gateway.stub.StreamTurn(request, metadata=md(keys.acme))
    two = (await first_frame(second)).accepted
    second.cancel()
    assert (two.turn_id, two.conversation_id) == (one.turn_id, one.conversation_id)


async def test_draining_gateway_finishes_open_streams_and_refuses_new_ones(
    gateway: Gateway,
    keys: Keys,
    agent_log: EmbeddedLog,
    log_path: Path,
    closed_addr: str,
    tmp_path: Path,
) -> None:
    call = gateway.stub.StreamTurn(start_request(), metadata=md(keys.acme))
    accepted = (await first_frame(call)).accepted
    call.cancel()
    agent = AgentPlayer(agent_log, accepted.turn_id, accepted.conversation_id)
    await agent.started()
    async with spawn_gateway(
        log_path, keys, closed_addr, tmp_path, MESH_GATEWAY_GRACE_S="10"
    ) as other:
        resumed = other.stub.ResumeTurn(
            gateway_pb2.ResumeTurnRequest(turn_id=accepted.turn_id), metadata=md(keys.acme)
        )
        assert (await first_frame(resumed)).WhichOneof("frame") == "accepted"
        other.process.send_signal(signal.SIGTERM)
        for _ in range(100):  # until the drain began: new calls are refused
            probe = other.stub.StreamTurn(start_request(), metadata=md(keys.acme))
            try:
                await probe.read()
                probe.cancel()
            except aio.AioRpcError as error:
                # UNAVAILABLE once the server stops taking calls; a call that raced the start of
                # the drain is cancelled by the server instead.
                assert error.code() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the draining gateway still accepted new turns")
        # The open stream still gets its turn, within the grace period.
        await agent.tokens(range(1, 6))
        await agent.finished(5)
        frames = await read_until_finished(resumed)
        assert seqs(frames) == [1, 2, 3, 4, 5]
        assert await asyncio.wait_for(other.process.wait(), TIMEOUT_S) == 0
        assert "draining" in await asyncio.to_thread(other.log_file.read_text)


async def test_health_watch_reports_not_serving_when_draining(
    keys: Keys, log_path: Path, closed_addr: str, tmp_path: Path, agent_log: EmbeddedLog
) -> None:
    async with spawn_gateway(
        log_path, keys, closed_addr, tmp_path, MESH_GATEWAY_GRACE_S="2"
    ) as other:
        watch = health_pb2_grpc.HealthStub(other.channel).Watch(health_pb2.HealthCheckRequest())
        assert (await first_frame(watch)).status == health_pb2.HealthCheckResponse.SERVING
        other.process.send_signal(signal.SIGTERM)
        assert (await first_frame(watch)).status == health_pb2.HealthCheckResponse.NOT_SERVING


# -- issue 12: keys that stop working, tenant limits, idempotent cancel ---------------------------


def quota_subjects(error: grpc.RpcError) -> list[str]:
    assert isinstance(error, aio.AioRpcError)
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            subjects = []
            for packed in status.details:
                quota = error_details_pb2.QuotaFailure()
                if packed.Unpack(quota):
                    subjects += [v.subject for v in quota.violations]
            return subjects
    return []


async def chat_ends_with(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        while True:
            frame = await asyncio.wait_for(call.read(), TIMEOUT_S)
            assert frame is not aio.EOF, "the stream ended OK"
            assert frame.WhichOneof("frame") != "accepted", "a turn was accepted"
    except aio.AioRpcError as error:
        code, reason, _ = rich(error)
        return code, reason


async def test_revoked_and_expired_keys_end_open_chat_streams(
    keys: Keys, log_path: Path, closed_addr: str, tmp_path: Path, agent_log: EmbeddedLog
) -> None:
    async with spawn_gateway(log_path, keys, closed_addr, tmp_path) as gateway:
        # Made once the gateway is up (a slow start must not eat its life), then picked up by
        # the gateway's once-a-second reload of the keys file.
        soon = add_key_to_file(keys.path, "acme", expires_at=time.time() + 4)
        await asyncio.sleep(1.5)
        revoked = gateway.stub.Chat(metadata=md(keys.acme))
        expiring = gateway.stub.Chat(metadata=md(soon))
        kept = gateway.stub.Chat(metadata=md(keys.globex))
        for call in (revoked, expiring, kept):
            await call.write(gateway_pb2.ChatRequest(start=gateway_pb2.StartTurn(text="hi")))
            accepted = (await first_frame(call)).accepted
            await call.write(gateway_pb2.ChatRequest(cancel=gateway_pb2.CancelTurn()))
            frames = await read_until_finished(call)
            assert frames[-1].finished.turn_id == accepted.turn_id
        revoke_key(keys.path, hash_key(keys.acme)[:12])
        await asyncio.sleep(3.2)  # past the keys file's reload interval and the expiry
        await revoked.write(gateway_pb2.ChatRequest(start=gateway_pb2.StartTurn(text="again")))
        assert await chat_ends_with(revoked) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_REVOKED")
        await expiring.write(gateway_pb2.ChatRequest(start=gateway_pb2.StartTurn(text="again")))
        assert await chat_ends_with(expiring) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "API_KEY_EXPIRED",
        )
        # The tenant that kept its key goes on, on the same gateway.
        await kept.write(gateway_pb2.ChatRequest(start=gateway_pb2.StartTurn(text="again")))
        assert (await first_frame(kept)).WhichOneof("frame") == "accepted"
        await kept.write(gateway_pb2.ChatRequest(cancel=gateway_pb2.CancelTurn()))
        await read_until_finished(kept)
        await kept.done_writing()
        code, reason, _ = await expect_error(
            gateway.stub.StreamTurn(start_request(), metadata=md(keys.acme))
        )
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")


async def test_one_tenants_idle_streams_leave_room_for_another(
    log_path: Path, keys: Keys, closed_addr: str, agent_log: EmbeddedLog
) -> None:
    settings = gateway_settings(
        log_path, keys, closed_addr, max_streams=5, max_streams_per_tenant=3
    )
    async with run_gateway(settings) as gateway:
        idle = []
        for _ in range(3):
            call = gateway.stub.Chat(metadata=md(keys.acme))
            await call.write(gateway_pb2.ChatRequest(credit=gateway_pb2.FlowCredit(tokens=1)))
            assert (await first_frame(call)).WhichOneof("frame") == "error"  # open and served
            idle.append(call)
        refused = gateway.stub.Chat(metadata=md(keys.acme))
        await refused.write(gateway_pb2.ChatRequest(start=gateway_pb2.StartTurn(text="hi")))
        with pytest.raises(aio.AioRpcError) as error:
            await asyncio.wait_for(refused.read(), TIMEOUT_S)
        code, reason, details = rich(error.value)
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TENANT_STREAM_LIMIT")
        assert "MAX_STREAMS_PER_TENANT=3" in error.value.details()
        assert any(isinstance(d, error_details_pb2.RetryInfo) for d in details)
        assert quota_subjects(error.value) == ["tenant:acme"]
        other = gateway.stub.Chat(metadata=md(keys.globex))
        await other.write(gateway_pb2.ChatRequest(start=gateway_pb2.StartTurn(text="hi")))
        assert (await first_frame(other)).WhichOneof("frame") == "accepted"
        other.cancel()
        for call in idle:
            call.cancel()


async def test_a_tenant_is_refused_past_its_share_of_the_queue(
    log_path: Path, keys: Keys, closed_addr: str, agent_log: EmbeddedLog
) -> None:
    settings = gateway_settings(
        log_path,
        keys,
        closed_addr,
        max_queued_turns_per_tenant=2,
        log=LogSettings(path=log_path, partitions=1),
    )
    async with run_gateway(settings) as gateway:
        held = []
        for _ in range(2):
            call = gateway.stub.StreamTurn(start_request(), metadata=md(keys.acme))
            assert (await first_frame(call)).WhichOneof("frame") == "accepted"
            held.append(call)
        with pytest.raises(aio.AioRpcError) as error:
            await asyncio.wait_for(
                gateway.stub.StreamTurn(start_request(), metadata=md(keys.acme)).read(), TIMEOUT_S
            )
        code, reason, details = rich(error.value)
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TENANT_QUEUE_FULL")
        retry = [d for d in details if isinstance(d, error_details_pb2.RetryInfo)]
        assert retry and retry[0].retry_delay.seconds >= 1
        assert quota_subjects(error.value) == ["tenant:acme"]
        other = gateway.stub.StreamTurn(start_request(), metadata=md(keys.globex))
        assert (await first_frame(other)).WhichOneof("frame") == "accepted"
        other.cancel()
        for call in held:
            call.cancel()


async def test_cancelling_a_finished_turn_appends_nothing(
    gateway: Gateway,
    keys: Keys,
    agent_log: EmbeddedLog,
    log_path: Path,
    closed_addr: str,
    tmp_path: Path,
) -> None:
    call = gateway.stub.StreamTurn(start_request(), metadata=md(keys.acme))
    accepted = (await first_frame(call)).accepted
    agent = AgentPlayer(agent_log, accepted.turn_id, accepted.conversation_id)
    await agent.started()
    await agent.tokens([1])
    await agent.finished(1)
    await read_until_finished(call)

    async def cancels() -> int:
        end = await agent_log.end_offset(TURN_EVENTS, agent.partition)
        records = await agent_log.read_range(TURN_EVENTS, agent.partition, 0, end)
        events = [events_pb2.TurnEvent.FromString(r.value) for r in records]
        return sum(1 for e in events if e.cancelled.turn_id == accepted.turn_id)

    request = gateway_pb2.CancelTurnRequest(turn_id=accepted.turn_id)
    for _ in range(20):
        reply = await gateway.stub.CancelTurn(request, metadata=md(keys.acme))
        assert reply.turn_id == accepted.turn_id
    async with spawn_gateway(log_path, keys, closed_addr, tmp_path) as other:
        for _ in range(5):
            await other.stub.CancelTurn(request, metadata=md(keys.acme))
    assert await cancels() == 0


async def test_a_broken_keys_edit_is_reported_and_the_last_good_keys_serve(
    keys: Keys, log_path: Path, closed_addr: str, tmp_path: Path, agent_log: EmbeddedLog
) -> None:
    metrics_port = free_port()
    async with spawn_gateway(
        log_path, keys, closed_addr, tmp_path, MESH_GATEWAY_METRICS_PORT=str(metrics_port)
    ) as gateway:

        def metrics() -> str:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as reply:
                return str(reply.read().decode())

        assert 'mesh_api_keys_file_valid{service="gateway"} 1.0' in await asyncio.to_thread(metrics)
        good = keys.path.read_text()
        keys.path.write_text(good.replace("{", "{ oops", 1))
        await asyncio.sleep(1.5)  # past the reload interval
        call = gateway.stub.StreamTurn(start_request(), metadata=md(keys.acme))
        assert (await first_frame(call)).WhichOneof("frame") == "accepted"
        call.cancel()
        text = await asyncio.to_thread(metrics)
        assert 'mesh_api_keys_file_valid{service="gateway"} 0.0' in text
        assert 'mesh_api_keys_file_errors_total{service="gateway"} 1.0' in text
        output = await asyncio.to_thread(gateway.log_file.read_text)
        assert "ERROR" in output and "is malformed" in output and str(keys.path) in output
        keys.path.write_text(good)
        await asyncio.sleep(1.5)
        assert 'mesh_api_keys_file_valid{service="gateway"} 1.0' in await asyncio.to_thread(metrics)


async def test_a_tenant_over_its_tokens_per_minute_waits_and_the_others_do_not(
    log_path: Path, keys: Keys, closed_addr: str, agent_log: EmbeddedLog
) -> None:
    settings = gateway_settings(log_path, keys, closed_addr, tokens_per_minute_per_tenant=100)
    async with run_gateway(settings) as gateway:
        first = gateway.stub.StreamTurn(start_request(max_tokens=80), metadata=md(keys.acme))
        assert (await first_frame(first)).WhichOneof("frame") == "accepted"
        code, reason, details = await expect_error(
            gateway.stub.StreamTurn(start_request(max_tokens=80), metadata=md(keys.acme))
        )
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TENANT_TOKEN_RATE")
        retry = [d for d in details if isinstance(d, error_details_pb2.RetryInfo)]
        assert retry and 0 < retry[0].retry_delay.seconds <= 60
        # Asking for fewer tokens fits what is left; another tenant has its own budget.
        small = gateway.stub.StreamTurn(start_request(max_tokens=20), metadata=md(keys.acme))
        assert (await first_frame(small)).WhichOneof("frame") == "accepted"
        other = gateway.stub.StreamTurn(start_request(max_tokens=80), metadata=md(keys.globex))
        assert (await first_frame(other)).WhichOneof("frame") == "accepted"
        for call in (first, small, other):
            call.cancel()


async def test_an_idle_chat_stream_ends_and_a_busy_one_does_not(
    log_path: Path, keys: Keys, closed_addr: str, agent_log: EmbeddedLog
) -> None:
    settings = gateway_settings(log_path, keys, closed_addr, stream_idle_timeout_s=0.5)
    async with run_gateway(settings) as gateway:
        idle = gateway.stub.Chat(metadata=md(keys.acme))
        busy = gateway.stub.Chat(metadata=md(keys.acme))
        for _ in range(6):  # a frame every 0.2 s for longer than the timeout
            await busy.write(gateway_pb2.ChatRequest(credit=gateway_pb2.FlowCredit(tokens=1)))
            assert (await first_frame(busy)).WhichOneof(
                "frame"
            ) == "error"  # no turn: a frame error
            await asyncio.sleep(0.2)
        code, reason, _ = await expect_error(idle)
        assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "STREAM_IDLE")
        await busy.write(gateway_pb2.ChatRequest(start=gateway_pb2.StartTurn(text="still here")))
        assert (await first_frame(busy)).WhichOneof("frame") == "accepted"
        busy.cancel()

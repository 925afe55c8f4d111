"""The ``mesh`` CLI against real gateways (in-process and ``python -m services.gateway``).

An ``AutoAgent`` in the test answers every TurnRequested on the log the way an agent would
(started, tokens ``w1 w2 ...``, finished; a TurnCancelled stops it), so the CLI sees real turns.
"""

from __future__ import annotations

import asyncio
import io
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from chat.common.v1 import common_pb2
from chat.events.v1 import events_pb2

from mesh.cli import ChatApp, ChatOptions, main
from mesh.log import TURN_EVENTS, TURN_REQUESTS
from mesh.log.embedded import EmbeddedLog
from tests.integration.test_gateway_persister import spawn_persister
from tests.integration.test_gateway_service import (
    TIMEOUT_S,
    AgentPlayer,
    Gateway,
    Keys,
    free_port,
    gateway_settings,
    run_gateway,
    spawn_gateway,
)
from tests.integration.test_gateway_service import agent_log as agent_log  # noqa: F401 - fixture
from tests.integration.test_gateway_service import keys as keys  # noqa: F401 - fixture
from tests.integration.test_gateway_service import log_path as log_path  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

PARTITIONS = 4


class AutoAgent:
    """Answers every new TurnRequested: ``tokens`` tokens, ``delay_s`` apart; honours cancels."""

    def __init__(self, log: EmbeddedLog, *, tokens: int = 5, delay_s: float = 0.0) -> None:
        self.log = log
        self.tokens = tokens
        self.delay_s = delay_s
        self.cancelled: set[str] = set()
        self.turns: list[events_pb2.TurnRequested] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> AutoAgent:
        await self.log.ensure_topic(TURN_REQUESTS, PARTITIONS)
        await self.log.ensure_topic(TURN_EVENTS, PARTITIONS)
        for partition in range(PARTITIONS):
            requests = await self.log.end_offset(TURN_REQUESTS, partition)
            events = await self.log.end_offset(TURN_EVENTS, partition)
            self._tasks.append(asyncio.create_task(self._requests(partition, requests)))
            self._tasks.append(asyncio.create_task(self._events(partition, events)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            while not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=0.5)

    async def _requests(self, partition: int, start: int) -> None:
        async for record in self.log.read(TURN_REQUESTS, partition, start):
            request = events_pb2.TurnRequested.FromString(record.value)
            self.turns.append(request)
            self._tasks.append(asyncio.create_task(self._answer(request)))

    async def _events(self, partition: int, start: int) -> None:
        async for record in self.log.read(TURN_EVENTS, partition, start):
            event = events_pb2.TurnEvent.FromString(record.value)
            if event.WhichOneof("event") == "cancelled":
                self.cancelled.add(event.cancelled.turn_id)

    async def _answer(self, request: events_pb2.TurnRequested) -> None:
        player = AgentPlayer(self.log, request.turn_id, request.conversation_id, request.tenant_id)
        await player.started()
        for seq in range(1, self.tokens + 1):
            if request.turn_id in self.cancelled:
                await player.finished(seq - 1, common_pb2.FINISH_REASON_CANCELLED)
                return
            await player.tokens([seq])
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        await player.finished(self.tokens)


def answer(count: int) -> str:
    return "".join(f"w{seq} " for seq in range(1, count + 1))


class Script:
    """Lines typed at the chat prompt; EOF after the last one. Records what ran when."""

    def __init__(self, lines: list[str], on_prompt: Callable[[int], None] | None = None) -> None:
        self._lines = list(lines)
        self.prompts = 0
        self._on_prompt = on_prompt

    def __call__(self, prompt: str) -> str:
        if self._on_prompt is not None:
            self._on_prompt(self.prompts)
        self.prompts += 1
        if not self._lines:
            raise EOFError
        return self._lines.pop(0)


async def run_chat(app: ChatApp) -> int:
    return await asyncio.wait_for(asyncio.to_thread(app.run), 60)


@pytest.fixture
async def mesh(
    log_path: Path,  # noqa: F811
    keys: Keys,  # noqa: F811
    pg_dsn: str,
    tmp_path: Path,
    agent_log: EmbeddedLog,  # noqa: F811
) -> AsyncIterator[tuple[Gateway, str]]:
    async with (
        spawn_persister(log_path, pg_dsn, tmp_path) as persister_addr,
        run_gateway(gateway_settings(log_path, keys, persister_addr)) as gateway,
    ):
        yield gateway, persister_addr


async def test_chat_keeps_the_conversation_until_new(
    mesh: tuple[Gateway, str],
    keys: Keys,  # noqa: F811
    agent_log: EmbeddedLog,  # noqa: F811
) -> None:
    gateway, _ = mesh
    conversations: list[str] = []
    out, err = io.StringIO(), io.StringIO()
    app: ChatApp | None = None

    def record(index: int) -> None:
        assert app is not None
        conversations.append(app.conversation_id)

    app = ChatApp(
        lambda: grpc.insecure_channel(gateway.addr),
        api_key=keys.acme,
        options=ChatOptions(max_tokens=16, temperature=0.2, seed=1),
        read_line=Script(["hello", "and again", "  ", "/new", "fresh start"], record),
        out=out,
        err=err,
        handle_sigint=False,
    )
    async with AutoAgent(agent_log, tokens=5) as agent:
        assert await run_chat(app) == 0
    assert out.getvalue() == (answer(5) + "\n") * 3 + "\n", err.getvalue()
    # prompts: before turn 1, turn 2, blank, /new, turn 3, EOF
    assert conversations[0] == ""
    assert conversations[1] == conversations[2] != ""
    assert conversations[4] == ""
    assert conversations[5] not in ("", conversations[1])
    assert [t.user_text for t in agent.turns] == ["hello", "and again", "fresh start"]
    assert agent.turns[0].options.max_tokens == 16 and agent.turns[0].options.seed == 1
    assert "error" not in err.getvalue()


async def test_chat_interrupt_cancels_the_turn(
    mesh: tuple[Gateway, str],
    keys: Keys,  # noqa: F811
    agent_log: EmbeddedLog,  # noqa: F811
) -> None:
    gateway, _ = mesh
    out, err = io.StringIO(), io.StringIO()
    app = ChatApp(
        lambda: grpc.insecure_channel(gateway.addr),
        api_key=keys.acme,
        options=ChatOptions(),
        read_line=Script(["a long answer please"]),
        out=out,
        err=err,
        handle_sigint=False,
    )
    async with AutoAgent(agent_log, tokens=400, delay_s=0.01):
        running = asyncio.create_task(run_chat(app))
        for _ in range(500):
            if out.getvalue().count("w") >= 5:
                break
            await asyncio.sleep(0.01)
        assert app.interrupt()  # what Ctrl-C does during a turn
        assert await running == 0
    printed = out.getvalue().split()
    assert 5 <= len(printed) < 400
    assert printed == answer(len(printed)).split()
    assert "[cancelled]" in err.getvalue()


async def test_chat_resumes_on_a_restarted_gateway_without_gaps_or_repeats(
    keys: Keys,  # noqa: F811
    log_path: Path,  # noqa: F811
    tmp_path: Path,
    agent_log: EmbeddedLog,  # noqa: F811
) -> None:
    port = free_port()
    nowhere = f"127.0.0.1:{free_port()}"
    out, err = io.StringIO(), io.StringIO()
    app = ChatApp(
        lambda: grpc.insecure_channel(f"127.0.0.1:{port}"),
        api_key=keys.acme,
        options=ChatOptions(),
        read_line=Script(["tell me everything"]),
        out=out,
        err=err,
        handle_sigint=False,
    )
    async with AutoAgent(agent_log, tokens=120, delay_s=0.02):
        first = spawn_gateway(log_path, keys, nowhere, tmp_path, port=port)
        gateway = await first.__aenter__()
        running = asyncio.create_task(run_chat(app))
        try:
            for _ in range(1000):
                if len(out.getvalue().split()) >= 10:
                    break
                await asyncio.sleep(0.01)
            gateway.process.send_signal(signal.SIGKILL)  # a crash, no drain
            await gateway.process.wait()
        finally:
            await first.__aexit__(None, None, None)
        async with spawn_gateway(log_path, keys, nowhere, tmp_path, port=port):
            assert await running == 0
    assert out.getvalue() == answer(120) + "\n\n", err.getvalue()


async def test_resume_history_and_health_commands(
    mesh: tuple[Gateway, str],
    keys: Keys,  # noqa: F811
    agent_log: EmbeddedLog,  # noqa: F811
) -> None:
    gateway, persister_addr = mesh
    out, err = io.StringIO(), io.StringIO()
    app = ChatApp(
        lambda: grpc.insecure_channel(gateway.addr),
        api_key=keys.acme,
        options=ChatOptions(),
        read_line=Script(["remember this"]),
        out=out,
        err=err,
        handle_sigint=False,
    )
    async with AutoAgent(agent_log, tokens=5):
        assert await run_chat(app) == 0
    env = {"MESH_GATEWAY_ADDR": gateway.addr, "MESH_API_KEY": keys.acme}

    async def cli(*argv: str, environ: dict[str, str] = env) -> tuple[int, str, str]:
        cli_out, cli_err = io.StringIO(), io.StringIO()
        code = await asyncio.wait_for(
            asyncio.to_thread(main, list(argv), environ=environ, out=cli_out, err=cli_err),
            TIMEOUT_S,
        )
        return code, cli_out.getvalue(), cli_err.getvalue()

    assert await cli("resume", app.last_turn_id, "--after", "2") == (
        0,
        "w3 w4 w5 \n",
        "[last seq 5]\n",
    )
    # A conversation read is consistent (it waits for the persister); the list is not.
    code, shown, _ = await cli("history", app.conversation_id)
    assert code == 0 and shown.splitlines()[1:] == ["you> remember this", f"assistant> {answer(5)}"]
    code, listed, _ = await cli("history")
    assert code == 0 and app.conversation_id in listed and "remember this" in listed

    code, _, problem = await cli(
        "resume", app.last_turn_id, environ={**env, "MESH_API_KEY": "mk_nope"}
    )
    assert code == 1
    assert problem == "error: API_KEY_INVALID (UNAUTHENTICATED): invalid API key\n"
    code, _, problem = await cli("resume", "t0.0.0.0123456789abcdef")
    assert code == 1 and problem.startswith("error: TURN_NOT_FOUND (NOT_FOUND)")

    nowhere = f"127.0.0.1:{free_port()}"
    code, table, _ = await cli(
        "health",
        "--timeout",
        "1",
        environ={
            "MESH_GATEWAY_ADDR": gateway.addr,
            "MESH_PERSISTER_ADDR": persister_addr,
            "MESH_AGENT_ADDR": nowhere,
            "MESH_MEMORY_ADDR": nowhere,
        },
    )
    rows = {line.split()[0]: line.split()[-1] for line in table.splitlines()}
    assert code == 1
    assert rows["gateway"] == rows["persister"] == "SERVING"
    assert rows["agent"] in {"UNREACHABLE", "TIMEOUT"}
    code, table, _ = await cli(
        "health",
        "--service",
        f"agent={gateway.addr}",
        "--service",
        f"memory={persister_addr}",
        environ={"MESH_GATEWAY_ADDR": gateway.addr, "MESH_PERSISTER_ADDR": persister_addr},
    )
    assert code == 0, table

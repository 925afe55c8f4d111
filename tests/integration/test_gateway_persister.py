"""The gateway with a real persister (``python -m services.persister`` on PostgreSQL).

Conversation checks, tenant isolation of history, and the GetConversation/ListConversations
proxy. The test still plays the agent by appending its records to the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from chat.common.v1 import conversation_pb2
from chat.gateway.v1 import gateway_pb2

from mesh.log.embedded import EmbeddedLog
from tests.integration.test_gateway_service import (
    ROOT,
    AgentPlayer,
    Gateway,
    Keys,
    expect_error,
    first_frame,
    free_port,
    gateway_settings,
    md,
    read_until_finished,
    run_gateway,
    wait_serving,
)
from tests.integration.test_gateway_service import agent_log as agent_log  # noqa: F401 - fixture
from tests.integration.test_gateway_service import keys as keys  # noqa: F401 - fixture
from tests.integration.test_gateway_service import log_path as log_path  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def spawn_persister(log_path: Path, pg_dsn: str, tmp_path: Path) -> AsyncIterator[str]:
    port = free_port()
    environ = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen" / "python")]),
        "PYTHONUNBUFFERED": "1",
        "MESH_STATE_DIR": str(tmp_path / "state"),
        "MESH_LOG_PATH": str(log_path),
        "MESH_PG_DSN": pg_dsn,
        "MESH_MEMORY_ADDR": "",
        "MESH_PERSISTER_PORT": str(port),
        "MESH_PERSISTER_METRICS_PORT": "-1",
        "MESH_PERSISTER_GRACE_S": "2",
    }
    log_file = tmp_path / "persister.log"
    with log_file.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.persister",
            cwd=ROOT,
            env=environ,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    addr = f"127.0.0.1:{port}"
    try:
        await wait_serving(addr, process, "persister", log_file)
        yield addr
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


@pytest.fixture
async def mesh_gateway(
    log_path: Path,  # noqa: F811
    keys: Keys,  # noqa: F811
    pg_dsn: str,
    tmp_path: Path,
    agent_log: EmbeddedLog,  # noqa: F811
) -> AsyncIterator[Gateway]:
    async with (
        spawn_persister(log_path, pg_dsn, tmp_path) as persister_addr,
        run_gateway(gateway_settings(log_path, keys, persister_addr)) as gateway,
    ):
        yield gateway


async def finished_turn(
    gateway: Gateway, agent_log: EmbeddedLog, key: str, text: str, conversation_id: str = ""
) -> gateway_pb2.TurnAccepted:
    call = gateway.stub.StreamTurn(
        gateway_pb2.StreamTurnRequest(
            start=gateway_pb2.StartTurn(conversation_id=conversation_id, text=text)
        ),
        metadata=md(key),
    )
    accepted = (await first_frame(call)).accepted
    agent = AgentPlayer(agent_log, accepted.turn_id, accepted.conversation_id)
    await agent.started()
    await agent.tokens([1, 2])
    await agent.finished(2)
    await read_until_finished(call)
    return accepted


async def test_conversations_are_checked_listed_and_isolated_by_tenant(
    mesh_gateway: Gateway,
    keys: Keys,  # noqa: F811
    agent_log: EmbeddedLog,  # noqa: F811
) -> None:
    gateway = mesh_gateway
    first = await finished_turn(gateway, agent_log, keys.acme, "hello there")
    conversation_id = first.conversation_id

    reply = await gateway.stub.GetConversation(
        gateway_pb2.GetConversationRequest(conversation_id=conversation_id),
        metadata=md(keys.acme),
    )
    messages = reply.conversation.messages
    assert [(m.role, m.text) for m in messages] == [
        (conversation_pb2.ROLE_USER, "hello there"),
        (conversation_pb2.ROLE_ASSISTANT, "w1 w2 "),
    ]

    # The same conversation continues; another tenant cannot see or continue it.
    second = await finished_turn(gateway, agent_log, keys.acme, "more", conversation_id)
    assert second.conversation_id == conversation_id
    code, reason, _ = await expect_error(
        gateway.stub.StreamTurn(
            gateway_pb2.StreamTurnRequest(
                start=gateway_pb2.StartTurn(conversation_id=conversation_id, text="mine now")
            ),
            metadata=md(keys.globex),
        )
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "CONVERSATION_NOT_FOUND")
    code, reason, _ = await expect_error(
        gateway.stub.GetConversation(
            gateway_pb2.GetConversationRequest(conversation_id=conversation_id),
            metadata=md(keys.globex),
        )
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "CONVERSATION_NOT_FOUND")
    code, reason, _ = await expect_error(
        gateway.stub.StreamTurn(
            gateway_pb2.StreamTurnRequest(
                start=gateway_pb2.StartTurn(conversation_id="never-seen", text="hi")
            ),
            metadata=md(keys.acme),
        )
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "CONVERSATION_NOT_FOUND")

    acme = await gateway.stub.ListConversations(
        gateway_pb2.ListConversationsRequest(), metadata=md(keys.acme)
    )
    assert [c.conversation_id for c in acme.conversations] == [conversation_id]
    assert not acme.conversations[0].messages
    globex = await gateway.stub.ListConversations(
        gateway_pb2.ListConversationsRequest(page_size=5), metadata=md(keys.globex)
    )
    assert list(globex.conversations) == []
    code, reason, _ = await expect_error(
        gateway.stub.ListConversations(
            gateway_pb2.ListConversationsRequest(page_token="garbage!"), metadata=md(keys.acme)
        )
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "PAGE_TOKEN_INVALID")


async def test_delete_conversation_through_the_gateway(
    mesh_gateway: Gateway,
    keys: Keys,  # noqa: F811
    agent_log: EmbeddedLog,  # noqa: F811
) -> None:
    gateway = mesh_gateway
    first = await finished_turn(gateway, agent_log, keys.acme, "please forget this")
    conversation_id = first.conversation_id

    def delete(key: str, conversation: str) -> Any:
        return gateway.stub.DeleteConversation(
            gateway_pb2.DeleteConversationRequest(conversation_id=conversation), metadata=md(key)
        )

    for key, conversation, expected in [
        (keys.acme, "", (grpc.StatusCode.INVALID_ARGUMENT, "CONVERSATION_ID_MISSING")),
        (keys.globex, conversation_id, (grpc.StatusCode.NOT_FOUND, "CONVERSATION_NOT_FOUND")),
        (keys.acme, "never-seen", (grpc.StatusCode.NOT_FOUND, "CONVERSATION_NOT_FOUND")),
        ("not-a-key", conversation_id, (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")),
    ]:
        code, reason, _ = await expect_error(delete(key, conversation))
        assert (code, reason) == expected, (conversation, reason)

    # A turn that is still generating: refused, and nothing is deleted.
    call = gateway.stub.StreamTurn(
        gateway_pb2.StreamTurnRequest(
            start=gateway_pb2.StartTurn(conversation_id=conversation_id, text="still running")
        ),
        metadata=md(keys.acme),
    )
    accepted = (await first_frame(call)).accepted
    agent = AgentPlayer(agent_log, accepted.turn_id, conversation_id)
    await agent.started()
    await agent.tokens([1])
    code, reason, _ = await expect_error(delete(keys.acme, conversation_id))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TURN_IN_PROGRESS")
    await agent.finished(1)
    await read_until_finished(call)

    reply = await delete(keys.acme, conversation_id)
    assert (reply.messages_deleted, reply.already_deleted) == (4, False)
    code, reason, _ = await expect_error(
        gateway.stub.GetConversation(
            gateway_pb2.GetConversationRequest(conversation_id=conversation_id),
            metadata=md(keys.acme),
        )
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "CONVERSATION_NOT_FOUND")
    # The gateway knew the conversation; it asks again now, so no turn starts in it.
    code, reason, _ = await expect_error(
        gateway.stub.StreamTurn(
            gateway_pb2.StreamTurnRequest(
                start=gateway_pb2.StartTurn(conversation_id=conversation_id, text="again")
            ),
            metadata=md(keys.acme),
        )
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "CONVERSATION_NOT_FOUND")
    again = await delete(keys.acme, conversation_id)
    assert (again.messages_deleted, again.already_deleted) == (0, True)
    listed = await gateway.stub.ListConversations(
        gateway_pb2.ListConversationsRequest(), metadata=md(keys.acme)
    )
    assert list(listed.conversations) == []

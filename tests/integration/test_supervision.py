"""The launcher users run (`make run`, `make up`) restarts a service that dies and leaves the
others serving: started here as `python -m mesh.launcher`, exactly as `make up` starts it."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from chat.gateway.v1 import gateway_pb2

from mesh.auth import add_key_to_file
from mesh.launcher import wait_healthy
from mesh.tls import channel_credentials, load_identity
from tests.fixtures.launched import launched
from tests.fixtures.mesh import TOKEN_INTERVAL_MS
from tests.integration.grpc_helpers import TurnResult, auth, gateway, start_request

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _read_info(path: Path) -> dict[str, Any] | None:
    try:
        info: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # not written yet, or caught half-way through a rewrite
    return info


def _wait_for(check: Any, timeout_s: float, what: str, log: Path) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"{what} within {timeout_s:.0f} s; launcher log:\n{log.read_text()[-4000:]}")


@pytest.fixture
def launcher(tmp_path: Path, tiny_model_path: Path) -> Iterator[tuple[Path, Path, str]]:
    """The launcher with the embedded profile; yields its mesh.json, its log and an API key."""
    keys_file = tmp_path / "api-keys.json"
    keys = add_key_to_file(keys_file, "tenant-a", rate_per_s=100.0, burst=100)
    args = ["--model", str(tiny_model_path), "--keys-file", str(keys_file)]
    # Paced so turns are still generating when the agent is killed.
    env = {"MESH_AGENT_MIN_TOKEN_INTERVAL_MS": str(TOKEN_INTERVAL_MS)}
    with launched(tmp_path, args, env) as running:
        yield running.info_path, running.log, keys


def test_a_killed_agent_is_restarted_and_the_rest_keeps_serving(
    launcher: tuple[Path, Path, str],
) -> None:
    info_path, log, _ = launcher
    info = _wait_for(lambda: _read_info(info_path), 240, "the mesh did not start", log)
    services = info["services"]
    agent = services["agent-1"]
    others = {name: s["pid"] for name, s in services.items() if name != "agent-1"}

    os.kill(agent["pid"], signal.SIGKILL)

    def restarted() -> dict[str, Any] | None:
        now = _read_info(info_path)
        if now is None or now["services"]["agent-1"]["pid"] == agent["pid"]:
            return None
        return now

    after = _wait_for(restarted, 60, "agent-1 was not started again", log)
    assert after["services"]["agent-1"]["addr"] == agent["addr"]  # peers keep its address
    # The agent takes mutual TLS only: probe it with the operator certificate mesh.json names.
    tls = info["tls"]
    identity = load_identity(
        Path(tls["MESH_TLS_CA"]), Path(tls["MESH_TLS_CERT"]), Path(tls["MESH_TLS_KEY"])
    )
    credentials = channel_credentials(identity)
    wait_healthy(
        agent["addr"], timeout_s=60, name="agent-1", credentials=credentials, server_name="agent"
    )
    for name, pid in others.items():
        assert after["services"][name]["pid"] == pid, f"{name} was restarted too"
        assert _alive(pid), f"{name} died"
    wait_healthy(services["gateway-1"]["addr"], timeout_s=5, name="gateway-1")

    url = f"http://127.0.0.1:{after['launcher_metrics_port']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        metrics = response.read().decode()
    assert 'mesh_launcher_restarts_total{service="agent-1"} 1.0' in metrics
    assert "agent-1 exited (-9); starting it again" in log.read_text()


def test_every_turn_in_flight_finishes_after_the_agent_is_killed(
    launcher: tuple[Path, Path, str],
) -> None:
    """SIGKILL with four turns generating in one batch: the restarted agent finishes all four,
    gap-free and duplicate-free, and PostgreSQL holds exactly what was streamed."""
    info_path, log, key = launcher
    info = _wait_for(lambda: _read_info(info_path), 240, "the mesh did not start", log)
    agent = info["services"]["agent-1"]
    with grpc.insecure_channel(info["services"]["gateway-1"]["addr"]) as channel:
        stub = gateway(channel)
        results = [TurnResult() for _ in range(4)]
        errors: list[BaseException] = []

        def run(index: int) -> None:
            start = start_request(f"turn number {index}", max_tokens=60, temperature=0.0)
            try:
                for frame in stub.StreamTurn(
                    gateway_pb2.StreamTurnRequest(start=start), metadata=auth(key), timeout=180
                ):
                    results[index].add(frame)
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(4)]
        for thread in threads:
            thread.start()
        _wait_for(
            lambda: all(len(r.tokens) >= 5 for r in results) or errors,
            60,
            "four turns did not all start generating",
            log,
        )
        assert not any(r.finished for r in results), "turns ended before the kill"
        os.kill(agent["pid"], signal.SIGKILL)
        for thread in threads:
            thread.join(180)
        assert not errors, errors
        for result in results:
            assert result.finished is not None, result.turn_id
            assert result.seqs == list(range(1, len(result.seqs) + 1)), result.seqs
            assert result.finished.last_seq == len(result.seqs)
            assert len(result.seqs) == 60

        def persisted(result: TurnResult) -> str | None:
            conversation = stub.GetConversation(
                gateway_pb2.GetConversationRequest(conversation_id=result.conversation_id),
                metadata=auth(key),
            ).conversation
            if len(conversation.messages) != 2:
                return None
            return str(conversation.messages[1].text)

        for result in results:
            text = _wait_for(lambda r=result: persisted(r), 30, "a turn was not persisted", log)
            assert text == result.text
    assert "agent-1 exited (-9); starting it again" in log.read_text()

"""Turns nobody follows are cancelled after the grace period, unless started in the background or
resumed in time; through the launcher users run, with two gateways."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from chat.common.v1 import common_pb2
from chat.gateway.v1 import gateway_pb2

from mesh.auth import add_key_to_file
from tests.integration.grpc_helpers import TurnResult, auth, error_reason, gateway, start_request

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GRACE_S = 2.0
TOKEN_INTERVAL_MS = 30  # 150 tokens take 4.5 s: far longer than the grace period
MAX_TOKENS = 150


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("orphans")
    keys_file = tmp / "api-keys.json"
    key = add_key_to_file(keys_file, "tenant-a", rate_per_s=100.0, burst=100)
    log = tmp / "launcher.log"
    command = [sys.executable, "-m", "mesh.launcher", "--state-dir", str(tmp / "state")]
    command += ["--model", str(tiny_model_path), "--keys-file", str(keys_file), "--gateways", "2"]
    env = {
        **os.environ,
        "MESH_AGENT_ORPHAN_GRACE_S": str(GRACE_S),
        "MESH_AGENT_MIN_TOKEN_INTERVAL_MS": str(TOKEN_INTERVAL_MS),
    }
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    info_path = tmp / "state" / "mesh.json"
    deadline = time.monotonic() + 240
    info: dict[str, Any] | None = None
    try:
        while info is None:
            if process.poll() is not None:
                pytest.fail(f"the launcher exited ({process.returncode}):\n{_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"the mesh did not start within 240 s:\n{_tail(log)}")
            try:
                found = json.loads(info_path.read_text())
                info = found if found.get("pid") == process.pid else None
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.3)
        yield {**info, "key": key, "log": log}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=90) == 0, _tail(log)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


def addr(mesh: dict[str, Any], name: str) -> str:
    return str(mesh["services"][name]["addr"])


def start_and_leave(mesh: dict[str, Any], *, background: bool = False) -> str:
    """Start a turn on gateway-1, wait for its first token, then drop the stream."""
    start = start_request("tell me a long story", max_tokens=MAX_TOKENS, temperature=0.0)
    start.background = background
    with grpc.insecure_channel(addr(mesh, "gateway-1")) as channel:
        call = gateway(channel).StreamTurn(
            gateway_pb2.StreamTurnRequest(start=start), metadata=auth(mesh["key"]), timeout=60
        )
        result = TurnResult()
        for frame in call:
            result.add(frame)
            if result.tokens:
                break
        call.cancel()
    assert result.turn_id and not result.finished
    return result.turn_id


def resume(mesh: dict[str, Any], turn_id: str, gateway_name: str = "gateway-2") -> TurnResult:
    result = TurnResult()
    with grpc.insecure_channel(addr(mesh, gateway_name)) as channel:
        for frame in gateway(channel).ResumeTurn(
            gateway_pb2.ResumeTurnRequest(turn_id=turn_id), metadata=auth(mesh["key"]), timeout=60
        ):
            result.add(frame)
    assert result.finished is not None
    return result


def test_a_turn_nobody_follows_is_cancelled_after_the_grace_period(mesh: dict[str, Any]) -> None:
    turn_id = start_and_leave(mesh)
    left_at = time.monotonic()
    time.sleep(GRACE_S + 1.0)
    result = resume(mesh, turn_id)
    finished = result.finished
    assert finished is not None
    assert finished.finish_reason == common_pb2.FINISH_REASON_CANCELLED, finished
    # Stopped soon after the grace period, far short of its length.
    generated = len(result.tokens)
    limit = (time.monotonic() - left_at) * 1000 / TOKEN_INTERVAL_MS
    assert generated < MAX_TOKENS and generated < limit, (generated, limit)
    assert finished.error.code == grpc.StatusCode.CANCELLED.value[0]
    assert "MESH_AGENT_ORPHAN_GRACE_S" in finished.error.message
    assert error_reason(finished.error) == "ORPHANED"
    assert "no client attached" in _tail(Path(mesh["services"]["agent-1"]["log"]))


def test_a_background_turn_runs_to_its_end_with_nobody_attached(mesh: dict[str, Any]) -> None:
    turn_id = start_and_leave(mesh, background=True)
    time.sleep(GRACE_S + 1.0)
    result = resume(mesh, turn_id)
    assert result.finished is not None
    assert result.finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert len(result.tokens) == MAX_TOKENS


def test_a_client_that_resumes_within_the_grace_period_loses_nothing(
    mesh: dict[str, Any],
) -> None:
    turn_id = start_and_leave(mesh)
    time.sleep(GRACE_S / 4)
    result = resume(mesh, turn_id, "gateway-2")  # another gateway, as after a reconnect
    assert result.finished is not None
    assert result.finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert [t.seq for t in result.tokens] == list(range(1, MAX_TOKENS + 1))

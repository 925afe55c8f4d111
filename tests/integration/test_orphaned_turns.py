"""Turns nobody follows are cancelled after the grace period, unless started in the background or
resumed in time; through the launcher users run, with two gateways."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from chat.common.v1 import common_pb2
from chat.gateway.v1 import gateway_pb2

from mesh.auth import add_key_to_file
from tests.fixtures.launched import launched, tail
from tests.integration.grpc_helpers import TurnResult, auth, error_reason, gateway, start_request

pytestmark = pytest.mark.integration

GRACE_S = 2.0
TOKEN_INTERVAL_MS = 30  # 150 tokens take 4.5 s: far longer than the grace period
MAX_TOKENS = 150


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("orphans")
    keys_file = tmp / "api-keys.json"
    key = add_key_to_file(keys_file, "tenant-a", rate_per_s=100.0, burst=100)
    args = ["--model", str(tiny_model_path), "--keys-file", str(keys_file), "--gateways", "2"]
    env = {
        "MESH_AGENT_ORPHAN_GRACE_S": str(GRACE_S),
        "MESH_AGENT_MIN_TOKEN_INTERVAL_MS": str(TOKEN_INTERVAL_MS),
    }
    with launched(tmp, args, env) as launcher:
        yield {**launcher.wait_started(), "key": key, "log": launcher.log}


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
    assert "no client attached" in tail(Path(mesh["services"]["agent-1"]["log"]))


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


def test_a_background_response_over_http_outlives_the_grace_period(mesh: dict[str, Any]) -> None:
    """The OpenAI API's background responses answer at once and run with nobody attached."""
    import urllib.request

    url = str(mesh["gateway_http_url"])
    headers = {"Authorization": f"Bearer {mesh['key']}", "Content-Type": "application/json"}
    body = {
        "model": json.loads(
            urllib.request.urlopen(
                urllib.request.Request(f"{url}/v1/models", headers=headers), timeout=10
            ).read()
        )["data"][0]["id"],
        "input": "a long story please",
        "background": True,
        "store": True,
        "max_output_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    request = urllib.request.Request(
        f"{url}/v1/responses", data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    created = json.loads(urllib.request.urlopen(request, timeout=30).read())
    assert created["status"] in ("queued", "in_progress"), created
    time.sleep(GRACE_S + 1.0)
    deadline = time.monotonic() + 60
    status = ""
    while time.monotonic() < deadline:
        polled = urllib.request.Request(f"{url}/v1/responses/{created['id']}", headers=headers)
        status = json.loads(urllib.request.urlopen(polled, timeout=10).read())["status"]
        if status not in ("queued", "in_progress"):
            break
        time.sleep(0.5)
    assert status == "incomplete", status  # ran to max_output_tokens: not cancelled

"""Health that means something, on the mesh as users start it (`python -m mesh.launcher`):

- a stopped persister (SIGSTOP) turns the gateway's readiness NOT_SERVING within the threshold,
  StartTurn fails fast with UNAVAILABLE and RetryInfo instead of accepting a turn that cannot be
  saved, liveness ("") stays SERVING and the supervisor restarts nothing; SIGCONT brings it back;
- with no agent consuming (the only agent stopped past its session), StartTurn fails fast with
  UNAVAILABLE (NO_AGENT), and turns run again once the agent is back.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import grpc
import pytest
from chat.gateway.v1 import gateway_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.auth import add_key_to_file
from mesh.tls import channel_credentials, load_identity
from tests.fixtures.launched import launched
from tests.integration.grpc_helpers import (
    auth,
    error_reason,
    gateway,
    retry_delay_s,
    rich_status,
    start_request,
    stream_turn,
)

pytestmark = pytest.mark.integration

GATEWAY = "chat.gateway.v1.GatewayService"
PERSISTER = "chat.persister.v1.PersisterService"
AGENT = "chat.agent.v1.AgentService"
INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 0.5
THRESHOLD_S = 2.0
SESSION_S = 2.0
# From the fault to the refusal: the threshold, plus a probe's timeout and interval, plus slack
# for two shared cores.
WITHIN_S = THRESHOLD_S + PROBE_TIMEOUT_S + INTERVAL_S + 3.0


def _read_info(path: Path) -> dict[str, Any] | None:
    try:
        info: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return info


def _wait_for(
    check: Callable[[], Any], timeout_s: float, what: str, log: Path, seen: object = None
) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(
        f"{what} within {timeout_s:.0f} s (saw {seen}); launcher log:\n{log.read_text()[-4000:]}"
    )


def _seen(seen: list[str], status: str) -> str:
    if not seen or seen[-1] != status:
        seen.append(status)
    return status


# The operator identity of the mesh under test (set by the fixture when the launcher runs the
# services over mutual TLS, its default): probes of the internal services present it.
_IDENTITY: list[grpc.ChannelCredentials] = []
_SERVER_NAMES = {PERSISTER: "persister", AGENT: "agent"}


def _status(addr: str, service: str, server_name: str = "") -> str:
    """grpc.health.v1 status of ``service`` at ``addr``; the internal services (``server_name``)
    over mutual TLS when the mesh uses it."""
    server_name = server_name or _SERVER_NAMES.get(service, "")
    if server_name and _IDENTITY:
        options = [("grpc.ssl_target_name_override", server_name)]
        opened = grpc.secure_channel(addr, _IDENTITY[0], options=options)
    else:
        opened = grpc.insecure_channel(addr)
    try:
        with opened as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1.0
            )
    except grpc.RpcError as error:
        return str(error.code().name)  # type: ignore[attr-defined]
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


class Mesh:
    def __init__(self, info_path: Path, log: Path, key: str) -> None:
        self.info_path, self.log, self.key = info_path, log, key
        self.info: dict[str, Any] = _wait_for(
            lambda: _read_info(info_path), 240, "the mesh did not start", log
        )

    def service(self, name: str) -> dict[str, Any]:
        info = _read_info(self.info_path) or self.info
        service: dict[str, Any] = info["services"][name]
        return service

    @property
    def gateway_addr(self) -> str:
        return str(self.service("gateway-1")["addr"])

    def refused_start(self, timeout_s: float = 60) -> tuple[grpc.RpcError | None, float]:
        """One turn on a new conversation: its error (None if it ran) and how long it took."""
        with grpc.insecure_channel(self.gateway_addr) as channel:
            started = time.monotonic()
            try:
                result = stream_turn(
                    gateway(channel),
                    self.key,
                    start_request("hello", max_tokens=2),
                    timeout=timeout_s,
                )
            except grpc.RpcError as error:
                return error, time.monotonic() - started
            assert result.finished is not None
            return None, time.monotonic() - started

    def turn_runs(self) -> bool:
        error, _ = self.refused_start()
        return error is None


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("health")
    keys_file = tmp / "api-keys.json"
    key = add_key_to_file(keys_file, "tenant-a", rate_per_s=100.0, burst=100)
    args = ["--model", str(tiny_model_path), "--keys-file", str(keys_file)]
    env = {
        "MESH_HEALTH_INTERVAL_S": str(INTERVAL_S),
        "MESH_HEALTH_TIMEOUT_S": str(PROBE_TIMEOUT_S),
        "MESH_HEALTH_THRESHOLD_S": str(THRESHOLD_S),
        "MESH_LOG_SESSION_TIMEOUT_S": str(SESSION_S),
        "MESH_LOG_HEARTBEAT_INTERVAL_S": "0.25",
    }
    with launched(tmp, args, env) as launcher:
        running = Mesh(launcher.info_path, launcher.log, key)
        tls = running.info.get("tls")
        _IDENTITY.clear()
        if tls:
            identity = load_identity(
                Path(tls["MESH_TLS_CA"]), Path(tls["MESH_TLS_CERT"]), Path(tls["MESH_TLS_KEY"])
            )
            _IDENTITY.append(channel_credentials(identity))
        _wait_for(
            lambda: _status(running.gateway_addr, GATEWAY) == "SERVING",
            30,
            "the gateway was not ready",
            launcher.log,
        )
        _wait_for(running.turn_runs, 60, "no turn ran on the fresh mesh", launcher.log)
        yield running


def _assert_unavailable(
    error: grpc.RpcError | None, took_s: float, reason: str, *also: str
) -> None:
    assert error is not None, "the turn was accepted"
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error  # type: ignore[attr-defined]
    status = rich_status(error)
    assert error_reason(status) in (reason, *also), status
    delay = retry_delay_s(status)
    assert delay is not None and delay > 0, status
    assert took_s < 1.0, f"the refusal took {took_s:.2f} s"


def test_a_stopped_persister_makes_the_gateway_unready_and_starts_fail_fast(mesh: Mesh) -> None:
    persister = mesh.service("persister")
    gateway_addr = mesh.gateway_addr
    assert _status(persister["addr"], PERSISTER) == "SERVING"
    os.kill(persister["pid"], signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        _wait_for(
            lambda: _status(gateway_addr, GATEWAY) == "NOT_SERVING",
            WITHIN_S,
            "the gateway's readiness did not turn NOT_SERVING",
            mesh.log,
        )
        unready_after = time.monotonic() - stopped_at
        assert unready_after >= THRESHOLD_S * 0.8, "unready before the threshold"
        print(f"gateway NOT_SERVING {unready_after:.1f}s after the persister stopped")
        # Liveness is separate: the process is healthy, it waits on a dependency.
        assert _status(gateway_addr, "") == "SERVING"
        error, took = mesh.refused_start()
        # The embedded log is one SQLite file: a persister stopped inside one of its write
        # transactions (an offset commit, a heartbeat) holds the write lock, and the log is
        # then unwritable for every process until it runs again (docs/reliability.md).
        _assert_unavailable(error, took, "PERSISTER_UNAVAILABLE", "LOG_UNAVAILABLE")
        # Conversation reads fail fast too, instead of waiting for the persister's timeout.
        with grpc.insecure_channel(gateway_addr) as channel:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as listed:
                gateway(channel).ListConversations(
                    gateway_pb2.ListConversationsRequest(page_size=5),
                    metadata=auth(mesh.key),
                    timeout=30,
                )
            assert listed.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert time.monotonic() - started < 1.0
        time.sleep(2.0)
        # Nobody restarted the stopped process: it is not dead, only unready.
        assert mesh.service("persister")["pid"] == persister["pid"]
    finally:
        os.kill(persister["pid"], signal.SIGCONT)
    resumed_at = time.monotonic()
    _wait_for(
        lambda: _status(gateway_addr, GATEWAY) == "SERVING",
        WITHIN_S,
        "the gateway did not become ready again after SIGCONT",
        mesh.log,
    )
    print(f"gateway SERVING {time.monotonic() - resumed_at:.1f}s after SIGCONT")
    _wait_for(mesh.turn_runs, 30, "no turn ran after the persister came back", mesh.log)


def test_with_no_agent_consuming_starts_fail_fast_until_one_is_back(mesh: Mesh) -> None:
    agent = mesh.service("agent-1")
    assert _status(agent["addr"], AGENT) == "SERVING"
    os.kill(agent["pid"], signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        refusal: list[tuple[grpc.RpcError | None, float]] = []

        def refused() -> bool:
            # A turn accepted meanwhile waits for the agent: each try gets a short deadline.
            error, took = mesh.refused_start(timeout_s=1.5)
            if error is None or error.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                return False
            refusal.append((error, took))
            return True

        _wait_for(refused, SESSION_S + WITHIN_S + 5, "StartTurn was never refused", mesh.log)
        refused_after = time.monotonic() - stopped_at
        error, took = refusal[-1]
        _assert_unavailable(error, took, "NO_AGENT")
        assert refused_after >= SESSION_S, "refused before the agent's session ran out"
        print(f"StartTurn refused (NO_AGENT) {refused_after:.1f}s after the agent stopped")
        # The gateway itself can still do the rest of its job.
        assert _status(mesh.gateway_addr, GATEWAY) == "SERVING"
    finally:
        os.kill(agent["pid"], signal.SIGCONT)
    _wait_for(mesh.turn_runs, 60, "no turn ran after the agent came back", mesh.log)
    assert mesh.service("agent-1")["pid"] == agent["pid"]


def _postgres_pids(mesh: Mesh) -> list[int]:
    """The embedded PostgreSQL's postmaster and every backend it runs now."""
    import psutil

    dsn = str(mesh.info["pg_dsn"])
    [socket_dir] = parse_qs(urlparse(dsn).query)["host"]
    postmaster = int((Path(socket_dir) / "postmaster.pid").read_text().split()[0])
    process = psutil.Process(postmaster)
    return [postmaster, *(child.pid for child in process.children(recursive=True))]


def test_a_stopped_postgres_makes_the_persister_and_the_gateway_unready(mesh: Mesh) -> None:
    """The chain of readiness: PostgreSQL stopped (every process of it) turns the persister
    NOT_SERVING, which the gateway sees through the persister's readiness; both come back."""
    persister = mesh.service("persister")
    gateway_addr = mesh.gateway_addr
    pids = _postgres_pids(mesh)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        seen: list[str] = []
        _wait_for(
            lambda: _seen(seen, _status(persister["addr"], PERSISTER)) == "NOT_SERVING",
            WITHIN_S,
            "the persister's readiness did not turn NOT_SERVING",
            mesh.log,
            seen,
        )
        print(
            f"persister NOT_SERVING {time.monotonic() - stopped_at:.1f}s after PostgreSQL stopped"
        )
        assert _status(persister["addr"], "", "persister") == "SERVING"
        _wait_for(
            lambda: _status(gateway_addr, GATEWAY) == "NOT_SERVING",
            WITHIN_S + INTERVAL_S,
            "the gateway's readiness did not follow the persister's",
            mesh.log,
        )
        error, took = mesh.refused_start()
        _assert_unavailable(error, took, "PERSISTER_UNAVAILABLE")
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    for addr, name in ((persister["addr"], PERSISTER), (gateway_addr, GATEWAY)):
        _wait_for(
            lambda a=addr, n=name: _status(a, n) == "SERVING",
            WITHIN_S + 10,
            f"{name} did not become ready again",
            mesh.log,
        )
    _wait_for(mesh.turn_runs, 30, "no turn ran after PostgreSQL came back", mesh.log)

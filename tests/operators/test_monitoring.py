"""Monitoring, checked for real against the launcher users run (`make up MONITORING=1` is
`python -m mesh.launcher --monitoring`):

- promtool passes our rules and fails a broken one;
- a real Prometheus (Debian's package) scrapes the live mesh: an alert fires when its condition
  is produced (the only agent stopped with turns queued), and after a few turns every panel
  query of the Grafana dashboard returns data through the Prometheus HTTP API;
- a real Jaeger v2 (built from the Go module proxy) holds one turn's trace, with spans from the
  gateway, the agent, the persister and memory, the GenAI attributes, and an agent takeover
  shown as a link to the killed agent's span;
- the services' JSON logs carry ECS fields and the turn's trace id, and no user text.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from chat.gateway.v1 import gateway_pb2

from mesh.auth import add_key_to_file
from mesh.infra.jaeger import DEFAULT_BINARY as JAEGER_BINARY
from mesh.infra.jaeger import fetch_trace
from mesh.infra.prometheus import (
    DASHBOARD,
    RULES,
    PrometheusError,
    PrometheusServer,
    check_rules,
)
from tests.fixtures.launched import launched, tail
from tests.integration.grpc_helpers import TurnResult, auth, gateway, start_request
from tests.operators.test_probes import operator_tools  # noqa: F401  (builds jaeger too)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

TOKEN_INTERVAL_MS = 30  # paced, so a turn is still generating when its agent is killed


def test_promtool_passes_the_rules() -> None:
    assert "SUCCESS: 12 rules found" in check_rules(RULES)


def test_promtool_fails_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(RULES.read_text().replace("up{job=~", "up{job=~~", 1))
    with pytest.raises(PrometheusError, match="promtool check rules failed"):
        check_rules(broken)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard target, with Grafana's rate window filled in."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [
        (panel["title"], target["expr"].replace("$__rate_interval", "1m"))
        for panel in panels
        for target in panel["targets"]
    ]


def test_the_dashboard_covers_what_an_operator_watches() -> None:
    text = " ".join(expr for _, expr in dashboard_queries())
    for metric in (
        "mesh_time_to_first_token_seconds",
        "mesh_inter_token_latency_seconds",
        "mesh_tokens_generated_total",
        "mesh_queue_depth",
        "mesh_engine_queue_wait_seconds",
        "mesh_rpc_errors_total",
        "mesh_consumer_lag_records",
        "mesh_engine_num_requests_running",
        "mesh_engine_kv_cache_usage_ratio",
        "mesh_persister_flush_seconds",
        "mesh_memory_recall_seconds",
        "gen_ai_server_time_to_first_token_seconds",
        "gen_ai_server_time_per_output_token_seconds",
        "gen_ai_server_request_duration_seconds",
    ):
        assert metric in text, f"no dashboard panel shows {metric}"


# -- the live mesh --------------------------------------------------------------------------


def _wait_for(check: Callable[[], Any], timeout_s: float, what: str, log: Path) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last and not isinstance(last, str):
            return last
        time.sleep(0.5)
    pytest.fail(f"{what} within {timeout_s:.0f} s ({last}); launcher log:\n{tail(log)}")


class Monitored:
    def __init__(self, info: dict[str, Any], key: str, log: Path) -> None:
        self.info = info
        self.key = key
        self.log = log
        self.prometheus = PrometheusServer(Path("/nonexistent"))
        self.prometheus.url = info["prometheus_url"]
        self.jaeger_url = info["jaeger_url"]

    @property
    def gateway_addr(self) -> str:
        return str(self.info["services"]["gateway-1"]["addr"])

    def service(self, name: str) -> dict[str, Any]:
        services: dict[str, Any] = json.loads(
            (Path(self.info["state_dir"]) / "mesh.json").read_text()
        )["services"]
        return services[name]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def monitored(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_path: Path,
    operator_tools: object,  # noqa: F811
) -> Iterator[Monitored]:
    if not os.access(JAEGER_BINARY, os.X_OK):
        pytest.fail(f"{JAEGER_BINARY} is missing: run scripts/install-operator-tools.sh")
    tmp = tmp_path_factory.mktemp("monitored")
    keys_file = tmp / "api-keys.json"
    key = add_key_to_file(keys_file, "tenant-a", rate_per_s=100.0, burst=100)
    # The same rules, with their `for` durations shortened so an alert fires within the test.
    rules = tmp / "mesh-rules.yml"
    rules.write_text(re.sub(r"for: \d+m", "for: 0s", RULES.read_text()))
    args = ["--model", str(tiny_model_path), "--keys-file", str(keys_file)]
    args += ["--monitoring", "--scrape-interval", "1", "--rules", str(rules)]
    env = {
        "MESH_LOG_FORMAT": "json",
        "MESH_PERSISTER_LAG_INTERVAL_S": "1",
        "MESH_AGENT_MIN_TOKEN_INTERVAL_MS": str(TOKEN_INTERVAL_MS),
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # export spans within a fraction of a second
        # Turns must queue behind a stopped agent for the alert to fire: the gateway would
        # otherwise refuse them (NO_AGENT, tests/integration/test_health.py checks that).
        "MESH_GATEWAY_REQUIRE_AGENT": "false",
    }
    with launched(tmp, args, env) as launcher:
        info = launcher.wait_started()
        assert info["prometheus_url"] and info["jaeger_url"], info
        yield Monitored(info, key, launcher.log)


def run_turn(
    mesh: Monitored, text: str, *, max_tokens: int = 8, metadata: tuple[tuple[str, str], ...] = ()
) -> TurnResult:
    result = TurnResult()
    with grpc.insecure_channel(mesh.gateway_addr) as channel:
        request = gateway_pb2.StreamTurnRequest(
            start=start_request(text, max_tokens=max_tokens, temperature=0.0)
        )
        for frame in gateway(channel).StreamTurn(
            request, metadata=(*auth(mesh.key), *metadata), timeout=180
        ):
            result.add(frame)
    assert result.finished is not None, result
    return result


def firing(mesh: Monitored) -> set[str]:
    alerts = mesh.prometheus.api("alerts")["alerts"]
    return {alert["labels"]["alertname"] for alert in alerts if alert["state"] == "firing"}


def test_an_alert_fires_then_every_dashboard_panel_has_data(monitored: Monitored) -> None:
    mesh = monitored
    agent_pid = mesh.service("agent-1")["pid"]
    os.kill(agent_pid, signal.SIGSTOP)
    results: list[TurnResult] = []
    errors: list[BaseException] = []

    def queued(index: int) -> None:
        try:
            results.append(run_turn(mesh, f"waiting turn {index}"))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=queued, args=(i,), daemon=True) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        fired = _wait_for(
            lambda: (
                {"MeshNoAgentConsuming", "MeshServiceDown"} <= firing(mesh)
                or f"firing: {sorted(firing(mesh))}"
            ),
            90,
            "the stopped agent did not fire MeshNoAgentConsuming and MeshServiceDown",
            mesh.log,
        )
        assert fired
    finally:
        os.kill(agent_pid, signal.SIGCONT)
    for thread in threads:
        thread.join(180)
    assert not errors, errors
    assert len(results) == 2

    for i in range(3):
        run_turn(mesh, f"a turn for the dashboard {i}", max_tokens=12)
    # One error for the "errors by code" panel: a conversation that does not exist.
    with grpc.insecure_channel(mesh.gateway_addr) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            gateway(channel).GetConversation(
                gateway_pb2.GetConversationRequest(conversation_id="no-such-conversation"),
                metadata=auth(mesh.key),
            )
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND

    def panels_without_data() -> list[str] | bool:
        empty = []
        for title, expr in dashboard_queries():
            values = [float(s["value"][1]) for s in mesh.prometheus.query(expr)]
            if not any(v == v for v in values):  # no samples, or only NaN
                empty.append(f"{title}: {expr}")
        return empty or True

    missing = _wait_for(
        lambda: panels_without_data() is True or str(panels_without_data()),
        60,
        "some dashboard panels have no data",
        mesh.log,
    )
    assert missing is True
    # The agent is back: the alert resolves.
    _wait_for(
        lambda: "MeshNoAgentConsuming" not in firing(mesh) or "still firing",
        60,
        "MeshNoAgentConsuming did not resolve",
        mesh.log,
    )


def jaeger_trace(mesh: Monitored, trace_id: str) -> dict[str, Any] | None:
    return fetch_trace(mesh.jaeger_url, trace_id)


def spans_by_service(trace: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    services: dict[str, list[dict[str, Any]]] = {}
    for span in trace["spans"]:
        name = trace["processes"][span["processID"]]["serviceName"]
        services.setdefault(name, []).append(span)
    return services


def tags(span: dict[str, Any]) -> dict[str, Any]:
    return {tag["key"]: tag["value"] for tag in span.get("tags", ())}


def test_one_turn_is_one_trace_across_the_services_and_the_logs(monitored: Monitored) -> None:
    mesh = monitored
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    secret_text = f"user text that must stay out of logs {secrets.token_hex(6)}"
    result = run_turn(
        mesh,
        secret_text,
        max_tokens=10,
        metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),),
    )
    # Span names by service; the RPC server spans are named after the method.
    wanted = {
        "mesh-gateway": {"accept turn", "append request"},
        "mesh-agent": {"claim turn", "history read", "recall", "generate", "finish turn"},
        "mesh-persister": {
            "persister batch write",
            "memory index",
            "chat.persister.v1.PersisterService/GetConversation",
        },
        "mesh-memory": {"chat.memory.v1.MemoryService/Remember"},
    }

    def complete() -> dict[str, Any] | str:
        trace = jaeger_trace(mesh, trace_id)
        if trace is None:
            return "no trace yet"
        names = {
            service: {span["operationName"] for span in spans}
            for service, spans in spans_by_service(trace).items()
        }
        missing = {
            service: sorted(expected - names.get(service, set()))
            for service, expected in wanted.items()
            if expected - names.get(service, set())
        }
        return f"missing spans: {missing}" if missing else trace

    trace = _wait_for(complete, 60, f"trace {trace_id} is incomplete in Jaeger", mesh.log)
    by_service = spans_by_service(trace)
    assert secret_text not in json.dumps(trace), "user text in a span"
    [turn_span] = [s for s in by_service["mesh-agent"] if s["operationName"].startswith("chat ")]
    attributes = tags(turn_span)
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"]
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["gen_ai.usage.output_tokens"] == len(result.tokens)
    assert attributes["mesh.turn.id"] == result.turn_id
    # The client's span is the root's parent: the trace is the one the client started.
    [accept] = [s for s in by_service["mesh-gateway"] if s["operationName"] == "accept turn"]
    assert any(ref["spanID"] == parent_id for ref in accept["references"]), accept["references"]

    # Logs: ECS JSON with the turn's trace id; no user text anywhere.
    logs_dir = Path(mesh.service("agent-1")["log"]).parent
    finished = []
    for name in ("gateway-1", "agent-1", "persister", "memory"):
        for line in (logs_dir / f"{name}.log").read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue  # lines written by native code, not our logger
            doc = json.loads(line)
            assert {"@timestamp", "log.level", "service.name", "message"} <= set(doc), doc
            if doc.get("event.action") == "turn-finished" and doc.get("labels.turn_id") == (
                result.turn_id
            ):
                finished.append(doc)
    assert len(finished) == 1, finished
    assert finished[0]["trace.id"] == trace_id
    assert finished[0]["service.name"] == "mesh-agent"
    for path in logs_dir.glob("*.log"):
        assert secret_text not in path.read_text(errors="replace"), f"user text in {path}"


def test_an_agent_takeover_is_linked_to_the_killed_agents_span(monitored: Monitored) -> None:
    mesh = monitored
    trace_id = secrets.token_hex(16)
    metadata = (("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01"),)
    result = TurnResult()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.turn_id = run_turn(
                mesh, "a long turn", max_tokens=120, metadata=metadata
            ).turn_id
        except BaseException as error:
            errors.append(error)

    before = mesh.service("agent-1")["pid"]
    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def claimed() -> bool | str:
        trace = jaeger_trace(mesh, trace_id)
        names = {s["operationName"] for s in trace["spans"]} if trace else set()
        return "claim turn" in names or f"spans so far: {sorted(names)}"

    _wait_for(claimed, 60, "the first agent's claim span never reached Jaeger", mesh.log)
    os.kill(before, signal.SIGKILL)
    thread.join(180)
    assert not errors, errors

    def linked() -> dict[str, Any] | str:
        trace = jaeger_trace(mesh, trace_id)
        if trace is None:
            return "no trace"
        turns = [s for s in trace["spans"] if s["operationName"].startswith("chat ")]
        taken = [s for s in turns if tags(s).get("mesh.turn.taken_over_from") == "agent-1"]
        return taken[0] if taken else f"{len(turns)} agent turn spans, none a takeover"

    takeover = _wait_for(linked, 60, "no takeover span", mesh.log)
    trace = jaeger_trace(mesh, trace_id)
    assert trace is not None
    # The killed agent's turn span never ended (so never reached Jaeger), but its claim span
    # did: the takeover links to that claim's parent, the killed agent's turn span.
    killed_turn_span = {
        ref["spanID"]
        for span in trace["spans"]
        if span["operationName"] == "claim turn"
        for ref in span["references"]
        if ref["refType"] == "CHILD_OF"
    }
    links = {ref["spanID"] for ref in takeover["references"] if ref["refType"] == "FOLLOWS_FROM"}
    assert links & killed_turn_span, (takeover["references"], killed_turn_span)
    assert tags(takeover)["mesh.turn.resumed_after_seq"] > 0

"""The ``mesh`` command line: arguments, key creation and error lines (no servers)."""

from __future__ import annotations

import io
import json
import socket
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.auth import KeyStore, hash_key
from mesh.cli import (
    CliError,
    build_parser,
    describe_status,
    health,
    health_addresses,
    main,
    persister_address,
)
from mesh.errors import InvalidArgument, ResourceExhausted, to_status_proto


def run(argv: list[str], environ: dict[str, str] | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, environ=environ or {}, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_client_options_come_from_flags_or_environment() -> None:
    env = {"MESH_GATEWAY_ADDR": "10.1.1.1:9", "MESH_API_KEY": "from-env"}
    args = build_parser(env).parse_args(["chat"])
    assert (args.gateway, args.api_key) == ("10.1.1.1:9", "from-env")
    assert (args.conversation, args.max_tokens, args.temperature, args.seed) == ("", 0, None, None)
    args = build_parser({}).parse_args(
        [
            "chat",
            "--gateway",
            "h:1",
            "--api-key",
            "k",
            "--conversation",
            "c1",
            "--max-tokens",
            "12",
            "--temperature",
            "0.5",
            "--seed",
            "3",
        ]
    )
    assert (args.gateway, args.api_key, args.conversation) == ("h:1", "k", "c1")
    assert (args.max_tokens, args.temperature, args.seed) == (12, 0.5, 3)
    assert build_parser({}).parse_args(["chat"]).gateway == "127.0.0.1:50051"


def test_resume_and_history_arguments() -> None:
    args = build_parser({}).parse_args(["resume", "t1.2.3.0123456789abcdef", "--after", "7"])
    assert (args.turn_id, args.after) == ("t1.2.3.0123456789abcdef", 7)
    assert build_parser({}).parse_args(["resume", "t"]).after == 0
    assert build_parser({}).parse_args(["history"]).conversation_id == ""
    assert build_parser({}).parse_args(["history", "c9"]).conversation_id == "c9"


def test_a_command_is_required() -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser({}).parse_args([])
    assert exited.value.code == 2


def test_keys_create_prints_the_key_once_and_stores_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    code, out, err = run(["keys", "create", "--tenant", "acme", "--file", str(path)])
    assert code == 0
    key = out.strip()
    assert key.startswith("mk_") and "\n" not in key
    assert "acme" in err and str(path) in err
    stored = json.loads(path.read_text())
    assert list(stored) == [hash_key(key)]
    assert key not in path.read_text()
    assert KeyStore(path).resolve(key).tenant_id == "acme"


def test_keys_create_uses_the_configured_file_and_rate(tmp_path: Path) -> None:
    env = {"MESH_GATEWAY_API_KEYS_FILE": str(tmp_path / "env-keys.json")}
    code, out, _ = run(
        ["keys", "create", "--tenant", "t1", "--rate-per-s", "2", "--burst", "4"], env
    )
    assert code == 0
    principal = KeyStore(tmp_path / "env-keys.json").resolve(out.strip())
    assert (principal.tenant_id, principal.rate_per_s, principal.burst) == ("t1", 2.0, 4)


def test_keys_create_and_list_a_key_token_budget(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    code, out, _ = run(
        [
            "keys",
            "create",
            "--tenant",
            "t1",
            "--tokens-per-minute",
            "1200",
            "--max-streams",
            "7",
            "--max-queued-turns",
            "3",
            "--file",
            str(path),
        ]
    )
    assert code == 0
    principal = KeyStore(path).resolve(out.strip())
    assert (principal.tokens_per_minute, principal.max_streams) == (1200, 7)
    assert principal.max_queued_turns == 3
    code, listing, _ = run(["keys", "list", "--file", str(path)])
    assert code == 0 and f"{principal.key_id}" in listing
    assert "1200 tokens/min 7 streams 3 queued turns" in listing
    code, out, err = run(
        ["keys", "create", "--tenant", "t1", "--tokens-per-minute", "0", "--file", str(path)]
    )
    assert code == 1 and out == "" and "tokens per minute must be >= 1" in err


def test_keys_create_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    code, out, err = run(
        ["keys", "create", "--tenant", "bad tenant", "--file", str(tmp_path / "k")]
    )
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    (tmp_path / "broken.json").write_text("[")
    code, _, err = run(
        ["keys", "create", "--tenant", "ok", "--file", str(tmp_path / "broken.json")]
    )
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1


def test_chat_without_a_key_says_how_to_get_one() -> None:
    code, _, err = run(["chat"])
    assert code == 1
    assert "MESH_API_KEY" in err and "mesh keys create" in err


def test_status_lines_name_reason_field_and_retry() -> None:
    line = describe_status(
        to_status_proto(InvalidArgument("text is empty", reason="TEXT_EMPTY", field="start.text"))
    )
    assert line == "TEXT_EMPTY (INVALID_ARGUMENT): text is empty [field: start.text]"
    line = describe_status(
        to_status_proto(ResourceExhausted("slow down", reason="RATE_LIMITED", retry_after_s=1.5))
    )
    assert line == "RATE_LIMITED (RESOURCE_EXHAUSTED): slow down (retry in 1.5s)"
    retry = any_pb2.Any()
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2)))
    bare = status_pb2.Status(code=14, message="", details=[retry])
    assert describe_status(bare) == "UNAVAILABLE: no details (retry in 2.0s)"


def test_health_addresses_follow_env_flags_and_pairs() -> None:
    env = {"MESH_PERSISTER_ADDR": "p:1"}
    targets = dict(health_addresses(env, "g:2", ["extra=e:3", "memory=m:4"]))
    assert targets == {
        "gateway": "g:2",
        "agent": "127.0.0.1:50052",
        "memory": "m:4",
        "persister": "p:1",
        "extra": "e:3",
    }
    with pytest.raises(CliError):
        health_addresses({}, None, ["no-equals"])


def test_health_addresses_from_the_state_file_of_make_up(tmp_path: Path) -> None:
    state = tmp_path / "mesh.json"
    state.write_text(
        json.dumps(
            {
                "gateway_addr": "127.0.0.1:1",
                "services": {
                    "gateway": {"addr": "127.0.0.1:1", "pid": 10},
                    "agent-1": {"addr": "127.0.0.1:2", "pid": 11},
                    "agent-2": {"addr": "127.0.0.1:3", "pid": 12},
                },
            }
        )
    )
    env = {"MESH_AGENT_ADDR": "ignored:9"}  # the file says what make up started
    targets = health_addresses(env, None, ["extra=e:3"], state)
    assert targets == [
        ("gateway", "127.0.0.1:1"),
        ("agent-1", "127.0.0.1:2"),
        ("agent-2", "127.0.0.1:3"),
        ("extra", "e:3"),
    ]
    with pytest.raises(CliError, match="make up"):
        health_addresses({}, None, [], tmp_path / "missing.json")
    state.write_text("{not json")
    with pytest.raises(CliError, match="not a mesh description"):
        health_addresses({}, None, [], state)


def test_erase_finds_the_persister_from_flags_state_file_or_environment(tmp_path: Path) -> None:
    state = tmp_path / "mesh.json"
    state.write_text(
        json.dumps({"services": {"gateway": {"addr": "g:1"}, "persister": {"addr": "p:4"}}})
    )
    assert persister_address({}, "given:9", state) == "given:9"
    assert persister_address({"MESH_PERSISTER_ADDR": "env:5"}, None, state) == "p:4"
    assert persister_address({"MESH_PERSISTER_ADDR": "env:5"}, None, None) == "env:5"
    assert persister_address({}, None, None) == "127.0.0.1:50054"
    state.write_text(json.dumps({"services": {"gateway": {"addr": "g:1"}}}))
    with pytest.raises(CliError, match="no persister"):
        persister_address({}, None, state)

    args = build_parser({"MESH_STATE_DIR": str(tmp_path)}).parse_args(
        ["erase", "--state", "--tenant", "acme", "--conversation", "c1", "--force"]
    )
    assert (args.tenant, args.conversation, args.force) == ("acme", "c1", True)
    assert args.state == tmp_path / "mesh.json"
    with pytest.raises(SystemExit):
        build_parser({}).parse_args(["erase", "--conversation", "c1"])  # --tenant is required


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_health_reports_unreachable_services_and_fails() -> None:
    out = io.StringIO()
    code = health([("gateway", f"127.0.0.1:{_closed_port()}")], timeout_s=1.0, out=out)
    assert code == 1
    assert out.getvalue().split()[-1] in {"UNREACHABLE", "TIMEOUT"}


def test_health_shows_a_live_service_that_is_not_ready() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = grpc_health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        servicer.set("chat.gateway.v1.GatewayService", health_pb2.HealthCheckResponse.NOT_SERVING)
        out = io.StringIO()
        targets = [("gateway-1", f"127.0.0.1:{port}"), ("other", f"127.0.0.1:{port}")]
        assert health(targets, timeout_s=2.0, out=out) == 1
        rows = {line.split()[0]: line.split()[-1] for line in out.getvalue().splitlines()}
        assert rows == {"gateway-1": "NOT_READY", "other": "SERVING"}
        servicer.set("chat.gateway.v1.GatewayService", health_pb2.HealthCheckResponse.SERVING)
        assert health(targets, timeout_s=2.0, out=io.StringIO()) == 0
    finally:
        server.stop(None)

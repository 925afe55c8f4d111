"""Starts and stops a whole mesh on one machine: PostgreSQL (unless a DSN is given) and the four
services as separate processes, each checked healthy before the next one starts.

Used by ``make run`` / ``make up`` (``python -m mesh.launcher``), the integration tests and the
benchmarks, so all three run the mesh the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.pg import EmbeddedPostgres

_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback port that was free a moment ago (the service binds it right after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class MeshConfig:
    """What to start. Empty ``pg_dsn`` starts the embedded PostgreSQL under ``state_dir``."""

    state_dir: Path
    model_path: Path
    api_keys_file: Path
    log_driver: str = "embedded"
    kafka_bootstrap: str = ""
    memory_backend: str = "postgres"
    es_url: str = ""
    pg_dsn: str = ""
    partitions: int = 4
    gateways: int = 1
    agents: int = 1
    gpu_layers: int = 0
    agent_threads: int = 2
    n_ctx: int = 2048
    extra_env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None


@dataclass
class Service:
    """One running service process."""

    name: str
    addr: str
    metrics_port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def kill(self) -> None:
        """SIGKILL: the crash a fault test wants, with no drain."""
        self.process.kill()
        self.process.wait(timeout=10)

    def terminate(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it does not drain in time."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


class MeshStartError(RuntimeError):
    """A service did not become healthy; the message includes the tail of its log."""


def wait_healthy(addr: str, *, timeout_s: float, process: subprocess.Popen[bytes] | None = None,
                 log_path: Path | None = None, name: str = "service") -> None:
    """Poll grpc.health.v1 on ``addr`` until SERVING, or raise with the service's log tail."""
    deadline = time.monotonic() + timeout_s
    last_error = "no answer"
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                last_error = f"exited with code {process.returncode}"
                break
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last_error = f"health status {reply.status}"
            except grpc.RpcError as error:
                last_error = f"{error.code().name}: {error.details()}"
            time.sleep(0.1)
    tail = ""
    if log_path is not None and log_path.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
    raise MeshStartError(f"{name} at {addr} did not become healthy ({last_error}).\n{tail}")


class Mesh:
    """A running mesh. ``start()`` brings everything up; ``stop()`` drains it in reverse order."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.services: list[Service] = []
        self.pg_dsn = config.pg_dsn
        self._pg: EmbeddedPostgres | None = None
        self._log_dir = config.log_dir or config.state_dir / "logs"

    # -- addresses ---------------------------------------------------------------------------
    def _one(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    def all(self, prefix: str) -> list[Service]:
        return [s for s in self.services if s.name.startswith(prefix)]

    @property
    def gateway_addr(self) -> str:
        return self.all("gateway")[0].addr

    @property
    def gateway_addrs(self) -> list[str]:
        return [s.addr for s in self.all("gateway")]

    @property
    def memory_addr(self) -> str:
        return self._one("memory").addr

    @property
    def persister_addr(self) -> str:
        return self._one("persister").addr

    @property
    def agents(self) -> list[Service]:
        return self.all("agent")

    # -- lifecycle ---------------------------------------------------------------------------
    def base_env(self) -> dict[str, str]:
        cfg = self.config
        pythonpath = os.pathsep.join(
            [str(_ROOT), str(_ROOT / "gen" / "python"), os.environ.get("PYTHONPATH", "")]
        )
        env = {
            **os.environ,
            "PYTHONPATH": pythonpath.rstrip(os.pathsep),
            "PYTHONUNBUFFERED": "1",
            "MESH_STATE_DIR": str(cfg.state_dir),
            "MESH_LOG_DRIVER": cfg.log_driver,
            "MESH_LOG_PATH": str(cfg.state_dir / "log" / "mesh-log.sqlite3"),
            "MESH_LOG_PARTITIONS": str(cfg.partitions),
            "MESH_KAFKA_BOOTSTRAP": cfg.kafka_bootstrap,
            "MESH_MEMORY_BACKEND": cfg.memory_backend,
            "MESH_ES_URL": cfg.es_url,
            "MESH_PG_DSN": self.pg_dsn,
            "MESH_AGENT_MODEL_PATH": str(cfg.model_path),
            "MESH_AGENT_GPU_LAYERS": str(cfg.gpu_layers),
            "MESH_AGENT_THREADS": str(cfg.agent_threads),
            "MESH_AGENT_N_CTX": str(cfg.n_ctx),
            "MESH_GATEWAY_API_KEYS_FILE": str(cfg.api_keys_file),
            "XDG_RUNTIME_DIR": os.environ.get("XDG_RUNTIME_DIR", "/tmp"),
        }
        env.update(cfg.extra_env)
        return env

    def _spawn(self, kind: str, name: str, env: dict[str, str]) -> Service:
        port, metrics_port = free_port(), free_port()
        prefix = f"MESH_{kind.upper()}_"
        env = {
            **env,
            prefix + "HOST": "127.0.0.1",
            prefix + "PORT": str(port),
            prefix + "METRICS_PORT": str(metrics_port),
        }
        if kind == "agent":
            env.setdefault("MESH_AGENT_ID", name)
            env["MESH_AGENT_ID"] = name
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_dir / f"{name}.log"
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", f"services.{kind}"],
                env=env,
                cwd=_ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the chat must not kill the services
            )
        service = Service(name, f"127.0.0.1:{port}", metrics_port, process, log_path)
        self.services.append(service)
        return service

    def start(self, *, timeout_s: float = 120.0) -> Mesh:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            if not self.pg_dsn:
                self._pg = EmbeddedPostgres(cfg.state_dir / "pg")
                self.pg_dsn = self._pg.start()
            env = self.base_env()
            memory = self._spawn("memory", "memory", env)
            self._wait(memory, timeout_s)
            env["MESH_MEMORY_ADDR"] = memory.addr
            persister = self._spawn("persister", "persister", env)
            self._wait(persister, timeout_s)
            env["MESH_PERSISTER_ADDR"] = persister.addr
            for index in range(cfg.agents):
                self._wait(self._spawn("agent", f"agent-{index + 1}", env), timeout_s)
            for index in range(cfg.gateways):
                self._wait(self._spawn("gateway", f"gateway-{index + 1}", env), timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def start_agent(self, *, timeout_s: float = 120.0) -> Service:
        """Add one more agent to a running mesh (scale-out and takeover tests)."""
        env = self.base_env()
        env["MESH_MEMORY_ADDR"] = self.memory_addr
        env["MESH_PERSISTER_ADDR"] = self.persister_addr
        service = self._spawn("agent", f"agent-{len(self.agents) + 1}", env)
        self._wait(service, timeout_s)
        return service

    def _wait(self, service: Service, timeout_s: float) -> None:
        wait_healthy(service.addr, timeout_s=timeout_s, process=service.process,
                     log_path=service.log_path, name=service.name)

    def stop(self) -> None:
        # Gateways first so no new turns arrive; the persister last but one so it drains the log.
        order = {"gateway": 0, "agent": 1, "persister": 2, "memory": 3}
        for service in sorted(self.services, key=lambda s: order.get(s.name.split("-")[0], 9)):
            service.terminate()
        self.services.clear()
        if self._pg is not None:
            self._pg.stop()
            self._pg = None

    def __enter__(self) -> Mesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def describe(self) -> dict[str, object]:
        return {
            "pid": os.getpid(),
            "gateway_addr": self.gateway_addr if self.all("gateway") else "",
            "state_dir": str(self.config.state_dir),
            "pg_dsn": self.pg_dsn,
            "services": {s.name: {"addr": s.addr, "metrics_port": s.metrics_port,
                                  "pid": s.process.pid, "log": str(s.log_path)}
                         for s in self.services},
        }


def with_overrides(config: MeshConfig, **changes: object) -> MeshConfig:
    return replace(config, **changes)  # type: ignore[arg-type]


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh.launcher", description=__doc__)
    parser.add_argument("--state-dir", type=Path, default=Path(".state"))
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--keys-file", type=Path, default=None)
    parser.add_argument("--profile", default="embedded", choices=["embedded", "scale"])
    parser.add_argument("--log-driver", default="embedded", choices=["embedded", "kafka"])
    parser.add_argument("--kafka-bootstrap", default="")
    parser.add_argument("--memory-backend", default="postgres", choices=["postgres", "elasticsearch"])
    parser.add_argument("--es-url", default="")
    parser.add_argument("--pg-dsn", default="")
    parser.add_argument("--gateways", type=int, default=1)
    parser.add_argument("--agents", type=int, default=1)
    parser.add_argument("--gpu-layers", type=int, default=0)
    args = parser.parse_args(argv)
    state_dir = args.state_dir.absolute()
    config = MeshConfig(
        state_dir=state_dir,
        model_path=args.model.absolute(),
        api_keys_file=(args.keys_file or state_dir / "api-keys.json").absolute(),
        log_driver=args.log_driver,
        kafka_bootstrap=args.kafka_bootstrap,
        memory_backend=args.memory_backend,
        es_url=args.es_url,
        pg_dsn=args.pg_dsn,
        gateways=args.gateways,
        agents=args.agents,
        gpu_layers=args.gpu_layers,
    )
    mesh = Mesh(config).start()
    (state_dir / "mesh.json").write_text(json.dumps(mesh.describe(), indent=2))
    print(json.dumps(mesh.describe(), indent=2), flush=True)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stop:
            for service in mesh.services:
                if service.process.poll() is not None:
                    print(f"{service.name} exited ({service.process.returncode}); see "
                          f"{service.log_path}", file=sys.stderr, flush=True)
                    stop = True
            time.sleep(0.5)
    finally:
        mesh.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

"""Starts and stops a whole mesh on one machine: its servers, then the four services as separate
processes, each checked healthy before the next one starts.

Two profiles. ``embedded`` (the default): PostgreSQL from the pgserver wheel (unless a DSN is
given), the embedded log, memory on PostgreSQL. ``scale``: a real Kafka as the log, Elasticsearch
as memory, a standalone PostgreSQL server, several gateways and agents, and Envoy in front of the
gateways serving gRPC-web and the chat page. In the scale profile every server whose address is
configured (``MESH_KAFKA_BOOTSTRAP``, ``MESH_ES_URL``, ``MESH_PG_DSN``) is used as is, with the
TLS and credential settings of the environment; only the missing ones are started here (see the
README, "Scale out"), with TLS and credentials by default (docs/security.md, "Data stores").

Used by ``make run`` / ``make up`` (``python -m mesh.launcher``), the integration tests and the
benchmarks, so all three run the mesh the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh import logs
from mesh.certs import OPERATOR, CertDir, default_cert_dir, ensure_mesh_certs, renew
from mesh.infra.postgres import redact_dsn
from mesh.infra.process import free_port as free_port  # re-exported: tests pick ports with it
from mesh.infra.process import log_tail, spawn, wait_until
from mesh.infra.security import ServerTls
from mesh.log import LogSettings
from mesh.memory.factory import StoreSettings
from mesh.metrics import start_metrics_server
from mesh.monitoring import Monitoring
from mesh.pg import ROOT_FALLBACK_DIR, EmbeddedPostgres
from mesh.server import channel as server_channel
from mesh.settings import Env, Secret, ServiceSettings, embedded_pg_dir
from mesh.supervisor import RestartPolicy, Supervisor
from mesh.tls import channel_credentials, load_identity
from services.agent.settings import AgentSettings
from services.gateway.settings import GatewaySettings
from services.memory.settings import MemorySettings
from services.persister.settings import PersisterSettings

_ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)


PROFILES = ("embedded", "scale")
# The certificate of the gateways' public ports when the launcher gives them TLS.
EDGE_IDENTITY = "gateway-edge"
# A running mesh reissues certificates this long before they expire (they last 90 days), and
# looks this often.
RENEW_WITHIN = timedelta(days=30)
RENEW_EVERY_S = 3600.0

# The settings of each kind of service: the launcher writes their variables through them.
SERVICE_SETTINGS: dict[str, type[ServiceSettings]] = {
    "gateway": GatewaySettings,
    "agent": AgentSettings,
    "memory": MemorySettings,
    "persister": PersisterSettings,
}


@dataclass(frozen=True)
class MeshConfig:
    """What to start.

    Servers are started only where no address is given: an empty ``pg_dsn`` starts PostgreSQL
    (pgserver when ``pg_server`` is ``embedded``, the system's standalone server when it is
    ``debian``); the ``kafka`` log driver with an empty ``kafka_bootstrap`` starts a Kafka
    broker; the ``elasticsearch`` memory backend with an empty ``es_url`` starts a node. Their
    data lives under ``infra_dir`` (default ``state_dir/infra``); downloads (Kafka jars, the
    Elasticsearch distribution) are cached under ``cache_dir`` (default ``state_dir``).
    """

    state_dir: Path
    model_path: Path
    api_keys_file: Path
    log_driver: str = "embedded"
    kafka_bootstrap: str = ""
    memory_backend: str = "postgres"
    es_url: str = ""
    pg_dsn: str = ""
    pg_server: str = "embedded"
    partitions: int = LogSettings.default("partitions")
    gateways: int = 1
    agents: int = 1
    gpu_layers: int = AgentSettings.default("gpu_layers")
    agent_threads: int = AgentSettings.default("threads")
    n_ctx: int = AgentSettings.default("n_ctx")
    envoy: bool = False
    envoy_port: int = 0
    infra_dir: Path | None = None
    cache_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    # Mutual TLS between the services, with a CA and certificates under ``state_dir/certs``
    # (kept across restarts; see mesh.certs).
    mesh_tls: bool = True
    # TLS and credentials on the Kafka, Elasticsearch and PostgreSQL servers started here, with
    # certificates from the same CA (mesh.infra.security): Kafka SASL_SSL (SCRAM-SHA-512),
    # Elasticsearch HTTPS with the ``elastic`` user's password, PostgreSQL TLS only.
    server_tls: bool = True
    # TLS on the gateways' public ports too, with a ``gateway-edge`` certificate from that CA
    # (loopback may stay plaintext, and does by default).
    edge_tls: bool = False
    # Prometheus and Jaeger next to the mesh (mesh/monitoring.py).
    monitoring: bool = False
    scrape_interval_s: float = 5.0
    rule_files: tuple[Path, ...] = ()  # Prometheus rules; empty: monitoring/prometheus's

    def __post_init__(self) -> None:
        if self.pg_server not in ("embedded", "debian"):
            raise ValueError(f"pg_server must be 'embedded' or 'debian', got {self.pg_server!r}")
        if self.gateways < 1 or self.agents < 1:
            raise ValueError("a mesh needs at least one gateway and one agent")
        if self.edge_tls and not self.mesh_tls:
            raise ValueError("edge_tls needs mesh_tls: the edge certificate comes from its CA")
        if self.envoy_port < 0:
            raise ValueError(
                f"envoy_port must be >= 0 (0 picks a free port), got {self.envoy_port}"
            )


def scale_config(
    *,
    state_dir: Path,
    model_path: Path,
    api_keys_file: Path,
    environ: Mapping[str, str] = os.environ,
    **overrides: object,
) -> MeshConfig:
    """The scale-out profile: Kafka, Elasticsearch, a PostgreSQL server, Envoy, 2+2 services.

    Addresses of existing servers come from ``MESH_KAFKA_BOOTSTRAP``, ``MESH_ES_URL`` and
    ``MESH_PG_DSN`` (``overrides`` win); unset, the launcher starts that server (where a
    service alone would use its default address). The partition count comes from
    ``MESH_LOG_PARTITIONS``; Envoy's port from ``MESH_ENVOY_PORT`` (unset: a free port).
    """
    agents = int(overrides.pop("agents", 2))  # type: ignore[call-overload]
    config = MeshConfig(
        state_dir=state_dir,
        model_path=model_path,
        api_keys_file=api_keys_file,
        log_driver="kafka",
        kafka_bootstrap=environ.get(LogSettings.var("kafka_bootstrap"), ""),
        memory_backend="elasticsearch",
        es_url=environ.get(StoreSettings.var("es_url"), ""),
        pg_dsn=environ.get(StoreSettings.var("pg_dsn"), ""),
        pg_server="debian",
        partitions=LogSettings.value_from_env("partitions", environ),
        gateways=2,
        agents=agents,
        # llama.cpp threads spin while they wait: co-located agents get disjoint shares of the
        # machine's cores, never more threads in all than it has.
        agent_threads=max(1, (os.cpu_count() or 1) // agents),
        envoy=True,
        envoy_port=Env(environ, "MESH_ENVOY_").int("PORT", 0, minimum=0),
    )
    return replace(config, **overrides)  # type: ignore[arg-type]


@dataclass
class Service:
    """One running service process."""

    name: str
    addr: str
    metrics_port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    # How it was started: a restart runs the same command with the same environment (and so
    # the same ports, which its peers already know).
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def exit_code(self) -> int | None:
        """The process's exit status, or None while it runs."""
        return self.process.poll()

    def kill(self) -> None:
        """SIGKILL: the crash a fault test wants, with no drain."""
        self.process.kill()
        self.process.wait(timeout=10)

    def terminate(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it does not drain in time."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        self.wait_stopped(timeout_s)

    def wait_stopped(self, timeout_s: float = 15.0) -> None:
        """Wait for a signalled process to exit; SIGKILL if it does not drain in time."""
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


_PORT_RACE_ATTEMPTS = 3


def _lost_port_race(service: Service) -> bool:
    """Whether ``service`` exited because a port picked for it was taken meanwhile."""
    if service.process.poll() is None or not service.log_path.exists():
        return False
    tail = service.log_path.read_text(errors="replace")[-4000:]
    return "Address already in use" in tail or "could not bind" in tail


class MeshStartError(RuntimeError):
    """A server or service did not start; the message includes the tail of its log."""


class _Server(Protocol):
    """What the launcher needs of Kafka, Elasticsearch and PostgreSQL launchers."""

    def start(self) -> str: ...

    def stop(self) -> None: ...


@dataclass
class InfraServer:
    """A server the launcher started (as opposed to one it was pointed at)."""

    name: str
    server: _Server
    address: str = ""
    started_in_s: float = 0.0


def client_env(server: _Server) -> dict[str, str]:
    """The settings with which the services reach a Kafka or Elasticsearch server started by
    ``mesh.infra`` beyond its address: TLS and credentials (``MESH_LOG_KAFKA_*``,
    ``MESH_ES_USER``/``PASSWORD``/``CA``); none for a plaintext one, or for PostgreSQL, whose
    DSN holds them."""
    from mesh.infra.elasticsearch import ElasticsearchServer
    from mesh.infra.kafka import SASL_MECHANISM, SASL_USERNAME, KafkaServer

    if isinstance(server, KafkaServer) and server.tls is not None:
        return LogSettings.env_for(
            kafka_security_protocol="sasl_ssl",
            kafka_sasl_mechanism=SASL_MECHANISM.lower(),
            kafka_sasl_username=SASL_USERNAME,
            kafka_sasl_password=server.sasl_password(),
            kafka_ca=server.tls.ca,
        )
    if isinstance(server, ElasticsearchServer) and server.tls is not None:
        return StoreSettings.env_for(
            es_user=server.username, es_password=server.password(), es_ca=server.tls.ca
        )
    return {}


def wait_healthy(
    addr: str,
    *,
    timeout_s: float,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
    name: str = "service",
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str = "",
) -> None:
    """Poll grpc.health.v1 on ``addr`` until SERVING, or raise with the service's log tail.

    With ``credentials`` the probe is TLS, and the server's certificate must name
    ``server_name`` (a mesh service: ``memory``) when given.
    """
    if credentials is None:
        opened = grpc.insecure_channel(addr)
    else:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        opened = grpc.secure_channel(addr, credentials, options=options)
    with opened as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def not_serving() -> str | None:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            except grpc.RpcError as error:
                return f"{error.code().name}: {error.details()}"
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return None
            return f"health status {reply.status}"

        failure = wait_until(not_serving, timeout_s=timeout_s, process=process, poll_s=0.1)
    if failure is None:
        return
    tail = "" if log_path is None else log_tail(log_path)
    raise MeshStartError(f"{name} at {addr} did not become healthy ({failure}).\n{tail}")


class Mesh:
    """A running mesh. ``start()`` brings everything up; ``stop()`` drains it in reverse order."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.services: list[Service] = []
        self.pg_dsn = config.pg_dsn
        self.kafka_bootstrap = config.kafka_bootstrap
        self.es_url = config.es_url
        # Servers this mesh started, in start order (stopped in reverse).
        self.infra: list[InfraServer] = []
        self._infra_starts: list[Future[str]] = []
        self._pg: EmbeddedPostgres | None = None
        self.monitoring: Monitoring | None = None
        self._otlp_endpoint = ""
        self._log_dir = config.log_dir or config.state_dir / "logs"
        self.certs: CertDir | None = None
        # How the services reach the servers started here (TLS, credentials): MESH_LOG_KAFKA_*,
        # MESH_ES_USER/PASSWORD/CA. PostgreSQL's are in its DSN.
        self._server_env: dict[str, str] = {}

    # -- identities --------------------------------------------------------------------------
    def ensure_certs(self) -> CertDir | None:
        """The CA and every service's certificate (created once, kept); None without mesh TLS."""
        if self.config.mesh_tls and self.certs is None:
            names = ["gateway", "agent", "memory", "persister", OPERATOR]
            if self.config.edge_tls:
                names.append(EDGE_IDENTITY)
            self.certs = ensure_mesh_certs(default_cert_dir(self.config.state_dir), names)
        return self.certs

    def renew_certs(self, within: timedelta = RENEW_WITHIN) -> list[str]:
        """Reissue the certificates that expire within ``within``; the services load the new
        files by themselves (mesh.tls), so nothing restarts. Returns the names reissued."""
        if self.certs is None:
            return []
        renewed = renew(self.certs, self.certs.issued(), within=within)
        for entry in self.infra:
            if entry.name not in renewed:
                continue
            reload_tls = getattr(entry.server, "reload_tls", None)
            if reload_tls is not None:
                reload_tls()  # PostgreSQL and Elasticsearch load new files while they run
            else:
                log.warning(
                    "reissued the certificate of %s: it serves the new one from its next start, "
                    "which must come before the old one expires",
                    entry.name,
                )
        return renewed

    def tls_env(self, identity: str) -> dict[str, str]:
        """``MESH_TLS_*`` of a process acting as ``identity`` (``operator`` for tools)."""
        return {} if self.certs is None else self.certs.env(identity)

    def credentials(self, identity: str = OPERATOR) -> grpc.ChannelCredentials | None:
        """Client credentials of ``identity`` for the services' ports; None without mesh TLS."""
        if self.certs is None:
            return None
        certs = self.certs
        return channel_credentials(
            load_identity(certs.ca_cert, certs.cert(identity), certs.key(identity))
        )

    def channel(self, addr: str, kind: str, identity: str = OPERATOR) -> aio.Channel:
        """An asyncio channel to a service of ``kind`` at ``addr``, as ``identity`` (the
        operator by default: Flush, GetStats); plaintext where the mesh is."""
        if kind == "gateway":
            return server_channel(addr, credentials=self.edge_credentials())
        return server_channel(addr, credentials=self.credentials(identity), server_name=kind)

    def edge_credentials(self) -> grpc.ChannelCredentials | None:
        """Client credentials for the gateways' public ports; None when they are plaintext."""
        if self.certs is None or not self.config.edge_tls:
            return None
        return grpc.ssl_channel_credentials(self.certs.ca_cert.read_bytes())

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
    def gateway_http_urls(self) -> list[str]:
        """Each gateway's OpenAI-compatible HTTP API (``http://host:port``, no ``/v1``)."""
        return [_http_url(s) for s in self.all("gateway")]

    @property
    def memory_addr(self) -> str:
        return self._one("memory").addr

    @property
    def persister_addr(self) -> str:
        return self._one("persister").addr

    @property
    def agents(self) -> list[Service]:
        return self.all("agent")

    @property
    def envoy(self) -> Service | None:
        found = self.all("envoy")
        return found[0] if found else None

    @property
    def envoy_url(self) -> str:
        """The page and gRPC-web (and native gRPC) through Envoy; empty without Envoy."""
        envoy = self.envoy
        scheme = "https" if self.config.edge_tls else "http"
        return f"{scheme}://{envoy.addr}" if envoy is not None else ""

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
        }
        log_path = cfg.state_dir / "log" / "mesh-log.sqlite3"
        env.update(StoreSettings.env_for(state_dir=cfg.state_dir, backend=cfg.memory_backend))
        env.update(StoreSettings.env_for(es_url=self.es_url, pg_dsn=Secret(self.pg_dsn)))
        env.update(LogSettings.env_for(driver=cfg.log_driver, path=log_path))
        env.update(
            LogSettings.env_for(partitions=cfg.partitions, kafka_bootstrap=self.kafka_bootstrap)
        )
        env.update(AgentSettings.env_for(model_path=cfg.model_path, gpu_layers=cfg.gpu_layers))
        env.update(AgentSettings.env_for(threads=cfg.agent_threads, n_ctx=cfg.n_ctx))
        env.update(GatewaySettings.env_for(api_keys_file=cfg.api_keys_file))
        env.update(self._server_env)
        env["XDG_RUNTIME_DIR"] = os.environ.get("XDG_RUNTIME_DIR", "/tmp")
        if self._otlp_endpoint:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = self._otlp_endpoint
        env.update(cfg.extra_env)
        return env

    def _spawn_process(
        self, name: str, argv: list[str], env: dict[str, str], port: int, metrics_port: int
    ) -> Service:
        log_path = self._log_dir / f"{name}.log"
        # Its own session: a Ctrl-C in the chat must not kill the services.
        process = spawn(argv, log_path=log_path, env=env, cwd=_ROOT)
        service = Service(
            name, f"127.0.0.1:{port}", metrics_port, process, log_path, list(argv), dict(env)
        )
        self.services.append(service)
        return service

    def respawn(self, name: str) -> Service:
        """Start an exited service again: same command, environment and ports."""
        service = self._one(name)
        service.process = spawn(service.argv, log_path=service.log_path, env=service.env, cwd=_ROOT)
        return service

    def _spawn(self, kind: str, name: str, env: dict[str, str]) -> Service:
        port, metrics_port = free_port(), free_port()
        settings = SERVICE_SETTINGS[kind]
        env = {**env, **settings.env_for(host="127.0.0.1", port=port, metrics_port=metrics_port)}
        env.update(self.tls_env(kind))
        if kind == "gateway" and self.config.edge_tls and self.certs is not None:
            env.update(
                GatewaySettings.env_for(
                    tls_cert=self.certs.cert(EDGE_IDENTITY), tls_key=self.certs.key(EDGE_IDENTITY)
                )
            )
        env.update(settings.env_for(instance=name))  # its name in spans and JSON logs
        if kind == "agent":
            env.update(AgentSettings.env_for(agent_id=name))
        if kind == "gateway":
            env.update(GatewaySettings.env_for(http_port=free_port()))
        argv = [sys.executable, "-m", f"services.{kind}"]
        return self._spawn_process(name, argv, env, port, metrics_port)

    def _spawn_envoy(self, env: dict[str, str]) -> Service:
        port = self.config.envoy_port or free_port()
        admin_port = free_port()  # Envoy's admin also serves its Prometheus stats
        env = {
            **env,
            "MESH_ENVOY_UPSTREAMS": ",".join(self.gateway_addrs),
            "MESH_ENVOY_HTTP_UPSTREAMS": ",".join(
                url.removeprefix("http://") for url in self.gateway_http_urls
            ),
            "MESH_ENVOY_HOST": "127.0.0.1",
            "MESH_ENVOY_PORT": str(port),
        }
        # A dead gateway should leave the pool within a second or two.
        env.setdefault("MESH_ENVOY_HEALTH_INTERVAL_S", "1")
        if self.config.edge_tls and self.certs is not None:
            # TLS on Envoy's listener too, and towards the gateways, which then serve TLS.
            env["MESH_ENVOY_TLS_CERT"] = str(self.certs.cert(EDGE_IDENTITY))
            env["MESH_ENVOY_TLS_KEY"] = str(self.certs.key(EDGE_IDENTITY))
            env["MESH_ENVOY_UPSTREAM_CA"] = str(self.certs.ca_cert)
        argv = [sys.executable, "-m", "mesh.infra.envoy", "run", "--admin-port", str(admin_port)]
        return self._spawn_process("envoy", argv, env, port, admin_port)

    def _server_tls(self, name: str) -> ServerTls | None:
        """The certificate of server ``name`` from the project CA (created if missing);
        None when the config keeps the servers plaintext."""
        if not self.config.server_tls:
            return None
        certs = self.ensure_certs() or CertDir(default_cert_dir(self.config.state_dir))
        certs.init()  # no-op when the CA exists
        return ServerTls.issue(certs, name)

    def _servers_to_start(self) -> list[tuple[str, _Server]]:
        """The servers this config needs and has no address for (none of them started)."""
        cfg = self.config
        infra_dir = (cfg.infra_dir or cfg.state_dir / "infra").absolute()
        cache_dir = (cfg.cache_dir or cfg.state_dir).absolute()
        wanted: list[tuple[str, _Server]] = []
        if not self.pg_dsn and cfg.pg_server == "debian":
            from mesh.infra.postgres import PostgresServer

            postgres = PostgresServer(
                cfg.state_dir, root_dir=infra_dir / "postgres", tls=self._server_tls("postgres")
            )
            wanted.append(("postgres", postgres))
        if cfg.log_driver == "kafka" and not self.kafka_bootstrap:
            from mesh.infra.kafka import KafkaServer, default_jars_dir

            kafka = KafkaServer(
                cfg.state_dir,
                jars_dir=default_jars_dir(cache_dir),
                data_dir=infra_dir / "kafka" / "broker",
                tls=self._server_tls("kafka"),
            )
            wanted.append(("kafka", kafka))
        if cfg.memory_backend == "elasticsearch" and not self.es_url:
            from mesh.infra.elasticsearch import ElasticsearchServer, default_home_dir

            elasticsearch = ElasticsearchServer(
                cfg.state_dir,
                home_dir=default_home_dir(cache_dir),
                node_dir=infra_dir / "elasticsearch" / "node",
                tls=self._server_tls("elasticsearch"),
            )
            wanted.append(("elasticsearch", elasticsearch))
        return wanted

    def _start_infra(self) -> None:
        """Start the missing servers side by side (JVM start-ups dominate: overlap them)."""
        wanted = self._servers_to_start()
        if not wanted:
            return
        self.infra = [InfraServer(name, server) for name, server in wanted]

        def start(entry: InfraServer) -> str:
            began = time.monotonic()
            address = entry.server.start()
            # The launchers that time themselves know better (e.g. without the jar fetch).
            own: float | None = getattr(entry.server, "started_in_s", None)
            entry.started_in_s = own if own is not None else time.monotonic() - began
            return address

        pool = ThreadPoolExecutor(len(self.infra), thread_name_prefix="infra")
        self._infra_starts = [pool.submit(start, entry) for entry in self.infra]
        pool.shutdown(wait=False)
        wait(self._infra_starts)
        errors = []
        for entry, future in zip(self.infra, self._infra_starts, strict=True):
            error = future.exception()
            if error is not None:
                errors.append(f"{entry.name}: {error}")
            else:
                entry.address = future.result()
        if errors:
            raise MeshStartError("could not start the servers:\n" + "\n".join(errors))
        for entry in self.infra:
            self._server_env.update(client_env(entry.server))
            if entry.name == "postgres":
                self.pg_dsn = entry.address
            elif entry.name == "kafka":
                self.kafka_bootstrap = entry.address
            elif entry.name == "elasticsearch":
                self.es_url = entry.address

    def start(self, *, timeout_s: float = 120.0) -> Mesh:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.ensure_certs()
        try:
            self._start_infra()
            if not self.pg_dsn:
                self._pg = EmbeddedPostgres(_embedded_pg_dir(cfg.state_dir))
                self.pg_dsn = self._pg.start()
            if cfg.monitoring:
                self.monitoring = Monitoring(
                    cfg.state_dir,
                    scrape_interval_s=cfg.scrape_interval_s,
                    rule_files=cfg.rule_files,
                )
                self._otlp_endpoint = self.monitoring.start_tracing()
            env = self.base_env()
            (memory,) = self._start_group("memory", ["memory"], env, timeout_s)
            env.update(AgentSettings.env_for(memory_addr=memory.addr))
            (persister,) = self._start_group("persister", ["persister"], env, timeout_s)
            env.update(AgentSettings.env_for(persister_addr=persister.addr))
            agent_names = [f"agent-{i + 1}" for i in range(cfg.agents)]
            self._start_group("agent", agent_names, env, timeout_s)
            gateway_names = [f"gateway-{i + 1}" for i in range(cfg.gateways)]
            self._start_group("gateway", gateway_names, env, timeout_s)
            if cfg.envoy:
                # Healthy through Envoy means: listening, and routing to a healthy gateway.
                self._wait(self._spawn_envoy(env), timeout_s)
            if self.monitoring is not None:
                self.monitoring.start_metrics(self.scrape_targets())
        except BaseException:
            self.stop()
            raise
        return self

    def scrape_targets(
        self, extra: Sequence[tuple[str, str, int]] = ()
    ) -> list[tuple[str, str, int]]:
        """(name, kind, metrics port) of every service with a /metrics endpoint, plus ``extra``.

        Envoy is left out: its admin port serves its statistics at another path.
        """
        own = [
            (s.name, s.name.split("-")[0], s.metrics_port)
            for s in self.services
            if not s.name.startswith("envoy")
        ]
        return [*own, *extra]

    def start_agent(self, *, timeout_s: float = 120.0) -> Service:
        """Add one more agent to a running mesh (scale-out and takeover tests)."""
        env = {
            **self.base_env(),
            **AgentSettings.env_for(
                memory_addr=self.memory_addr, persister_addr=self.persister_addr
            ),
        }
        (service,) = self._start_group("agent", [f"agent-{len(self.agents) + 1}"], env, timeout_s)
        return service

    def start_gateway(self, *, timeout_s: float = 120.0) -> Service:
        """Add one more gateway to a running mesh (resume-anywhere tests)."""
        env = {
            **self.base_env(),
            **AgentSettings.env_for(
                memory_addr=self.memory_addr, persister_addr=self.persister_addr
            ),
        }
        name = f"gateway-{len(self.all('gateway')) + 1}"
        (service,) = self._start_group("gateway", [name], env, timeout_s)
        return service

    def retire(self, service: Service) -> None:
        """Stop one service (if it still runs) and drop it from the mesh: a test that killed
        a replica it added leaves the mesh as it found it."""
        service.terminate()  # returns at once for one that already exited
        self.services.remove(service)

    def _start_group(
        self, kind: str, names: list[str], env: dict[str, str], timeout_s: float
    ) -> list[Service]:
        """Start replicas of one kind together (they need nothing from each other), healthy."""
        services = [self._spawn(kind, name, env) for name in names]
        return [self._wait_or_respawn(kind, service, env, timeout_s) for service in services]

    def _wait_or_respawn(
        self, kind: str, service: Service, env: dict[str, str], timeout_s: float
    ) -> Service:
        # free_port() only says a port was free a moment ago; when another process took it
        # before the service bound it, the service exits at once and gets fresh ports.
        for attempt in range(1, _PORT_RACE_ATTEMPTS + 1):
            try:
                self._wait(service, timeout_s)
                return service
            except MeshStartError:
                if attempt == _PORT_RACE_ATTEMPTS or not _lost_port_race(service):
                    raise
                self.services.remove(service)
                service = self._spawn(kind, service.name, env)
        raise AssertionError("unreachable")

    def _wait(self, service: Service, timeout_s: float) -> None:
        kind = service.name.split("-")[0]
        if kind in ("gateway", "envoy"):
            credentials, server_name = self.edge_credentials(), ""
        else:
            credentials, server_name = self.credentials(), kind
        wait_healthy(
            service.addr,
            timeout_s=timeout_s,
            process=service.process,
            log_path=service.log_path,
            name=service.name,
            credentials=credentials,
            server_name=server_name,
        )

    def stop(self) -> None:
        # Envoy and the gateways first so no new turns arrive; the persister last but one so it
        # drains the log; the servers the services used after all of them.
        order = {"envoy": 0, "gateway": 1, "agent": 2, "persister": 3, "memory": 4}
        for rank in sorted({order.get(s.name.split("-")[0], 9) for s in self.services}):
            # Replicas of one kind drain side by side.
            group = [s for s in self.services if order.get(s.name.split("-")[0], 9) == rank]
            for service in group:
                if service.process.poll() is None:
                    service.process.send_signal(signal.SIGTERM)
            for service in group:
                service.wait_stopped()
        self.services.clear()
        if self.monitoring is not None:
            self.monitoring.stop()
            self.monitoring = None
        if self._pg is not None:
            self._pg.stop()
            self._pg = None
        # A start interrupted by a signal keeps running in its thread: let it end, so that each
        # server is either up (and stopped here) or not, never left running half-way.
        wait(self._infra_starts)
        for entry in reversed(self.infra):
            entry.server.stop()
        self.infra.clear()
        self._infra_starts = []

    def __enter__(self) -> Mesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def describe(self) -> dict[str, object]:
        return {
            "pid": os.getpid(),
            "log_driver": self.config.log_driver,
            "memory_backend": self.config.memory_backend,
            "gateway_addr": self.gateway_addr if self.all("gateway") else "",
            "gateway_http_url": self.gateway_http_urls[0] if self.all("gateway") else "",
            "gateway_http_urls": self.gateway_http_urls,
            "envoy_url": self.envoy_url,
            "state_dir": str(self.config.state_dir),
            # What a tool needs to call the services (`mesh health --state` reads it).
            "tls": (
                {
                    **self.tls_env(OPERATOR),
                    "edge": self.config.edge_tls,
                }
                if self.certs is not None
                else {}
            ),
            "pg_dsn": redact_dsn(self.pg_dsn),
            "kafka_bootstrap": self.kafka_bootstrap,
            "es_url": self.es_url,
            # TLS and credentials of the servers started here (passwords never shown).
            "server_tls": self.config.server_tls and bool(self.infra),
            **(self.monitoring.describe() if self.monitoring is not None else {}),
            "started_here": {
                entry.name: {
                    "address": redact_dsn(entry.address),
                    "started_in_s": round(entry.started_in_s, 1),
                }
                for entry in self.infra
            },
            "services": {
                s.name: {
                    "addr": s.addr,
                    "metrics_port": s.metrics_port,
                    "pid": s.process.pid,
                    "log": str(s.log_path),
                }
                for s in self.services
            },
        }


def _http_url(service: Service) -> str:
    host = service.addr.rpartition(":")[0]
    return f"http://{host}:{service.env[GatewaySettings.var('http_port')]}"


def _embedded_pg_dir(state_dir: Path) -> Path:
    """The embedded PostgreSQL's data directory, the one the services use without a launcher.

    Launchers before this one kept it in ``state_dir/pg``: a stopped server found there moves
    once, with its conversations and memory, to ``state_dir/postgres``.
    """
    new, old = embedded_pg_dir(state_dir), state_dir / "pg"
    if new.exists() or not old.is_dir():
        return new
    # As root, pgserver may keep the data elsewhere, with a record naming the directory it
    # belongs to (see mesh.pg.server_data_dir).
    owners = [
        owner
        for owner in (ROOT_FALLBACK_DIR.glob("*.owner") if ROOT_FALLBACK_DIR.is_dir() else ())
        if owner.read_text().strip() == str(old)
    ]
    data_dirs = [old, *(owner.with_suffix("") for owner in owners)]
    if any((data / "postmaster.pid").exists() for data in data_dirs):
        return old  # still running: leave it where it is until it stops
    old.rename(new)
    for owner in owners:
        owner.write_text(f"{new}\n")
    return new


class _Interrupted(Exception):
    """SIGTERM/SIGINT while starting: unwind through Mesh.start, which stops what it started."""


def _config_from_args(args: argparse.Namespace) -> MeshConfig:
    state_dir = args.state_dir.absolute()
    common = {
        "state_dir": state_dir,
        "model_path": args.model.absolute(),
        "api_keys_file": (args.keys_file or state_dir / "api-keys.json").absolute(),
        "gpu_layers": args.gpu_layers,
    }
    # Only what was given on the command line overrides the profile's defaults.
    given = {
        key: value
        for key, value in {
            "log_driver": args.log_driver,
            "kafka_bootstrap": args.kafka_bootstrap,
            "memory_backend": args.memory_backend,
            "es_url": args.es_url,
            "pg_dsn": args.pg_dsn,
            "partitions": args.partitions,
            "gateways": args.gateways,
            "agents": args.agents,
            "envoy_port": args.envoy_port,
        }.items()
        if value is not None
    }
    if args.envoy:
        given["envoy"] = True
    if args.no_mesh_tls:
        given["mesh_tls"] = False
    if args.edge_tls:
        given["edge_tls"] = True
    if args.no_server_tls:
        given["server_tls"] = False
    if args.monitoring:
        given["monitoring"] = True
    if args.scrape_interval is not None:
        given["scrape_interval_s"] = args.scrape_interval
    if args.rules:
        given["rule_files"] = tuple(path.absolute() for path in args.rules)
    if args.profile == "scale":
        return scale_config(**common, **given)
    return MeshConfig(**common, **given)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mesh.launcher", description=__doc__)
    parser.add_argument("--state-dir", type=Path, default=Path(".state"))
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--keys-file", type=Path, default=None)
    parser.add_argument("--profile", default="embedded", choices=PROFILES)
    parser.add_argument("--log-driver", default=None, choices=["embedded", "kafka"])
    parser.add_argument("--kafka-bootstrap", default=None)
    parser.add_argument("--memory-backend", default=None, choices=["postgres", "elasticsearch"])
    parser.add_argument("--es-url", default=None)
    parser.add_argument("--pg-dsn", default=None)
    parser.add_argument("--partitions", type=int, default=None)
    parser.add_argument("--gateways", type=int, default=None)
    parser.add_argument("--agents", type=int, default=None)
    parser.add_argument("--envoy", action="store_true", help="Envoy in front (scale: always)")
    parser.add_argument("--envoy-port", type=int, default=None, help="0 picks a free port")
    parser.add_argument("--gpu-layers", type=int, default=0)
    parser.add_argument(
        "--no-mesh-tls",
        action="store_true",
        help="plaintext between the services (default: mutual TLS, certificates in STATE/certs)",
    )
    parser.add_argument(
        "--no-server-tls",
        action="store_true",
        help="plaintext, password-less Kafka and Elasticsearch, plaintext PostgreSQL for the "
        "servers started here (default: TLS and credentials, certificates from STATE/certs)",
    )
    parser.add_argument(
        "--edge-tls",
        action="store_true",
        help="TLS on the gateways' public ports too (default: plaintext on loopback)",
    )
    parser.add_argument(
        "--monitoring", action="store_true", help="Prometheus and Jaeger next to the mesh"
    )
    parser.add_argument(
        "--scrape-interval", type=float, default=None, help="Prometheus' interval (default 5 s)"
    )
    parser.add_argument(
        "--rules",
        type=Path,
        action="append",
        help="Prometheus rule file, repeatable (default: monitoring/prometheus/mesh-rules.yml)",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=0, help="the launcher's own metrics (0: a free port)"
    )
    parser.add_argument(
        "--restart-budget",
        type=int,
        default=RestartPolicy.budget,
        help=f"restarts of one service within {RestartPolicy.window_s:.0f} s before it is left "
        "down (default %(default)s)",
    )
    return parser


def _main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = _config_from_args(args)
    logs.configure("launcher", fmt=ServiceSettings.value_from_env("log_format", os.environ))
    state_dir = config.state_dir

    stop = False

    def _interrupt(*_: object) -> None:
        # Once: a second signal must not cut short the stop that this one starts.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise _Interrupted

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    # Starting the scale profile takes a minute; `make down` meanwhile must not orphan Kafka,
    # Elasticsearch or PostgreSQL, so a signal unwinds the start (which stops what it started).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        mesh = Mesh(config).start()
    except _Interrupted:
        return 143
    except MeshStartError as error:
        print(error, file=sys.stderr, flush=True)
        return 1
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    supervisor = Supervisor(mesh.respawn, policy=RestartPolicy(budget=args.restart_budget))
    metrics_port = start_metrics_server(args.metrics_port)
    if mesh.monitoring is not None:
        mesh.monitoring.scrape(mesh.scrape_targets([("launcher", "launcher", metrics_port)]))
    info = {**mesh.describe(), "launcher_metrics_port": metrics_port}
    try:
        (state_dir / "mesh.json").write_text(json.dumps(info, indent=2))
        print(json.dumps(info, indent=2), flush=True)
        next_renewal = time.monotonic() + RENEW_EVERY_S
        while not stop:
            if time.monotonic() >= next_renewal:
                next_renewal = time.monotonic() + RENEW_EVERY_S
                renewed = mesh.renew_certs()
                if renewed:
                    log.info("reissued certificates close to expiry: %s", ", ".join(renewed))
            # A service that exits is started again; the others go on serving meanwhile.
            if supervisor.check(mesh.services):
                info = {**mesh.describe(), "launcher_metrics_port": metrics_port}
                (state_dir / "mesh.json").write_text(json.dumps(info, indent=2))
            time.sleep(0.2)
    finally:
        # A second signal must not cut the shutdown short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        mesh.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

"""A real single-node Apache Kafka (KRaft, broker and controller in one JVM) from Maven jars.

No Docker and no Kafka distribution download here: the broker is the ``kafka_2.13`` artifact on
Maven Central, so ``mvn dependency:copy-dependencies`` on a generated pom fetches the broker and
everything it needs into a cache directory, once per machine. The broker leaves its logging
backend to the application, so the pom adds log4j2 (Kafka 4.x logs through log4j2 and slf4j 1.7).

    python -m mesh.infra.kafka fetch   # pre-fetch the jars (CI, make setup)
    python -m mesh.infra.kafka run     # start a broker, print its bootstrap, stop on Ctrl-C

Only for development, tests and single-machine use: one node, replication factor 1, loopback
listeners on ports picked at start. Production points the mesh at a real cluster.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from mesh.infra.digests import KAFKA_JARS
from mesh.infra.maven import (
    add_fetch_command,
    fetch_once,
    run_maven,
    verify_digests,
)
from mesh.infra.process import (
    ServerProcess,
    StartStop,
    free_port,
    run_command,
    serve_until_signalled,
)
from mesh.infra.security import ServerTls, stored_password
from mesh.settings import Secret, default_state_dir

KAFKA_VERSION = "4.1.0"
# The SASL mechanism of the TLS listener, and the user the broker creates at format time.
SASL_MECHANISM = "SCRAM-SHA-512"
SASL_USERNAME = "mesh"
SCALA_VERSION = "2.13"
LOG4J_VERSION = "2.24.3"
_MARKER = ".complete"

_POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>llm-mesh.infra</groupId>
  <artifactId>kafka-broker-jars</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{scala}</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <!-- the broker still logs through slf4j 1.7, hence the slf4j 1 binding -->
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
# Request logs are per request: far too chatty for a test broker.
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


class KafkaError(RuntimeError):
    """The broker could not be fetched, formatted or started; the message says why."""


def default_jars_dir(state_dir: Path) -> Path:
    """Where the broker jars of this Kafka version are cached under a mesh state directory."""
    return state_dir / "infra" / "kafka" / f"kafka-{KAFKA_VERSION}" / "lib"


def fetch_jars(jars_dir: Path, *, quiet: bool = True, fresh: bool = False) -> Path:
    """Fetch the broker jars into ``jars_dir`` unless a previous fetch completed there.

    Every jar is checked against its pinned digest before anything is installed. ``fresh``
    fetches again through an empty, throwaway Maven repository (what CI does on every run).
    """
    what = f"the Kafka {KAFKA_VERSION} jars"

    def fetch(scratch: Path) -> tuple[Path, str]:
        (scratch / "pom.xml").write_text(
            _POM.format(scala=SCALA_VERSION, kafka=KAFKA_VERSION, log4j=LOG4J_VERSION)
        )
        run_maven(
            ["dependency:copy-dependencies", "-DincludeScope=runtime"]
            + [f"-DoutputDirectory={scratch / 'lib'}"],
            cwd=scratch,
            what=what,
            error=KafkaError,
            quiet=quiet,
            timeout_s=900,
            fresh=fresh,
        )
        verify_digests(scratch / "lib", KAFKA_JARS, pattern="*.jar", what=what, error=KafkaError)
        jars = sorted(path.name for path in (scratch / "lib").glob("*.jar"))
        return scratch / "lib", "\n".join(jars) + "\n"

    return fetch_once(jars_dir, fetch, marker=_MARKER, fresh=fresh)


def _cluster_id() -> str:
    # Kafka's Uuid format: 16 random bytes, URL-safe base64 without padding. Kafka avoids ids
    # starting with '-' (they read as command-line flags), and so do we.
    while True:
        value = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        if not value.startswith("-"):
            return value


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise KafkaError("Java 17+ is needed to run Kafka: apt-get install openjdk-17-jre-headless")
    return java


def _metadata_problem(bootstrap: str, config: dict[str, str] | None = None) -> str | None:
    """One real metadata request; None once the broker answers it, else why not.

    ``config``: librdkafka security settings (TLS, SASL) of the listener.
    """
    try:
        from confluent_kafka.admin import AdminClient
    except ImportError:  # the embedded profile has no Kafka client: a TCP accept must do
        host, port = bootstrap.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), 1):
                return None
        except OSError as error:
            return f"no connection to {bootstrap}: {error}"
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0, **(config or {})})
    try:
        metadata = admin.list_topics(timeout=2)
    except Exception as error:  # KafkaException while the broker is still starting
        return f"no metadata from {bootstrap}: {error}"
    if not metadata.brokers:
        return f"no broker in the metadata from {bootstrap}"
    return _coordinator_problem(bootstrap, config or {})


def _coordinator_problem(bootstrap: str, config: dict[str, str]) -> str | None:
    """None once the group coordinator answers an offset fetch, else why not.

    A fresh broker creates ``__consumer_offsets`` on the first coordinator lookup and answers
    NOT_COORDINATOR while it loads; a broker is ready once groups work. (librdkafka 2.16's admin
    ``list_consumer_group_offsets`` crashes the process on that answer, a NULL consumer group in
    ``rd_kafka_cgrp_op``; the log reads offsets through a consumer of the group instead, see
    mesh/log/kafka/offsets.py.) A consumer's own offset fetch only fails, so it is the probe.
    """
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "mesh-readiness-probe",
            "enable.auto.commit": False,
            "log_level": 0,
            **config,
        }
    )
    try:
        consumer.committed([TopicPartition("mesh-readiness-probe", 0)], timeout=5)
    except KafkaException as error:
        return f"the group coordinator of {bootstrap} is not ready: {error.args[0]}"
    finally:
        consumer.close()
    return None


class KafkaServer(StartStop):
    """One Kafka broker+controller; ``start()`` returns the bootstrap address.

    ``state_dir`` is the mesh state directory: the broker's data and logs go to
    ``state_dir/infra/kafka/broker`` and the jars are cached next to it, unless ``jars_dir`` or
    ``data_dir`` say otherwise (tests keep a fresh data dir but share the jar cache).

    With ``tls`` the clients' listener is ``SASL_SSL``: TLS with that certificate, and SCRAM-SHA-512
    as user ``mesh`` (created when the storage is formatted; its password is kept in
    ``data_dir/sasl-password``). The controller listener then takes mutual TLS only, with the
    same certificate on both ends. ``client_config()`` is what a client needs to connect.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        heap: str = "512m",
        jars_dir: Path | None = None,
        data_dir: Path | None = None,
        start_timeout_s: float = 90.0,
        stop_timeout_s: float = 30.0,
        tls: ServerTls | None = None,
        broker_config: Mapping[str, str] | None = None,
    ) -> None:
        self.state_dir = state_dir.absolute()
        self.heap = heap
        self.tls = tls
        self.jars_dir = (jars_dir or default_jars_dir(self.state_dir)).absolute()
        self.data_dir = (data_dir or self.state_dir / "infra" / "kafka" / "broker").absolute()
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        # server.properties entries that replace or add to ours (tests shorten the retention
        # check, for instance).
        self.broker_config = dict(broker_config or {})
        self.bootstrap: str | None = None
        self._server: ServerProcess | None = None
        # Picked at the first start and kept: a restarted broker is where its clients left it.
        self._ports: tuple[int, int] | None = None

    @property
    def log_file(self) -> Path:
        return self.data_dir / "logs" / "server.log"

    @property
    def password_file(self) -> Path:
        return self.data_dir / "sasl-password"

    @property
    def security_protocol(self) -> str:
        """``SASL_SSL`` with ``tls``, else ``PLAINTEXT``."""
        return "SASL_SSL" if self.tls is not None else "PLAINTEXT"

    def sasl_password(self) -> Secret:
        """The SCRAM password of user ``mesh`` (empty without ``tls``)."""
        return Secret(stored_password(self.password_file) if self.tls is not None else "")

    def client_config(self) -> dict[str, str]:
        """librdkafka settings that authenticate to this broker (none for a plaintext one)."""
        if self.tls is None:
            return {}
        return {
            "security.protocol": "SASL_SSL",
            "ssl.ca.location": str(self.tls.ca),
            "sasl.mechanism": SASL_MECHANISM,
            "sasl.username": SASL_USERNAME,
            "sasl.password": self.sasl_password().reveal(),
        }

    def _java_command(self, *args: str, heap: str = "256m") -> list[str]:
        return [
            _java(),
            f"-Xmx{heap}",
            f"-Xms{heap}",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-cp",
            f"{self.jars_dir}/*",
            *args,
        ]

    def _write_config(self, port: int, controller_port: int) -> Path:
        listener = self.security_protocol
        config = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
            "listeners": f"{listener}://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"{listener}://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": listener,
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir / "data"),
            # One node: every internal topic has a single replica.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Topics are created explicitly with their partition counts; a typo must not create
            # a one-partition topic silently.
            "auto.create.topics.enable": "false",
            "num.partitions": "1",
            # Groups form at once and may detect a dead member within a couple of seconds
            # (the default floor is 6 s).
            "group.initial.rebalance.delay.ms": "0",
            "group.min.session.timeout.ms": "1000",
            "group.consumer.min.session.timeout.ms": "1000",
            "group.consumer.min.heartbeat.interval.ms": "500",
        }
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        if self.tls is not None:
            config.update(self._tls_config(listener))
        config.update(self.broker_config)
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2.format(log_file=self.log_file))
        path = self.data_dir / "server.properties"
        # 0600 before anything is written: with TLS it holds the broker's SCRAM password.
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text("".join(f"{key}={value}\n" for key, value in config.items()))
        return path

    def _tls_config(self, listener: str) -> dict[str, str]:
        assert self.tls is not None
        # Kafka's PEM key store is one file: the (unencrypted PKCS#8) key, then the chain.
        keystore = self.data_dir / "tls" / "keystore.pem"
        keystore.parent.mkdir(mode=0o700, exist_ok=True)
        keystore.touch(mode=0o600)
        keystore.write_bytes(self.tls.key.read_bytes() + self.tls.cert.read_bytes())
        password = self.sasl_password().reveal()
        jaas = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{SASL_USERNAME}" password="{password}";'
        )
        prefix = f"listener.name.{listener.lower()}.{SASL_MECHANISM.lower()}"
        return {
            "listener.security.protocol.map": f"CONTROLLER:SSL,{listener}:{listener}",
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.tls.ca),
            # The controller's port takes only the broker's own certificate (mutual TLS).
            "listener.name.controller.ssl.client.auth": "required",
            "sasl.enabled.mechanisms": SASL_MECHANISM,
            "sasl.mechanism.inter.broker.protocol": SASL_MECHANISM,
            f"{prefix}.sasl.jaas.config": jaas,
        }

    def _format(self, config: Path) -> None:
        scram_marker = self.data_dir / "data" / ".mesh-scram-user"
        if (self.data_dir / "data" / "meta.properties").exists():
            # Formatted by an earlier start: keep the data. SCRAM users are created at format
            # time only, so storage formatted for a plaintext broker has none.
            if self.tls is not None and not scram_marker.exists():
                raise KafkaError(
                    f"{self.data_dir / 'data'} was formatted for a plaintext broker, without the "
                    f"SASL user {SASL_USERNAME!r}: remove {self.data_dir} to start afresh "
                    "with TLS and SASL (the log's records go with it)"
                )
            return
        scram: list[str] = []
        if self.tls is not None:
            password = self.sasl_password().reveal()
            scram = ["--add-scram", f"{SASL_MECHANISM}=[name={SASL_USERNAME},password={password}]"]
        command = self._java_command(
            "kafka.tools.StorageTool",
            "format",
            "-t",
            _cluster_id(),
            "-c",
            str(config),
            "--ignore-formatted",
            *scram,
        )
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
        if result.returncode != 0:
            raise KafkaError(f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}")
        if self.tls is not None:
            scram_marker.write_text(f"{SASL_USERNAME} {SASL_MECHANISM}\n")

    def start(self) -> str:
        """Fetch jars if needed, start the broker, wait for it to answer; return bootstrap."""
        if self.bootstrap is not None:
            return self.bootstrap
        fetch_jars(self.jars_dir)
        if self._ports is None:
            port, controller_port = free_port(), free_port()
            while controller_port == port:
                controller_port = free_port()
            self._ports = (port, controller_port)
        port, controller_port = self._ports
        config = self._write_config(port, controller_port)
        self._format(config)
        bootstrap = f"127.0.0.1:{port}"
        self._server = ServerProcess(
            "Kafka",
            self.data_dir / "logs" / "console.log",
            error=KafkaError,
            other_logs=(self.log_file,),
            stop_timeout_s=self.stop_timeout_s,
        )
        self._server.spawn(self._java_command("kafka.Kafka", str(config), heap=self.heap))
        self._server.wait_ready(
            lambda: _metadata_problem(bootstrap, self.client_config()),
            timeout_s=self.start_timeout_s,
        )
        self.bootstrap = bootstrap
        return bootstrap

    def stop(self) -> None:
        """SIGTERM (a controlled shutdown), then SIGKILL if it takes too long."""
        self._stop_process()
        self.bootstrap = None

    def __repr__(self) -> str:
        return f"KafkaServer({self.data_dir}, bootstrap={self.bootstrap})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh.infra.kafka", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_fetch_command(sub, "the broker jars")
    sub.add_parser("run", help="start a broker and keep it running until interrupted")
    args = parser.parse_args(argv)
    state_dir = default_state_dir(os.environ)
    if args.command == "fetch":
        jars = default_jars_dir(state_dir)
        return run_command(
            lambda: print(fetch_jars(jars, quiet=False, fresh=args.fresh)), KafkaError
        )
    server = KafkaServer(state_dir)
    return run_command(lambda: serve_until_signalled(server, "MESH_KAFKA_BOOTSTRAP"), KafkaError)


if __name__ == "__main__":
    sys.exit(main())

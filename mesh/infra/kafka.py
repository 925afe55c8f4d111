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
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from mesh.settings import default_state_dir

KAFKA_VERSION = "4.1.0"
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


def fetch_jars(jars_dir: Path, *, quiet: bool = True) -> Path:
    """Fetch the broker jars into ``jars_dir`` unless a previous fetch completed there.

    A marker file is written last, so an interrupted fetch is redone, and a completed one never
    touches the network again (not even Maven's own update checks).
    """
    if (jars_dir / _MARKER).exists():
        return jars_dir
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaError(
            "Maven (mvn) is needed once to fetch the Kafka jars: apt-get install maven"
        )
    build_dir = jars_dir.parent / "pom"
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / "pom.xml").write_text(
        _POM.format(scala=SCALA_VERSION, kafka=KAFKA_VERSION, log4j=LOG4J_VERSION)
    )
    staging = jars_dir.parent / "lib.partial"
    shutil.rmtree(staging, ignore_errors=True)
    command = [
        mvn,
        "-B",
        *(["-q"] if quiet else []),
        "-f",
        str(build_dir / "pom.xml"),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={staging}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
    if result.returncode != 0:
        raise KafkaError(
            f"fetching Kafka {KAFKA_VERSION} jars failed ({' '.join(command)}):\n"
            f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    jars = sorted(path.name for path in staging.glob("*.jar"))
    if f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar" not in jars:
        raise KafkaError(f"the Maven fetch did not produce the broker jar; got {jars}")
    shutil.rmtree(jars_dir, ignore_errors=True)
    staging.rename(jars_dir)
    (jars_dir / _MARKER).write_text("\n".join(jars) + "\n")
    return jars_dir


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def _metadata_ready(bootstrap: str) -> bool:
    """One real metadata request; True once the broker answers it."""
    try:
        from confluent_kafka.admin import AdminClient
    except ImportError:  # the embedded profile has no Kafka client: a TCP accept must do
        host, port = bootstrap.rsplit(":", 1)
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 1):
            return True
        return False
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        metadata = admin.list_topics(timeout=2)
    except Exception:  # KafkaException while the broker is still starting
        return False
    return bool(metadata.brokers)


class KafkaServer:
    """One Kafka broker+controller; ``start()`` returns the bootstrap address.

    ``state_dir`` is the mesh state directory: the broker's data and logs go to
    ``state_dir/infra/kafka/broker`` and the jars are cached next to it, unless ``jars_dir`` or
    ``data_dir`` say otherwise (tests keep a fresh data dir but share the jar cache).
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
    ) -> None:
        self.state_dir = state_dir.absolute()
        self.heap = heap
        self.jars_dir = (jars_dir or default_jars_dir(self.state_dir)).absolute()
        self.data_dir = (data_dir or self.state_dir / "infra" / "kafka" / "broker").absolute()
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.bootstrap: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._console: IO[bytes] | None = None

    @property
    def log_file(self) -> Path:
        return self.data_dir / "logs" / "server.log"

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
        config = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
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
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2.format(log_file=self.log_file))
        path = self.data_dir / "server.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in config.items()))
        return path

    def _format(self, config: Path) -> None:
        if (self.data_dir / "data" / "meta.properties").exists():
            return  # formatted by an earlier start: keep the data
        command = self._java_command(
            "kafka.tools.StorageTool",
            "format",
            "-t",
            _cluster_id(),
            "-c",
            str(config),
            "--ignore-formatted",
        )
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
        if result.returncode != 0:
            raise KafkaError(f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}")

    def start(self) -> str:
        """Fetch jars if needed, start the broker, wait for it to answer; return bootstrap."""
        if self.bootstrap is not None:
            return self.bootstrap
        fetch_jars(self.jars_dir)
        port, controller_port = _free_port(), _free_port()
        while controller_port == port:
            controller_port = _free_port()
        config = self._write_config(port, controller_port)
        self._format(config)
        self._console = (self.data_dir / "logs" / "console.log").open("ab")
        self._process = subprocess.Popen(
            self._java_command("kafka.Kafka", str(config), heap=self.heap),
            stdout=self._console,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal goes to us, we stop it cleanly
        )
        bootstrap = f"127.0.0.1:{port}"
        deadline = time.monotonic() + self.start_timeout_s
        while not _metadata_ready(bootstrap):
            if self._process.poll() is not None:
                code = self._process.returncode
                self._cleanup()
                raise KafkaError(f"Kafka exited with {code} while starting:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise KafkaError(
                    f"Kafka did not answer on {bootstrap} within {self.start_timeout_s:.0f} s:\n"
                    f"{self._log_tail()}"
                )
            time.sleep(0.2)
        self.bootstrap = bootstrap
        return bootstrap

    def _log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in (self.data_dir / "logs" / "console.log", self.log_file):
            with contextlib.suppress(OSError):
                parts.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGTERM (a controlled shutdown), then SIGKILL if it takes too long."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self._cleanup()

    def _cleanup(self) -> None:
        self._process = None
        self.bootstrap = None
        if self._console is not None:
            self._console.close()
            self._console = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"KafkaServer({self.data_dir}, bootstrap={self.bootstrap})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh.infra.kafka", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="fetch the broker jars into the state dir (once per machine)")
    sub.add_parser("run", help="start a broker and keep it running until interrupted")
    args = parser.parse_args(argv)
    state_dir = default_state_dir(os.environ)
    try:
        if args.command == "fetch":
            print(fetch_jars(default_jars_dir(state_dir), quiet=False))
            return 0
        server = KafkaServer(state_dir)
        with server as bootstrap:
            print(f"MESH_KAFKA_BOOTSTRAP={bootstrap}", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
                while True:
                    time.sleep(3600)
    except KafkaError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A real single-node Elasticsearch 8.x from the distribution zip published on Maven Central.

Elasticsearch's own build publishes its integration-test distribution as
``org.elasticsearch.distribution.integ-test-zip:elasticsearch:<version>:zip``: the real server
(``bin/``, ``lib/``, ``config/``) with a handful of modules and no bundled JDK. ``mvn`` fetches it
once per machine into a cache under the mesh state directory; later starts never touch the
network. It runs on the machine's Java 17+.

    python -m mesh.infra.elasticsearch fetch   # pre-fetch the distribution (CI, make setup)
    python -m mesh.infra.elasticsearch run     # start a node, print its URL, stop on Ctrl-C

What this distribution lacks, and the memory store copes with: ``GET /`` (no rest-root module,
so the client's ``info()``/``ping()`` fail; use cluster health), ``_delete_by_query`` (no reindex
module), language analyzers (no analysis-common; the standard analyzer is in core) and server-side
RRF. Security is present as a module. Without ``tls`` it is switched off (the node listens on
loopback only); with it, HTTP is TLS with a certificate from the project CA and every request
needs the ``elastic`` user's password (a random one, set as the keystore's
``bootstrap.password`` when the node is first prepared and kept in ``node_dir/elastic-password``).

Elasticsearch refuses to run as root. Run as root (CI containers, this machine), the launcher
creates a system user ``mesh-es`` if missing and starts the node as that user; the node directory
is handed to it and the cached distribution must be readable by it.

Only for development, tests and single-machine use: one node, no replicas, disk watermarks off.
Production points the mesh at a real cluster.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path

from mesh.infra.digests import ELASTICSEARCH_ZIP
from mesh.infra.maven import (
    add_fetch_command,
    fetch_once,
    run_maven,
    verify_digests,
)
from mesh.infra.process import (
    RunAs,
    ServerProcess,
    StartStop,
    run_command,
    serve_until_signalled,
    user_can,
)
from mesh.infra.process import ensure_user as _ensure_user
from mesh.infra.security import ServerTls, stored_password
from mesh.settings import Secret, default_state_dir

ES_VERSION = "8.19.9"
MAVEN_ARTIFACT = f"org.elasticsearch.distribution.integ-test-zip:elasticsearch:{ES_VERSION}:zip"
RUN_AS_USER = "mesh-es"
# The built-in superuser whose password the node is given when security is on.
USERNAME = "elastic"
_MARKER = ".mesh-fetched"
_HEAP = re.compile(r"[1-9][0-9]*[kKmMgG]")


class ElasticsearchError(RuntimeError):
    """The node could not be fetched or started; the message says why."""


def default_home_dir(state_dir: Path) -> Path:
    """Where this version's distribution is cached under a mesh state directory."""
    return state_dir / "infra" / "elasticsearch" / f"elasticsearch-{ES_VERSION}"


def _extract(archive: Path, target: Path) -> None:
    """Unzip keeping the Unix modes (``bin/`` scripts must stay executable); no path escapes."""
    root = target.resolve()
    with zipfile.ZipFile(archive) as zipped:
        for info in zipped.infolist():
            destination = (target / info.filename).resolve()
            if not destination.is_relative_to(root):
                raise ElasticsearchError(
                    f"{archive} holds a path outside its root: {info.filename}"
                )
            zipped.extract(info, target)
            mode = (info.external_attr >> 16) & 0o777
            if info.is_dir():
                destination.chmod(0o755)
            elif mode:
                # Readable by everyone: the node runs as another user than the one who fetched.
                destination.chmod(mode | 0o444)


def fetch_distribution(home_dir: Path, *, quiet: bool = True, fresh: bool = False) -> Path:
    """Fetch and unpack the distribution into ``home_dir`` unless a previous fetch completed.

    Maven keeps the zip in its local repository (``~/.m2``), so a cache wiped by ``make clean``
    is rebuilt without the network. The zip is checked against its pinned digest before it is
    unpacked. ``fresh`` fetches again through an empty, throwaway Maven repository (CI does).
    """

    def fetch(scratch: Path) -> tuple[Path, str]:
        # cwd: the empty scratch dir, so Maven runs standalone and never picks up a pom.xml.
        run_maven(
            ["dependency:copy", f"-Dartifact={MAVEN_ARTIFACT}"]
            + [f"-DoutputDirectory={scratch / 'download'}"],
            cwd=scratch,
            what=MAVEN_ARTIFACT,
            error=ElasticsearchError,
            quiet=quiet,
            timeout_s=1800,
            fresh=fresh,
        )
        verify_digests(
            scratch / "download",
            ELASTICSEARCH_ZIP,
            pattern="*.zip",
            what=MAVEN_ARTIFACT,
            error=ElasticsearchError,
        )
        archive = scratch / "download" / f"elasticsearch-{ES_VERSION}.zip"
        _extract(archive, scratch / "unpacked")
        home = scratch / "unpacked" / f"elasticsearch-{ES_VERSION}"
        if not (home / "bin" / "elasticsearch").is_file():
            raise ElasticsearchError(
                f"{archive} has no elasticsearch-{ES_VERSION}/bin/elasticsearch"
            )
        summary = {"artifact": MAVEN_ARTIFACT, "modules": sorted(modules(home))}
        return home, json.dumps(summary, indent=2) + "\n"

    return fetch_once(home_dir, fetch, marker=_MARKER, fresh=fresh)


def modules(home_dir: Path) -> frozenset[str]:
    """The modules the distribution ships (settings of absent modules are rejected at start)."""
    return frozenset(path.name for path in (home_dir / "modules").iterdir())


def java_home(environ: Mapping[str, str]) -> Path:
    """The JDK the node runs on: ``ES_JAVA_HOME``, ``JAVA_HOME``, else ``java`` on the PATH."""
    for name in ("ES_JAVA_HOME", "JAVA_HOME"):
        value = environ.get(name)
        if value and (Path(value) / "bin" / "java").is_file():
            return Path(value)
    java = shutil.which("java", path=environ.get("PATH"))
    if java is None:
        raise ElasticsearchError(
            "Java 17+ is needed to run Elasticsearch 8: apt-get install openjdk-17-jre-headless"
        )
    return Path(java).resolve().parent.parent


def ensure_user(name: str = RUN_AS_USER) -> RunAs:
    """The system user ``name`` the node runs as when we are root, created if missing."""
    return _ensure_user(
        name, refusal="Elasticsearch refuses to run as root", error=ElasticsearchError
    )


def node_settings(
    *, data_dir: Path, logs_dir: Path, available_modules: frozenset[str], tls: bool = False
) -> dict[str, str | int | bool]:
    """``elasticsearch.yml`` for a loopback single node on ports the OS picks.

    ``tls``: security on, HTTP over TLS with ``certs/server.pem`` and ``certs/server.key`` of
    the config directory (Elasticsearch reads TLS files from there only).
    """
    settings: dict[str, str | int | bool] = {
        "cluster.name": "mesh",
        "node.name": "mesh-es",
        "path.data": str(data_dir),
        "path.logs": str(logs_dir),
        "network.host": "127.0.0.1",
        # Port 0 lets the OS pick free ports at bind time (no window in which another process can
        # take a port we probed); the node writes them to logs/{http,transport}.ports.
        "http.port": 0,
        "transport.port": 0,
        "node.portsfile": True,
        "discovery.type": "single-node",
        # CI disks are often past the 85/90/95% watermarks, which would block shard allocation
        # and turn indices read-only.
        "cluster.routing.allocation.disk.threshold_enabled": False,
    }
    if tls:
        if "x-pack-security" not in available_modules:
            raise ElasticsearchError("TLS needs the x-pack-security module, absent here")
        settings.update(
            {
                "xpack.security.enabled": True,
                "xpack.security.http.ssl.enabled": True,
                "xpack.security.http.ssl.certificate": "certs/server.pem",
                "xpack.security.http.ssl.key": "certs/server.key",
                "xpack.security.http.ssl.certificate_authorities": "certs/ca.pem",
                # One node: no transport peers to encrypt for (single-node discovery).
                "xpack.security.transport.ssl.enabled": False,
            }
        )
    elif "x-pack-security" in available_modules:
        settings["xpack.security.enabled"] = False
    if "ingest-geoip" in available_modules:
        settings["ingest.geoip.downloader.enabled"] = False  # it would try the internet
    return settings


def render_settings(settings: Mapping[str, str | int | bool]) -> str:
    # JSON scalars are valid YAML scalars, and json.dumps quotes paths safely.
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items())


def jvm_options(distribution_options: str, logs_dir: Path) -> str:
    """The distribution's ``jvm.options`` with every file it writes moved into ``logs_dir``.

    Relative paths would land in the working directory, which may be the read-only distribution;
    heap dumps (as large as the heap) are not worth the disk on a test node.
    """
    lines = []
    for line in distribution_options.splitlines():
        if line.strip() == "-XX:+HeapDumpOnOutOfMemoryError":
            continue
        line = line.replace("-XX:ErrorFile=hs_err", f"-XX:ErrorFile={logs_dir}/hs_err")
        line = line.replace("file=gc.log", f"file={logs_dir}/gc.log")
        line = re.sub(r"filecount=\d+,filesize=\d+m", "filecount=2,filesize=16m", line)
        lines.append(line)
    return "\n".join(lines) + "\n"


def _read_ports_file(path: Path) -> str | None:
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            # IPv4 first if both are there: we bound 127.0.0.1, but stay safe with [::1]:port.
            if line.strip() and not line.startswith("["):
                return line.strip()
    return None


def cluster_ready(
    url: str,
    timeout_s: float = 5.0,
    *,
    ca: Path | None = None,
    auth: tuple[str, str] | None = None,
) -> bool:
    """True once cluster health is yellow or green (the node answers and has a master).

    ``ca`` and ``auth`` (user, password) for a node with security on.
    """
    request = urllib.request.Request(
        f"{url}/_cluster/health?wait_for_status=yellow&timeout=2s", method="GET"
    )
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    context = None if ca is None else ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:
            body = json.loads(response.read())
    except (OSError, ValueError, urllib.error.URLError):
        return False  # not listening yet, or 503 while no master is elected
    return body.get("status") in ("yellow", "green")


class ElasticsearchServer(StartStop):
    """One Elasticsearch node; ``start()`` returns its URL (``http://127.0.0.1:<port>``).

    ``state_dir`` is the mesh state directory: the distribution is cached under
    ``state_dir/infra/elasticsearch`` and the node's config, data and logs go to
    ``state_dir/infra/elasticsearch/node``, unless ``home_dir`` or ``node_dir`` say otherwise
    (tests use a fresh node dir but share the cached distribution). Data survives restarts.

    Args:
        state_dir: the mesh state directory (``MESH_STATE_DIR``).
        heap: JVM heap, both initial and maximum (``512m``, ``1g``).
        home_dir: an unpacked distribution; fetched there if missing.
        node_dir: config, data, logs and tmp of this node. When running as root, it is handed
            to the ``mesh-es`` user, so each of its parents must be traversable by others.
        start_timeout_s: how long ``start`` waits for cluster health yellow.
        stop_timeout_s: how long ``stop`` waits after SIGTERM before SIGKILL.
        tls: the node's certificate (``mesh.infra.security``). Given, security is on: HTTPS
            only, and requests authenticate as ``elastic`` with ``password()``.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        heap: str = "512m",
        home_dir: Path | None = None,
        node_dir: Path | None = None,
        start_timeout_s: float = 180.0,
        stop_timeout_s: float = 30.0,
        tls: ServerTls | None = None,
    ) -> None:
        if not _HEAP.fullmatch(heap):
            raise ValueError(f"heap must look like 512m or 1g, got {heap!r}")
        self.state_dir = state_dir.absolute()
        self.heap = heap
        self.home_dir = (home_dir or default_home_dir(self.state_dir)).absolute()
        self.node_dir = (node_dir or self.state_dir / "infra" / "elasticsearch" / "node").absolute()
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.tls = tls
        self.url: str | None = None
        self._server: ServerProcess | None = None
        self.started_in_s: float | None = None  # how long the last start took

    @property
    def logs_dir(self) -> Path:
        return self.node_dir / "logs"

    @property
    def console_log(self) -> Path:
        return self.node_dir / "console.log"

    @property
    def password_file(self) -> Path:
        return self.node_dir / "elastic-password"

    @property
    def username(self) -> str:
        """The user clients authenticate as (empty without ``tls``: no security)."""
        return USERNAME if self.tls is not None else ""

    def password(self) -> Secret:
        """The ``elastic`` user's password (empty without ``tls``)."""
        return Secret(stored_password(self.password_file) if self.tls is not None else "")

    def _auth(self) -> tuple[str, str] | None:
        return None if self.tls is None else (self.username, self.password().reveal())

    def _prepare(self, run_as: RunAs | None) -> dict[str, str]:
        config_dir = self.node_dir / "config"
        data_dir = self.node_dir / "data"
        tmp_dir = self.node_dir / "tmp"
        for path in (config_dir / "jvm.options.d", data_dir, self.logs_dir, tmp_dir):
            path.mkdir(parents=True, exist_ok=True)
        # Left over from an earlier run; reading them would point us at a dead port.
        for name in ("http.ports", "transport.ports"):
            (self.logs_dir / name).unlink(missing_ok=True)
        dist_config = self.home_dir / "config"
        shutil.copyfile(dist_config / "log4j2.properties", config_dir / "log4j2.properties")
        (config_dir / "jvm.options").write_text(
            jvm_options((dist_config / "jvm.options").read_text(), self.logs_dir)
        )
        settings = node_settings(
            data_dir=data_dir,
            logs_dir=self.logs_dir,
            available_modules=modules(self.home_dir),
            tls=self.tls is not None,
        )
        (config_dir / "elasticsearch.yml").write_text(render_settings(settings))
        if self.tls is not None:
            self.tls.install(config_dir / "certs")
            self.password()  # created now, so that the hand-over below covers it
        if run_as is not None:
            self._hand_over(run_as)
        jdk = java_home(os.environ)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.node_dir),
            "LANG": "C.UTF-8",
            "ES_JAVA_HOME": str(jdk),
            "ES_PATH_CONF": str(config_dir),
            "ES_TMPDIR": str(tmp_dir),
            "ES_JAVA_OPTS": f"-Xms{self.heap} -Xmx{self.heap}",
            # The launcher JVM probes the JVM flags through temp files; keep them in the node dir
            # instead of leaving one in /tmp per start.
            "CLI_JAVA_OPTS": f"-Djava.io.tmpdir={tmp_dir}",
        }
        if self.tls is not None:
            self._set_bootstrap_password(env, run_as)
        return env

    def _set_bootstrap_password(self, env: dict[str, str], run_as: RunAs | None) -> None:
        """Put the password in the keystore as ``bootstrap.password``, once per node dir.

        The node then accepts it for ``elastic`` until someone changes that user's password;
        no request to the node, and no network, is needed.
        """
        keystore = self.node_dir / "config" / "elasticsearch.keystore"
        # A marker, not the keystore itself: a node started without security creates an empty
        # keystore of its own, and a node dir may switch to TLS later.
        done = self.node_dir / "config" / ".mesh-bootstrap-password"
        if done.exists() and keystore.exists():
            return
        result = subprocess.run(
            [str(self.home_dir / "bin" / "elasticsearch-keystore"), "add", "-x", "-f"]
            + ["bootstrap.password"],
            input=self.password().reveal(),
            capture_output=True,
            text=True,
            env=env,
            cwd=self.node_dir,
            check=False,
            timeout=120,
            user=None if run_as is None else run_as.uid,
            group=None if run_as is None else run_as.gid,
            extra_groups=None if run_as is None else [],
        )
        if result.returncode != 0 or not keystore.exists():
            raise ElasticsearchError(
                f"elasticsearch-keystore could not set bootstrap.password:\n"
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        done.touch()

    def _hand_over(self, run_as: RunAs) -> None:
        """Give the node dir to the run-as user and check it can reach what it needs."""
        for root, dirs, files in os.walk(self.node_dir):
            os.chown(root, run_as.uid, run_as.gid)
            for name in (*dirs, *files):
                os.chown(os.path.join(root, name), run_as.uid, run_as.gid, follow_symlinks=False)
        jar = self.home_dir / "lib" / f"elasticsearch-{ES_VERSION}.jar"
        if not user_can(run_as, read=[jar], write=[self.node_dir]):
            raise ElasticsearchError(
                f"user {run_as.name!r} cannot read {jar} or write {self.node_dir}: every parent "
                f"directory must be traversable by others (chmod o+x), e.g. put the node dir "
                f"under /tmp and the state dir outside /root"
            )

    def start(self) -> str:
        """Fetch if needed, start the node, wait for health yellow; return its URL."""
        if self.url is not None:
            return self.url
        fetch_distribution(self.home_dir)
        run_as = ensure_user() if os.geteuid() == 0 else None
        env = self._prepare(run_as)
        started = time.monotonic()
        # Stopped as a process group: the launcher JVM forks the server JVM.
        self._server = ServerProcess(
            "Elasticsearch",
            self.console_log,
            error=ElasticsearchError,
            stop_timeout_s=self.stop_timeout_s,
        )
        self._server.spawn(
            [str(self.home_dir / "bin" / "elasticsearch")], env=env, cwd=self.node_dir, user=run_as
        )
        self._server.wait_ready(self._not_ready, timeout_s=self.start_timeout_s, poll_s=0.25)
        self.url = f"{self._scheme}://{_read_ports_file(self.logs_dir / 'http.ports')}"
        self.started_in_s = time.monotonic() - started
        return self.url

    @property
    def _scheme(self) -> str:
        return "http" if self.tls is None else "https"

    def _not_ready(self) -> str | None:
        address = _read_ports_file(self.logs_dir / "http.ports")
        if address is None:
            return "no HTTP port published yet"
        ca = None if self.tls is None else self.tls.ca
        if not cluster_ready(f"{self._scheme}://{address}", ca=ca, auth=self._auth()):
            return f"cluster health on {address} not yellow yet"
        return None

    def reload_tls(self) -> bool:
        """Copy the (reissued) certificate files into the config directory again; the node
        watches them and loads them within seconds by itself. False without ``tls``."""
        if self.tls is None or self.url is None:
            return False
        run_as = ensure_user() if os.geteuid() == 0 else None
        self.tls.install(self.node_dir / "config" / "certs", owner=run_as)
        return True

    def stop(self) -> None:
        """SIGTERM to the node's process group (a clean shutdown), SIGKILL after the timeout."""
        self._stop_process()
        self.url = None

    def __repr__(self) -> str:
        return f"ElasticsearchServer({self.node_dir}, url={self.url})"


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if stat.S_ISREG(p.lstat().st_mode))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh.infra.elasticsearch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_fetch_command(sub, "the distribution")
    run = sub.add_parser("run", help="start a node and keep it running until interrupted")
    run.add_argument("--heap", default="512m")
    args = parser.parse_args(argv)
    state_dir = default_state_dir(os.environ)

    def fetch() -> None:
        home = fetch_distribution(default_home_dir(state_dir), quiet=False, fresh=args.fresh)
        print(f"{home} ({_size(home) / 1e6:.0f} MB)")

    if args.command == "fetch":
        return run_command(fetch, ElasticsearchError)
    server = ElasticsearchServer(state_dir, heap=args.heap)
    return run_command(lambda: serve_until_signalled(server, "MESH_ES_URL"), ElasticsearchError)


if __name__ == "__main__":
    sys.exit(main())

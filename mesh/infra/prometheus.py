"""A real Prometheus next to the mesh: scrapes every service, evaluates our rules.

The server and ``promtool`` come from Debian's ``prometheus`` package (``.ci/run`` installs it).
We write its configuration: one scrape job per kind of service (``mesh-gateway``, ``mesh-agent``,
...), whose targets live in a file-discovery file that ``set_targets`` rewrites (Prometheus
re-reads it on its own, so a service added later is scraped without a restart), and the rules
of ``monitoring/prometheus/mesh-rules.yml``. There is no Alertmanager here: firing alerts are
visible in the UI and at ``/api/v1/alerts``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mesh.infra.process import ServerProcess, StartStop, free_port

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "prometheus" / "mesh-rules.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "mesh-dashboard.json"


class PrometheusError(RuntimeError):
    pass


def binary(name: str = "prometheus") -> str:
    found = shutil.which(name)
    if found is None:
        raise PrometheusError(
            f"no {name} on PATH: install Debian's prometheus package "
            "(apt-get install --no-install-recommends prometheus)"
        )
    return found


def check_rules(*paths: Path) -> str:
    """``promtool check rules``; its report, or PrometheusError with it."""
    done = subprocess.run(
        [binary("promtool"), "check", "rules", *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
    )
    report = done.stdout + done.stderr
    if done.returncode != 0:
        raise PrometheusError(f"promtool check rules failed:\n{report}")
    return report


def config(targets_file: Path, rule_files: Sequence[Path], interval_s: float) -> str:
    """prometheus.yml (JSON is valid YAML)."""
    every = f"{max(1, round(interval_s))}s"
    doc: dict[str, Any] = {
        "global": {"scrape_interval": every, "evaluation_interval": every},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {
                "job_name": "mesh",
                "scrape_timeout": every,
                "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": every}],
            }
        ],
    }
    return json.dumps(doc, indent=2)


class PrometheusServer(StartStop):
    """One Prometheus; ``start()`` returns its URL. ``set_targets`` says what to scrape."""

    def __init__(
        self,
        state_dir: Path,
        *,
        rule_files: Sequence[Path] = (RULES,),
        interval_s: float = 5.0,
    ) -> None:
        self.dir = state_dir / "prometheus"
        self.rule_files = tuple(rule_files)
        self.interval_s = interval_s
        self.targets_file = self.dir / "targets.json"
        self.url = ""

    def set_targets(self, targets: Mapping[str, Sequence[tuple[str, str]]]) -> None:
        """Scrape these: job -> [(instance name, host:port)]. Written atomically."""
        groups = [
            {"targets": [address], "labels": {"job": job, "instance": name}}
            for job, members in sorted(targets.items())
            for name, address in members
        ]
        self.dir.mkdir(parents=True, exist_ok=True)
        partial = self.targets_file.with_suffix(".partial")
        partial.write_text(json.dumps(groups, indent=2))
        partial.replace(self.targets_file)

    def start(self) -> str:
        prometheus = binary()
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.targets_file.exists():
            self.set_targets({})
        config_path = self.dir / "prometheus.yml"
        config_path.write_text(config(self.targets_file, self.rule_files, self.interval_s))
        port = free_port()
        server = ServerProcess("Prometheus", self.dir / "prometheus.log", error=PrometheusError)
        self._server = server
        server.spawn(
            [
                prometheus,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                "--storage.tsdb.retention.time=2d",
                f"--web.listen-address=127.0.0.1:{port}",
            ]
        )
        self.url = f"http://127.0.0.1:{port}"
        server.wait_ready(lambda: _ready(self.url), timeout_s=60)
        return self.url

    def stop(self) -> None:
        self._stop_process()

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``; the ``data`` of a success, else PrometheusError."""
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            raise PrometheusError(f"{url}: HTTP {error.code}: {error.read()[:500]!r}") from error
        if body.get("status") != "success":
            raise PrometheusError(f"{url}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (empty: no data)."""
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result


def _ready(url: str) -> str | None:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except (OSError, urllib.error.URLError) as error:
        return str(error)

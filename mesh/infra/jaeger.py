"""Jaeger v2 as the mesh's trace backend: OTLP in, traces kept in memory, the query API out.

The binary is built from the Go module proxy by ``scripts/install-operator-tools.sh`` into
``.build/bin/jaeger``. We give it a configuration of our own: an OTLP/gRPC receiver, in-memory
storage and the query service (``/api/traces``, ``/api/services``; the web UI too when the
binary carries its assets, which a build from the module proxy does not), each on a loopback
port chosen at start, with its own telemetry endpoints turned off so nothing else binds.

``python -m mesh.infra.jaeger run`` prints ``OTEL_EXPORTER_OTLP_ENDPOINT=...`` and keeps Jaeger
running until interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mesh.infra.process import ServerProcess, StartStop, free_port, serve_until_signalled
from mesh.settings import default_state_dir

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BINARY = ROOT / ".build" / "bin" / "jaeger"


class JaegerError(RuntimeError):
    pass


def config(otlp_port: int, query_port: int, health_port: int, max_traces: int) -> str:
    """Jaeger's YAML configuration (JSON is valid YAML: written as JSON, checked by json)."""
    loopback = "127.0.0.1"
    doc: dict[str, Any] = {
        "service": {
            "extensions": ["jaeger_storage", "jaeger_query", "healthcheckv2"],
            "pipelines": {
                "traces": {
                    "receivers": ["otlp"],
                    "processors": ["batch"],
                    "exporters": ["jaeger_storage_exporter"],
                }
            },
            "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "warn"}},
        },
        "extensions": {
            "healthcheckv2": {"use_v2": True, "http": {"endpoint": f"{loopback}:{health_port}"}},
            "jaeger_storage": {
                "backends": {"memory_store": {"memory": {"max_traces": max_traces}}}
            },
            "jaeger_query": {
                "storage": {"traces": "memory_store"},
                # It would trace its own queries to the default OTLP port: off.
                "enable_tracing": False,
                "http": {"endpoint": f"{loopback}:{query_port}"},
                "grpc": {"endpoint": f"{loopback}:{free_port()}"},
            },
        },
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"{loopback}:{otlp_port}"}}}},
        "processors": {"batch": {"timeout": "200ms"}},
        "exporters": {"jaeger_storage_exporter": {"trace_storage": "memory_store"}},
    }
    return json.dumps(doc, indent=2)


class JaegerServer(StartStop):
    """One Jaeger process; ``start()`` returns the OTLP endpoint (``http://127.0.0.1:port``)."""

    def __init__(
        self, state_dir: Path, *, binary: Path = DEFAULT_BINARY, max_traces: int = 50_000
    ) -> None:
        self.dir = state_dir / "jaeger"
        self.binary = binary
        self.max_traces = max_traces
        self.otlp_endpoint = ""
        self.query_url = ""

    def start(self) -> str:
        if not self.binary.is_file():
            raise JaegerError(
                f"no Jaeger binary at {self.binary}: run scripts/install-operator-tools.sh "
                "(it builds Jaeger v2 from the Go module proxy)"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        otlp_port, query_port, health_port = free_port(), free_port(), free_port()
        config_path = self.dir / "jaeger.yaml"
        config_path.write_text(config(otlp_port, query_port, health_port, self.max_traces))
        server = ServerProcess("Jaeger", self.dir / "jaeger.log", error=JaegerError)
        self._server = server
        # Jaeger traces itself through the OTel SDK, which would send to the default OTLP port
        # (someone else's collector, or nobody): off.
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(OTEL_SDK_DISABLED="true", OTEL_TRACES_EXPORTER="none")
        server.spawn([str(self.binary), f"--config=file:{config_path}"], env=env)
        self.query_url = f"http://127.0.0.1:{query_port}"
        health = f"http://127.0.0.1:{health_port}/status"
        server.wait_ready(lambda: _http_ok(health) or _http_ok(self.query_url), timeout_s=60)
        self.otlp_endpoint = f"http://127.0.0.1:{otlp_port}"
        return self.otlp_endpoint

    def stop(self) -> None:
        self._stop_process()


def fetch_trace(query_url: str, trace_id: str) -> dict[str, Any] | None:
    """One trace from a Jaeger query API (Jaeger's JSON model), or None if it has none yet."""
    try:
        with urllib.request.urlopen(f"{query_url}/api/traces/{trace_id}", timeout=5) as response:
            data = json.load(response).get("data") or []
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise
    return data[0] if data else None


def _http_ok(url: str) -> str | None:
    """None if ``url`` answers 200, else why not (for ``wait_ready``)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return None if response.status == 200 else f"{url}: HTTP {response.status}"
    except (OSError, urllib.error.URLError) as error:
        return f"{url}: {error}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh.infra.jaeger", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start Jaeger and keep it running until interrupted")
    parser.parse_args(argv)
    server = JaegerServer(default_state_dir(os.environ))
    try:
        serve_until_signalled(server, "OTEL_EXPORTER_OTLP_ENDPOINT")
    except JaegerError as error:
        print(f"jaeger: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

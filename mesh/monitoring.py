"""``make up MONITORING=1``: Prometheus and Jaeger next to the mesh the launcher starts.

Jaeger starts first, so every service is started with ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing
at it; without its binary (``scripts/install-operator-tools.sh`` builds it) the mesh runs
untraced and says so. Prometheus starts once the services are up, scraping each by its metrics
port under the job ``mesh-<kind>`` and evaluating monitoring/prometheus/mesh-rules.yml.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from mesh.infra.jaeger import DEFAULT_BINARY as JAEGER_BINARY
from mesh.infra.jaeger import JaegerServer
from mesh.infra.prometheus import RULES, PrometheusServer

log = logging.getLogger(__name__)


class Monitoring:
    """The trace backend and Prometheus of one mesh; ``stop`` ends both."""

    def __init__(
        self,
        state_dir: Path,
        *,
        scrape_interval_s: float = 5.0,
        rule_files: Sequence[Path] = (),
        jaeger_binary: Path | None = None,
    ) -> None:
        self.jaeger: JaegerServer | None = None
        self.prometheus = PrometheusServer(
            state_dir, rule_files=tuple(rule_files) or (RULES,), interval_s=scrape_interval_s
        )
        self._state_dir = state_dir
        self._jaeger_binary = jaeger_binary or JAEGER_BINARY

    def start_tracing(self) -> str:
        """Start Jaeger; its OTLP endpoint for the services, or "" without a Jaeger binary."""
        if not self._jaeger_binary.is_file():
            log.warning(
                "no Jaeger at %s (scripts/install-operator-tools.sh builds it): no traces",
                self._jaeger_binary,
            )
            return ""
        self.jaeger = JaegerServer(self._state_dir, binary=self._jaeger_binary)
        return self.jaeger.start()

    def start_metrics(self, targets: Iterable[tuple[str, str, int]]) -> str:
        """Start Prometheus scraping (service name, kind, metrics port); return its URL."""
        self.scrape(targets)
        return self.prometheus.start()

    def scrape(self, targets: Iterable[tuple[str, str, int]]) -> None:
        """Replace what Prometheus scrapes (it re-reads the list within a scrape interval)."""
        jobs: dict[str, list[tuple[str, str]]] = {}
        for name, kind, port in targets:
            if port > 0:
                jobs.setdefault(f"mesh-{kind}", []).append((name, f"127.0.0.1:{port}"))
        self.prometheus.set_targets(jobs)

    def describe(self) -> dict[str, str]:
        return {
            "prometheus_url": self.prometheus.url,
            "jaeger_url": self.jaeger.query_url if self.jaeger is not None else "",
            "otlp_endpoint": self.jaeger.otlp_endpoint if self.jaeger is not None else "",
        }

    def stop(self) -> None:
        self.prometheus.stop()
        if self.jaeger is not None:
            self.jaeger.stop()

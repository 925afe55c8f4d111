"""Gateway settings, read once from the environment (``MESH_GATEWAY_*`` plus shared ones)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mesh.auth import default_keys_file
from mesh.log import LogSettings
from mesh.settings import Env, SettingsError


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway needs; build with ``from_env``."""

    host: str = "127.0.0.1"
    port: int = 50051
    # 0 picks a free port (logged at start); -1 turns the metrics endpoint off.
    metrics_port: int = 0
    grace_s: float = 10.0
    log_level: str = "INFO"
    api_keys_file: Path = field(default_factory=lambda: Path(".state/api-keys.json"))
    persister_addr: str = "127.0.0.1:50054"
    persister_timeout_s: float = 15.0
    # Turn starts per API key: token bucket refilled at rate_per_s holding up to rate_burst.
    rate_per_s: float = 5.0
    rate_burst: int = 10
    # Concurrent streaming RPCs (Chat, StreamTurn, ResumeTurn) on this gateway.
    max_streams: int = 1000
    max_text_chars: int = 16_000
    max_tokens_limit: int = 4096
    # Tokens a Chat turn may send before the client grants credit (FlowCredit).
    initial_window: int = 1024
    # Events buffered per subscriber before it is dropped to catch up from the log.
    subscriber_buffer: int = 2048
    # How often waiting turns re-read the agents' committed offset for their queue position.
    queue_poll_s: float = 0.5
    # Idempotent starts: how long, and how many, request ids this gateway remembers.
    idempotency_ttl_s: float = 600.0
    idempotency_max: int = 10_000
    # Records of the request partition a resume scans for the turn's TurnRequested.
    resume_scan_limit: int = 10_000
    log: LogSettings = field(default_factory=LogSettings)

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0:
            raise SettingsError(f"MESH_GATEWAY_RATE_PER_S={self.rate_per_s} must be > 0")
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"MESH_GATEWAY_PORT={self.port} must be a port number")
        if self.grace_s < 0:
            raise SettingsError(f"MESH_GATEWAY_GRACE_S={self.grace_s} must be >= 0")
        if self.queue_poll_s <= 0:
            raise SettingsError(f"MESH_GATEWAY_QUEUE_POLL_S={self.queue_poll_s} must be > 0")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> GatewaySettings:
        env = Env(environ, "MESH_GATEWAY_")
        return cls(
            host=env.str("HOST", "127.0.0.1"),
            port=env.int("PORT", 50051, minimum=0),
            metrics_port=env.int("METRICS_PORT", 0, minimum=-1),
            grace_s=env.float("GRACE_S", 10.0),
            log_level=env.str("LOG_LEVEL", "INFO"),
            api_keys_file=default_keys_file(environ),
            persister_addr=Env(environ, "MESH_").str("PERSISTER_ADDR", "127.0.0.1:50054"),
            persister_timeout_s=env.float("PERSISTER_TIMEOUT_S", 15.0),
            rate_per_s=env.float("RATE_PER_S", 5.0),
            rate_burst=env.int("RATE_BURST", 10, minimum=1),
            max_streams=env.int("MAX_STREAMS", 1000, minimum=1),
            max_text_chars=env.int("MAX_TEXT_CHARS", 16_000, minimum=1),
            max_tokens_limit=env.int("MAX_TOKENS_LIMIT", 4096, minimum=1),
            initial_window=env.int("INITIAL_WINDOW", 1024, minimum=1),
            subscriber_buffer=env.int("SUBSCRIBER_BUFFER", 2048, minimum=1),
            queue_poll_s=env.float("QUEUE_POLL_S", 0.5),
            idempotency_ttl_s=env.float("IDEMPOTENCY_TTL_S", 600.0),
            idempotency_max=env.int("IDEMPOTENCY_MAX", 10_000, minimum=1),
            resume_scan_limit=env.int("RESUME_SCAN_LIMIT", 10_000, minimum=1),
            log=LogSettings.from_env(environ),
        )

"""Gateway settings, read once from the environment (``MESH_GATEWAY_*`` plus shared ones)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mesh.log import LogSettings
from mesh.readiness import HealthSettings
from mesh.settings import (
    ServiceSettings,
    SettingsError,
    default_state_dir,
    persister_addr_setting,
    port_setting,
    setting,
)
from services.agent.settings import AgentSettings


def _agent_model_name(environ: Mapping[str, str]) -> str:
    """The agents' model id (the GGUF file's name, as agents report it) when the gateway runs
    with the agents' environment; empty otherwise."""
    path = environ.get("MESH_AGENT_MODEL_PATH", "")
    return Path(path).name if path else ""


@dataclass(frozen=True, kw_only=True)
class GatewaySettings(ServiceSettings):
    """Everything the gateway needs; build with ``from_env``.

    Attributes:
        host, metrics_port, grace_s, log_level: see ``mesh.settings.ServiceSettings``.
        port: gRPC port, 0 picks one (``MESH_GATEWAY_PORT``).
        api_keys_file: JSON file of hashed API keys (``MESH_GATEWAY_API_KEYS_FILE``, default
            ``$MESH_STATE_DIR/api-keys.json``).
        persister_addr: where the persister listens (``MESH_PERSISTER_ADDR``); the gateway
            cannot run without one, so empty is an error here.
        log: the shared log settings (``MESH_LOG_*``).
        health: how dependencies are probed for readiness (``MESH_HEALTH_*``).
    """

    env_prefix = "MESH_GATEWAY_"

    port: int = port_setting(50051)
    api_keys_file: Path = setting(
        "API_KEYS_FILE", derive=lambda env: default_state_dir(env) / "api-keys.json"
    )
    persister_addr: str = persister_addr_setting()
    persister_timeout_s: float = setting("PERSISTER_TIMEOUT_S", 15.0)
    # Turn starts per API key: token bucket refilled at rate_per_s holding up to rate_burst.
    rate_per_s: float = setting("RATE_PER_S", 5.0, above=0)
    rate_burst: int = setting("RATE_BURST", 10, minimum=1)
    # Concurrent streaming RPCs (Chat, StreamTurn, ResumeTurn) on this gateway.
    max_streams: int = setting("MAX_STREAMS", 1000, minimum=1)
    # ...of which one tenant may hold at most this many, so it cannot take them all.
    max_streams_per_tenant: int = setting("MAX_STREAMS_PER_TENANT", 250, minimum=1)
    max_text_chars: int = setting("MAX_TEXT_CHARS", 16_000, minimum=1)
    max_tokens_limit: int = setting("MAX_TOKENS_LIMIT", 4096, minimum=1)
    # Tokens a Chat turn may send before the client grants credit (FlowCredit).
    initial_window: int = setting("INITIAL_WINDOW", 1024, minimum=1)
    # Events buffered per subscriber before it is dropped to catch up from the log.
    subscriber_buffer: int = setting("SUBSCRIBER_BUFFER", 2048, minimum=1)
    # Unfinished turns one request partition may hold before StartTurn is refused
    # (RESOURCE_EXHAUSTED, QUEUE_FULL): a backlog past it would only wait longer.
    max_queued_turns: int = setting("MAX_QUEUED_TURNS", 256, minimum=1)
    # ...of which one tenant may hold at most this many (TENANT_QUEUE_FULL), so one tenant's
    # backlog leaves room on the partition for the others.
    max_queued_turns_per_tenant: int = setting("MAX_QUEUED_TURNS_PER_TENANT", 64, minimum=1)
    # Generated tokens one tenant may start in any minute on this gateway (TENANT_TOKEN_RATE;
    # services/gateway/token_budget.py); 0: no limit.
    tokens_per_minute_per_tenant: int = setting("TOKENS_PER_MINUTE_PER_TENANT", 0, minimum=0)
    # A Chat stream with no turn and no frame for this long ends (DEADLINE_EXCEEDED,
    # STREAM_IDLE); 0: never.
    stream_idle_timeout_s: float = setting("STREAM_IDLE_TIMEOUT_S", 300.0, minimum=0)
    # How often waiting turns re-read the agents' committed offset for their queue position.
    queue_poll_s: float = setting("QUEUE_POLL_S", 0.5, above=0)
    # Idempotent starts: how long, and how many, request ids this gateway remembers.
    idempotency_ttl_s: float = setting("IDEMPOTENCY_TTL_S", 600.0)
    idempotency_max: int = setting("IDEMPOTENCY_MAX", 10_000, minimum=1)
    # A request-id claim (made at the persister before the append) whose turn is still not on
    # the log after this long was left by a gateway that died: a retry takes it over. Longer
    # than a claim-to-append ever takes; a claim answered after half of it is not used.
    idempotency_takeover_s: float = setting("IDEMPOTENCY_TAKEOVER_S", 10.0, above=0)
    # Records of the request partition a resume scans for the turn's TurnRequested.
    resume_scan_limit: int = setting("RESUME_SCAN_LIMIT", 10_000, minimum=1)
    # How long a resume or cancel waits for the persister's LookupTurn before using the log.
    turn_lookup_timeout_s: float = setting("TURN_LOOKUP_TIMEOUT_S", 2.0, above=0)
    # The OpenAI-compatible HTTP API (services/gateway/http, docs/openai.md): its port (0 picks
    # one, -1 turns it off), the largest request body, and the model ids /v1/models lists.
    http_port: int = setting("HTTP_PORT", 8000, minimum=-1, maximum=65535)
    http_max_body_bytes: int = setting("HTTP_MAX_BODY_BYTES", 1_048_576, minimum=1024)
    models: str = setting("MODELS", derive=lambda env: _agent_model_name(env))
    # What a prompt can hold (services/gateway/context_check.py): the agents' GGUF files, comma
    # separated, whose vocabulary and chat template count a message's tokens, their context
    # window and system prompt. Derived from the agents' settings when the gateway runs with
    # their environment (as the launcher starts it); no file: the agent's PROMPT_TOO_LONG is
    # the only check.
    context_models: str = setting(
        "CONTEXT_MODELS", derive=lambda env: env.get("MESH_AGENT_MODEL_PATH", ""), blank=True
    )
    # The agents' own settings, read as the agents read them (their defaults included).
    context_tokens: int = setting(
        "CONTEXT_TOKENS",
        derive=lambda env: AgentSettings.value_from_env("n_ctx", env),
        minimum=64,
    )
    context_system_prompt: str = setting(
        "CONTEXT_SYSTEM_PROMPT",
        derive=lambda env: AgentSettings.value_from_env("system_prompt", env),
    )
    # TLS of the public ports (gRPC and HTTP): the certificate clients see and its key. The
    # gateway's mesh identity, for its calls to the persister, is MESH_TLS_* like every service.
    tls_cert: Path | None = setting("TLS_CERT", None)
    tls_key: Path | None = setting("TLS_KEY", None)
    # What a turn needs to start (docs/reliability.md): without it StartTurn fails fast with
    # UNAVAILABLE. Off: turns are accepted and wait for an agent (scale from zero), or run
    # without history while the persister is down (the turn says so).
    require_agent: bool = setting("REQUIRE_AGENT", True)
    require_persister: bool = setting("REQUIRE_PERSISTER", True)
    log: LogSettings = field(default_factory=LogSettings)
    health: HealthSettings = field(default_factory=HealthSettings)

    @property
    def model_ids(self) -> tuple[str, ...]:
        """The model ids this mesh serves (``MESH_GATEWAY_MODELS``, comma separated)."""
        return tuple(part.strip() for part in self.models.split(",") if part.strip())

    @property
    def context_model_paths(self) -> tuple[Path, ...]:
        """The GGUF files of ``MESH_GATEWAY_CONTEXT_MODELS``."""
        return tuple(Path(p.strip()) for p in self.context_models.split(",") if p.strip())

    def listens_with_tls(self) -> bool:
        return self.tls_cert is not None

    def plaintext_fix(self) -> str:
        return (
            "set MESH_GATEWAY_TLS_CERT and MESH_GATEWAY_TLS_KEY to the certificate (PEM, chain "
            "included) and key clients should see (`mesh certs issue gateway-edge --dns NAME` "
            "makes one from the project CA)"
        )

    def check(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError(
                "MESH_GATEWAY_TLS_CERT and MESH_GATEWAY_TLS_KEY go together: set both for TLS "
                "on the gateway's public ports, or neither"
            )
        super().check()
        for path in self.context_model_paths:
            if not path.is_file():
                raise SettingsError(
                    f"MESH_GATEWAY_CONTEXT_MODELS names {str(path)!r}, which is not a file: name "
                    "the agents' GGUF files (comma separated), or set it empty to leave the "
                    "context check to the agents"
                )
        if not self.persister_addr:
            raise SettingsError(
                "MESH_PERSISTER_ADDR is empty, but the gateway needs a persister "
                "(unset means 127.0.0.1:50054)"
            )


__all__ = ["GatewaySettings"]

"""Settings of the agent service, read from ``MESH_AGENT_*`` (and the shared ``MESH_*``)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from mesh.log import LogSettings
from mesh.settings import Env, SettingsError


@dataclass(frozen=True)
class AgentSettings:
    """Everything the agent reads from the environment, parsed once at start.

    Attributes:
        host, port: gRPC listen address (``MESH_AGENT_HOST``, ``MESH_AGENT_PORT``).
        metrics_port: Prometheus port, 0 picks one (``MESH_AGENT_METRICS_PORT``).
        grace_s: drain time on SIGTERM (``MESH_AGENT_GRACE_S``): the turn in progress may
            finish within it; otherwise it is handed back uncommitted for another agent.
        log_level: logging level (``MESH_AGENT_LOG_LEVEL``).
        agent_id: instance name in events and group membership (``MESH_AGENT_ID``).
        model_path: the GGUF file (``MESH_AGENT_MODEL_PATH``, required).
        gpu_layers: layers offloaded to a GPU, -1 all (``MESH_AGENT_GPU_LAYERS``).
        n_ctx: context window in tokens (``MESH_AGENT_N_CTX``).
        threads: CPU threads for llama.cpp (``MESH_AGENT_THREADS``).
        slots: concurrent generations, one llama context each (``MESH_AGENT_SLOTS``).
        seed: sampling seed for requests without one, -1 random (``MESH_AGENT_SEED``).
        default_max_tokens: reply length when a request says 0 (``MESH_AGENT_DEFAULT_MAX_TOKENS``).
        max_tokens_limit: largest max_tokens accepted (``MESH_AGENT_MAX_TOKENS_LIMIT``).
        default_temperature, default_top_p: sampling when a request leaves them unset
            (``MESH_AGENT_TEMPERATURE``, ``MESH_AGENT_TOP_P``).
        recall_top_k: memory chunks recalled per turn, 0 disables recall
            (``MESH_AGENT_RECALL_TOP_K``).
        system_prompt: optional instructions put before every conversation
            (``MESH_AGENT_SYSTEM_PROMPT``).
        memory_addr, persister_addr: where memory and persister listen (``MESH_MEMORY_ADDR``,
            ``MESH_PERSISTER_ADDR``; set but empty: turns go without recall or history).
        dependency_timeout_s: deadline of one history or recall call
            (``MESH_AGENT_DEPENDENCY_TIMEOUT_S``).
        dependency_attempts: tries before generating without history or recall
            (``MESH_AGENT_DEPENDENCY_ATTEMPTS``).
        prompt_log: when set, every prompt is appended to this JSON-lines file (an audit and
            debugging aid: it holds user text, so keep it off in production)
        worker: consume turns from the request log; false serves only the direct RPCs
            (``MESH_AGENT_WORKER``).
        max_waiting: direct Generate calls that may wait for a slot before
            RESOURCE_EXHAUSTED (``MESH_AGENT_MAX_WAITING``).
        min_token_interval_ms: the least time between two tokens of a turn, 0 for none
            (``MESH_AGENT_MIN_TOKEN_INTERVAL_MS``): paces a fast model like a slower one, for
            demos and client tests; cancels stay immediate.
        log: the shared log settings (``MESH_LOG_*``).
    """

    model_path: Path
    host: str = "127.0.0.1"
    port: int = 50052
    metrics_port: int = 0
    grace_s: float = 10.0
    log_level: str = "INFO"
    agent_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    gpu_layers: int = 0
    n_ctx: int = 2048
    threads: int = 2
    slots: int = 1
    seed: int | None = None
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    default_temperature: float = 0.8
    default_top_p: float = 0.95
    recall_top_k: int = 4
    system_prompt: str = ""
    memory_addr: str = "127.0.0.1:50053"
    persister_addr: str = "127.0.0.1:50054"
    dependency_timeout_s: float = 10.0
    dependency_attempts: int = 3
    worker: bool = True
    max_waiting: int = 16
    prompt_log: Path | None = None
    min_token_interval_ms: float = 0.0
    log: LogSettings = field(default_factory=LogSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        env_map = os.environ if environ is None else environ
        env = Env(env_map, "MESH_AGENT_")
        raw_path = env.str("MODEL_PATH", "")
        if not raw_path:
            raise SettingsError(
                "MESH_AGENT_MODEL_PATH is required: the GGUF model file to serve "
                "(`python -m mesh.llm.models` prints the default model's path; "
                "`python -m mesh.llm.tiny_model PATH` writes a tiny test model)"
            )
        model_path = Path(raw_path).expanduser().absolute()
        if not model_path.is_file():
            raise SettingsError(f"MESH_AGENT_MODEL_PATH={raw_path!r} is not a file")
        if not os.access(model_path, os.R_OK):
            raise SettingsError(f"MESH_AGENT_MODEL_PATH={raw_path!r} is not readable")
        grace_s = env.float("GRACE_S", 10.0)
        if grace_s < 0:
            raise SettingsError(f"MESH_AGENT_GRACE_S={grace_s} must be >= 0")
        default_max = env.int("DEFAULT_MAX_TOKENS", 256, minimum=1)
        limit = env.int("MAX_TOKENS_LIMIT", 4096, minimum=1)
        if default_max > limit:
            raise SettingsError(
                f"MESH_AGENT_DEFAULT_MAX_TOKENS={default_max} exceeds "
                f"MESH_AGENT_MAX_TOKENS_LIMIT={limit}"
            )
        temperature = env.float("TEMPERATURE", 0.8)
        if not 0.0 <= temperature <= 2.0:
            raise SettingsError(f"MESH_AGENT_TEMPERATURE={temperature} must be in [0, 2]")
        top_p = env.float("TOP_P", 0.95)
        if not 0.0 < top_p <= 1.0:
            raise SettingsError(f"MESH_AGENT_TOP_P={top_p} must be in (0, 1]")
        gpu_layers = env.int("GPU_LAYERS", 0, minimum=-1)
        seed = env.int("SEED", -1, minimum=-1)
        dep_timeout = env.float("DEPENDENCY_TIMEOUT_S", 10.0)
        if dep_timeout <= 0:
            raise SettingsError(f"MESH_AGENT_DEPENDENCY_TIMEOUT_S={dep_timeout} must be > 0")
        min_interval_ms = env.float("MIN_TOKEN_INTERVAL_MS", 0.0)
        if not 0.0 <= min_interval_ms <= 10_000.0:
            raise SettingsError(
                f"MESH_AGENT_MIN_TOKEN_INTERVAL_MS={min_interval_ms} must be in [0, 10000]"
            )
        agent_id = env.str("ID", "") or f"{socket.gethostname()}-{os.getpid()}"
        return cls(
            model_path=model_path,
            host=env.str("HOST", "127.0.0.1"),
            port=env.int("PORT", 50052, minimum=0),
            metrics_port=env.int("METRICS_PORT", 0, minimum=0),
            grace_s=grace_s,
            log_level=env.str("LOG_LEVEL", "INFO"),
            agent_id=agent_id,
            gpu_layers=gpu_layers,
            n_ctx=env.int("N_CTX", 2048, minimum=64),
            threads=env.int("THREADS", 2, minimum=1),
            slots=env.int("SLOTS", 1, minimum=1),
            seed=None if seed < 0 else seed,
            default_max_tokens=default_max,
            max_tokens_limit=limit,
            default_temperature=temperature,
            default_top_p=top_p,
            recall_top_k=env.int("RECALL_TOP_K", 4, minimum=0),
            system_prompt=env.str("SYSTEM_PROMPT", ""),
            memory_addr=env_map.get("MESH_MEMORY_ADDR", "127.0.0.1:50053").strip(),
            persister_addr=env_map.get("MESH_PERSISTER_ADDR", "127.0.0.1:50054").strip(),
            dependency_timeout_s=dep_timeout,
            dependency_attempts=env.int("DEPENDENCY_ATTEMPTS", 3, minimum=1),
            worker=env.bool("WORKER", True),
            max_waiting=env.int("MAX_WAITING", 16, minimum=0),
            prompt_log=Path(p) if (p := env.str("PROMPT_LOG", "")) else None,
            min_token_interval_ms=min_interval_ms,
            log=LogSettings.from_env(env_map),
        )


__all__ = ["AgentSettings"]

"""Settings of the agent service, read from ``MESH_AGENT_*`` (and the shared ``MESH_*``)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from mesh.log import LogSettings
from mesh.readiness import HealthSettings
from mesh.settings import (
    ServiceSettings,
    SettingsError,
    memory_addr_setting,
    persister_addr_setting,
    port_setting,
    setting,
)

# Generations per batch when MESH_AGENT_PARALLEL is unset. On a CPU, aggregate throughput grows
# up to about 8 streams while each stream slows; 4 keeps a single stream near full speed. A GPU
# has far more parallel compute idle at one stream.
CPU_PARALLEL = 4
GPU_PARALLEL = 16


@dataclass(frozen=True, kw_only=True)
class AgentSettings(ServiceSettings):
    """Everything the agent reads from the environment, parsed once at start.

    Attributes:
        host, metrics_port, grace_s, log_level: see ``mesh.settings.ServiceSettings``. Within
            ``grace_s`` the turn in progress may finish; otherwise it is handed back
            uncommitted for another agent.
        port: gRPC port, 0 picks one (``MESH_AGENT_PORT``).
        agent_id: instance name in events and group membership (``MESH_AGENT_ID``).
        model_path: the GGUF file (``MESH_AGENT_MODEL_PATH``, required).
        gpu_layers: layers offloaded to a GPU, -1 all (``MESH_AGENT_GPU_LAYERS``).
        n_ctx: context window in tokens (``MESH_AGENT_N_CTX``).
        threads: CPU threads for llama.cpp (``MESH_AGENT_THREADS``).
        parallel: generations decoded together in one batch (``MESH_AGENT_PARALLEL``); 0, the
            default, picks 4 on a CPU node and 16 when layers are offloaded to a GPU. Turns
            beyond it wait in the agent's fair queue.
        prefill_chunk: prompt tokens read per decode step (``MESH_AGENT_PREFILL_CHUNK``): larger
            reads long prompts faster, smaller keeps running streams flowing meanwhile.
        kv_cache_tokens: KV cache cells shared by running and idle sequences, 0 for
            ``n_ctx * parallel`` (``MESH_AGENT_KV_CACHE_TOKENS``); idle ones keep a
            conversation's prefix for its next turn until the room is needed.
        read_ahead: turns taken from the log beyond those running (``MESH_AGENT_READ_AHEAD``),
            so the fair queue sees other tenants' turns behind one tenant's burst.
        max_turn_s: a running turn's time limit in seconds, 0 for none
            (``MESH_AGENT_MAX_TURN_SECONDS``): a turn still running after it is stopped and
            finished with a ``TURN_TIME_LIMIT`` error, so the turns behind it on its partition
            run.
        history_messages: the newest messages read for a prompt's history; the prompt keeps
            what fits of them, the oldest going first (``MESH_AGENT_HISTORY_MESSAGES``).
        orphan_grace_s: how long a turn not started in the background may have no client
            attached on any gateway before it is cancelled (``MESH_AGENT_ORPHAN_GRACE_S``).
        seed: sampling seed for requests without one; unset or -1: random (``MESH_AGENT_SEED``).
        default_max_tokens: reply length when a request says 0 (``MESH_AGENT_DEFAULT_MAX_TOKENS``).
        max_tokens_limit: largest max_tokens accepted (``MESH_AGENT_MAX_TOKENS_LIMIT``).
        default_temperature, default_top_p: sampling when a request leaves them unset
            (``MESH_AGENT_TEMPERATURE``, ``MESH_AGENT_TOP_P``).
        recall_top_k: memory chunks recalled per turn, 0 disables recall
            (``MESH_AGENT_RECALL_TOP_K``).
        system_prompt: optional instructions put before every conversation
            (``MESH_AGENT_SYSTEM_PROMPT``).
        memory_addr, persister_addr: where memory and persister listen (``MESH_MEMORY_ADDR``,
            default 127.0.0.1:50053; ``MESH_PERSISTER_ADDR``, default 127.0.0.1:50054); empty:
            turns go without recall or history.
        dependency_timeout_s: deadline of one history or recall call
            (``MESH_AGENT_DEPENDENCY_TIMEOUT_S``).
        dependency_attempts: tries before generating without history or recall
            (``MESH_AGENT_DEPENDENCY_ATTEMPTS``).
        prompt_log: when set, every prompt is appended to this JSON-lines file (an audit and
            debugging aid: it holds user text, so keep it off in production;
            ``MESH_AGENT_PROMPT_LOG``)
        worker: consume turns from the request log; false serves only the direct RPCs
            (``MESH_AGENT_WORKER``).
        max_waiting: direct Generate calls that may wait for a slot before
            RESOURCE_EXHAUSTED (``MESH_AGENT_MAX_WAITING``).
        min_token_interval_ms: the least time between two tokens of a turn, 0 for none
            (``MESH_AGENT_MIN_TOKEN_INTERVAL_MS``): paces a fast model like a slower one, for
            demos and client tests; cancels stay immediate.
        log: the shared log settings (``MESH_LOG_*``).
        health: how the log is probed for readiness (``MESH_HEALTH_*``).
    """

    env_prefix = "MESH_AGENT_"

    model_path: Path = setting(
        "MODEL_PATH",
        hint=(
            ": the GGUF model file to serve "
            "(`python -m mesh.llm.models` prints the default model's path; "
            "`python -m mesh.llm.tiny_model PATH` writes a tiny test model)"
        ),
    )
    port: int = port_setting(50052)
    agent_id: str = setting("ID", default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    gpu_layers: int = setting("GPU_LAYERS", 0, minimum=-1)
    n_ctx: int = setting("N_CTX", 2048, minimum=64)
    threads: int = setting("THREADS", 2, minimum=1)
    parallel: int = setting("PARALLEL", 0, minimum=0, maximum=256)
    prefill_chunk: int = setting("PREFILL_CHUNK", 512, minimum=1)
    kv_cache_tokens: int = setting("KV_CACHE_TOKENS", 0, minimum=0)
    read_ahead: int = setting("READ_AHEAD", 32, minimum=0)
    max_turn_s: float = setting("MAX_TURN_SECONDS", 900.0, minimum=0)
    orphan_grace_s: float = setting("ORPHAN_GRACE_S", 30.0, minimum=0)
    history_messages: int = setting("HISTORY_MESSAGES", 100, minimum=1)
    seed: int | None = setting("SEED", None)
    default_max_tokens: int = setting("DEFAULT_MAX_TOKENS", 256, minimum=1)
    max_tokens_limit: int = setting("MAX_TOKENS_LIMIT", 4096, minimum=1)
    default_temperature: float = setting("TEMPERATURE", 0.8, minimum=0, maximum=2)
    default_top_p: float = setting("TOP_P", 0.95, above=0, maximum=1)
    recall_top_k: int = setting("RECALL_TOP_K", 4, minimum=0)
    system_prompt: str = setting("SYSTEM_PROMPT", "")
    memory_addr: str = memory_addr_setting()
    persister_addr: str = persister_addr_setting()
    dependency_timeout_s: float = setting("DEPENDENCY_TIMEOUT_S", 10.0, above=0)
    dependency_attempts: int = setting("DEPENDENCY_ATTEMPTS", 3, minimum=1)
    worker: bool = setting("WORKER", True)
    max_waiting: int = setting("MAX_WAITING", 16, minimum=0)
    prompt_log: Path | None = setting("PROMPT_LOG", None)
    min_token_interval_ms: float = setting("MIN_TOKEN_INTERVAL_MS", 0.0, minimum=0, maximum=10_000)
    log: LogSettings = field(default_factory=LogSettings)
    health: HealthSettings = field(default_factory=HealthSettings)

    @property
    def slots(self) -> int:
        """Generations decoded together: ``parallel``, or its default for the device."""
        if self.parallel:
            return self.parallel
        return GPU_PARALLEL if self.gpu_layers else CPU_PARALLEL

    def check(self) -> None:
        super().check()
        path = self.model_path
        if not path.is_file():
            raise SettingsError(f"MESH_AGENT_MODEL_PATH={str(path)!r} is not a file")
        if not os.access(path, os.R_OK):
            raise SettingsError(f"MESH_AGENT_MODEL_PATH={str(path)!r} is not readable")
        if self.default_max_tokens > self.max_tokens_limit:
            raise SettingsError(
                f"MESH_AGENT_DEFAULT_MAX_TOKENS={self.default_max_tokens} exceeds "
                f"MESH_AGENT_MAX_TOKENS_LIMIT={self.max_tokens_limit}"
            )
        if self.kv_cache_tokens and self.kv_cache_tokens < self.n_ctx * self.slots:
            raise SettingsError(
                f"MESH_AGENT_KV_CACHE_TOKENS={self.kv_cache_tokens} is less than "
                f"MESH_AGENT_N_CTX * parallel = {self.n_ctx * self.slots}: every running turn "
                "must be able to fill its window"
            )


__all__ = ["AgentSettings"]

"""Settings of the memory service, read from ``MESH_MEMORY_*`` (and the shared ``MESH_*``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Self

from mesh.memory.chunking import ChunkingConfig
from mesh.memory.factory import StoreSettings
from mesh.settings import Env, SettingsError


@dataclass(frozen=True)
class Limits:
    """Input bounds; anything larger is rejected with INVALID_ARGUMENT before any work.

    Attributes:
        max_text_chars: one Remember text (``MESH_MEMORY_MAX_TEXT_CHARS``).
        max_query_chars: one Recall query (``MESH_MEMORY_MAX_QUERY_CHARS``).
        max_document_chars: one ingested document, all frames together
            (``MESH_MEMORY_MAX_DOCUMENT_CHARS``).
        max_id_chars: tenant, conversation, document and request ids
            (``MESH_MEMORY_MAX_ID_CHARS``).
    """

    max_text_chars: int = 256 * 1024
    max_query_chars: int = 8 * 1024
    max_document_chars: int = 16 * 1024 * 1024
    max_id_chars: int = 256


@dataclass(frozen=True)
class MemorySettings:
    """Everything the memory service reads from the environment, parsed once at start.

    Attributes:
        host: gRPC listen host (``MESH_MEMORY_HOST``).
        port: gRPC port, 0 picks one (``MESH_MEMORY_PORT``).
        metrics_port: Prometheus port, 0 picks one (``MESH_MEMORY_METRICS_PORT``).
        grace_s: drain time on SIGTERM (``MESH_MEMORY_GRACE_S``).
        log_level: logging level (``MESH_MEMORY_LOG_LEVEL``).
        store: backend and connection (see ``StoreSettings``).
        chunking: chunk size and overlap in words (``MESH_MEMORY_CHUNK_WORDS``,
            ``MESH_MEMORY_CHUNK_OVERLAP_WORDS``).
        limits: input bounds (see ``Limits``).
    """

    host: str = "127.0.0.1"
    port: int = 50053
    metrics_port: int = 0
    grace_s: float = 10.0
    log_level: str = "INFO"
    store: StoreSettings = field(default_factory=StoreSettings)
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        env_map = os.environ if environ is None else environ
        env = Env(env_map, "MESH_MEMORY_")
        grace_s = env.float("GRACE_S", 10.0)
        if grace_s < 0:
            raise SettingsError(f"MESH_MEMORY_GRACE_S={grace_s} must be >= 0")
        chunk_words = env.int("CHUNK_WORDS", 120, minimum=1)
        overlap_words = env.int("CHUNK_OVERLAP_WORDS", min(30, chunk_words - 1), minimum=0)
        if overlap_words >= chunk_words:
            raise SettingsError(
                f"MESH_MEMORY_CHUNK_OVERLAP_WORDS={overlap_words} must be smaller than "
                f"MESH_MEMORY_CHUNK_WORDS={chunk_words}"
            )
        return cls(
            host=env.str("HOST", "127.0.0.1"),
            port=env.int("PORT", 50053, minimum=0),
            metrics_port=env.int("METRICS_PORT", 0, minimum=0),
            grace_s=grace_s,
            log_level=env.str("LOG_LEVEL", "INFO"),
            store=StoreSettings.from_env(env_map),
            chunking=ChunkingConfig(max_words=chunk_words, overlap_words=overlap_words),
            limits=Limits(
                max_text_chars=env.int("MAX_TEXT_CHARS", Limits.max_text_chars, minimum=1),
                max_query_chars=env.int("MAX_QUERY_CHARS", Limits.max_query_chars, minimum=1),
                max_document_chars=env.int(
                    "MAX_DOCUMENT_CHARS", Limits.max_document_chars, minimum=1
                ),
                max_id_chars=env.int("MAX_ID_CHARS", Limits.max_id_chars, minimum=1),
            ),
        )


__all__ = ["Limits", "MemorySettings"]

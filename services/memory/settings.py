"""Settings of the memory service, read from ``MESH_MEMORY_*`` (and the shared ``MESH_*``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mesh.memory.chunking import ChunkingConfig
from mesh.memory.factory import StoreSettings
from mesh.readiness import HealthSettings
from mesh.settings import Env, ServiceSettings, Settings, SettingsError, port_setting, setting

_CHUNK_WORDS = "MESH_MEMORY_CHUNK_WORDS"
_CHUNK_OVERLAP_WORDS = "MESH_MEMORY_CHUNK_OVERLAP_WORDS"


@dataclass(frozen=True, kw_only=True)
class Limits(Settings):
    """Input bounds; anything larger is rejected with INVALID_ARGUMENT before any work.

    Attributes:
        max_text_chars: one Remember text (``MESH_MEMORY_MAX_TEXT_CHARS``).
        max_query_chars: one Recall query (``MESH_MEMORY_MAX_QUERY_CHARS``).
        max_document_chars: one ingested document, all frames together
            (``MESH_MEMORY_MAX_DOCUMENT_CHARS``).
        max_id_chars: tenant, conversation, document and request ids
            (``MESH_MEMORY_MAX_ID_CHARS``).
    """

    env_prefix = "MESH_MEMORY_"

    max_text_chars: int = setting("MAX_TEXT_CHARS", 256 * 1024, minimum=1)
    max_query_chars: int = setting("MAX_QUERY_CHARS", 8 * 1024, minimum=1)
    max_document_chars: int = setting("MAX_DOCUMENT_CHARS", 16 * 1024 * 1024, minimum=1)
    max_id_chars: int = setting("MAX_ID_CHARS", 256, minimum=1)


def _read_chunking(environ: Mapping[str, str]) -> ChunkingConfig:
    # The default overlap depends on the chunk size (at most one word less), so the two
    # variables are read together.
    env, default = Env(environ, ""), ChunkingConfig()
    words = env.int(_CHUNK_WORDS, default.max_words, minimum=1)
    overlap = env.int(_CHUNK_OVERLAP_WORDS, min(default.overlap_words, words - 1), minimum=0)
    if overlap >= words:
        raise SettingsError(
            f"{_CHUNK_OVERLAP_WORDS}={overlap} must be smaller than {_CHUNK_WORDS}={words}"
        )
    return ChunkingConfig(max_words=words, overlap_words=overlap)


def _write_chunking(chunking: ChunkingConfig) -> dict[str, str]:
    return {
        _CHUNK_WORDS: str(chunking.max_words),
        _CHUNK_OVERLAP_WORDS: str(chunking.overlap_words),
    }


@dataclass(frozen=True, kw_only=True)
class MemorySettings(ServiceSettings):
    """Everything the memory service reads from the environment, parsed once at start.

    Attributes:
        host, metrics_port, grace_s, log_level: see ``mesh.settings.ServiceSettings``.
        port: gRPC port, 0 picks one (``MESH_MEMORY_PORT``).
        store: backend and connection (see ``StoreSettings``).
        chunking: chunk size and overlap in words (``MESH_MEMORY_CHUNK_WORDS``,
            ``MESH_MEMORY_CHUNK_OVERLAP_WORDS``, default 120 and 30, the overlap at most one
            word less than the chunk).
        limits: input bounds (see ``Limits``).
        health: how the store is probed for readiness (``MESH_HEALTH_*``).
    """

    env_prefix = "MESH_MEMORY_"

    port: int = port_setting(50053)
    store: StoreSettings = field(default_factory=StoreSettings)
    chunking: ChunkingConfig = setting(
        _CHUNK_WORDS, default_factory=ChunkingConfig, read=_read_chunking, write=_write_chunking
    )
    limits: Limits = field(default_factory=Limits)
    health: HealthSettings = field(default_factory=HealthSettings)


__all__ = ["Limits", "MemorySettings"]

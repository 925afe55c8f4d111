"""Choosing and opening the memory store from settings.

``postgres`` (the default) needs only PostgreSQL with pgvector; with no DSN configured it starts
the embedded server (pgserver) under the state directory, so one machine runs the mesh with
nothing installed. ``elasticsearch`` is the scale-out backend; its client library is only
imported when it is chosen.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.memory.base import MemoryStore
from mesh.memory.embedding import DEFAULT_DIMS
from mesh.memory.postgres import PostgresMemoryStore
from mesh.pg import EmbeddedPostgres
from mesh.settings import PostgresSettings, Secret, SettingsError, setting

BACKENDS = ("postgres", "elasticsearch")


@dataclass(frozen=True, kw_only=True)
class StoreSettings(PostgresSettings):
    """Which memory backend to use and how to reach it.

    Attributes:
        backend: ``postgres`` or ``elasticsearch`` (``MESH_MEMORY_BACKEND``).
        pg_dsn, state_dir: PostgreSQL (see ``mesh.settings.PostgresSettings``); an empty DSN
            starts the embedded server in ``embedded_pg_dir`` (``$MESH_STATE_DIR/postgres``),
            shared with the other services of the machine.
        es_url: Elasticsearch URL (``MESH_ES_URL``); ``https://`` for TLS.
        es_user, es_password: basic authentication on a cluster with security on
            (``MESH_ES_USER``, ``MESH_ES_PASSWORD``); both or neither.
        es_ca: PEM bundle the cluster's certificate must chain to (``MESH_ES_CA``); unset, the
            system's trust store.
        es_index_prefix: prefix of the Elasticsearch index names (``MESH_MEMORY_ES_INDEX_PREFIX``).
        dims: embedding dimension (``MESH_MEMORY_EMBEDDING_DIMS``); changing it needs re-ingest.
        pg_table: table of the PostgreSQL backend (``MESH_MEMORY_PG_TABLE``).
        pg_text_config: full-text configuration, ``english`` (default) or ``simple``
            (``MESH_MEMORY_PG_TEXT_CONFIG``).
        pg_pool_size: most PostgreSQL connections (``MESH_MEMORY_PG_POOL_SIZE``).
    """

    env_prefix = "MESH_MEMORY_"

    backend: str = setting("BACKEND", "postgres", choices=BACKENDS)
    es_url: str = setting("MESH_ES_URL", "http://127.0.0.1:9200")
    es_user: str = setting("MESH_ES_USER", "")
    es_password: Secret = setting("MESH_ES_PASSWORD", Secret(""))
    es_ca: Path | None = setting("MESH_ES_CA", None)
    es_index_prefix: str = setting("ES_INDEX_PREFIX", "mesh-memory")
    dims: int = setting("EMBEDDING_DIMS", DEFAULT_DIMS, minimum=8)
    pg_table: str = setting("PG_TABLE", "memory_chunks")
    pg_text_config: str = setting("PG_TEXT_CONFIG", "english", choices=("simple", "english"))
    pg_pool_size: int = setting("PG_POOL_SIZE", 8, minimum=1)

    def check(self) -> None:
        super().check()
        if bool(self.es_user) != bool(self.es_password.reveal()):
            raise SettingsError(
                "MESH_ES_USER and MESH_ES_PASSWORD go together: set both or neither"
            )
        if self.es_ca is not None and not self.es_url.startswith("https://"):
            raise SettingsError(
                f"MESH_ES_CA is set but MESH_ES_URL={self.es_url!r} is not https://: "
                "the CA would never be used"
            )


class EmbeddedPostgresMemoryStore(PostgresMemoryStore):
    """A ``PostgresMemoryStore`` on the embedded PostgreSQL server, started with the store.

    Other services of the machine may share the server; ``stop`` leaves it running while
    they still use it (pgserver counts the processes attached to a data directory).
    """

    def __init__(self, data_dir: Path, **options: Any) -> None:
        # The server's DSN is known once it runs: start() sets it before the pool opens.
        super().__init__("", **options)
        self._data_dir = data_dir
        self._server: EmbeddedPostgres | None = None

    async def start(self) -> None:
        if self._server is None:
            server = EmbeddedPostgres(self._data_dir)
            # initdb and server start block for seconds; keep the event loop free meanwhile.
            self._dsn = await asyncio.to_thread(server.start)
            self._server = server
        try:
            await super().start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await super().stop()
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.stop)


def open_store(settings: StoreSettings) -> MemoryStore:
    """The configured store, not started yet: ``async with open_store(s) as store: ...``."""
    if settings.backend == "elasticsearch":
        from mesh.memory.elasticsearch import ElasticsearchMemoryStore

        es_store: MemoryStore = ElasticsearchMemoryStore(
            settings.es_url,
            index_prefix=settings.es_index_prefix,
            dims=settings.dims,
            username=settings.es_user,
            password=settings.es_password.reveal(),
            ca=settings.es_ca,
        )
        return es_store
    if settings.backend != "postgres":
        raise SettingsError(f"unknown memory backend {settings.backend!r}")
    options: dict[str, Any] = {
        "dims": settings.dims,
        "table": settings.pg_table,
        "text_config": settings.pg_text_config,
        "max_pool_size": settings.pg_pool_size,
    }
    dsn = settings.pg_dsn.reveal()
    if not dsn:
        return EmbeddedPostgresMemoryStore(settings.embedded_pg_dir, **options)
    return PostgresMemoryStore(dsn, **options)


__all__ = ["BACKENDS", "EmbeddedPostgresMemoryStore", "StoreSettings", "open_store"]

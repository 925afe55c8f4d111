"""Memory settings: defaults, parsing, and errors naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.memory.factory import EmbeddedPostgresMemoryStore, StoreSettings, open_store
from mesh.memory.postgres import PostgresMemoryStore
from mesh.settings import SettingsError
from services.memory.settings import MemorySettings


def test_defaults() -> None:
    settings = MemorySettings.from_env({})
    assert (settings.host, settings.port) == ("127.0.0.1", 50053)
    assert settings.metrics_port == 0
    assert settings.grace_s == 10.0
    assert settings.store.backend == "postgres"
    assert settings.store.pg_dsn.reveal() == ""
    assert settings.store.dims == 256
    assert settings.store.embedded_pg_dir == Path(".state").absolute() / "postgres"
    assert settings.chunking.max_words == 120 and settings.chunking.overlap_words == 30


def test_values_from_the_environment() -> None:
    settings = MemorySettings.from_env(
        {
            "MESH_MEMORY_HOST": "127.0.0.2",
            "MESH_MEMORY_PORT": "6000",
            "MESH_MEMORY_METRICS_PORT": "6001",
            "MESH_MEMORY_GRACE_S": "2.5",
            "MESH_PG_DSN": "postgresql://u:secret@db/mesh",
            "MESH_MEMORY_BACKEND": "Elasticsearch",
            "MESH_ES_URL": "http://es:9200",
            "MESH_MEMORY_EMBEDDING_DIMS": "128",
            "MESH_MEMORY_CHUNK_WORDS": "50",
            "MESH_MEMORY_CHUNK_OVERLAP_WORDS": "10",
            "MESH_MEMORY_MAX_TEXT_CHARS": "1000",
            "MESH_STATE_DIR": "/var/mesh",
        }
    )
    assert (settings.host, settings.port, settings.metrics_port) == ("127.0.0.2", 6000, 6001)
    assert settings.grace_s == 2.5
    assert settings.store.backend == "elasticsearch"
    assert settings.store.es_url == "http://es:9200"
    assert settings.store.dims == 128
    assert settings.store.embedded_pg_dir == Path("/var/mesh/postgres")
    assert (settings.chunking.max_words, settings.chunking.overlap_words) == (50, 10)
    assert settings.limits.max_text_chars == 1000
    # The DSN carries a password: it never shows in reprs.
    assert "secret" not in repr(settings)
    assert settings.store.pg_dsn.reveal() == "postgresql://u:secret@db/mesh"


def test_small_chunk_size_lowers_the_default_overlap() -> None:
    settings = MemorySettings.from_env({"MESH_MEMORY_CHUNK_WORDS": "10"})
    assert settings.chunking.overlap_words == 9


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        ({"MESH_MEMORY_BACKEND": "redis"}, "MESH_MEMORY_BACKEND"),
        ({"MESH_MEMORY_PORT": "http"}, "MESH_MEMORY_PORT"),
        ({"MESH_MEMORY_PORT": "-1"}, "MESH_MEMORY_PORT"),
        ({"MESH_MEMORY_GRACE_S": "-1"}, "MESH_MEMORY_GRACE_S"),
        ({"MESH_MEMORY_EMBEDDING_DIMS": "4"}, "MESH_MEMORY_EMBEDDING_DIMS"),
        (
            {"MESH_MEMORY_CHUNK_WORDS": "10", "MESH_MEMORY_CHUNK_OVERLAP_WORDS": "10"},
            "MESH_MEMORY_CHUNK_OVERLAP_WORDS",
        ),
        ({"MESH_MEMORY_PG_TEXT_CONFIG": "klingon"}, "MESH_MEMORY_PG_TEXT_CONFIG"),
    ],
)
def test_bad_values_name_the_variable(environ: dict[str, str], names: str) -> None:
    with pytest.raises(SettingsError, match=names):
        MemorySettings.from_env(environ)


def test_open_store_picks_the_backend_without_connecting() -> None:
    with_dsn = open_store(StoreSettings.from_env({"MESH_PG_DSN": "postgresql:///nowhere"}))
    assert isinstance(with_dsn, PostgresMemoryStore)
    embedded = open_store(StoreSettings.from_env({"MESH_STATE_DIR": "/tmp/x"}))
    assert isinstance(embedded, EmbeddedPostgresMemoryStore)


def test_elasticsearch_credentials_and_ca() -> None:
    env = {
        "MESH_MEMORY_BACKEND": "elasticsearch",
        "MESH_ES_URL": "https://es:9200",
        "MESH_ES_USER": "elastic",
        "MESH_ES_PASSWORD": "s3cret",
        "MESH_ES_CA": "/certs/ca.pem",
    }
    store = StoreSettings.from_env(env)
    assert (store.es_user, store.es_password.reveal(), store.es_ca) == (
        "elastic",
        "s3cret",
        Path("/certs/ca.pem"),
    )
    assert "s3cret" not in repr(store)
    assert StoreSettings.from_env(store.to_env()) == store
    with pytest.raises(SettingsError, match="go together"):
        StoreSettings.from_env({**env, "MESH_ES_PASSWORD": ""})
    with pytest.raises(SettingsError, match="not https"):
        StoreSettings.from_env({**env, "MESH_ES_URL": "http://es:9200"})

"""The settings model: one meaning per variable, validation in one place, and a round trip
through the environment for every settings class."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mesh import launcher
from mesh.log import LogSettings
from mesh.memory.chunking import ChunkingConfig
from mesh.memory.factory import StoreSettings
from mesh.settings import (
    PostgresSettings,
    Secret,
    ServiceSettings,
    Settings,
    SettingsError,
    default_state_dir,
)
from services.agent.settings import AgentSettings
from services.gateway.settings import GatewaySettings
from services.memory.settings import Limits, MemorySettings
from services.persister.settings import PersisterSettings

ROOT = Path(__file__).resolve().parents[2]
SERVICES: list[type[ServiceSettings]] = [
    GatewaySettings,
    AgentSettings,
    MemorySettings,
    PersisterSettings,
]
ALL: list[type[Settings]] = [*SERVICES, LogSettings, StoreSettings, Limits]
MESH_DEFAULTS = launcher.MeshConfig(
    state_dir=Path("s"), model_path=Path("m"), api_keys_file=Path("k")
)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    return path


def base_env(cls: type[Settings], model_file: Path) -> dict[str, str]:
    """The least environment ``cls`` needs (the agent requires its model)."""
    return {"MESH_AGENT_MODEL_PATH": str(model_file)} if cls is AgentSettings else {}


# -- defaults -------------------------------------------------------------------------------


def test_shared_service_fields_have_one_default_everywhere(model_file: Path) -> None:
    for cls in SERVICES:
        settings = cls.from_env(base_env(cls, model_file))
        assert (settings.host, settings.metrics_port) == ("127.0.0.1", 0), cls
        assert (settings.grace_s, settings.log_level) == (10.0, "INFO"), cls
    ports = [cls.from_env(base_env(cls, model_file)).port for cls in SERVICES]  # type: ignore[attr-defined]
    assert ports == [50051, 50052, 50053, 50054]


def test_defaults_from_the_environment_equal_defaults_in_code(tmp_path: Path) -> None:
    # One place for each default: the class, built in code, says what an empty environment does.
    for cls in (GatewaySettings, MemorySettings, PersisterSettings, LogSettings, Limits):
        assert cls.from_env({}) == cls(), cls
    assert MESH_DEFAULTS.partitions == LogSettings.default("partitions") == 4
    assert MESH_DEFAULTS.n_ctx == AgentSettings.default("n_ctx") == 2048
    assert MESH_DEFAULTS.agent_threads == AgentSettings.default("threads") == 2


def test_state_dir_places_every_derived_path(tmp_path: Path) -> None:
    env = {"MESH_STATE_DIR": str(tmp_path)}
    assert GatewaySettings.from_env(env).api_keys_file == tmp_path / "api-keys.json"
    assert LogSettings.from_env(env).path == tmp_path / "log" / "mesh-log.sqlite3"
    assert default_state_dir(env) == tmp_path
    # The embedded PostgreSQL: one directory whoever starts it.
    pg = tmp_path / "postgres"
    assert PersisterSettings.from_env(env).embedded_pg_dir == pg
    assert StoreSettings.from_env(env).embedded_pg_dir == pg
    assert launcher._embedded_pg_dir(tmp_path) == pg


def test_the_launcher_moves_an_old_embedded_postgres_once(tmp_path: Path) -> None:
    old = tmp_path / "pg"
    old.mkdir()
    (old / "PG_VERSION").write_text("16\n")
    assert launcher._embedded_pg_dir(tmp_path) == tmp_path / "postgres"
    assert not old.exists()
    assert (tmp_path / "postgres" / "PG_VERSION").read_text() == "16\n"
    # A running server stays where it is.
    running = tmp_path / "running"
    (running / "pg").mkdir(parents=True)
    (running / "pg" / "postmaster.pid").write_text("1\n")
    assert launcher._embedded_pg_dir(running) == running / "pg"


# -- one meaning per value ------------------------------------------------------------------


@pytest.mark.parametrize("cls", [AgentSettings, PersisterSettings])
def test_memory_addr_means_the_same_to_every_service(cls: type[Settings], model_file: Path) -> None:
    env = base_env(cls, model_file)
    assert cls.from_env(env).memory_addr == "127.0.0.1:50053"  # type: ignore[attr-defined]
    assert cls.from_env({**env, "MESH_MEMORY_ADDR": ""}).memory_addr == ""  # type: ignore[attr-defined]
    assert cls.from_env({**env, "MESH_MEMORY_ADDR": " m:1 "}).memory_addr == "m:1"  # type: ignore[attr-defined]


def test_persister_addr_means_the_same_to_every_service(model_file: Path) -> None:
    env = base_env(AgentSettings, model_file)
    assert AgentSettings.from_env(env).persister_addr == "127.0.0.1:50054"
    assert GatewaySettings.from_env({}).persister_addr == "127.0.0.1:50054"
    # Empty is "no persister": the agent goes without history, the gateway cannot run.
    assert AgentSettings.from_env({**env, "MESH_PERSISTER_ADDR": ""}).persister_addr == ""
    with pytest.raises(SettingsError, match="MESH_PERSISTER_ADDR is empty, but the gateway"):
        GatewaySettings.from_env({"MESH_PERSISTER_ADDR": ""})


@pytest.mark.parametrize("cls", SERVICES)
def test_metrics_port_minus_one_is_off_for_every_service(
    cls: type[ServiceSettings], model_file: Path
) -> None:
    prefix = cls.env_prefix
    env = base_env(cls, model_file)
    assert cls.from_env({**env, f"{prefix}METRICS_PORT": "-1"}).metrics_port == -1
    with pytest.raises(SettingsError, match=f"{prefix}METRICS_PORT=-2 must be >= -1"):
        cls.from_env({**env, f"{prefix}METRICS_PORT": "-2"})
    with pytest.raises(SettingsError, match=f"{prefix}PORT=-1 must be >= 0"):
        cls.from_env({**env, f"{prefix}PORT": "-1"})


def test_empty_means_unset_except_for_addresses(tmp_path: Path) -> None:
    env = {"MESH_GATEWAY_PORT": "", "MESH_LOG_PARTITIONS": "", "MESH_STATE_DIR": ""}
    assert GatewaySettings.from_env(env) == GatewaySettings.from_env({})


# -- validation in one place ----------------------------------------------------------------


def test_objects_built_in_code_are_validated_like_the_environment() -> None:
    with pytest.raises(SettingsError, match=r"^MESH_GATEWAY_PORT=70000 must be <= 65535$"):
        GatewaySettings(port=70000)
    with pytest.raises(SettingsError, match=r"^MESH_LOG_PARTITIONS=0 must be >= 1$"):
        LogSettings(partitions=0)
    with pytest.raises(SettingsError, match=r"^MESH_LOG_DRIVER='nats' must be one of"):
        LogSettings(driver="nats")
    with pytest.raises(SettingsError, match=r"^MESH_PERSISTER_BARRIER_TIMEOUT_S=0 must be > 0$"):
        PersisterSettings(barrier_timeout_s=0)
    with pytest.raises(SettingsError, match=r"^MESH_MEMORY_GRACE_S=-1 must be >= 0$"):
        MemorySettings(grace_s=-1)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"MESH_GATEWAY_RATE_PER_S": "fast"}, "MESH_GATEWAY_RATE_PER_S='fast' is not a number"),
        ({"MESH_GATEWAY_RATE_BURST": "1.5"}, "MESH_GATEWAY_RATE_BURST='1.5' is not an integer"),
        ({"MESH_GATEWAY_QUEUE_POLL_S": "0"}, "MESH_GATEWAY_QUEUE_POLL_S=0.0 must be > 0"),
        ({"MESH_LOG_WATCH_WRITES": "maybe"}, "MESH_LOG_WATCH_WRITES='maybe' is not a boolean"),
        ({"MESH_LOG_DRIVER": "kafka"}, "MESH_LOG_DRIVER=kafka needs MESH_KAFKA_BOOTSTRAP"),
    ],
)
def test_errors_name_the_variable_and_the_rule(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        GatewaySettings.from_env(environ)
    assert str(caught.value).startswith(message)


def test_required_and_cross_field_rules(model_file: Path) -> None:
    with pytest.raises(SettingsError, match=r"^MESH_AGENT_MODEL_PATH is required: the GGUF"):
        AgentSettings.from_env({})
    with pytest.raises(SettingsError, match="MESH_AGENT_DEFAULT_MAX_TOKENS=9 exceeds"):
        AgentSettings(model_path=model_file, default_max_tokens=9, max_tokens_limit=8)
    with pytest.raises(SettingsError, match="is not a file"):
        AgentSettings(model_path=model_file.parent / "missing.gguf")


# -- written back as environment ------------------------------------------------------------


def custom(cls: type[Settings], tmp_path: Path, model_file: Path) -> Settings:
    """An object of ``cls`` with non-default values wherever that is interesting."""
    log = LogSettings(
        driver="kafka",
        kafka_bootstrap="k1:9092,k2:9092",
        path=tmp_path / "log.sqlite3",
        partitions=7,
        session_timeout_s=4.5,
        watch_writes=False,
    )
    objects: dict[type[Settings], Settings] = {
        GatewaySettings: GatewaySettings(
            port=0, metrics_port=-1, rate_per_s=2.5, api_keys_file=tmp_path / "k.json", log=log
        ),
        AgentSettings: AgentSettings(
            model_path=model_file,
            agent_id="agent-9",
            seed=5,
            prompt_log=tmp_path / "p.jsonl",
            memory_addr="",
            persister_addr="p:1",
            worker=False,
            system_prompt=" be brief ",
            log=log,
        ),
        MemorySettings: MemorySettings(
            port=6000,
            store=StoreSettings(
                backend="elasticsearch",
                pg_dsn=Secret("postgresql://u:pw@db/m"),
                state_dir=tmp_path,
            ),
            chunking=ChunkingConfig(max_words=10, overlap_words=9),
            limits=Limits(max_id_chars=10),
        ),
        PersisterSettings: PersisterSettings(
            memory_addr="", pg_dsn=Secret("postgresql://u:pw@db/p"), state_dir=tmp_path, log=log
        ),
        LogSettings: log,
        StoreSettings: StoreSettings(pg_text_config="simple", dims=64),
        Limits: Limits(max_text_chars=5),
    }
    return objects[cls]


@pytest.mark.parametrize("cls", ALL)
def test_to_env_then_from_env_gives_the_same_settings(
    cls: type[Settings], tmp_path: Path, model_file: Path
) -> None:
    defaults = cls.from_env(base_env(cls, model_file))
    assert cls.from_env(defaults.to_env()) == defaults
    changed = custom(cls, tmp_path, model_file)
    assert changed != defaults
    env = changed.to_env()
    assert all(isinstance(value, str) for value in env.values())
    assert cls.from_env(env) == changed
    # Every variable the class reads is written, and nothing else.
    assert set(env) == set(cls.variables())


def test_to_env_reveals_secrets_that_reprs_hide(tmp_path: Path) -> None:
    settings = PersisterSettings(pg_dsn=Secret("postgresql://u:pw@db/p"))
    assert "pw" not in repr(settings)
    assert settings.to_env()["MESH_PG_DSN"] == "postgresql://u:pw@db/p"


def test_env_for_writes_only_the_named_fields() -> None:
    assert AgentSettings.env_for(port=0, agent_id="a-1") == {
        "MESH_AGENT_PORT": "0",
        "MESH_AGENT_ID": "a-1",
    }
    assert MemorySettings.env_for(metrics_port=-1) == {"MESH_MEMORY_METRICS_PORT": "-1"}
    assert PostgresSettings.env_for(state_dir=Path("/s")) == {"MESH_STATE_DIR": "/s"}
    assert AgentSettings.var("memory_addr") == "MESH_MEMORY_ADDR"
    with pytest.raises(AttributeError, match="has no setting 'prot'"):
        AgentSettings.env_for(prot=1)
    with pytest.raises(SettingsError, match="MESH_GATEWAY_PORT=-5 must be >= 0"):
        GatewaySettings.env_for(port=-5)


def test_the_launcher_spells_no_variable_itself(tmp_path: Path) -> None:
    config = launcher.MeshConfig(
        state_dir=tmp_path, model_path=tmp_path / "m.gguf", api_keys_file=tmp_path / "k.json"
    )
    env = launcher.Mesh(config).base_env()
    assert env["MESH_STATE_DIR"] == str(tmp_path)
    assert env["MESH_LOG_PATH"] == str(tmp_path / "log" / "mesh-log.sqlite3")
    assert env["MESH_AGENT_MODEL_PATH"] == str(tmp_path / "m.gguf")
    assert env["MESH_GATEWAY_API_KEYS_FILE"] == str(tmp_path / "k.json")
    source = (ROOT / "mesh" / "launcher.py").read_text()
    assert not re.search(r'"MESH_(AGENT|GATEWAY|MEMORY|PERSISTER|LOG|PG|ES|KAFKA|STATE)', source)


SHARED_SUFFIXES = ("HOST", "PORT", "METRICS_PORT", "GRACE_S", "LOG_LEVEL")


def test_docs_give_every_variable_its_meaning() -> None:
    table = (ROOT / "docs" / "protocol.md").read_text()
    for cls in ALL:
        for name in cls.variables():
            suffix = name.removeprefix(getattr(cls, "env_prefix", ""))
            shared = cls in SERVICES and suffix in SHARED_SUFFIXES
            documented = f"`MESH_<SERVICE>_{suffix}`" if shared else f"`{name}`"
            assert documented in table, f"{name} is not in docs/protocol.md"

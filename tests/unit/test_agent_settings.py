"""Agent settings from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.settings import SettingsError
from services.agent.settings import AgentSettings


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    return path


def test_defaults(model_file: Path) -> None:
    settings = AgentSettings.from_env({"MESH_AGENT_MODEL_PATH": str(model_file)})
    assert settings.model_path == model_file
    assert (settings.host, settings.port) == ("127.0.0.1", 50052)
    assert settings.gpu_layers == 0
    assert settings.n_ctx == 2048
    assert settings.threads == 2
    assert settings.default_max_tokens == 256
    assert settings.max_tokens_limit == 4096
    assert settings.recall_top_k == 4
    assert settings.worker is True
    assert settings.seed is None
    assert settings.memory_addr == "127.0.0.1:50053"
    assert settings.persister_addr == "127.0.0.1:50054"
    assert settings.agent_id  # hostname-pid
    assert settings.log.driver == "embedded"


def test_everything_from_the_environment(model_file: Path, tmp_path: Path) -> None:
    settings = AgentSettings.from_env(
        {
            "MESH_AGENT_MODEL_PATH": str(model_file),
            "MESH_AGENT_HOST": "127.0.0.2",
            "MESH_AGENT_PORT": "0",
            "MESH_AGENT_METRICS_PORT": "9999",
            "MESH_AGENT_GRACE_S": "2.5",
            "MESH_AGENT_ID": "agent-7",
            "MESH_AGENT_GPU_LAYERS": "-1",
            "MESH_AGENT_N_CTX": "4096",
            "MESH_AGENT_THREADS": "8",
            "MESH_AGENT_DEFAULT_MAX_TOKENS": "100",
            "MESH_AGENT_MAX_TOKENS_LIMIT": "1000",
            "MESH_AGENT_RECALL_TOP_K": "0",
            "MESH_AGENT_SEED": "5",
            "MESH_AGENT_WORKER": "false",
            "MESH_MEMORY_ADDR": "10.0.0.1:1",
            "MESH_PERSISTER_ADDR": "10.0.0.2:2",
            "MESH_LOG_PATH": str(tmp_path / "log.sqlite3"),
            "MESH_LOG_PARTITIONS": "2",
            "MESH_AGENT_MIN_TOKEN_INTERVAL_MS": "25",
        }
    )
    assert settings.host == "127.0.0.2" and settings.port == 0
    assert settings.metrics_port == 9999
    assert settings.grace_s == 2.5
    assert settings.agent_id == "agent-7"
    assert settings.gpu_layers == -1
    assert settings.n_ctx == 4096
    assert settings.threads == 8
    assert settings.default_max_tokens == 100
    assert settings.max_tokens_limit == 1000
    assert settings.recall_top_k == 0
    assert settings.seed == 5
    assert settings.worker is False
    assert settings.memory_addr == "10.0.0.1:1"
    assert settings.persister_addr == "10.0.0.2:2"
    assert settings.log.path == tmp_path / "log.sqlite3"
    assert settings.log.partitions == 2
    assert settings.min_token_interval_ms == 25.0


def test_empty_dependency_address_disables_it(model_file: Path) -> None:
    settings = AgentSettings.from_env(
        {
            "MESH_AGENT_MODEL_PATH": str(model_file),
            "MESH_MEMORY_ADDR": "",
            "MESH_PERSISTER_ADDR": "",
        }
    )
    assert settings.memory_addr == ""
    assert settings.persister_addr == ""


def test_model_path_is_required() -> None:
    with pytest.raises(SettingsError, match="MESH_AGENT_MODEL_PATH is required"):
        AgentSettings.from_env({})


def test_missing_model_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="is not a file"):
        AgentSettings.from_env({"MESH_AGENT_MODEL_PATH": str(tmp_path / "nope.gguf")})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MESH_AGENT_N_CTX", "abc"),
        ("MESH_AGENT_GRACE_S", "-1"),
        ("MESH_AGENT_TEMPERATURE", "3"),
        ("MESH_AGENT_TOP_P", "0"),
        ("MESH_AGENT_WORKER", "maybe"),
        ("MESH_AGENT_DEFAULT_MAX_TOKENS", "5000"),
        ("MESH_AGENT_THREADS", "0"),
        ("MESH_AGENT_MIN_TOKEN_INTERVAL_MS", "-5"),
        ("MESH_AGENT_MIN_TOKEN_INTERVAL_MS", "20000"),
    ],
)
def test_bad_values_name_the_variable(model_file: Path, name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        AgentSettings.from_env({"MESH_AGENT_MODEL_PATH": str(model_file), name: value})

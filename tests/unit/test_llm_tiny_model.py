"""The tiny GGUF model file: deterministic, small, cached."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mesh.llm.tiny_model import ensure_tiny_model, main, write_tiny_model


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_file_other_seed_other_file(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a.gguf", seed=1)
    b = write_tiny_model(tmp_path / "b.gguf", seed=1)
    c = write_tiny_model(tmp_path / "c.gguf", seed=2)
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)
    assert 300_000 < a.stat().st_size < 2_000_000
    assert a.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "c.gguf"]


def test_ensure_writes_once(tmp_path: Path) -> None:
    first = ensure_tiny_model(tmp_path)
    stamp = first.stat().st_mtime_ns
    second = ensure_tiny_model(tmp_path)
    assert second == first
    assert second.stat().st_mtime_ns == stamp


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(tmp_path / "cli.gguf"), "--seed", "3"])
    size = (tmp_path / "cli.gguf").stat().st_size
    assert capsys.readouterr().out.strip() == f"{tmp_path / 'cli.gguf'} ({size} bytes)"

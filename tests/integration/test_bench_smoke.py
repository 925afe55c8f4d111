"""``python -m bench --quick`` runs every row end to end, so the harness cannot rot.

It starts real servers (PostgreSQL, the mesh's processes, a gateway, llama.cpp with the tiny
model), hence ``integration``. It checks the shape of the results, never their values: timings
on a shared CI machine are not something a test can assert.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROWS = ("ttft", "throughput", "http", "relay", "log", "persistence", "recall", "batching")
VERDICTS = {"PASS", "MISS", "n/a"}

pytestmark = pytest.mark.integration


def _run_bench(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), str(ROOT / "gen" / "python"), os.environ.get("PYTHONPATH")) if p
        ),
    }
    return subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--quiet", "--out", str(out), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.timeout(300)
def test_quick_run_reports_every_row_with_numbers(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = _run_bench(out)
    assert result.returncode == 0, f"bench failed:\n{result.stdout}\n{result.stderr[-6000:]}"
    data = json.loads(out.read_text())

    assert data["errors"] == {}
    assert data["quick"] is True
    assert data["machine"]["cpus"] >= 1
    for key in ("min", "mean", "max"):
        assert isinstance(data["load_average_1m"][key], float)

    by_row: dict[str, list[dict[str, object]]] = {}
    for row in data["rows"]:
        by_row.setdefault(str(row["row"]), []).append(row)
    assert sorted(by_row) == sorted(ROWS)
    # Relay and recall have one line per level of their quick sizes.
    assert len(by_row["relay"]) == 2
    assert len(by_row["recall"]) == 2
    for row in data["rows"]:
        assert row["verdict"] in VERDICTS, row
        metrics = row["metrics"]
        assert isinstance(metrics, dict) and metrics, row
        for name, value in metrics.items():
            assert isinstance(value, int | float) and not isinstance(value, bool), (name, row)
            assert math.isfinite(value), (name, row)

    ttft = by_row["ttft"][0]["metrics"]
    assert isinstance(ttft, dict)
    # The same seed and prompt on both sides: the mesh must return the direct call's text.
    assert ttft["identical_outputs"] == ttft["runs"]

    # The table printed on stdout has one line per row, plus a header and a rule.
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(table) == len(data["rows"]) + 2


@pytest.mark.timeout(120)
def test_only_selects_rows(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = _run_bench(out, "--only", "persistence")
    assert result.returncode == 0, f"bench failed:\n{result.stdout}\n{result.stderr[-6000:]}"
    data = json.loads(out.read_text())
    assert data["selected"] == ["persistence"]
    assert [row["row"] for row in data["rows"]] == ["persistence"]

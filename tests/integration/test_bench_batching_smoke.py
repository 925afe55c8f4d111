"""``python -m bench --quick --only batching`` runs end to end on the tiny model.

The llama-server side is a benchmark peer that is built once per machine
(``python -m bench.llama_server build``, minutes of compiling) and never in CI, so this test
points the row at a binary that does not exist: the row must then say so in the table instead
of failing or leaving the anchor out silently. The engine and mesh sides run for real.
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

pytestmark = pytest.mark.integration


@pytest.mark.timeout(300)
def test_quick_batching_row_reports_sides_and_a_missing_anchor(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), str(ROOT / "gen" / "python"), os.environ.get("PYTHONPATH")) if p
        ),
        "MESH_BENCH_LLAMA_SERVER": str(tmp_path / "no-llama-server"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--quiet", "--only", "batching"]
        + ["--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, f"bench failed:\n{result.stdout}\n{result.stderr[-6000:]}"
    data = json.loads(out.read_text())
    assert data["errors"] == {}
    rows = data["rows"]
    assert {row["row"] for row in rows} == {"batching"}
    variants = [str(row["variant"]) for row in rows]
    # Quick sizes: N = 1 and 2, engine and mesh each, then the single-stream, anchor and
    # multi-turn lines.
    for n in (1, 2):
        for side in ("engine", "mesh"):
            assert any(v.startswith(f"N={n} {side}") for v in variants), variants
    assert any(v.startswith("single stream") for v in variants), variants
    assert any(v.startswith("multi-turn") for v in variants), variants
    anchor = next(row for row in rows if str(row["variant"]).startswith("llama-server"))
    assert "llama-server not built: run python -m bench.llama_server build" in anchor["baseline"]
    assert "llama-server not built" in result.stdout  # visible in the printed table
    for row in rows:
        assert row["verdict"] in {"PASS", "MISS", "n/a"}, row
        for name, value in row["metrics"].items():
            assert isinstance(value, int | float) and not isinstance(value, bool), (name, row)
            assert math.isfinite(value), (name, row)
        if str(row["variant"]).startswith("N="):
            assert row["metrics"][f"{row['variant'].split()[1]}_tokens"] > 0, row

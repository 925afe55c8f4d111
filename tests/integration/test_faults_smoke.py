"""The smoke subset of the fault suite (`make faults`, bench/faults.py): one agent SIGKILL mid-turn
and a burst of malformed calls, through the launcher users run. Nothing may be lost, duplicated
or persisted differently, and the suite's own failure checks must be able to fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.faults import FaultResult, Followed, Outcome, judge, table

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


@pytest.mark.timeout(420)
def test_an_agent_kill_and_malformed_calls_lose_nothing(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), str(ROOT / "gen" / "python"), os.environ.get("PYTHONPATH")) if p
        ),
    }
    command = [sys.executable, "-m", "bench.faults", "--only", "agent-kill", "--only", "malformed"]
    command += ["--runs", "1", "--frames", "60", "--json", str(out)]
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, check=False
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-4000:]}"
    rows = {row["fault"]: row for row in json.loads(out.read_text())["rows"]}
    kill = rows["agent-kill"]
    assert kill["runs"] == 1
    assert (kill["turns_lost"], kill["tokens_lost"], kill["tokens_duplicated"]) == (0, 0, 0)
    assert kill["persisted_differs"] == 0
    assert kill["recovery_p50_s"] > 0, kill  # the kill landed mid-turn and was timed
    assert rows["malformed"]["notes"] == ["60 frames, 0 hung, restarted: none"]


def test_the_judgement_counts_gaps_repeats_and_unfinished_turns() -> None:
    # A turn that never finished needs no look at PostgreSQL: no mesh is involved.
    outcome = judge(None, Followed(seqs=[1, 2, 2, 4]), Outcome())  # type: ignore[arg-type]
    assert (outcome.finished, outcome.lost, outcome.duplicated) == (False, 1, 1)
    row = FaultResult("agent-kill", [outcome]).row()
    assert (row["turns_lost"], row["tokens_lost"], row["tokens_duplicated"]) == (1, 1, 1)
    report = {
        "machine": {"cpu_model": "cpu", "cpus": 2, "memory_gib": 1.0},
        "load_average": (1.0, 1.0, 1.0),
        "seconds": 1.0,
        "rows": [row],
    }
    assert "| agent-kill | 1 | 1 | 1 | 1 | 0 |" in table(report)

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
    # One agent, as the smoke subset always ran: a second would double the engines on the CI.
    command += ["--runs", "1", "--frames", "60", "--agents", "1", "--json", str(out)]
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
    (note,) = rows["malformed"]["notes"]
    clean = "60 frames, 0 hung, 0 UNKNOWN/INTERNAL, 0 leaking, restarted: none"
    assert note.startswith(clean), note
    assert rows["malformed"]["failed_calls"] == 0

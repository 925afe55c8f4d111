"""The fault suite's judgement and report (bench/faults.py), without a mesh."""

from __future__ import annotations

from bench.faults import FaultResult, Followed, Outcome, judge, table


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
        "interrupted": False,
        "options": {"agents": 2, "outage_s": 60.0},
        "rows": [row],
    }
    assert "| agent-kill | embedded | 1 | 1 | 1 | 1 | 0 | 0 |" in table(report)

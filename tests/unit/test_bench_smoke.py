"""The benchmark harness's pure parts: statistics, argument parsing, the table.

The end-to-end run of ``python -m bench --quick`` is tests/integration/test_bench_smoke.py.
"""

from __future__ import annotations

import math

import pytest

from bench.__main__ import ROWS, parse_args, render_table
from bench.common import MISS, PASS, Row, p50_p99, percentile, verdict


def test_percentile_interpolates_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_p50_p99_ignore_input_order() -> None:
    assert p50_p99([3.0, 1.0, 2.0]) == p50_p99([1.0, 2.0, 3.0]) == (2.0, pytest.approx(2.98))


def test_verdict() -> None:
    assert verdict(True) == PASS
    assert verdict(False) == MISS


def test_args_select_rows_and_sizes() -> None:
    args = parse_args(
        [
            "--quick",
            "--only",
            "relay,log",
            "--only",
            "recall",
            "--recall-sizes",
            "10_000,100000",
            "--relay-streams",
            "1,100",
        ]
    )
    assert args.quick
    assert [n for group in args.only for n in group] == ["relay", "log", "recall"]
    assert args.recall_sizes == [10_000, 100_000]
    assert args.relay_streams == [1, 100]
    assert parse_args([]).only is None
    assert set(ROWS) == {
        "ttft",
        "throughput",
        "http",
        "relay",
        "log",
        "persistence",
        "recall",
        "batching",
    }


@pytest.mark.parametrize(
    "argv", [["--only", "nope"], ["--recall-sizes", "0"], ["--relay-streams", "a,b"]]
)
def test_bad_args_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_table_has_a_line_per_row_and_escapes_pipes() -> None:
    row = Row("log", "embedded log", "pipe 1 ms", "log 2 | 3 ms", "+1 ms", "none", "n/a")
    lines = render_table([row, row]).splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| row | variant |")
    assert "log 2 / 3 ms" in lines[2]
    assert lines[2].count("|") == 8

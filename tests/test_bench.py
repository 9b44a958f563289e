"""A smoke run of the benchmarks, so they never rot; the goals are checked by `make bench`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"
FIGURES = (
    "launch: gpurun -g 1 -c 1 -- true",
    "gpurun ps /",
    "gpurun status /",
    "gpurun ps -a /",
    "contention: 10 launches at once",
    "contention: longest wait",
    "footprint:",
    "hand-off, one waiting",
    "hand-off, five waiting",
)


def test_quick_bench_prints_every_figure():
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=300
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["FIGURE", "VALUE", "GOAL", "MET"]
    for figure in FIGURES:
        [row] = [line for line in lines if line.startswith(figure)]
        assert "median" in row and row.rstrip().endswith("-"), row

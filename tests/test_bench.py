"""A smoke run of the benchmarks, so they never rot; the goals are checked by `make bench`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"


def test_quick_bench_prints_every_figure():
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["FIGURE", "VALUE", "GOAL", "MET"]
    handoff = [line for line in lines if line.startswith("hand-off, one waiting")]
    assert len(handoff) == 1 and "median" in handoff[0] and "p99" in handoff[0]

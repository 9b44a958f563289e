"""The small stress run of `make test`: the same driver and checker as `make stress`."""

from __future__ import annotations

import subprocess
import sys

from conftest import HERE


def test_a_small_stress_run_breaks_no_invariant():
    result = subprocess.run(
        [sys.executable, str(HERE / "stress.py"), "--jobs", "50", "--seconds", "14"],
        capture_output=True,
        text=True,
        timeout=110,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "verdict: PASS" in result.stdout
    assert "jobs started" in result.stdout

"""What every figure shares: a private state dir and config, timing and summary statistics."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

GPURUN = str(Path(sys.executable).with_name("gpurun"))
SERVER = "bench"
# The interpreter alone, the yardstick of every ratio: the same one gpurun runs on.
BASELINE = [sys.executable, "-c", "pass"]


class Figure(NamedTuple):
    name: str
    value: str
    goal: str
    met: bool | None  # None when the goal was not checked


class Bench:
    """A private state dir and config, and helpers to run gpurun against them."""

    def __init__(self, root: Path, gpus: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.state_dir = root / "state"
        self.config = root / "gpurun.yaml"
        self.config.write_text(
            f"state_dir: {self.state_dir}\ngpus: {gpus}\ncpus: auto\nlock_timeout: 30\n"
        )
        self.env = dict(
            os.environ,
            GPURUN_CONFIG=str(self.config),
            GPURUN_SERVER=SERVER,
            XDG_CACHE_HOME=str(root / "cache"),
        )
        self.env.pop("GPURUN_STATE_DIR", None)

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [GPURUN, *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

    def leases(self) -> list[dict]:
        try:
            with open(self.state_dir / f"{SERVER}.json") as f:
                return json.load(f)["leases"]
        except (OSError, ValueError):
            return []

    def history(self) -> list[dict]:
        try:
            with open(self.state_dir / f"{SERVER}.history.jsonl") as f:
                return [json.loads(line) for line in f]
        except FileNotFoundError:
            return []

    def wait_until(self, predicate: Callable[[list[dict]], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while not predicate(self.leases()):
            if time.monotonic() > deadline:
                sys.exit(f"bench: timed out waiting for {what}")
            time.sleep(0.002)


def wall(argv: list[str], env: dict[str, str]) -> float:
    """Seconds from starting `argv` to its exit; the bench stops if it fails."""
    began = time.perf_counter()
    result = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    took = time.perf_counter() - began
    if result.returncode != 0:
        sys.exit(f"bench: {' '.join(argv)} exited {result.returncode}: {result.stderr[-300:]!r}")
    return took


def interleaved(
    commands: dict[str, list[str]], env: dict[str, str], rounds: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Wall times of each command, run in turn every round, so a load that comes and goes on
    the machine weighs on all of them alike; the order flips every round."""
    names = list(commands)
    for _ in range(warmup):
        for name in names:
            wall(commands[name], env)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names if i % 2 == 0 else reversed(names):
            samples[name].append(wall(commands[name], env))
    return samples


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def ratio_figure(
    name: str, times: list[float], baseline: list[float], goal: float | None, checked: bool
) -> Figure:
    """A figure for `times` over `baseline`, taken in the same rounds: the median of the
    round-by-round ratios, their middle half, and both medians in milliseconds."""
    ratios = [t / b for t, b in zip(times, baseline, strict=True)]
    median = statistics.median(ratios)
    value = (
        f"median {median:.2f} (p25-p75 {percentile(ratios, 0.25):.2f}-"
        f"{percentile(ratios, 0.75):.2f}); {statistics.median(times) * 1000:.1f} ms vs "
        f"{statistics.median(baseline) * 1000:.1f} ms, {len(ratios)} runs"
    )
    return Figure(
        name,
        value,
        "(informative)" if goal is None else f"<= {goal:.1f}",
        median <= goal if checked and goal is not None else None,
    )

"""gpurun's benchmarks: measure each figure, compare it with its goal, print one table.

    python bench/run.py            # the full run (`make bench`)
    python bench/run.py --quick    # small sizes, goals not checked (run inside `make test`)

Every figure runs the real CLI against a private state dir and fake GPUs declared in a
temporary config, so it needs no GPU and touches no shared state.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

GPURUN = str(Path(sys.executable).with_name("gpurun"))
SERVER = "bench"


class Figure(NamedTuple):
    name: str
    value: str
    goal: str
    met: bool | None  # None when the goal was not checked


class Bench:
    """A private state dir and config, and helpers to run gpurun against them."""

    def __init__(self, root: Path, gpus: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.state_dir = root / "state"
        self.config = root / "gpurun.yaml"
        self.config.write_text(
            f"state_dir: {self.state_dir}\ngpus: {gpus}\ncpus: auto\nlock_timeout: 30\n"
        )
        self.env = dict(os.environ, GPURUN_CONFIG=str(self.config), GPURUN_SERVER=SERVER)
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

    def wait_until(self, predicate: Callable[[list[dict]], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while not predicate(self.leases()):
            if time.monotonic() > deadline:
                sys.exit(f"bench: timed out waiting for {what}")
            time.sleep(0.002)


def measure_handoff(root: Path, rounds: int, waiting: int) -> list[float]:
    """Milliseconds from the end of a job to the start of the next waiting job's command.

    One GPU; job A holds it and waits for a go file; B (and `waiting - 1` more behind it) queue
    for the GPU. Once all are queued the go file is created: A prints the time and exits, and B
    runs `date`, which prints the time it started. The difference is the hand-off, including
    A's shell exit, gpurun noticing it, freeing the lease, B learning of it and spawning `date`.
    """
    bench = Bench(root, gpus=1)
    go = root / "go"
    samples = []

    for _ in range(rounds):
        go.unlink(missing_ok=True)
        first = bench.start(
            "-g", "1", "-c", "1", "--",
            "sh", "-c", f'while [ ! -e "{go}" ]; do sleep 0.002; done; date +%s%N',
        )  # fmt: skip
        bench.wait_until(lambda ls: any(x["state"] == "running" for x in ls), "the first job")
        queued = [bench.start("-g", "1", "-c", "1", "--", "date", "+%s%N") for _ in range(waiting)]
        bench.wait_until(
            lambda ls: sum(x["state"] == "waiting" for x in ls) == waiting, "the waiting jobs"
        )

        go.touch()
        ended = int(first.communicate()[0])
        started = int(queued[0].communicate()[0])
        for proc in queued[1:]:
            proc.communicate()
        if started < ended:
            sys.exit(f"bench: a waiting job started {ended - started} ns before the GPU was freed")
        samples.append((started - ended) / 1e6)

    return samples


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def handoff_figures(root: Path, quick: bool) -> list[Figure]:
    rounds = 5 if quick else 60
    figures = []
    for waiting, label in ((1, "one waiting"), (5, "five waiting")):
        samples = measure_handoff(root / f"handoff-{waiting}", rounds, waiting)
        median = statistics.median(samples)
        p99 = percentile(samples, 0.99)
        checked = not quick and waiting == 1
        figures.append(
            Figure(
                f"hand-off, {label} (ms, {len(samples)} runs)",
                f"median {median:.1f}, p99 {p99:.1f}, max {max(samples):.1f}",
                "median < 50, p99 < 200" if waiting == 1 else "(informative)",
                (median < 50 and p99 < 200) if checked else None,
            )
        )
    return figures


def slurm_overhead_figures(root: Path, quick: bool) -> list[Figure]:
    """`gpurun --backend slurm -g 1 -- true` over bare `srun --gres=gpu:1 true`, interleaved in
    the same run so both see the same cluster load; skipped when no Slurm answers."""
    import shutil

    name = "Slurm launch overhead: gpurun --backend slurm / bare srun (median)"
    probe = None
    if shutil.which("srun") and shutil.which("sinfo"):
        probe = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True)
    if probe is None or probe.returncode != 0 or "gpu" not in probe.stdout:
        return [
            Figure(name, "skipped: no Slurm cluster with GPUs (tests/slurm/setup)", "<= 1.3", None)
        ]
    bench = Bench(root, gpus=1)
    commands = {
        "gpurun": [GPURUN, "--backend", "slurm", "-g", "1", "--", "true"],
        "srun": ["srun", "--gres=gpu:1", "true"],
    }
    samples: dict[str, list[float]] = {"gpurun": [], "srun": []}
    for _ in range(3 if quick else 20):
        for label, argv in commands.items():
            started = time.perf_counter()
            done = subprocess.run(argv, env=bench.env, capture_output=True, check=False)
            samples[label].append(time.perf_counter() - started)
            if done.returncode != 0:
                sys.exit(f"bench: {argv[0]} failed: {done.stderr.decode(errors='replace')}")
    ours, bare = statistics.median(samples["gpurun"]), statistics.median(samples["srun"])
    ratio = ours / bare
    value = f"{ratio:.2f} ({ours * 1000:.0f} ms / {bare * 1000:.0f} ms)"
    return [Figure(name, value, "<= 1.3", None if quick else ratio <= 1.3)]


def print_table(figures: list[Figure]) -> None:
    rows = [("FIGURE", "VALUE", "GOAL", "MET")]
    for figure in figures:
        met = "-" if figure.met is None else ("yes" if figure.met else "NO")
        rows.append((figure.name, figure.value, figure.goal, met))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, goals not checked")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="gpurun-bench-") as tmp:
        figures = handoff_figures(Path(tmp), args.quick)
        figures += slurm_overhead_figures(Path(tmp) / "slurm", args.quick)

    print_table(figures)
    return 0 if all(figure.met is not False for figure in figures) else 1


if __name__ == "__main__":
    sys.exit(main())

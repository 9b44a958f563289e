"""Figure 5: the queue's hand-off, from the end of one job to the start of the next one."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from common import Bench, Figure, percentile


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

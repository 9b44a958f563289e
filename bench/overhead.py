"""Figures 1, 3 and 4: what gpurun adds to a launch, alone, in a crowd, and in memory."""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import BASELINE, GPURUN, Bench, Figure, interleaved, ratio_figure
from views import write_history

LAUNCH = [GPURUN, "-g", "1", "-c", "1", "--", "true"]
CROWD_LAUNCH = [GPURUN, "-g", "1", "--", "true"]  # in a row; the crowd names each launch
MEGABYTE = 1024 * 1024


def launch_figure(root: Path, quick: bool) -> Figure:
    """Figure 1: `gpurun -g 1 -c 1 -- true` over the bare interpreter, on 8 GPUs.

    The server has a long history (100,000 finished jobs), which a launch must never read.
    """
    bench = Bench(root, gpus=8)
    write_history(bench, 1000 if quick else 100_000)
    samples = interleaved({"python": BASELINE, "gpurun": LAUNCH}, bench.env, 5 if quick else 60)
    return ratio_figure(
        "launch: gpurun -g 1 -c 1 -- true / python -c pass",
        samples["gpurun"],
        samples["python"],
        2.0,
        not quick,
    )


def crowd(bench: Bench, count: int) -> tuple[float, float]:
    """Start `count` launches at once; return the seconds until all ended, and the longest
    wait of one launch: from the moment it was started to its command's start (its history
    record's `started`), whatever held it up (the lock, the queue, the CPUs)."""
    seen = {record["id"] for record in bench.history()}
    began = time.perf_counter()
    procs, spawned = [], {}
    for i in range(count):
        spawned[f"crowd-{i}"] = time.time()
        procs.append(
            subprocess.Popen(
                [GPURUN, "-g", "1", "-n", f"crowd-{i}", "--", "true"],
                env=bench.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"bench: a crowded launch exited {proc.returncode}: {err[-300:]!r}")
    took = time.perf_counter() - began
    records = [record for record in bench.history() if record["id"] not in seen]
    if len(records) != count or any(record["state"] != "exited" for record in records):
        sys.exit(f"bench: {count} crowded launches left {len(records)} finished jobs")
    return took, max(record["started"] - spawned[record["name"]] for record in records)


def in_a_row(bench: Bench, count: int) -> float:
    began = time.perf_counter()
    for _ in range(count):
        subprocess.run(CROWD_LAUNCH, env=bench.env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - began


def contention_figures(root: Path, quick: bool) -> list[Figure]:
    """Figure 3: 100 launches at once on 8 GPUs against 100 one after another."""
    count, rounds = (10, 2) if quick else (100, 7)
    bench = Bench(root, gpus=8)
    crowded, waits, sequential = [], [], []
    for i in range(rounds):
        if i % 2:
            sequential.append(in_a_row(bench, count))
        took, wait = crowd(bench, count)
        crowded.append(took)
        waits.append(wait)
        if not i % 2:
            sequential.append(in_a_row(bench, count))
    ratio = ratio_figure(
        f"contention: {count} launches at once / {count} in a row (8 GPUs)",
        crowded,
        sequential,
        1.0,
        not quick,
    )
    longest = max(waits)
    wait = Figure(
        f"contention: longest wait of a launch among {count} at once (s)",
        f"max {longest:.2f}, median of rounds {statistics.median(waits):.2f}, {rounds} rounds",
        "<= 2.0",
        longest <= 2.0 if not quick else None,
    )
    return [ratio, wait]


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def footprint_figure(root: Path, quick: bool) -> Figure:
    """Figure 4: resident memory of the supervising gpurun while its command runs."""
    bench = Bench(root, gpus=8)
    sizes = []
    for _ in range(2 if quick else 7):
        proc = bench.start("-g", "1", "-c", "1", "--", "sleep", "60")
        bench.wait_until(
            lambda ls: any(len(x["holders"]) == 2 for x in ls), "the command's pid in the ledger"
        )
        sizes.append(resident_bytes(proc.pid) / MEGABYTE)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    return Figure(
        "footprint: resident memory of the waiting gpurun (MB)",
        f"median {statistics.median(sizes):.1f}, max {max(sizes):.1f}, {len(sizes)} runs",
        "<= 25",
        max(sizes) <= 25 if not quick else None,
    )

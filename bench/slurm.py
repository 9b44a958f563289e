"""The Slurm backend's launch overhead, beside bare srun on the same cluster."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import GPURUN, Bench, Figure


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

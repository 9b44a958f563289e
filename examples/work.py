"""A stand-in training job for `make demo`: report what gpurun gave it, then burn CPU."""

import os
import sys
import time

name = sys.argv[1] if len(sys.argv) > 1 else "job"
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
print(
    f"[{name}] job {os.environ.get('GPURUN_JOB_ID')}: "
    f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} "
    f"CPU affinity={sorted(os.sched_getaffinity(0))} "
    f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
    flush=True,
)
deadline = time.monotonic() + seconds
steps = 0
while time.monotonic() < deadline:
    sum(i * i for i in range(10_000))
    steps += 1
print(f"[{name}] done: {steps} steps of real work in {seconds:g} s", flush=True)

"""A job for the tests: records what gpurun gave it, then does what its options say.

python probe.py OUT [--sleep S] [--wait-for FILE] [--exit N] [--ignore-term]
                    [--grandchild PIDFILE] [--read-line]

Writes OUT.start (JSON: pid, environment, CPU affinity, time) when it starts, and OUT.end
when it ends normally or by SIGTERM/SIGINT (with the signal it got). The tests wait for these
files instead of sleeping.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time


def write(path: str, record: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.rename(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--wait-for")
    parser.add_argument("--exit", type=int, default=0)
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--grandchild")
    parser.add_argument("--read-line", action="store_true")
    args = parser.parse_args()

    signals_seen: list[str] = []

    def on_signal(signum: int, frame: object) -> None:
        signals_seen.append(signal.Signals(signum).name)
        write(args.out + ".signals", {"signals": signals_seen})
        if args.ignore_term:
            return
        write(args.out + ".end", {"time": time.time(), "signal": signal.Signals(signum).name})
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.grandchild:
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import signal, time; "
                "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)",
            ],
            start_new_session=True,
        )
        with open(args.grandchild, "w") as f:
            f.write(str(child.pid))
    keys = (
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "GPURUN_JOB_ID",
        "GPURUN_GPUS",
        "GPURUN_CPUS",
        "OMP_NUM_THREADS",
    )
    write(
        args.out + ".start",
        {
            "pid": os.getpid(),
            "time": time.time(),
            "env": {k: os.environ.get(k) for k in keys},
            "affinity": sorted(os.sched_getaffinity(0)),
        },
    )
    if args.read_line:
        line = sys.stdin.readline()
        write(args.out + ".line", {"line": line})
    if args.wait_for:
        while not os.path.exists(args.wait_for):
            time.sleep(0.01)
    if args.sleep:
        time.sleep(args.sleep)
    write(args.out + ".end", {"time": time.time(), "signal": None})
    return args.exit


if __name__ == "__main__":
    sys.exit(main())

"""The job of the stress run: records what gpurun gave it, and who else was on it.

python stress_job.py OUTDIR SECONDS EXIT

At its start, for each GPU and CPU it was given, it takes that id's mark lock, reads the mark
(the job that last started on the id, with its pid and start time), notes a conflict if that
process is still alive, and writes itself as the mark. A conflict is a fact observed at one
instant: two live processes held the same GPU or CPU. It then writes OUTDIR/ID.start, sleeps,
writes OUTDIR/ID.end (also on SIGTERM, then exits 143) and exits with EXIT.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time


def start_time(pid: int) -> int | None:
    """Clock ticks since boot at which `pid` started; None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    return None if fields[0] in (b"Z", b"X") else int(fields[19])


def write(path: str, record: dict) -> None:
    tmp = f"{path}.{os.getpid()}.part"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.rename(tmp, path)


def ids(text: str | None) -> list[int]:
    """The ids of a cpulist or comma list like '0-2,5'."""
    found: list[int] = []
    for part in (text or "").split(","):
        if "-" in part:
            low, high = part.split("-")
            found.extend(range(int(low), int(high) + 1))
        elif part:
            found.append(int(part))
    return found


def main() -> int:
    out, seconds, code = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    job = int(os.environ["GPURUN_JOB_ID"])
    me = {"job": job, "pid": os.getpid(), "start": start_time(os.getpid()), "ppid": os.getppid()}
    gpus = ids(os.environ.get("CUDA_VISIBLE_DEVICES"))
    cpus = ids(os.environ.get("GPURUN_CPUS"))

    conflicts = []
    marks = os.path.join(out, "marks")
    for resource in [f"gpu{g}" for g in gpus] + [f"cpu{c}" for c in cpus]:
        mark = os.path.join(marks, resource)
        fd = os.open(mark + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                with open(mark) as f:
                    last = json.load(f)
            except FileNotFoundError:
                last = None
            if last and last["start"] is not None and start_time(last["pid"]) == last["start"]:
                conflicts.append({"resource": resource, "job": last["job"], "pid": last["pid"]})
            write(mark, me)
        finally:
            os.close(fd)

    def on_term(signum: int, frame: object) -> None:
        write(os.path.join(out, f"{job}.end"), {"time": time.time(), "signal": "SIGTERM"})
        os._exit(143)

    signal.signal(signal.SIGTERM, on_term)
    write(
        os.path.join(out, f"{job}.start"),
        {**me, "time": time.time(), "gpus": gpus, "cpus": cpus, "conflicts": conflicts},
    )
    time.sleep(seconds)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    write(os.path.join(out, f"{job}.end"), {"time": time.time(), "signal": None})
    return code


if __name__ == "__main__":
    sys.exit(main())

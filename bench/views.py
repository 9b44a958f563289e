"""Figure 2: `gpurun ps` and `gpurun status` on a busy server with a long history.

The state is built the way gpurun itself writes it, through its ledger module:

- 1,000 live job leases (8 of them on a GPU each, the rest CPU-only jobs run with `-c 0`),
  each held by a real sleeping process: its pid and start time are the lease's holder, and it
  holds the lease's job lock, taken as gpurun takes it and inherited as a job inherits it.
  Those are what `ps` and `status` judge a job lease by (liveness.lease_alive), exactly as
  for a job whose gpurun runs. Reservations would be cheaper and not representative (they
  are live by the clock alone), and 1,000 real supervising gpuruns would take gigabytes of
  memory on a small machine while making those two commands read the same things.
- 100,000 finished jobs in the history file, records as gpurun appends them.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from common import BASELINE, GPURUN, SERVER, Bench, Figure, interleaved, ratio_figure

from gpurun.launch import finished_record
from gpurun.ledger import Holder, Lease, Ledger, Request
from gpurun.liveness import boot_id, lock_job, process_start


def job_lease(lease_id: int, pid: int, gpus: tuple[int, ...], now: float) -> Lease:
    return Lease(
        id=lease_id,
        kind="job",
        state="running",
        name=f"eval-{lease_id}",
        user="bench",
        uid=0,
        host="bench-host",
        gpus=gpus,
        cpus=(),
        command=("python", "eval.py", "--ckpt", f"step-{lease_id}.pt"),
        created=now - 60,
        started=now - 59,
        holders=(Holder(pid, process_start(pid), "gpurun"),) if pid else (),
        boot=boot_id(),
        expires=None,
        request=Request(len(gpus), 0, None),
        priority=0,
        time_limit=None,
        after=(),
        after_any=False,
        log=None,
        placed=now - 60,
        reservation=None,
    )


def write_history(bench: Bench, count: int) -> None:
    """Append `count` finished jobs, ids 1 to count, as gpurun records them."""
    ledger = Ledger(str(bench.state_dir), SERVER, named=True)
    ledger.ensure_dirs()
    now = time.time()
    template = job_lease(0, 0, (0,), now - 86400)
    for first in range(1, count + 1, 10_000):
        records = []
        for lease_id in range(first, min(first + 10_000, count + 1)):
            record = finished_record(template, SERVER, now - 86400 + lease_id, 0, "exited")
            record["id"] = lease_id
            records.append(record)
        ledger.append_history(records)
    with ledger.transaction() as state:
        state.next_id = max(state.next_id, count + 1)
        state.changed = True


def busy_server(bench: Bench, leases: int, history: int) -> list[subprocess.Popen]:
    """Write the state described above; return the sleeping holders (the caller ends them)."""
    write_history(bench, history)
    ledger = Ledger(str(bench.state_dir), SERVER, named=True)
    sleepers = []
    try:
        with ledger.transaction() as state:
            now = time.time()
            for i in range(leases):
                lease_id = state.take_id()
                lock = lock_job(ledger.job_lock_path(lease_id))
                sleepers.append(subprocess.Popen(["sleep", "3600"], pass_fds=(lock,)))
                os.close(lock)
                gpus = (i,) if i < 8 else ()
                state.add(job_lease(lease_id, sleepers[-1].pid, gpus, now))
    except BaseException:
        end_all(sleepers)
        raise
    return sleepers


def end_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()


def views_figures(root: Path, quick: bool) -> list[Figure]:
    leases, history = (50, 1000) if quick else (1000, 100_000)
    bench = Bench(root, gpus=8)
    sleepers = busy_server(bench, leases, history)
    try:
        if len(bench.leases()) != leases:
            raise SystemExit("bench: the busy server's leases did not all land in the ledger")
        commands = {"python": BASELINE, "ps": [GPURUN, "ps"], "status": [GPURUN, "status"]}
        samples = interleaved(commands, bench.env, 3 if quick else 21, warmup=1)
        # `ps -a` lists every finished job, so it takes seconds; a few rounds tell enough.
        everything = {"python": BASELINE, "ps -a": [GPURUN, "ps", "-a"]}
        samples_all = interleaved(everything, bench.env, 3 if quick else 5, warmup=0)
    finally:
        end_all(sleepers)
    where = f"{leases:,} live leases, {history:,} finished"
    return [
        *(
            ratio_figure(f"gpurun {name} / python -c pass ({where})", samples[name],
                         samples["python"], 3.0, not quick)
            for name in ("ps", "status")
        ),
        ratio_figure(f"gpurun ps -a / python -c pass ({where})", samples_all["ps -a"],
                     samples_all["python"], None, False),
    ]  # fmt: skip

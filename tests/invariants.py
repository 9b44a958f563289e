"""The invariant checker: replays what the jobs of a run recorded and judges it by facts.

It never judges by timing. Each job (tests/stress_job.py) wrote what gpurun gave it, when it
started and, unless it was killed with SIGKILL, when it ended, and it noted any live process
it found on its GPUs and CPUs at its start. The checks:

- no GPU or CPU held by two live jobs at any instant: no job saw a live process on an id it
  was given, and no two jobs that recorded both their start and their end overlap in time on
  an id (both intervals were written by the live processes themselves);
- every job that exited appears in history exactly once, and no id appears twice; a job whose
  gpurun exited normally is recorded with the code gpurun exited with;
- after everything ended and one `gpurun gc`: the ledger holds no lease, every GPU and CPU is
  free, no temporary file or job lock is left.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from itertools import pairwise
from pathlib import Path


def read_records(out: Path) -> dict[int, dict]:
    """Every job's start record, with its end record (or None) under "end"."""
    jobs: dict[int, dict] = {}
    for path in out.glob("*.start"):
        record = json.loads(path.read_text())
        end = out / f"{record['job']}.end"
        record["end"] = json.loads(end.read_text()) if end.exists() else None
        jobs[record["job"]] = record
    return jobs


def overlaps(jobs: dict[int, dict]) -> list[str]:
    """Pairs of jobs whose recorded intervals overlap on a GPU or CPU."""
    by_resource: dict[str, list[tuple[float, float, int]]] = {}
    for job in jobs.values():
        if job["end"] is None:
            continue
        span = (job["time"], job["end"]["time"], job["job"])
        for gpu in job["gpus"]:
            by_resource.setdefault(f"GPU {gpu}", []).append(span)
        for cpu in job["cpus"]:
            by_resource.setdefault(f"CPU {cpu}", []).append(span)
    found = []
    for resource, spans in sorted(by_resource.items()):
        spans.sort()
        for (_, end_a, a), (start_b, _, b) in pairwise(spans):
            if start_b < end_a:
                found.append(f"jobs {a} and {b} both ran on {resource} at {start_b:.3f}")
    return found


def check(
    out: Path,
    history: list[dict],
    ledger: dict,
    free: tuple[list[int], list[int]],
    total: tuple[list[int], list[int]],
    state_dir: Path,
    exits: dict[int, int],
) -> tuple[list[str], dict[str, int]]:
    """Return (violations, facts). `exits`: job id -> gpurun's exit code, for the gpuruns that
    exited by themselves (not by SIGKILL) after their job started."""
    jobs = read_records(out)
    violations = []
    for job in jobs.values():
        for conflict in job["conflicts"]:
            violations.append(
                f"job {job['job']} started on {conflict['resource']} while job "
                f"{conflict['job']} (pid {conflict['pid']}) still ran"
            )
    violations.extend(overlaps(jobs))

    counts = Counter(record.get("id") for record in history)
    violations.extend(f"job {i} is in history {n} times" for i, n in counts.items() if n > 1)
    violations.extend(f"job {i} started but is not in history" for i in jobs if i not in counts)
    recorded = {record.get("id"): record for record in history}
    for job_id, code in exits.items():
        got = recorded.get(job_id, {}).get("exit_code")
        if job_id in recorded and got != code:
            violations.append(f"job {job_id}: gpurun exited {code}, history says {got}")

    if ledger.get("leases"):
        ids = [lease["id"] for lease in ledger["leases"]]
        violations.append(f"after gc the ledger still holds leases {ids}")
    if free != total:
        violations.append(f"after gc GPUs/CPUs free are {free}, not all of {total}")
    left = [
        name
        for folder in (state_dir, state_dir / "jobs")
        for name in os.listdir(folder)
        if name.startswith(".") or (name.endswith(".lock") and folder.name == "jobs")
    ]
    if left:
        violations.append(f"files left in the state dir: {sorted(left)[:10]}")

    states = Counter(str(record.get("state")) for record in history)
    facts = {
        "jobs started": len(jobs),
        "ended by themselves or SIGTERM": sum(1 for job in jobs.values() if job["end"]),
        "history records": len(history),
        **{f"history {state}": n for state, n in sorted(states.items())},
    }
    return violations, facts

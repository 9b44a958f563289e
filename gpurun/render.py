"""Turn command results into text: aligned tables like `docker ps`, or JSON."""

from __future__ import annotations

import os
import sys

from gpurun.cpulist import format_cpulist

# Only for annotations (see config.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from gpurun.ledger import Lease


def to_json(data: object) -> str:
    import json

    return json.dumps(data, indent=2)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart; the last column is cut to a terminal's width.

    Every row has a cell per header.
    """
    # A newline or other control character in a cell (a command's argument) would break the
    # rows for grep and awk; it is shown escaped, as Python writes it. One test of all the
    # text finds the usual table clean: `ps` writes a row per lease.
    if not "".join(map("".join, rows)).isprintable():
        rows = [row if "".join(row).isprintable() else [_printable(c) for c in row] for row in rows]
    widths = [max(map(len, column)) for column in zip(headers, *rows, strict=True)]
    # One template pads every cell but the last; %-formatting takes four fifths of the time
    # str.format does here.
    template = "  ".join([*(f"%-{width}s" for width in widths[:-1]), "%s"])
    lines = [(template % tuple(row)).rstrip() for row in [headers, *rows]]
    if sys.stdout.isatty():
        width = os.get_terminal_size().columns
        lines = [line if len(line) <= width else line[: width - 1] + "…" for line in lines]
    return "\n".join(lines)


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def duration(seconds: object) -> str:
    """12s, 4m05s, 2h03m, 3d04h."""
    if not isinstance(seconds, (int, float)):
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _ids(ids: object) -> str:
    return ",".join(map(str, ids)) if ids else "-"


def _cpus(ids: object) -> str:
    return format_cpulist(ids) if ids else "-"


def _state(state: object, kind: object, code: object, position: object) -> str:
    if state == "exited" and code is not None:
        return f"exit {code}"
    if kind == "reservation" and state == "running":
        return "reserved"
    if state == "waiting" and position:
        return f"waiting #{position}"
    return str(state)


def _command(command: object, kind: object, reason: object) -> str:
    text = " ".join(command or []) or f"({kind})"
    if reason:
        text += f"  ({reason})"
    return text


JOBS_HEADERS = ["ID", "NAME", "USER", "PID", "GPUS", "CPUS", "STATE", "ELAPSED", "COMMAND"]


def job_cells(job: dict[str, object]) -> list[str]:
    """A `ps` row for a job as `ps --json` shows it (history, Slurm)."""
    return [
        f"slurm:{job['id']}" if job.get("backend") == "slurm" else str(job["id"]),
        str(job["name"]),
        str(job["user"]),
        str(job.get("pid") or "-"),
        _ids(job["gpus"]),
        f"n={job['cpu_count']}" if job.get("cpu_count") else _cpus(job["cpus"]),
        _state(job.get("state"), job.get("kind"), job.get("exit_code"), job.get("position")),
        duration(job.get("elapsed")),
        _command(job.get("command"), job.get("kind"), job.get("reason")),
    ]


def lease_cells(lease: Lease, state: str, elapsed: float, position: int | None) -> list[str]:
    """The `ps` row of a ledger lease, the row job_cells makes of its jobs.lease_view; made
    from the lease itself, since `ps` makes one per lease and the view was a third of it."""
    pid = lease.shown_pid()
    return [
        str(lease.id),
        lease.name,
        lease.user,
        str(pid or "-"),
        _ids(lease.gpus),
        _cpus(lease.cpus),
        _state(state, lease.kind, None, position),
        duration(elapsed),
        _command(lease.command, lease.kind, None),
    ]


def jobs_table(rows: list[list[str]]) -> str:
    return table(JOBS_HEADERS, rows)


def gc_text(dropped: list[dict[str, object]], dry_run: bool) -> str:
    if not dropped:
        return "no dead leases"
    verb = "would drop" if dry_run else "dropped"
    return "\n".join(
        f"{verb} lease {j['id']} ({j['name']}, {j['user']}, pid {j.get('pid') or '-'}): "
        f"GPUs {_ids(j['gpus'])}, CPUs {_cpus(j['cpus'])}"
        for j in dropped
    )


def status_text(status: dict[str, object], detail: bool = False) -> str:
    """One row per server and a total; with `detail`, each server's GPUs and CPUs after it."""
    rows = []
    for server in status["servers"]:
        rows.append(
            [
                server["name"] + (" *" if server.get("local") else ""),
                f"{len(server['gpus_free'])}/{server['gpus_total']}",
                _percent(server["gpus_total"] - len(server["gpus_free"]), server["gpus_total"]),
                f"{server['cpus_free']}/{server['cpus_total']}",
                _percent(server["cpus_total"] - server["cpus_free"], server["cpus_total"]),
                str(server["jobs"]),
                str(server["waiting"]),
                _server_state(server),
            ]
        )
    total = status.get("total")
    if total and len(status["servers"]) > 1:
        rows.append(
            [
                "TOTAL",
                f"{total['gpus_free']}/{total['gpus_total']}",
                _percent(total["gpus_total"] - total["gpus_free"], total["gpus_total"]),
                f"{total['cpus_free']}/{total['cpus_total']}",
                _percent(total["cpus_total"] - total["cpus_free"], total["cpus_total"]),
                str(total["jobs"]),
                str(total["waiting"]),
                "",
            ]
        )
    headers = ["SERVER", "GPUS FREE", "GPU%", "CPUS FREE", "CPU%", "JOBS", "WAITING", "STATE"]
    parts = [table(headers, rows)]
    if detail:
        for server in status["servers"]:
            parts.append(f"{server['name']}:\n{_server_detail(server)}")
    return "\n\n".join(parts)


def _percent(used: int, total: int) -> str:
    return f"{100 * used // total}%" if total else "-"


def _server_state(server: dict[str, object]) -> str:
    state = server["state"]
    age = server.get("heartbeat_age")
    if "stale" in state and age is not None:
        state = state.replace("stale", f"stale ({duration(age)} ago)")
    return state


def _server_detail(server: dict[str, object]) -> str:
    gpus = (
        table(
            ["GPU", "STATE", "JOB", "USER", "NAME", "OUTSIDE"],
            [
                [
                    str(g["id"]),
                    g["state"],
                    str(g["job"] or "-"),
                    g["user"] or "-",
                    g["name"] or "-",
                    _outside(g),
                ]
                for g in server["gpus"]
            ],
        )
        if server["gpus"]
        else "no GPUs"
    )
    cpus = table(
        ["CPUS", "COUNT", "STATE", "JOB", "USER", "NAME"],
        [
            [
                c["cpulist"],
                str(c["count"]),
                c["state"],
                str(c["job"] or "-"),
                c["user"] or "-",
                c["name"] or "-",
            ]
            for c in server["cpus"]
        ],
    )
    return f"{gpus}\n\n{cpus}"


def _outside(gpu: dict[str, object]) -> str:
    """Use of a GPU outside gpurun's leases: `pid 4242 alice 8000MiB`, `violation job 3 pid 99`."""
    parts = []
    external = gpu.get("external")
    if external:
        words = [f"pid {external['pid']}" if external["pid"] else "memory"]
        if external.get("user"):
            words.append(external["user"])
        if external.get("memory_mb") is not None:
            words.append(f"{external['memory_mb']}MiB")
        parts.append(" ".join(words))
    violation = gpu.get("violation")
    if violation:
        parts.append(f"violation job {violation['job']} pid {violation['pid']}")
    return "; ".join(parts) or "-"


def reservation_text(booked: dict[str, object]) -> str:
    import shlex

    left = booked.get("expires_in")
    until = "until 'gpurun release'" if left is None else f"for {duration(left)}"
    return (
        f"gpurun: reservation {booked['id']} '{booked['name']}' on server {booked['server']}: "
        f"GPUs {_ids(booked['gpus'])}, CPUs {_cpus(booked['cpus'])}, {until}; run in it with "
        f"'gpurun -r {shlex.quote(str(booked['name']))} -- COMMAND' or use these lines:"
    )

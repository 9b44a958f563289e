"""Turn command results into text: aligned tables like `docker ps`, or JSON."""

from __future__ import annotations

import json
import os
import sys

from gpurun.cpulist import format_cpulist


def to_json(data: object) -> str:
    return json.dumps(data, indent=2)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart; the last column is cut to a terminal's width."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [headers, *rows]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    if sys.stdout.isatty():
        width = os.get_terminal_size().columns
        lines = [line if len(line) <= width else line[: width - 1] + "…" for line in lines]
    return "\n".join(lines)


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


def _state(job: dict[str, object]) -> str:
    code = job.get("exit_code")
    if job.get("state") == "exited" and code is not None:
        return f"exit {code}"
    if job.get("state") == "waiting" and job.get("position"):
        return f"waiting #{job['position']}"
    return str(job.get("state"))


def jobs_table(jobs: list[dict[str, object]]) -> str:
    headers = ["ID", "NAME", "USER", "PID", "GPUS", "CPUS", "STATE", "ELAPSED", "COMMAND"]
    rows = [
        [
            str(j["id"]),
            str(j["name"]),
            str(j["user"]),
            str(j.get("pid") or "-"),
            _ids(j["gpus"]),
            _cpus(j["cpus"]),
            _state(j),
            duration(j.get("elapsed")),
            " ".join(j.get("command") or []),
        ]
        for j in jobs
    ]
    return table(headers, rows)


def gc_text(dropped: list[dict[str, object]], dry_run: bool) -> str:
    if not dropped:
        return "no dead leases"
    verb = "would drop" if dry_run else "dropped"
    return "\n".join(
        f"{verb} lease {j['id']} ({j['name']}, {j['user']}, pid {j.get('pid') or '-'}): "
        f"GPUs {_ids(j['gpus'])}, CPUs {_cpus(j['cpus'])}"
        for j in dropped
    )


def status_text(status: dict[str, object]) -> str:
    parts = []
    for server in status["servers"]:
        summary = table(
            ["SERVER", "GPUS FREE", "CPUS FREE", "JOBS", "WAITING", "STATE"],
            [
                [
                    server["name"],
                    f"{len(server['gpus_free'])}/{server['gpus_total']}",
                    f"{server['cpus_free']}/{server['cpus_total']}",
                    str(server["jobs"]),
                    str(server["waiting"]),
                    server["state"],
                ]
            ],
        )
        gpus = (
            table(
                ["GPU", "STATE", "JOB", "USER", "NAME"],
                [
                    [
                        str(g["id"]),
                        g["state"],
                        str(g["job"] or "-"),
                        g["user"] or "-",
                        g["name"] or "-",
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
        parts.append(f"{summary}\n\n{gpus}\n\n{cpus}")
    return "\n\n".join(parts)

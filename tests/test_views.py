"""ps, status and gc as people and scripts read them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from conftest import wait_for, wait_json

REPO = Path(__file__).resolve().parent.parent


def test_ps_json_has_the_documented_keys(gpurun):
    job = gpurun.start(
        "-g", "2", "-c", "1", "-n", "train", "--", *gpurun.probe("a", "--sleep", "60")
    )
    child = wait_json(gpurun.tmp / "a.start")["pid"]
    wait_for(lambda: len(gpurun.ledger()["leases"][0]["holders"]) == 2, what="command pid")

    [row] = gpurun.ps()

    assert row["id"] == 1 and row["name"] == "train" and row["state"] == "running"
    assert row["pid"] == child
    assert row["gpus"] == [0, 1] and len(row["cpus"]) == 1
    assert row["host"] == os.uname().nodename
    assert row["command"][-2:] == ["--sleep", "60"]
    datetime.fromisoformat(row["started"])
    table = gpurun.run("ps").stdout.splitlines()
    assert table[0].split() == [
        "ID",
        "NAME",
        "USER",
        "PID",
        "GPUS",
        "CPUS",
        "STATE",
        "ELAPSED",
        "COMMAND",
    ]
    assert table[1].split()[:7] == [
        "1",
        "train",
        row["user"],
        str(child),
        "0,1",
        str(row["cpus"][0]),
        "running",
    ]
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=10) == 143
    [done] = gpurun.ps("-a")
    assert done["exit_code"] == 143
    assert datetime.fromisoformat(done["ended"]) >= datetime.fromisoformat(done["started"])
    assert gpurun.ps() == []


def test_status_shows_who_holds_what(gpurun):
    job = gpurun.start(
        "-g", "1", "-c", "1", "-n", "holder", "--", *gpurun.probe("a", "--sleep", "60")
    )
    wait_json(gpurun.tmp / "a.start")

    server = gpurun.status()
    text = gpurun.run("status", "--detail").stdout

    assert server["gpus_total"] == 4 and server["gpus_free"] == [1, 2, 3]
    assert server["cpus_total"] == len(os.sched_getaffinity(0))
    assert server["cpus_free"] == server["cpus_total"] - 1
    assert server["jobs"] == 1
    assert server["gpus"][0] == {
        "id": 0,
        "state": "held",
        "job": 1,
        "user": server["gpus"][0]["user"],
        "name": "holder",
    }
    assert any(line.split()[:3] == ["0", "held", "1"] for line in text.splitlines())
    job.kill()


def test_gc_dry_run_changes_nothing(gpurun):
    job = gpurun.start("-g", "1", "-c", "0", "--", *gpurun.probe("a", "--sleep", "60"))
    child = wait_json(gpurun.tmp / "a.start")["pid"]
    job.send_signal(signal.SIGKILL)
    job.wait()
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{child}"), what="the command to go")
    before = gpurun.ledger_path().read_bytes()

    dry = gpurun.run("gc", "--dry-run")
    dry_json = gpurun.run("gc", "--dry-run", "--json")

    assert "would drop lease 1" in dry.stdout
    assert [lease["id"] for lease in json.loads(dry_json.stdout)] == [1]
    assert gpurun.ledger_path().read_bytes() == before
    assert gpurun.ps()[0]["state"] == "dead"
    assert "dropped lease 1" in gpurun.run("gc").stdout
    assert gpurun.ps() == []


def test_reset_refuses_while_jobs_live_unless_forced(gpurun):
    job = gpurun.start("-g", "1", "-c", "0", "--", *gpurun.probe("a", "--sleep", "60"))
    wait_json(gpurun.tmp / "a.start")

    refused = gpurun.run("reset", "--yes")
    forced = gpurun.run("reset", "--yes", "--force")

    assert refused.returncode == 125
    assert "live jobs" in refused.stderr and "--force" in refused.stderr
    assert forced.returncode == 0
    assert gpurun.ledger()["leases"] == []
    assert gpurun.ledger()["next_id"] == 2
    job.kill()


def test_make_demo_places_three_jobs_apart(tmp_path):
    env = dict(os.environ)
    env.pop("GPURUN_CONFIG", None)
    env.pop("GPURUN_STATE_DIR", None)
    env["GPURUN"] = str(Path(sys.executable).with_name("gpurun"))
    env["PY"] = sys.executable

    result = subprocess.run(
        ["bash", str(REPO / "examples" / "demo.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "CUDA_VISIBLE_DEVICES=" in line]
    assert len(lines) == 3
    given = {line.split("]")[0][1:]: line for line in lines}
    gpus = {
        name: line.split("CUDA_VISIBLE_DEVICES='")[1].split("'")[0] for name, line in given.items()
    }
    assert sorted([gpus["first"], gpus["second"]]) == ["0,1", "2,3"]
    affinity = {name: line.split("CPU affinity=")[1].split("]")[0] for name, line in given.items()}
    assert affinity["first"] != affinity["second"]
    assert "waiting" in result.stderr and "in the queue" in result.stderr


def test_the_ps_table_shows_what_ps_json_shows(gpurun):
    # `ps` makes its table rows from the leases, `ps --json` its views; every kind of row
    # must come out as the view's row would: finished, running, waiting with its place,
    # reserved, dead, and a command with a newline in it.
    from gpurun.render import JOBS_HEADERS, job_cells, table

    assert gpurun.run("-g", "1", "-c", "0", "--", "sh", "-c", "exit 3").returncode == 3
    assert gpurun.run("alloc", "box", "-g", "1", "-c", "0").returncode == 0
    gpurun.start("-g", "1", "-c", "0", "-n", "odd", "--", "sh", "-c", "sleep 60\n#")
    dead = gpurun.start("-g", "0", "-c", "0", "--", *gpurun.probe("d", "--sleep", "60"))
    doomed = wait_json(gpurun.tmp / "d.start")["pid"]
    queued = gpurun.start("-g", "3", "-c", "0", "-n", "queued", "--", "true")
    wait_for(lambda: [j["state"] for j in gpurun.ps()].count("waiting") == 1, what="a queue")
    # Stopped, the waiting gpurun cannot reap the lease that dies next.
    queued.send_signal(signal.SIGSTOP)
    dead.kill()
    dead.wait()
    os.kill(doomed, signal.SIGKILL)
    wait_for(lambda: "dead" in [j["state"] for j in gpurun.ps()], what="a dead lease")

    text = gpurun.run("ps", "-a").stdout
    views = gpurun.ps("-a")

    assert sorted(j["state"] for j in views) == ["dead", "exited", "running", "running", "waiting"]
    assert "reserved" in text and "waiting #1" in text and "exit 3" in text and "\\n#" in text
    # Elapsed times move on between the two calls; everything else must match exactly.
    expected = table(JOBS_HEADERS, [job_cells(view) for view in views])
    clock = re.compile(r"\b\d+(s|m\d\ds|h\d\dm|d\d\dh)\b")
    assert [clock.sub("-", line).split() for line in text.splitlines()] == [
        clock.sub("-", line).split() for line in expected.splitlines()
    ]

"""Several servers in one inventory: cluster status, reservations, limits, liveness of hosts.

Two or three "hosts" are simulated on this machine: each gpurun is told which server it is by
$GPURUN_SERVER (or --server for the commands that take it that way), and all of them share one
state dir, as the hosts of a lab share one over NFS.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from datetime import datetime

import pytest
from conftest import one_error_line, wait_for, wait_json

TWO_CPUS = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="needs a host with at least 2 CPUs"
)


def configure(gpurun, servers: str, extra: str = "") -> None:
    """Write a config whose `servers:` is the given YAML (a flow list or mapping)."""
    gpurun.write_config(f"kill_grace: 1\nlock_timeout: 10\n{extra}servers: {servers}\n")


def as_host(gpurun, server: str) -> dict[str, str]:
    """The environment of a gpurun started on the host of `server`."""
    env = dict(gpurun.env)
    env["GPURUN_SERVER"] = server
    return env


def cluster(gpurun, env: dict[str, str], *args: str) -> dict:
    result = gpurun.run("status", "--json", *args, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def servers_by_name(gpurun, env: dict[str, str]) -> dict[str, dict]:
    return {server["name"]: server for server in cluster(gpurun, env)["servers"]}


def alloc(gpurun, env: dict[str, str], *args: str) -> dict:
    result = gpurun.run("alloc", *args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def table_rows(text: str) -> dict[str, list[str]]:
    """The rows of `status`'s table by their first word (the server's name, or TOTAL)."""
    table = text.split("\n\n")[0].splitlines()
    return {line.split()[0]: line.split()[1:] for line in table[1:]}


def test_status_sums_servers_of_different_sizes_and_adds_a_total_row(gpurun):
    configure(gpurun, "[{name: a, gpus: 4, cpus: 6}, {name: b, gpus: 8, cpus: 64}]")
    a = as_host(gpurun, "a")
    assert gpurun.run("gc", "--server", "b", env=a).returncode == 0
    go = gpurun.tmp / "go"
    job = gpurun.start(
        "-g", "1", "-c", "2", "--", *gpurun.probe("job", "--wait-for", str(go)), env=a
    )
    wait_json(gpurun.tmp / "job.start")
    waiter = gpurun.start("-g", "4", "-c", "0", "--", "true", env=a)
    wait_for(lambda: servers_by_name(gpurun, a)["a"]["waiting"] == 1, what="a queued job")
    alloc(gpurun, a, "booked", "-g", "3", "-c", "16", "--server", "b")

    status = cluster(gpurun, a)
    text = gpurun.run("status", env=a).stdout
    only_b = cluster(gpurun, a, "--server", "b")
    only_b_text = gpurun.run("status", "--server", "b", env=a).stdout

    by_name = {server["name"]: server for server in status["servers"]}
    assert [server["name"] for server in status["servers"]] == ["a", "b"]
    expected_a = {
        "local": True,
        "gpus_total": 4,
        "gpus_free": [1, 2, 3],
        "cpus_total": 6,
        "cpus_free": 4,
        "jobs": 1,
        "reservations": 0,
        "waiting": 1,
        "state": "ok",
    }
    expected_b = {
        "local": False,
        "gpus_total": 8,
        "gpus_free": [3, 4, 5, 6, 7],
        "cpus_total": 64,
        "cpus_free": 48,
        "jobs": 0,
        "reservations": 1,
        "waiting": 0,
        "state": "ok",
    }
    assert {key: by_name["a"][key] for key in expected_a} == expected_a
    assert {key: by_name["b"][key] for key in expected_b} == expected_b
    assert status["total"] == {
        "gpus_total": 12,
        "gpus_free": 8,
        "cpus_total": 70,
        "cpus_free": 52,
        "jobs": 1,
        "waiting": 1,
    }
    rows = table_rows(text)
    assert rows["a"] == ["*", "3/4", "25%", "4/6", "33%", "1", "1", "ok"]
    assert rows["b"] == ["5/8", "37%", "48/64", "25%", "0", "0", "ok"]
    assert rows["TOTAL"] == ["8/12", "33%", "52/70", "25%", "1", "1"]
    assert [server["name"] for server in only_b["servers"]] == ["b"]
    assert "TOTAL" not in only_b_text and list(table_rows(only_b_text)) == ["b"]
    go.touch()
    assert job.wait(timeout=20) == 0
    assert waiter.wait(timeout=20) == 0


def test_alloc_auto_picks_the_server_with_the_most_free_gpus(gpurun):
    # b is neither this host, nor first in the inventory, nor the biggest: only the free count
    # makes it the choice.
    configure(
        gpurun,
        "[{name: a, gpus: 4, cpus: 8}, {name: b, gpus: 4, cpus: 8}, {name: c, gpus: 8, cpus: 8}]",
    )
    a = as_host(gpurun, "a")
    alloc(gpurun, a, "big", "-g", "6", "-c", "0", "--server", "c")
    alloc(gpurun, a, "small", "-g", "1", "-c", "0", "--server", "a")

    picked = alloc(gpurun, a, "pick", "-g", "2", "-c", "1", "--server", "auto")
    too_big = gpurun.run("alloc", "huge", "-g", "4", "-c", "0", "--server", "auto", env=a)

    assert picked["server"] == "b" and picked["gpus"] == [0, 1]
    assert picked["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert servers_by_name(gpurun, a)["b"]["gpus_free"] == [2, 3]
    assert too_big.returncode == 75
    assert one_error_line(too_big.stderr)


def test_alloc_auto_breaks_ties_by_free_cpus_then_this_host_first(gpurun):
    configure(
        gpurun,
        "[{name: a, gpus: 4, cpus: 8}, {name: b, gpus: 4, cpus: 8}, {name: c, gpus: 4, cpus: 8}]",
    )
    b = as_host(gpurun, "b")

    everything_equal = alloc(gpurun, b, "t1", "-g", "1", "-c", "0", "--server", "auto")
    a_and_c_equal = alloc(gpurun, b, "t2", "-g", "1", "-c", "0", "--server", "auto")
    alloc(gpurun, b, "t3", "-g", "1", "-c", "0", "--server", "c")
    alloc(gpurun, b, "cpus-a", "-g", "0", "-c", "3", "--server", "a")
    alloc(gpurun, b, "cpus-b", "-g", "0", "-c", "3", "--server", "b")
    most_cpus = alloc(gpurun, b, "t4", "-g", "1", "-c", "1", "--server", "auto")

    assert everything_equal["server"] == "b"
    assert a_and_c_equal["server"] == "a"
    assert most_cpus["server"] == "c"


def test_release_by_name_frees_the_gpus_and_the_name(gpurun):
    configure(gpurun, "[{name: a, gpus: 4, cpus: 8}, {name: b, gpus: 4, cpus: 8}]")
    a = as_host(gpurun, "a")
    booked = alloc(gpurun, a, "dbg", "-g", "2", "-c", "2", "--server", "b")
    taken = gpurun.run("alloc", "dbg", "-g", "1", "-c", "0", env=a)
    held = servers_by_name(gpurun, a)["b"]

    released = gpurun.run("release", "dbg", env=a)

    assert taken.returncode == 125 and "dbg" in one_error_line(taken.stderr)
    assert booked["gpus"] == [0, 1] and held["gpus_free"] == [2, 3]
    assert held["reservations"] == 1
    assert released.returncode == 0, released.stderr
    assert f"reservation {booked['id']} 'dbg' on b" in released.stdout
    after = servers_by_name(gpurun, a)["b"]
    assert after["gpus_free"] == [0, 1, 2, 3] and after["cpus_free"] == 8
    assert after["reservations"] == 0 and after["leases"] == []
    again = alloc(gpurun, a, "dbg", "-g", "4", "-c", "0", "--server", "b")
    assert again["gpus"] == [0, 1, 2, 3]
    by_id = gpurun.run("release", str(again["id"]), "--server", "b", env=a)
    assert by_id.returncode == 0, by_id.stderr
    gone = gpurun.run("release", "dbg", env=a)
    assert gone.returncode == 125 and "dbg" in one_error_line(gone.stderr)
    history = [job for job in gpurun.ps("-a", "--server", "b") if job["name"] == "dbg"]
    assert [job["state"] for job in history] == ["released", "released"]


def test_a_reservation_expires_after_its_ttl(gpurun):
    before = time.time()
    booked = alloc(gpurun, gpurun.env, "short", "-g", "4", "-c", "0", "--ttl", "1s")
    blocked = gpurun.run("alloc", "next", "-g", "1", "-c", "0")

    wait_for(
        lambda: gpurun.ps()[0]["state"] == "expired", timeout=5, what="the reservation to expire"
    )
    expired_at = time.time()
    server = gpurun.status()

    expires = datetime.fromisoformat(booked["expires"]).timestamp()
    assert before <= expires <= time.time() + 1
    assert 0 < booked["expires_in"] <= 1
    assert blocked.returncode == 75
    assert expired_at + 1 >= expires
    assert not any(gpu["state"] == "held" for gpu in server["gpus"])
    after = alloc(gpurun, gpurun.env, "next", "-g", "4", "-c", "0")
    assert after["gpus"] == [0, 1, 2, 3]
    assert [lease["name"] for lease in gpurun.status()["leases"]] == ["next"]
    states = {job["name"]: job["state"] for job in gpurun.ps("-a")}
    assert states == {"short": "expired", "next": "running"}


def start_inside_expiring_reservation(gpurun):
    """A job running inside a 2-GPU reservation that has just expired; return it."""
    alloc(gpurun, gpurun.env, "box", "-g", "2", "-c", "1", "--ttl", "1s")
    go = gpurun.tmp / "go"
    job = gpurun.start("-r", "box", "--", *gpurun.probe("inside", "--wait-for", str(go)))
    inside = wait_json(gpurun.tmp / "inside.start")
    assert inside["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    wait_for(
        lambda: any(j["state"] == "expired" for j in gpurun.ps()), timeout=5, what="the expiry"
    )
    return job


def end_job(gpurun, job) -> None:
    (gpurun.tmp / "go").touch()
    assert job.wait(timeout=20) == 0


def test_a_job_inside_an_expired_reservation_keeps_its_gpus(gpurun):
    job = start_inside_expiring_reservation(gpurun)

    whole = gpurun.run("alloc", "whole", "-g", "4", "-c", "0")
    rest = alloc(gpurun, gpurun.env, "rest", "-g", "2", "-c", "0")

    assert whole.returncode == 75
    assert rest["gpus"] == [2, 3]
    end_job(gpurun, job)


def test_status_shows_a_job_inside_an_expired_reservation_as_holding_its_gpus(gpurun):
    job = start_inside_expiring_reservation(gpurun)
    assert gpurun.run("gc").returncode == 0

    server = gpurun.status()

    job_id = next(j["id"] for j in gpurun.ps() if j["kind"] == "job")
    end_job(gpurun, job)
    assert server["jobs"] == 1
    assert server["gpus_free"] == [2, 3]
    assert [(gpu["state"], gpu["job"]) for gpu in server["gpus"][:2]] == [("held", job_id)] * 2


def test_a_gpu_removed_from_the_config_under_a_lease_is_orphaned_and_never_handed_out(gpurun):
    go = gpurun.tmp / "go"
    holder = gpurun.start(
        "--gpu-ids", "3", "-c", "0", "--", *gpurun.probe("holder", "--wait-for", str(go))
    )
    wait_json(gpurun.tmp / "holder.start")
    gpurun.write_config("gpus: 3\ncpus: auto\nkill_grace: 1\nlock_timeout: 10\n")

    orphaned = gpurun.status()
    doctor = gpurun.run("doctor")
    three = gpurun.start("-g", "3", "-c", "0", "--", *gpurun.probe("three", "--wait-for", str(go)))
    given = wait_json(gpurun.tmp / "three.start")
    one_more = gpurun.run("-g", "1", "-c", "0", "--no-wait", "--", "true")

    assert "orphaned" in orphaned["state"]
    assert orphaned["gpus_total"] == 3 and orphaned["gpus_free"] == [0, 1, 2]
    assert orphaned["gpus"][3]["id"] == 3 and orphaned["gpus"][3]["state"] == "orphaned"
    assert [lease["orphaned"] for lease in orphaned["leases"]] == [True]
    assert doctor.returncode == 1
    assert "no longer lists" in doctor.stdout
    assert given["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    assert one_more.returncode == 75
    go.touch()
    assert holder.wait(timeout=20) == 0 and three.wait(timeout=20) == 0
    assert gpurun.run("gc").returncode == 0
    cleaned = gpurun.status()
    assert cleaned["state"] == "ok"
    assert [gpu["id"] for gpu in cleaned["gpus"]] == [0, 1, 2]
    assert cleaned["gpus_free"] == [0, 1, 2] and cleaned["leases"] == []


def test_reset_of_a_server_not_in_the_inventory_is_refused(gpurun):
    configure(gpurun, "[{name: a, gpus: 2, cpus: 2}]")

    result = gpurun.run("reset", "--yes", "--server", "nosuch", env=as_host(gpurun, "a"))

    assert result.returncode == 125
    assert "no server named 'nosuch'" in one_error_line(result.stderr)
    assert not (gpurun.state_dir / "nosuch.json").exists()


def test_a_server_whose_heartbeat_is_older_than_stale_after_is_stale(gpurun):
    configure(
        gpurun, "[{name: a, gpus: 2, cpus: 2}, {name: b, gpus: 2, cpus: 2}]", "stale_after: 2s\n"
    )
    a = as_host(gpurun, "a")

    wrote = gpurun.run("gc", "--server", "b", env=a)
    fresh = servers_by_name(gpurun, a)
    stale = wait_for(
        lambda: (s := servers_by_name(gpurun, a))["b"]["state"] == "stale" and s,
        timeout=10,
        what="b to go stale",
    )
    text = gpurun.run("status", env=a).stdout
    alloc(gpurun, a, "foreign", "-g", "1", "-c", "0", "--server", "b")
    after_foreign_write = servers_by_name(gpurun, a)["b"]
    gpurun.run("gc", "--server", "b", env=a)
    after_gc = servers_by_name(gpurun, a)

    assert wrote.returncode == 0, wrote.stderr
    assert fresh["b"]["state"] == "ok" and fresh["b"]["heartbeat_age"] < 2
    assert stale["b"]["heartbeat_age"] >= 2  # rounded to 0.1 s
    assert stale["a"]["state"] == "ok"
    b_row = " ".join(table_rows(text)["b"])
    assert " stale (" in b_row and b_row.endswith(" ago)")
    assert after_foreign_write["state"] == "stale"
    assert after_gc["b"]["state"] == "ok" and after_gc["b"]["heartbeat_age"] < 2


def test_a_server_whose_host_never_wrote_its_ledger_is_unseen(gpurun):
    configure(gpurun, "[{name: a, gpus: 2, cpus: 2}, {name: b, gpus: 2, cpus: 2}]")
    a = as_host(gpurun, "a")

    never = servers_by_name(gpurun, a)
    alloc(gpurun, a, "foreign", "-g", "1", "-c", "0", "--server", "b")
    foreign_only = servers_by_name(gpurun, a)["b"]
    gpurun.run("gc", "--server", "b", env=a)
    seen = servers_by_name(gpurun, a)["b"]

    assert never["a"]["state"] == "ok"
    assert never["b"]["state"] == "unseen" and never["b"]["heartbeat"] is None
    assert never["b"]["gpus_total"] == 2
    assert foreign_only["state"] == "unseen" and foreign_only["reservations"] == 1
    assert seen["state"] == "ok" and seen["heartbeat"] is not None


LIMITS = "limits: {min_gpus: 1, max_gpus: 3, max_cpus: 5}\nlabel_limits:\n  dev: {max_gpus: 2}\n"
LIMITED = (
    "[{name: a, gpus: 4, cpus: 8}, {name: d, gpus: 4, cpus: 8, labels: [dev]}, "
    "{name: p, gpus: 4, cpus: 8, limits: {max_cpus: 4}}]"
)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-g", "4", "-c", "1", "--", "true"], "at most 3"),
        (["-g", "0", "-c", "1", "--", "true"], "no fewer than 1"),
        (["-g", "1", "-c", "6", "--", "true"], "at most 5"),
        (["alloc", "x", "-g", "3", "-c", "1", "--server", "d"], "at most 2"),
        (["alloc", "x", "-g", "0", "-c", "1", "--server", "d"], "no fewer than 1"),
        (["alloc", "x", "-g", "1", "-c", "5", "--server", "p"], "at most 4"),
        (["alloc", "x", "-g", "4", "-c", "1", "--server", "p"], "at most 3"),
    ],
    ids=[
        "max_gpus",
        "min_gpus",
        "max_cpus",
        "label",
        "label-keeps-top",
        "server",
        "server-keeps-top",
    ],
)
def test_a_request_outside_the_limits_exits_125_naming_the_limit(gpurun, args, needle):
    configure(gpurun, LIMITED, LIMITS)

    result = gpurun.run(*args, env=as_host(gpurun, "a"))

    assert result.returncode == 125
    line = one_error_line(result.stderr)
    assert needle in line and str(gpurun.config) in line
    assert all(s["leases"] == [] for s in cluster(gpurun, as_host(gpurun, "a"))["servers"])


def test_requests_at_the_limits_are_granted(gpurun):
    configure(gpurun, LIMITED, LIMITS)
    a = as_host(gpurun, "a")

    job = gpurun.run("-g", "3", "-c", "5", "--", "true", env=a)
    on_dev = gpurun.run("alloc", "x", "-g", "2", "-c", "5", "--server", "d", env=a)
    on_p = gpurun.run("alloc", "y", "-g", "3", "-c", "4", "--server", "p", env=a)

    assert job.returncode == 0, job.stderr
    assert on_dev.returncode == 0, on_dev.stderr
    assert on_p.returncode == 0, on_p.stderr


@pytest.mark.parametrize(
    ("servers", "expected"),
    [
        (
            '{count: 3, start: 1, name: "node{i:02d}", address: "10.0.0.{i}", gpus: 2, cpus: 4}',
            {f"node0{i}": (2, 4, f"10.0.0.{i}", []) for i in (1, 2, 3)},
        ),
        (
            '[{count: 2, start: 1, name: "node{i:02d}", gpus: 2, cpus: 4}, '
            "{name: node03, gpus: 1, cpus: 2, labels: [dev]}]",
            {
                "node01": (2, 4, None, []),
                "node02": (2, 4, os.uname().nodename, []),  # this host, listed with no address
                "node03": (1, 2, None, ["dev"]),
            },
        ),
    ],
    ids=["one-group", "group-and-entry"],
)
def test_a_group_expands_into_servers_named_from_its_template(gpurun, servers, expected):
    configure(gpurun, servers)

    status = cluster(gpurun, as_host(gpurun, "node02"))

    found = {
        server["name"]: (
            server["gpus_total"],
            server["cpus_total"],
            server["address"],
            server["labels"],
        )
        for server in status["servers"]
    }
    assert found == expected
    assert [server["name"] for server in status["servers"] if server["local"]] == ["node02"]


@TWO_CPUS
def test_a_job_run_inside_a_reservation_gets_exactly_its_gpus_and_cpus(gpurun):
    alloc(gpurun, gpurun.env, "pad", "-g", "1", "-c", "0")
    booked = alloc(gpurun, gpurun.env, "box", "-g", "2", "-c", "2")
    go = gpurun.tmp / "go"

    job = gpurun.start("-r", "box", "--", *gpurun.probe("whole", "--wait-for", str(go)))
    record = wait_json(gpurun.tmp / "whole.start")
    second = gpurun.run("-r", "box", "--", "true")
    release = gpurun.run("release", "box")

    assert booked["gpus"] == [1, 2] and booked["cpus"] == [0, 1]
    assert record["env"]["CUDA_VISIBLE_DEVICES"] == booked["env"]["CUDA_VISIBLE_DEVICES"]
    assert record["env"]["GPURUN_CPUS"] == booked["env"]["GPURUN_CPUS"] == "0-1"
    assert record["affinity"] == booked["cpus"]
    assert second.returncode == 75
    assert release.returncode == 125 and "box" in one_error_line(release.stderr)
    go.touch()
    assert job.wait(timeout=20) == 0
    assert gpurun.run("release", "box").returncode == 0


@TWO_CPUS
def test_g_1_inside_a_reservation_splits_it_and_never_leaves_it(gpurun):
    alloc(gpurun, gpurun.env, "pad", "-g", "1", "-c", "0")
    booked = alloc(gpurun, gpurun.env, "box", "-g", "2", "-c", "2")
    go = gpurun.tmp / "go"

    first = gpurun.start("-r", "box", "-g", "1", "--", *gpurun.probe("p1", "--wait-for", str(go)))
    second = gpurun.start("-r", "box", "-g", "1", "--", *gpurun.probe("p2", "--wait-for", str(go)))
    records = [wait_json(gpurun.tmp / "p1.start"), wait_json(gpurun.tmp / "p2.start")]
    third = gpurun.run("-r", "box", "-g", "1", "--", "true")

    gpus = sorted(r["env"]["CUDA_VISIBLE_DEVICES"] for r in records)
    assert gpus == ["1", "2"]
    assert sorted(cpu for r in records for cpu in r["affinity"]) == booked["cpus"]
    assert all(len(r["affinity"]) == 1 for r in records)
    assert third.returncode == 75
    go.touch()
    assert first.wait(timeout=20) == 0 and second.wait(timeout=20) == 0


def test_run_inside_a_reservation_on_another_server_is_refused(gpurun):
    configure(gpurun, "[{name: a, gpus: 2, cpus: 2}, {name: b, gpus: 2, cpus: 2}]")
    a = as_host(gpurun, "a")
    alloc(gpurun, a, "far", "-g", "1", "-c", "1", "--server", "b")

    result = gpurun.run("-r", "far", "--", *gpurun.probe("never"), env=a)

    assert result.returncode == 125
    assert "server b" in one_error_line(result.stderr)
    assert not (gpurun.tmp / "never.start").exists()


def test_two_hosts_allocating_and_releasing_at_once_keep_both_ledgers_consistent(gpurun):
    configure(gpurun, "[{name: a, gpus: 4, cpus: 8}, {name: b, gpus: 4, cpus: 8}]")
    cycles = 8
    workers = [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    done: list[dict] = []
    failures: list[str] = []
    snapshots = [0]
    stop = threading.Event()

    def cycle(host: str, worker: int) -> None:
        try:
            cycles_of(host, worker)
        except Exception as exc:  # a thread's exception would otherwise go unseen
            failures.append(f"{host}{worker}: {exc!r}")

    def cycles_of(host: str, worker: int) -> None:
        env = as_host(gpurun, host)
        for i in range(cycles):
            target = "ab"[(i + worker) % 2]
            name = f"{host}{worker}-{i}"
            got = gpurun.run(
                "alloc", name, "-g", "1", "-c", "1", "--server", target, "--json", env=env
            )
            if got.returncode != 0:
                failures.append(f"alloc {name}: {got.returncode} {got.stderr}")
                continue
            freed = gpurun.run("release", name, "--server", target, env=env)
            if freed.returncode != 0:
                failures.append(f"release {name}: {freed.returncode} {freed.stderr}")
            done.append(json.loads(got.stdout))

    def watch() -> None:
        try:
            check_snapshots()
        except Exception as exc:  # a ledger that does not parse lands here
            failures.append(f"watcher: {exc!r}")

    def check_snapshots() -> None:
        # Every snapshot of either ledger parses and gives no GPU to two leases.
        while not stop.is_set():
            for server in "ab":
                path = gpurun.state_dir / f"{server}.json"
                if not path.exists():
                    continue
                leases = json.loads(path.read_bytes())["leases"]
                gpus = [gpu for lease in leases for gpu in lease["gpus"]]
                if len(gpus) != len(set(gpus)):
                    failures.append(f"{server}: a GPU in two leases: {leases}")
                snapshots[0] += 1
            time.sleep(0.005)

    threads = [threading.Thread(target=cycle, args=worker) for worker in workers]
    watcher = threading.Thread(target=watch)

    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    stop.set()
    watcher.join(timeout=10)

    assert failures == []
    assert snapshots[0] > 0
    assert len(done) == cycles * len(workers)
    status = servers_by_name(gpurun, as_host(gpurun, "a"))
    for server in "ab":
        booked = [entry for entry in done if entry["server"] == server]
        ledger = json.loads((gpurun.state_dir / f"{server}.json").read_bytes())
        assert ledger["leases"] == []
        # No lost update: every alloc took its own id and the counter saw all of them.
        assert sorted(entry["id"] for entry in booked) == list(range(1, len(booked) + 1))
        assert ledger["next_id"] == len(booked) + 1
        assert status[server]["gpus_free"] == [0, 1, 2, 3]
        assert status[server]["cpus_free"] == 8
        history = gpurun.ps("-a", "--server", server)
        assert sorted(job["name"] for job in history) == sorted(e["name"] for e in booked)


@pytest.mark.parametrize(
    ("servers", "key"),
    [
        ("[{name: a, gpus: 1}, {name: a, gpus: 2}]", "servers[1]"),
        ("[{name: a, gpus: -1}]", "servers[0].gpus"),
        ('{count: 2, name: "n{i}", gpus: -2}', "servers (i=0).gpus"),
        ("[{gpus: 2}]", "servers[0]"),
        ("[{name: a, gpu: 2}]", "servers[0].gpu"),
        ('{count: 2, name: "n{j}"}', "servers.name"),
        ('{count: 2, name: "node"}', "servers.name"),
        ('{count: 2, name: "n{i:q}"}', "servers.name"),
    ],
    ids=[
        "duplicate-name",
        "negative-gpus",
        "negative-gpus-in-group",
        "no-name",
        "unknown-key",
        "template-unknown-field",
        "template-without-i",
        "template-bad-format",
    ],
)
def test_a_bad_inventory_exits_125_naming_the_file_and_the_key(gpurun, servers, key):
    configure(gpurun, servers)

    result = gpurun.run("status")

    assert result.returncode == 125
    line = one_error_line(result.stderr)
    assert str(gpurun.config) in line
    assert f"key '{key}'" in line
    assert not gpurun.state_dir.exists()


def test_a_name_booked_on_two_servers_at_once_is_granted_once(gpurun):
    configure(gpurun, "[{name: a, gpus: 2, cpus: 2}, {name: b, gpus: 2, cpus: 2}]")
    a = as_host(gpurun, "a")
    assert gpurun.run("gc", "--server", "b", env=a).returncode == 0
    lock_path = str(gpurun.state_dir / "b.json.lock")
    lock = os.open(lock_path, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    slow = gpurun.start("alloc", "dup", "-g", "1", "-c", "0", "--server", "b", env=a)

    def holds_open(process, path: str) -> bool:
        fds = f"/proc/{process.pid}/fd"
        try:
            return any(os.readlink(f"{fds}/{fd}") == path for fd in os.listdir(fds))
        except OSError:
            return False

    try:
        # The alloc on b waits for b's lock, so it has not written its name anywhere yet.
        wait_for(lambda: holds_open(slow, lock_path), what="the alloc on b to wait for b's lock")
        quick = gpurun.start("alloc", "dup", "-g", "1", "-c", "0", "--server", "a", env=a)
        names_lock = str(gpurun.state_dir / "names.lock")
        wait_for(
            lambda: quick.poll() is not None or holds_open(quick, names_lock),
            what="the alloc on a to end or wait for the names lock",
        )
    finally:
        os.close(lock)
    outcomes = [process.communicate(timeout=30) for process in (slow, quick)]

    codes = sorted([slow.returncode, quick.returncode])
    assert codes == [0, 125], outcomes
    refused = outcomes[0][1] if slow.returncode else outcomes[1][1]
    assert "already named 'dup'" in one_error_line(refused)


def test_server_before_the_command_name_is_taken_like_config(gpurun):
    configure(gpurun, "[{name: a, gpus: 2, cpus: 2}, {name: b, gpus: 2, cpus: 2}]")
    a = as_host(gpurun, "a")

    result = gpurun.run("--server", "b", "gc", env=a)

    assert result.returncode == 0, result.stderr
    assert servers_by_name(gpurun, a)["b"]["state"] == "ok"


def test_alloc_auto_that_no_server_can_ever_hold_is_refused_not_busy(gpurun):
    configure(gpurun, "[{name: a, gpus: 2, cpus: 2}, {name: b, gpus: 4, cpus: 2}]")

    never = gpurun.run("alloc", "big", "-g", "9", "--server", "auto", env=as_host(gpurun, "a"))
    later = gpurun.run("alloc", "fits", "-g", "4", "-c", "0", "--server", "auto")

    assert never.returncode == 125
    assert "no server can ever hold 9 GPUs" in one_error_line(never.stderr)
    assert later.returncode == 0, later.stderr


def test_status_counts_nothing_free_on_a_server_whose_ledger_cannot_be_read(gpurun):
    configure(gpurun, "[{name: a, gpus: 4, cpus: 6}, {name: b, gpus: 8, cpus: 64}]")
    a = as_host(gpurun, "a")
    assert gpurun.run("gc", "--server", "b", env=a).returncode == 0
    assert gpurun.run("gc", env=a).returncode == 0
    (gpurun.state_dir / "b.json").write_text("{not json")

    status = gpurun.run("status", "--json", env=a)
    text = gpurun.run("status", env=a)

    assert status.returncode == 0 and text.returncode == 0, status.stderr
    by_name = {s["name"]: s for s in json.loads(status.stdout)["servers"]}
    assert by_name["b"]["state"].startswith("unreadable")
    assert (by_name["b"]["gpus_free"], by_name["b"]["cpus_free"]) == ([], 0)
    assert json.loads(status.stdout)["total"]["gpus_free"] == 4
    assert table_rows(text.stdout)["TOTAL"][0] == "4/4"

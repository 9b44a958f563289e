"""When a lease is dead: pid plus start time, zombies, the job lock, and many jobs at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import read_json, wait_for, wait_json


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def lease_ids(gpurun) -> list[int]:
    return [lease["id"] for lease in gpurun.ledger()["leases"]]


def test_twenty_jobs_at_once_never_share_a_gpu(gpurun):
    procs = [
        gpurun.start(
            "-g",
            str(1 + i % 2),
            "-c",
            "0",
            "--",
            *gpurun.probe(f"j{i}", "--sleep", str(0.05 + (i % 5) * 0.05)),
        )
        for i in range(20)
    ]

    codes = [proc.wait(timeout=120) for proc in procs]

    assert codes == [0] * 20
    spans = []
    for i in range(20):
        start = read_json(gpurun.tmp / f"j{i}.start")
        end = read_json(gpurun.tmp / f"j{i}.end")
        gpus = set(start["env"]["CUDA_VISIBLE_DEVICES"].split(","))
        assert len(gpus) == 1 + i % 2
        spans.append((start["time"], end["time"], gpus))
    for a in range(20):
        for b in range(a + 1, 20):
            (s1, e1, g1), (s2, e2, g2) = spans[a], spans[b]
            if s1 < e2 and s2 < e1:
                assert not g1 & g2, f"jobs {a} and {b} overlapped on GPUs {g1 & g2}"
    assert gpurun.ledger()["leases"] == []
    assert len(gpurun.ps("-a")) == 20


def test_sigkill_of_the_command_frees_its_gpus_on_the_next_gc(gpurun):
    # gpurun itself is stopped first, so the lease outlives the command it watched.
    job = gpurun.start("-g", "2", "-c", "0", "--", *gpurun.probe("a", "--sleep", "60"))
    child = wait_json(gpurun.tmp / "a.start")["pid"]
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=10)
    assert lease_ids(gpurun) == [1]
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{child}"), what="the command to go")

    result = gpurun.run("gc", "--json")

    assert result.returncode == 0, result.stderr
    assert [lease["id"] for lease in json.loads(result.stdout)] == [1]
    assert gpurun.ledger()["leases"] == []
    assert gpurun.status()["gpus_free"] == [0, 1, 2, 3]
    dead = [job for job in gpurun.ps("-a") if job["id"] == 1]
    assert dead[0]["state"] == "dead"


def test_the_next_launch_reaps_a_dead_lease(gpurun):
    job = gpurun.start("-g", "4", "-c", "0", "--", *gpurun.probe("a", "--sleep", "60"))
    child = wait_json(gpurun.tmp / "a.start")["pid"]
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=10)
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{child}"), what="the command to go")

    result = gpurun.run("-g", "4", "--no-wait", "--", "true")

    assert result.returncode == 0, result.stderr
    assert gpurun.ledger()["leases"] == []


def test_killed_gpurun_keeps_the_lease_while_its_command_runs(gpurun):
    job = gpurun.start(
        "-g", "4", "-c", "0", "--", *gpurun.probe("a", "--wait-for", str(gpurun.tmp / "go"))
    )
    wait_json(gpurun.tmp / "a.start")
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=10)

    gc = gpurun.run("gc")
    blocked = gpurun.run("-g", "1", "--no-wait", "--", "true")
    (gpurun.tmp / "go").touch()
    wait_json(gpurun.tmp / "a.end")
    wait_for(
        lambda: gpurun.run("gc").returncode == 0 and gpurun.ledger()["leases"] == [],
        what="the lease to be reaped once the command ended",
    )

    assert gc.returncode == 0 and "no dead leases" in gc.stdout
    assert blocked.returncode == 75
    assert gpurun.run("-g", "4", "--no-wait", "--", "true").returncode == 0


def test_a_live_pid_with_another_start_time_is_dead(gpurun):
    job = gpurun.start("-g", "1", "-c", "0", "--", *gpurun.probe("a", "--sleep", "60"))
    wait_json(gpurun.tmp / "a.start")
    wait_for(lambda: len(gpurun.ledger()["leases"][0]["holders"]) == 2, what="command pid")
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=10)
    # Pretend the recorded processes are other ones that now wear the same pids: this test's
    # own, which is alive, with a start time it never had. The job lock goes too, as it
    # would after a reboot.
    ledger = gpurun.ledger_path()
    doc = json.loads(ledger.read_text())
    lease = doc["leases"][0]
    for holder in lease["holders"]:
        holder["pid"] = os.getpid()
        holder["start"] = 1
    ledger.write_text(json.dumps(doc))
    os.kill(read_json(gpurun.tmp / "a.start")["pid"], signal.SIGKILL)

    result = gpurun.run("gc", "--json")

    assert [lease["id"] for lease in json.loads(result.stdout)] == [1]


def test_same_pid_and_start_time_is_alive(gpurun):
    # The inverse of the test above: our own pid with its real start time keeps the lease.
    job = gpurun.start("-g", "1", "-c", "0", "--", *gpurun.probe("a", "--sleep", "60"))
    wait_json(gpurun.tmp / "a.start")
    wait_for(lambda: len(gpurun.ledger()["leases"][0]["holders"]) == 2, what="command pid")
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=10)
    os.kill(read_json(gpurun.tmp / "a.start")["pid"], signal.SIGKILL)
    with open(f"/proc/{os.getpid()}/stat") as f:
        my_start = int(f.read().rsplit(")", 1)[1].split()[19])
    ledger = gpurun.ledger_path()
    doc = json.loads(ledger.read_text())
    doc["leases"][0]["holders"] = [{"pid": os.getpid(), "start": my_start, "role": "gpurun"}]
    ledger.write_text(json.dumps(doc))

    result = gpurun.run("gc", "--json")

    assert json.loads(result.stdout) == []


def test_a_zombie_is_not_alive(gpurun):
    # A parent that never reaps: its child stays a zombie after it exits.
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            f"p = subprocess.Popen([{gpurun.probe('z')!r}][0])\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        zombie = int(parent.stdout.readline())
        wait_json(gpurun.tmp / "z.end")
        wait_for(lambda: process_state(zombie) == "Z", what="a zombie")
        from gpurun.liveness import holder_alive, process_start

        assert process_start(zombie) is None
        assert not holder_alive(zombie, 0)
    finally:
        parent.kill()
        parent.wait()


def test_lease_from_another_boot_is_dead(gpurun):
    job = gpurun.start("-g", "1", "-c", "0", "--", *gpurun.probe("a", "--sleep", "60"))
    wait_json(gpurun.tmp / "a.start")
    wait_for(lambda: len(gpurun.ledger()["leases"][0]["holders"]) == 2, what="command pid")
    job.send_signal(signal.SIGSTOP)
    ledger = gpurun.ledger_path()
    doc = json.loads(ledger.read_text())
    doc["leases"][0]["boot"] = "another-boot"
    ledger.write_text(json.dumps(doc))

    result = gpurun.run("gc", "--json")

    assert [lease["id"] for lease in json.loads(result.stdout)] == [1]
    job.send_signal(signal.SIGKILL)


def test_judging_many_leases_at_once_agrees_with_judging_each(tmp_path):
    # ps and status judge every lease through liveness.live_ids, which probes the usual
    # job's lock inline; it must answer as lease_alive does for every kind of lease.
    from conftest import lease_record

    from gpurun.ledger import Lease
    from gpurun.liveness import boot_id, lease_alive, live_ids, lock_job, process_start

    prefix = str(tmp_path / "srv.")
    me = {"pid": os.getpid(), "start": process_start(os.getpid()), "role": "gpurun"}
    gone = {"pid": os.getpid(), "start": process_start(os.getpid()) + 1, "role": "gpurun"}
    held = lock_job(f"{prefix}1.lock")
    holder = subprocess.Popen(["sleep", "60"], pass_fds=(held,))
    os.close(held)
    os.close(lock_job(f"{prefix}2.lock"))  # a lock file nobody holds
    os.symlink("/dev/null", f"{prefix}6.lock")  # refused: kept, fail closed
    os.mkdir(f"{prefix}7.lock")
    records = [
        lease_record(1, boot=boot_id(), holders=[gone]),
        lease_record(2, boot=boot_id(), holders=[gone]),
        lease_record(3, boot=boot_id(), holders=[me]),
        lease_record(4, boot=boot_id(), holders=[gone]),
        lease_record(5, boot="another", holders=[me]),
        lease_record(6, boot=boot_id(), holders=[gone]),
        lease_record(7, boot=boot_id(), holders=[gone]),
        lease_record(8, kind="reservation", expires=time.time() + 60),
        lease_record(9, kind="reservation", expires=time.time() - 60),
    ]
    leases = [Lease.from_json(record) for record in records]
    try:
        now = time.time()
        each = {lease.id for lease in leases if lease_alive(lease, f"{prefix}{lease.id}.lock", now)}

        assert live_ids(leases, prefix, now) == each == {1, 3, 6, 8}
    finally:
        holder.kill()
        holder.wait()

"""The queue: first come first served without starvation, backfill, detached jobs, --after."""

from __future__ import annotations

import json
import os
import signal
import struct
import time

import pytest
from conftest import read_json, wait_for, wait_json


def waiting_ids(gpurun) -> list[int]:
    return [job["id"] for job in gpurun.ps() if job["state"] == "waiting"]


def start_and_queue(gpurun, *args: str):
    """Start a gpurun that must wait; return once its entry is in the queue."""
    before = len(waiting_ids(gpurun))
    proc = gpurun.start(*args)
    wait_for(lambda: len(waiting_ids(gpurun)) > before, what="the job to be queued")
    return proc


def test_a_big_job_is_not_starved_by_later_small_ones(gpurun):
    go = gpurun.tmp / "go"
    small = gpurun.start("-g", "1", "-c", "0", "--", *gpurun.probe("a", "--wait-for", str(go)))
    wait_json(gpurun.tmp / "a.start")
    big = start_and_queue(
        gpurun, "-g", "4", "-c", "0", "--", *gpurun.probe("big", "--sleep", "0.3")
    )
    later = []
    for i in range(5):
        later.append(gpurun.start("-g", "1", "-c", "0", "--", *gpurun.probe(f"s{i}")))
        time.sleep(0.1)  # arrivals 100 ms apart, as in the issue
    wait_for(lambda: len(waiting_ids(gpurun)) == 6, what="all six queued")

    go.touch()
    codes = [proc.wait(timeout=60) for proc in [small, big, *later]]

    assert codes == [0] * 7
    big_start = read_json(gpurun.tmp / "big.start")["time"]
    assert big_start >= read_json(gpurun.tmp / "a.end")["time"]
    assert all(read_json(gpurun.tmp / f"s{i}.start")["time"] > big_start for i in range(5))
    assert gpurun.ledger()["leases"] == []


@pytest.mark.parametrize(("ask", "starts_at_once"), [("2", True), ("3", False)])
def test_a_later_job_passes_only_if_it_delays_no_one(gpurun, ask, starts_at_once):
    # 8 GPUs: A runs on 4, B waits for 6; C asking 2 fits beside B's claim, C asking 3 does not.
    gpurun.write_config("gpus: 8\ncpus: auto\nkill_grace: 1\n")
    go = gpurun.tmp / "go"
    a = gpurun.start("-g", "4", "-c", "0", "--", *gpurun.probe("a", "--wait-for", str(go)))
    wait_json(gpurun.tmp / "a.start")
    b = start_and_queue(gpurun, "-g", "6", "-c", "0", "--", *gpurun.probe("b"))

    c = gpurun.start("-g", ask, "-c", "0", "--", *gpurun.probe("c", "--wait-for", str(go)))
    if starts_at_once:
        wait_json(gpurun.tmp / "c.start")
        assert not (gpurun.tmp / "a.end").exists()
    else:
        wait_for(lambda: len(waiting_ids(gpurun)) == 2, what="C to queue behind B")
        assert not (gpurun.tmp / "c.start").exists()
    go.touch()

    assert [p.wait(timeout=30) for p in (a, b, c)] == [0, 0, 0]
    if not starts_at_once:
        assert read_json(gpurun.tmp / "c.start")["time"] >= read_json(gpurun.tmp / "a.end")["time"]


def test_backfill_with_time_limits_and_overrun(gpurun):
    # A holds 2 of 4 GPUs for at most 3 s; B needs all 4 and must wait for A.
    a = gpurun.start("-g", "2", "-c", "0", "--time", "3", "--", *gpurun.probe("a", "--sleep", "60"))
    wait_json(gpurun.tmp / "a.start")
    b = start_and_queue(gpurun, "-g", "4", "-c", "0", "--", *gpurun.probe("b"))

    # C ends within 1 s, before B could start anyway: it may use what B waits for.
    c = gpurun.run("-g", "1", "-c", "0", "--time", "1", "--", *gpurun.probe("c"))
    # D has no limit: it would delay B, so it waits.
    d = gpurun.run("-g", "1", "-c", "0", "--no-wait", "--", "true")

    assert c.returncode == 0, c.stderr
    assert d.returncode == 75
    assert a.wait(timeout=30) == 143
    assert "ran past its --time limit" in a.stderr.read()
    assert read_json(gpurun.tmp / "a.end")["signal"] == "SIGTERM"
    assert b.wait(timeout=30) == 0


def test_dead_waiters_are_skipped_and_interrupted_ones_leave_no_entry(gpurun):
    go = gpurun.tmp / "go"
    a = gpurun.start("-g", "4", "-c", "0", "--", *gpurun.probe("a", "--wait-for", str(go)))
    wait_json(gpurun.tmp / "a.start")
    doomed = start_and_queue(gpurun, "-g", "4", "-c", "0", "--", "true")
    interrupted = start_and_queue(gpurun, "-g", "4", "-c", "0", "--", "true")
    c = start_and_queue(gpurun, "-g", "1", "-c", "0", "--", *gpurun.probe("c"))

    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=10)
    interrupted.send_signal(signal.SIGINT)
    timed_out = gpurun.run("-g", "4", "-c", "0", "--timeout", "0.5", "--", "true")

    assert interrupted.wait(timeout=10) == 130
    assert timed_out.returncode == 75
    # The dead waiter was reaped by the next gpurun; only A and C remain.
    states = {job["id"]: job["state"] for job in gpurun.ps()}
    assert sorted(states.values()) == ["running", "waiting"]
    go.touch()
    assert a.wait(timeout=20) == 0
    assert c.wait(timeout=20) == 0
    assert gpurun.ledger()["leases"] == []


def test_waiting_output_off_a_terminal_is_one_line_then_one_more(gpurun):
    go = gpurun.tmp / "go"
    a = gpurun.start("-g", "4", "-c", "0", "--", *gpurun.probe("a", "--wait-for", str(go)))
    wait_json(gpurun.tmp / "a.start")
    w = start_and_queue(gpurun, "-g", "1", "-c", "0", "--", "true")
    time.sleep(1.5)  # long enough for a second status update, had there been one

    go.touch()
    _, err = w.communicate(timeout=20)

    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert "waiting" in lines[0] and "1 of 1 in the queue" in lines[0]
    assert "starting after waiting" in lines[1]
    assert a.wait(timeout=10) == 0


def test_detached_job_survives_its_caller_and_logs_everything(gpurun):
    script = "echo out-line; echo err-line >&2; sleep 0.5; echo last; exit 3"

    queued = gpurun.run("-g", "1", "-d", "--", "sh", "-c", script)

    assert queued.returncode == 0, queued.stderr
    job_id = queued.stdout.strip()
    assert job_id.isdigit()
    [job] = [j for j in gpurun.ps() if j["id"] == int(job_id)]
    gpurun_pid = next(
        h["pid"] for h in gpurun.ledger()["leases"][0]["holders"] if h["role"] == "gpurun"
    )
    assert os.getsid(gpurun_pid) != os.getsid(0)
    os.kill(gpurun_pid, signal.SIGHUP)  # a logout: ignored by the detached job
    waited = gpurun.run("wait", job_id)
    logs = gpurun.run("logs", job_id)

    assert waited.returncode == 3
    assert logs.stdout.splitlines() == ["out-line", "err-line", "last"]
    assert job["log"].endswith(f".{job_id}.log")
    assert gpurun.ledger()["leases"] == []


def test_logs_follow_until_the_job_ends(gpurun):
    queued = gpurun.run("-d", "--", "sh", "-c", "echo one; sleep 1; echo two")
    job_id = queued.stdout.strip()

    followed = gpurun.run("logs", "-f", job_id, timeout=30)

    assert followed.stdout.splitlines() == ["one", "two"]
    assert gpurun.run("logs", "999").returncode == 125


def test_after_runs_a_chain_in_order_and_a_failure_cancels(gpurun):
    first = gpurun.run("-d", "--", *gpurun.probe("one", "--sleep", "0.3")).stdout.strip()
    second = gpurun.run("-d", "--after", first, "--", *gpurun.probe("two")).stdout.strip()
    failing = gpurun.run("-d", "--", "sh", "-c", "exit 4").stdout.strip()
    cancelled = gpurun.run("-d", "--after", failing, "--", *gpurun.probe("never")).stdout.strip()
    anyway = gpurun.run("-d", "--after-any", failing, "--", *gpurun.probe("any")).stdout.strip()

    assert gpurun.run("wait", first, second).returncode == 0
    assert gpurun.run("wait", cancelled).returncode == 125
    assert gpurun.run("wait", anyway, failing).returncode == 4
    assert read_json(gpurun.tmp / "two.start")["time"] >= read_json(gpurun.tmp / "one.end")["time"]
    assert not (gpurun.tmp / "never.start").exists()
    assert (gpurun.tmp / "any.start").exists()
    [record] = [j for j in gpurun.ps("-a") if j["id"] == int(cancelled)]
    assert record["state"] == "cancelled"
    assert f"job {failing}" in record["reason"] and "exit 4" in record["reason"]
    [row] = [line for line in gpurun.run("ps", "-a").stdout.splitlines() if "never" in line]
    assert row.split()[:1] == [cancelled] and record["reason"] in row
    assert gpurun.run("-d", "--after", "9999", "--", "true").returncode == 125


def test_kill_works_on_waiting_and_detached_jobs(gpurun):
    running = gpurun.run("-g", "4", "-d", "--", *gpurun.probe("a", "--sleep", "60"))
    wait_json(gpurun.tmp / "a.start")
    waiting = gpurun.run("-g", "1", "-d", "--", "true")
    running_id, waiting_id = running.stdout.strip(), waiting.stdout.strip()
    wait_for(lambda: waiting_ids(gpurun) == [int(waiting_id)], what="the queued job")

    killed_waiting = gpurun.run("kill", waiting_id)
    killed_running = gpurun.run("kill", running_id)

    assert killed_waiting.returncode == 0, killed_waiting.stderr
    assert killed_running.returncode == 0, killed_running.stderr
    assert gpurun.run("wait", running_id).returncode == 143
    assert gpurun.ledger()["leases"] == []
    assert not (gpurun.tmp / "w.start").exists()


def test_priority_goes_first_and_only_root_may_raise_it(gpurun):
    go = gpurun.tmp / "go"
    a = gpurun.start("-g", "4", "-c", "0", "--", *gpurun.probe("a", "--wait-for", str(go)))
    wait_json(gpurun.tmp / "a.start")
    low = start_and_queue(gpurun, "-g", "4", "-c", "0", "--", *gpurun.probe("low"))
    high = start_and_queue(
        gpurun, "-g", "4", "-c", "0", "--priority", "5", "--", *gpurun.probe("high")
    )

    positions = {job["id"]: job.get("position") for job in gpurun.ps()}
    go.touch()

    assert [p.wait(timeout=30) for p in (a, low, high)] == [0, 0, 0]
    assert positions[3] == 1 and positions[2] == 2
    assert (
        read_json(gpurun.tmp / "high.start")["time"] < read_json(gpurun.tmp / "low.start")["time"]
    )


def test_thirty_jobs_queued_at_once_start_in_arrival_order_per_size(gpurun):
    go = gpurun.tmp / "go"
    blocker = gpurun.start(
        "-g", "4", "-c", "0", "--", *gpurun.probe("blocker", "--wait-for", str(go))
    )
    wait_json(gpurun.tmp / "blocker.start")
    sizes = [(1, 2, 4)[i % 3] for i in range(30)]
    procs = [
        gpurun.start("-g", str(size), "-c", "0", "--", *gpurun.probe(f"j{i}", "--sleep", "0.05"))
        for i, size in enumerate(sizes)
    ]
    wait_for(lambda: len(waiting_ids(gpurun)) == 30, timeout=60, what="30 queued jobs")
    arrival = {
        job["command"][2].rsplit("/", 1)[1]: job["id"]
        for job in gpurun.ps()
        if job["state"] == "waiting"
    }

    go.touch()
    codes = [proc.wait(timeout=120) for proc in procs]

    assert codes == [0] * 30
    spans = {}
    for i in range(30):
        start = read_json(gpurun.tmp / f"j{i}.start")
        end = read_json(gpurun.tmp / f"j{i}.end")
        spans[i] = (
            start["time"],
            end["time"],
            set(start["env"]["CUDA_VISIBLE_DEVICES"].split(",")),
        )
    for i in spans:
        for j in spans:
            if i < j:
                (s1, e1, g1), (s2, e2, g2) = spans[i], spans[j]
                if s1 < e2 and s2 < e1:
                    assert not g1 & g2, f"jobs {i} and {j} shared GPUs {g1 & g2}"
    # Placement follows the queue: among jobs of one size, an earlier arrival is never
    # placed after a later one (jobs placed in one ledger write share a time).
    history = [
        json.loads(line)
        for line in gpurun.state_dir.glob("*.history.jsonl").__next__().read_text().splitlines()
    ]
    placed = {record["id"]: record["placed"] for record in history}
    for size in (1, 2, 4):
        ids = sorted(arrival[f"j{i}"] for i in range(30) if sizes[i] == size)
        times = [placed[i] for i in ids]
        assert times == sorted(times), (size, ids, times)
    assert blocker.wait(timeout=10) == 0
    assert gpurun.ledger()["leases"] == []


def test_on_finish_gets_the_record_and_does_not_hold_the_lease(gpurun):
    out = gpurun.tmp / "hook.json"
    gpurun.write_config(
        f"gpus: 4\ncpus: auto\non_finish: 'cat > {out}.tmp; mv {out}.tmp {out}; sleep 30'\n"
    )

    result = gpurun.run("-g", "2", "-n", "hooked", "--", "sh", "-c", "exit 5")

    assert result.returncode == 5
    assert gpurun.ledger()["leases"] == []
    record = json.loads(wait_json(out) and out.read_text())
    assert record["name"] == "hooked" and record["exit_code"] == 5 and record["gpus"] == [0, 1]


def test_jobs_that_leave_the_queue_are_recorded_as_withdrawn(gpurun):
    go = gpurun.tmp / "go"
    a = gpurun.start("-g", "4", "-c", "0", "--", *gpurun.probe("a", "--wait-for", str(go)))
    wait_json(gpurun.tmp / "a.start")
    interrupted = start_and_queue(gpurun, "-g", "1", "-c", "0", "--", "true")
    detached = gpurun.run("-g", "1", "-c", "0", "-d", "--", "true").stdout.strip()
    interrupted.send_signal(signal.SIGINT)
    timed_out = gpurun.run("-g", "1", "-c", "0", "--timeout", "0.2", "--", "true")
    killed = gpurun.run("kill", detached)

    waited = gpurun.run("wait", detached)
    go.touch()
    assert a.wait(timeout=20) == 0
    finished = {job["id"]: job for job in gpurun.ps("-a") if job["state"] != "exited"}

    assert interrupted.wait(timeout=10) == 130
    assert timed_out.returncode == 75
    assert killed.returncode == 0, killed.stderr
    assert waited.returncode == 143, waited.stderr
    outcomes = sorted((job["exit_code"], job["state"]) for job in finished.values())
    assert outcomes == [(75, "withdrawn"), (130, "withdrawn"), (143, "withdrawn")]
    assert "--timeout" in next(j["reason"] for j in finished.values() if j["exit_code"] == 75)
    assert finished[int(detached)]["reason"] == "interrupted by signal 15 before it started"


def test_a_job_is_in_history_before_it_leaves_the_ledger(gpurun):
    """`gpurun wait` and `ps -a` read the ledger, then history: a job gone from one must be
    in the other, so the history line is written before the ledger that drops the job."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    gpurun.state_dir.mkdir()
    watch = libc.inotify_init1(os.O_NONBLOCK)
    in_modify, in_moved_to = 0x2, 0x80
    assert libc.inotify_add_watch(watch, bytes(gpurun.state_dir), in_modify | in_moved_to) >= 0
    try:
        assert gpurun.run("-g", "1", "-c", "0", "--", "true").returncode == 0
        data = os.read(watch, 65536)
    finally:
        os.close(watch)

    events = []
    while data:
        mask, _, length = struct.unpack_from("iIII", data)[1:4]
        name = data[16 : 16 + length].rstrip(b"\0").decode()
        events.append((name, mask))
        data = data[16 + length :]
    history = [
        i
        for i, (name, mask) in enumerate(events)
        if name.endswith(".history.jsonl") and mask & in_modify
    ]
    ledgers = [
        i for i, (name, mask) in enumerate(events) if name.endswith(".json") and mask & in_moved_to
    ]

    assert len(history) == 1 and len(ledgers) >= 2, events
    # The last ledger write is the one that frees the job; history comes just before it.
    assert ledgers[-2] < history[0] < ledgers[-1], events


def test_a_waiting_job_forgotten_by_a_forced_reset_still_reaches_history(gpurun):
    go = gpurun.tmp / "go"
    a = gpurun.start("-g", "4", "-c", "0", "--", *gpurun.probe("a", "--wait-for", str(go)))
    wait_json(gpurun.tmp / "a.start")
    waiting = gpurun.run("-g", "1", "-c", "0", "-d", "--", "true").stdout.strip()
    wait_for(lambda: waiting_ids(gpurun) == [int(waiting)], what="the queued job")

    assert gpurun.run("reset", "--yes", "--force").returncode == 0
    waited = gpurun.run("wait", waiting)
    go.touch()
    assert a.wait(timeout=20) == 0

    def records() -> list[str]:
        return [job["state"] for job in gpurun.ps("-a") if job["id"] == int(waiting)]

    assert wait_for(records, what="the forgotten job's record") == ["withdrawn"]
    assert waited.returncode == 125, waited.stderr

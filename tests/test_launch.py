"""What a job is given, what gpurun exits with, and what it leaves behind."""

from __future__ import annotations

import os
import subprocess

from conftest import read_json, wait_json


def test_job_gets_its_gpus_cpus_and_environment(gpurun):
    cpus = sorted(os.sched_getaffinity(0))

    result = gpurun.run("-g", "2", "-c", "1", "-n", "probe", "--", *gpurun.probe("a"))

    assert result.returncode == 0, result.stderr
    start = read_json(gpurun.tmp / "a.start")
    assert start["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert start["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert start["env"]["GPURUN_GPUS"] == "0,1"
    assert start["env"]["OMP_NUM_THREADS"] == "1"
    assert start["affinity"] == [cpus[0]]
    history = gpurun.ps("-a")
    assert [(j["id"], j["name"], j["gpus"], j["cpus"], j["exit_code"]) for j in history] == [
        (int(start["env"]["GPURUN_JOB_ID"]), "probe", [0, 1], [cpus[0]], 0)
    ]
    assert gpurun.ledger()["leases"] == []


def test_no_gpus_hides_every_gpu_and_keeps_callers_omp(gpurun):
    env = dict(gpurun.env, OMP_NUM_THREADS="7", CUDA_VISIBLE_DEVICES="0,1,2,3")

    result = gpurun.run("--", *gpurun.probe("a"), env=env)

    assert result.returncode == 0, result.stderr
    start = read_json(gpurun.tmp / "a.start")
    assert start["env"]["CUDA_VISIBLE_DEVICES"] == ""
    assert start["env"]["OMP_NUM_THREADS"] == "7"
    assert len(start["affinity"]) == 1


def test_cpus_zero_means_no_pinning(gpurun):
    result = gpurun.run("-g", "1", "-c", "0", "--", *gpurun.probe("a"))

    assert result.returncode == 0, result.stderr
    start = read_json(gpurun.tmp / "a.start")
    assert start["affinity"] == sorted(os.sched_getaffinity(0))
    assert start["env"]["OMP_NUM_THREADS"] is None


def test_exact_gpu_ids(gpurun):
    result = gpurun.run("--gpu-ids", "3,1", "-c", "0", "--", *gpurun.probe("a"))

    assert result.returncode == 0, result.stderr
    assert read_json(gpurun.tmp / "a.start")["env"]["CUDA_VISIBLE_DEVICES"] == "3,1"


def test_exit_code_passes_through(gpurun):
    assert gpurun.run("--", "sh", "-c", "exit 7").returncode == 7
    assert gpurun.run("--", "false").returncode == 1
    assert gpurun.run("run", "-g", "1", "--", "true").returncode == 0


def test_command_killed_by_a_signal_exits_128_plus_n_and_says_which(gpurun):
    result = gpurun.run("-g", "1", "--", "sh", "-c", "kill -USR1 $$")

    assert result.returncode == 128 + 10
    assert "SIGUSR1" in result.stderr
    assert gpurun.ps("-a")[0]["exit_code"] == 138


def test_stdin_and_stdout_pass_straight_through(gpurun):
    result = gpurun.run("--", "tr", "a-z", "A-Z", input="hello\n")

    assert result.returncode == 0
    assert result.stdout == "HELLO\n"


def test_no_wait_and_timeout_exit_75_and_leave_no_trace(gpurun):
    hold = gpurun.start("-g", "4", "-c", "0", "--", *gpurun.probe("hold", "--sleep", "30"))
    wait_json(gpurun.tmp / "hold.start")

    no_wait = gpurun.run("-g", "1", "--no-wait", "--", "true")
    timed_out = gpurun.run("-g", "1", "--timeout", "0.3", "--", "true")

    assert no_wait.returncode == 75
    assert no_wait.stderr.strip().splitlines()[-1].startswith("gpurun: ")
    assert "--no-wait" in no_wait.stderr
    assert timed_out.returncode == 75
    assert "--timeout" in timed_out.stderr
    assert len(gpurun.ps()) == 1
    hold.kill()


def test_waiting_job_says_what_it_waits_for_and_starts_when_freed(gpurun):
    hold = gpurun.start(
        "-g",
        "3",
        "-c",
        "0",
        "-n",
        "holder",
        "--",
        *gpurun.probe("hold", "--wait-for", str(gpurun.tmp / "go")),
    )
    wait_json(gpurun.tmp / "hold.start")

    waiter = gpurun.start("-g", "2", "-c", "0", "--", *gpurun.probe("w"))
    first_line = waiter.stderr.readline()
    (gpurun.tmp / "go").touch()
    waiter.wait(timeout=20)

    assert "waiting" in first_line and "holder" in first_line
    assert waiter.returncode == 0
    assert hold.wait(timeout=10) == 0
    assert read_json(gpurun.tmp / "w.start")["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_interrupted_while_waiting_exits_130_and_leaves_no_trace(gpurun):
    hold = gpurun.start("-g", "4", "-c", "0", "--", *gpurun.probe("hold", "--sleep", "30"))
    wait_json(gpurun.tmp / "hold.start")
    waiter = gpurun.start("-g", "1", "--", "true")
    assert "waiting" in waiter.stderr.readline()

    waiter.send_signal(subprocess.signal.SIGINT)

    assert waiter.wait(timeout=10) == 130
    assert [job["id"] for job in gpurun.ps()] == [1]
    assert all(job["id"] == 1 for job in gpurun.ledger()["leases"])
    hold.kill()


def test_a_double_dash_after_the_command_belongs_to_the_command(gpurun):
    cases = {
        ("--", "echo", "a", "--", "b"): "a -- b",
        ("echo", "a", "--", "b"): "a -- b",
        ("-g", "1", "echo", "--", "--", "x"): "-- -- x",
        ("-g", "1", "--", "echo", "--lr", "3"): "--lr 3",
    }
    for argv, printed in cases.items():
        result = gpurun.run(*argv)
        assert (result.returncode, result.stdout.strip()) == (0, printed), (argv, result.stderr)
    named = gpurun.run("--", "--", "x")
    assert named.returncode == 127 and "--: command not found" in named.stderr


def test_options_are_never_abbreviated(gpurun):
    result = gpurun.run("--nam", "x", "true")

    assert result.returncode == 2
    assert "unrecognized arguments: --nam" in result.stderr

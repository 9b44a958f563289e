"""Slurm: gpurun inside an allocation, and Slurm as the backend, against a real cluster.

The cluster is the one-node one that tests/slurm/setup starts (four fake GPUs). Without it
these tests are skipped with the reason; under CI=true they fail instead, so CI cannot pass
without having run them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GPURUN, PROBE, one_error_line, read_json, wait_for, wait_json

BIN = str(Path(GPURUN).parent)


def _cluster_problem() -> str | None:
    """Why the Slurm tests cannot run here, or None when a cluster with gpu:4 answers."""
    if shutil.which("sinfo") is None or shutil.which("srun") is None:
        return "Slurm is not installed; run tests/slurm/setup as root"
    try:
        result = subprocess.run(
            ["sinfo", "-h", "-o", "%G %t"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return "sinfo gave no answer within 20 s; is slurmctld running? (tests/slurm/setup)"
    if result.returncode != 0:
        return f"sinfo failed: {result.stderr.strip()}; run tests/slurm/setup as root"
    if "gpu:4" not in result.stdout or "down" in result.stdout:
        return f"no up node with gpu:4 (sinfo: {result.stdout.strip()}); run tests/slurm/setup"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    problem = _cluster_problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but the Slurm tests cannot run: {problem}")
    pytest.skip(problem)


@pytest.fixture
def slurm(gpurun, cluster):
    """The gpurun fixture, outside any allocation, with the venv's gpurun on PATH (for jobs
    that run gpurun on the node) and Slurm jobs cancelled at the end."""
    for key in [k for k in gpurun.env if k.startswith("SLURM_")]:
        del gpurun.env[key]
    gpurun.env["PATH"] = BIN + os.pathsep + gpurun.env["PATH"]
    gpurun.env["TMPDIR"] = str(gpurun.tmp / "tmp")
    (gpurun.tmp / "tmp").mkdir()
    yield gpurun
    jobs = squeue(gpurun, "%i|%k")
    mine = [line.split("|")[0] for line in jobs if str(gpurun.tmp) in line]
    if mine:
        subprocess.run(["scancel", *mine], timeout=30, check=False)


def squeue(gpurun, fmt: str, *args: str) -> list[str]:
    result = subprocess.run(
        ["squeue", "-h", "--me", "-o", fmt, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=gpurun.env,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def slurm_state(gpurun, job: str) -> str:
    result = subprocess.run(
        ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return next(w for w in result.stdout.split() if w.startswith("JobState=")).split("=")[1]


def srun_driver(gpurun, script: str, *options: str) -> subprocess.CompletedProcess:
    """Run a shell script as one Slurm step, the way a user drives gpurun in an allocation."""
    return subprocess.run(
        ["srun", f"--comment=driver {gpurun.tmp}", *options, "--", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=gpurun.env,
        cwd=gpurun.tmp,
    )


def test_four_runs_in_an_allocation_get_disjoint_gpus_of_it(slurm):
    slurm.write_config("gpus: 8\ncpus: auto\n")
    go = slurm.tmp / "go"
    probes = " ".join(
        f"gpurun -g 1 -c 0 -d -- {sys.executable} {PROBE} {slurm.tmp / f'p{i}'} --wait-for {go};"
        for i in range(4)
    )
    script = (
        f"echo $SLURM_JOB_ID.$SLURM_STEP_ID $CUDA_VISIBLE_DEVICES > {slurm.tmp / 'step'}; "
        f"{probes} "
        + " ".join(
            f"while [ ! -e {slurm.tmp / f'p{i}'}.start ]; do sleep 0.05; done;" for i in range(4)
        )
        + " gpurun -g 1 --no-wait -- true; echo fifth=$?; "
        f"touch {go}; gpurun wait 1 2 3 4; echo wait=$?"
    )

    result = srun_driver(slurm, script, "--gres=gpu:4", "-c", "2")

    assert result.returncode == 0, result.stderr
    assert "fifth=75" in result.stdout and "wait=0" in result.stdout, result.stdout
    step, visible = (slurm.tmp / "step").read_text().split()
    given = [read_json(slurm.tmp / f"p{i}.start")["env"]["CUDA_VISIBLE_DEVICES"] for i in range(4)]
    assert sorted(given) == sorted(visible.split(",")) and len(set(given)) == 4
    assert not slurm.state_dir.exists()  # the config's state dir was not touched
    assert (slurm.tmp / "tmp" / f"gpurun-slurm-{step}").is_dir()


def test_an_allocation_hands_out_only_its_own_gpus_in_the_parents_form(slurm):
    slurm.write_config("gpus: 4\ncpus: auto\n")
    go = slurm.tmp / "go"
    blocker = slurm.run(
        "--backend", "slurm", "-g", "2", "-c", "1", "-d", "--",
        sys.executable, PROBE, str(slurm.tmp / "blocker"), "--wait-for", str(go),
    )  # fmt: skip
    assert blocker.returncode == 0, blocker.stderr
    wait_json(slurm.tmp / "blocker.start", timeout=60)
    script = (
        f"echo $CUDA_VISIBLE_DEVICES > {slurm.tmp / 'step'}; "
        f"gpurun -g 1 -c 0 -d -- {sys.executable} {PROBE} {slurm.tmp / 'a'} --wait-for {go}; "
        f"gpurun -g 1 -c 0 -- {sys.executable} {PROBE} {slurm.tmp / 'b'}; "
        f"gpurun -g 3 -c 0 -- true; echo third=$?; touch {go}; gpurun wait 1"
    )

    result = srun_driver(slurm, script, "--gres=gpu:2", "-c", "1")

    assert result.returncode == 0, result.stderr
    assert "third=125" in result.stdout, (result.stdout, result.stderr)
    held = set(read_json(slurm.tmp / "blocker.start")["env"]["CUDA_VISIBLE_DEVICES"].split(","))
    visible = (slurm.tmp / "step").read_text().split()[0].split(",")
    given = {read_json(slurm.tmp / f"{n}.start")["env"]["CUDA_VISIBLE_DEVICES"] for n in "ab"}
    assert given == set(visible) and not given & held


def test_a_foreground_job_exits_with_its_code_through_srun(slurm):
    result = slurm.run(
        "--backend", "slurm", "-g", "1", "-c", "1", "-n", "three", "--",
        "sh", "-c", 'echo "gpus=$CUDA_VISIBLE_DEVICES"; echo oops >&2; exit 3',
        timeout=120,
    )  # fmt: skip

    assert result.returncode == 3
    assert result.stdout.startswith("gpus=") and len(result.stdout.split("=")[1].split(",")) == 1
    assert result.stderr == "oops\n"  # srun's own lines are kept back


def test_sigterm_reaches_the_command_through_srun(slurm):
    proc = slurm.start(
        "--backend", "slurm", "-c", "1", "--", sys.executable, PROBE, str(slurm.tmp / "p")
        , "--sleep", "300",
    )  # fmt: skip
    wait_json(slurm.tmp / "p.start", timeout=60)

    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)

    # The command got SIGTERM itself (srun alone would SIGKILL it: 137 and no .end record).
    assert read_json(slurm.tmp / "p.end")["signal"] == "SIGTERM"
    assert proc.returncode == 128 + signal.SIGTERM, err


def test_a_detached_job_shows_in_ps_and_squeue_and_kill_cancels_it(slurm):
    slurm.write_config("gpus: 4\nbackend: slurm\n")
    out = slurm.tmp / "d"
    submitted = slurm.run(
        "-g", "1", "-c", "1", "-d", "-n", "sweep", "--",
        sys.executable, PROBE, str(out), "--sleep", "300", cwd=slurm.tmp,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    assert job.isdigit()
    wait_json(f"{out}.start", timeout=60)

    rows = [row for row in slurm.ps() if row.get("backend") == "slurm" and str(row["id"]) == job]
    assert len(rows) == 1
    row = rows[0]
    assert (row["name"], row["state"], row["kind"]) == ("sweep", "running", "slurm")
    assert len(row["gpus"]) == 1 and row["command"][1:3] == [PROBE, str(out)]
    assert f"slurm:{job}" in slurm.run("ps").stdout
    assert any(line.startswith(f"{job}|sweep") for line in squeue(slurm, "%i|%j"))

    killed = slurm.run("kill", job)

    assert killed.returncode == 0, killed.stderr
    assert wait_json(f"{out}.end", timeout=60)["signal"] == "SIGTERM"
    wait_for(lambda: slurm_state(slurm, job) == "CANCELLED", 60, "the job cancelled")
    assert not [row for row in slurm.ps() if str(row["id"]) == job]
    again = slurm.run("kill", job)
    assert again.returncode == 125 and "has already ended (cancelled)" in again.stderr


def test_logs_reads_the_output_file_of_a_detached_job(slurm):
    submitted = slurm.run(
        "--backend", "slurm", "-c", "1", "-d", "--", "sh", "-c", "echo hello from slurm",
        cwd=slurm.tmp,
    )  # fmt: skip
    job = submitted.stdout.strip()
    wait_for(lambda: slurm_state(slurm, job) == "COMPLETED", 60, "the job to end")

    shown = slurm.run("logs", f"slurm:{job}", cwd=slurm.tmp)

    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "hello from slurm\n"


def test_a_dependency_chain_runs_in_order(slurm):
    order = slurm.tmp / "order"
    go = slurm.tmp / "go"

    def submit(word: str, *after: str) -> str:
        wait = f"while [ ! -e {go} ]; do sleep 0.05; done; " if not after else ""
        result = slurm.run(
            "--backend", "slurm", "-c", "1", "-d", *after,
            "--", "sh", "-c", f"{wait}echo {word} >> {order}", cwd=slurm.tmp,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    first = submit("a")
    second = submit("b", "--after", first)
    third = submit("c", "--after-any", second)
    assert slurm_state(slurm, third) == "PENDING"
    assert "Dependency" in squeue(slurm, "%r", "-j", third)[0]

    go.touch()

    wait_for(lambda: slurm_state(slurm, third) == "COMPLETED", 60, "the last job")
    assert order.read_text().split() == ["a", "b", "c"]


def test_a_request_larger_than_the_cluster_is_refused_with_slurms_reason(slurm):
    for detach in ([], ["-d"]):
        result = slurm.run("--backend", "slurm", "-g", "5", *detach, "--", "true", timeout=60)

        assert result.returncode == 125
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("gpurun: "), result.stderr
        assert "Requested node configuration is not available" in lines[0]


def test_an_unknown_partition_is_refused_with_slurms_reason(slurm):
    slurm.write_config("gpus: 4\nbackend: slurm\nslurm_partition: nosuch\n")

    result = slurm.run("--", "true", timeout=60)

    assert result.returncode == 125
    assert result.stderr.startswith("gpurun: ") and "partition" in result.stderr.lower()
    assert len(result.stderr.splitlines()) == 1


def test_squeue_json_and_format_agree(slurm):
    submitted = slurm.run(
        "--backend", "slurm", "-c", "1", "-d", "--", "sh", "-c", "sleep 300", str(slurm.tmp),
        cwd=slurm.tmp,
    )  # fmt: skip
    job = int(submitted.stdout)
    from gpurun import slurm as backend

    from_json = {j["id"]: j for j in backend._squeue_json()}[job]
    from_format = {j["id"]: j for j in backend._squeue_format()}[job]

    for key in ("name", "user", "slurm_state", "cpus", "comment"):
        assert from_json[key] == from_format[key], key


# Without a cluster: config and options.


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ("backend: slurmm\n", "key 'backend': must be 'local' or 'slurm', not 'slurmm'"),
        ("slurm_partition: [a]\n", "key 'slurm_partition': must be a Slurm partition name"),
        ("slurm_account: 'a b'\n", "key 'slurm_account': must be a Slurm account name"),
    ],
)
def test_bad_backend_keys_are_config_errors(gpurun, config, problem):
    gpurun.write_config("gpus: 4\n" + config)

    result = gpurun.run("--", "true")

    assert result.returncode == 125
    assert result.stderr.startswith("gpurun: ") and problem in result.stderr, result.stderr


def test_local_only_options_are_refused_for_slurm(gpurun):
    result = gpurun.run("--backend", "slurm", "--gpu-ids", "1", "--", "true")

    assert result.returncode == 2
    assert result.stderr == (
        "gpurun: --gpu-ids is for local runs; Slurm chooses GPUs and orders its queue\n"
    )


def test_a_local_run_does_not_import_the_slurm_module(gpurun):
    env = dict(gpurun.env)
    env.pop("SLURM_JOB_ID", None)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "gpurun", "--", "true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines()]
    assert "gpurun.launch" in imported and "gpurun.slurm" not in imported


def test_inside_an_allocation_ids_that_are_not_indices_are_refused(gpurun):
    env = dict(
        gpurun.env, SLURM_JOB_ID="77", CUDA_VISIBLE_DEVICES="GPU-1234", TMPDIR=str(gpurun.tmp)
    )

    result = gpurun.run("-g", "1", "--", "true", env=env)

    assert result.returncode == 125
    assert result.stderr.startswith("gpurun: $CUDA_VISIBLE_DEVICES: holds 'GPU-1234'")


def test_private_folders_of_ended_allocations_are_removed(gpurun, cluster):
    """The first gpurun of an allocation removes the folders of this user's ended jobs."""
    ended = gpurun.tmp / "gpurun-slurm-999999.0"
    ended.mkdir()
    env = dict(gpurun.env, SLURM_JOB_ID="1000000", CUDA_VISIBLE_DEVICES="0", TMPDIR=str(gpurun.tmp))
    env.pop("SLURM_STEP_ID", None)

    result = gpurun.run("-g", "1", "--", "true", env=env)

    assert result.returncode == 0, result.stderr
    assert not ended.exists() and (gpurun.tmp / "gpurun-slurm-1000000").is_dir()
    assert (
        json.loads(gpurun.run("status", "--json", env=env).stdout)["servers"][0]["gpus_total"] == 1
    )


def test_a_slurm_launch_imports_none_of_the_heavy_modules(slurm):
    # Each of these cost every `gpurun --backend slurm` launch one to five milliseconds.
    from test_lean import imported_by

    assert slurm.run("--backend", "slurm", "-g", "1", "--", "true").returncode == 0

    modules = imported_by(["--backend", "slurm", "-g", "1", "--", "true"], slurm.env)

    assert "gpurun.slurm" in modules
    heavy = {"subprocess", "shlex", "shutil", "contextlib", "re", "collections", "gpurun.launch"}
    assert modules & heavy == set()


def test_an_srun_that_cannot_start_is_one_clear_line(gpurun):
    # No cluster needed: the srun on PATH is a script whose interpreter is missing.
    folder = gpurun.tmp / "bin"
    folder.mkdir()
    (folder / "srun").write_text("#!/nonexistent/interpreter\n")
    (folder / "srun").chmod(0o755)
    env = dict(gpurun.env, PATH=f"{folder}{os.pathsep}{gpurun.env['PATH']}")

    result = gpurun.run("--backend", "slurm", "-g", "1", "--", "true", env=env)

    assert result.returncode == 125, result.stderr
    assert "cannot start it" in one_error_line(result.stderr)

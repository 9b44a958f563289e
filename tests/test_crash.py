"""Faults in the middle of a ledger change: SIGKILL at each step, a full disk, a read-only
state dir, a lock held by a stuck process, a lock file left by a crash."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import one_error_line, wait_for

from gpurun.ledger import CRASH_POINTS


def leftovers(folder: Path) -> list[str]:
    """Temporary files a write left behind, in the state dir and jobs/."""
    names = [p.name for p in (folder, folder / "jobs") for p in p.iterdir()] if folder else []
    return [n for n in names if n.startswith(".") and n.endswith((".tmp", ".new"))]


def prepare(gpurun) -> bytes:
    """A ledger with history and a next id, as a server that ran one job has."""
    assert gpurun.run("-g", "1", "--", "true").returncode == 0
    return gpurun.ledger_path().read_bytes()


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_at_each_step_of_a_launch_leaves_the_old_or_the_new_ledger(gpurun, point):
    old = prepare(gpurun)
    marker = gpurun.tmp / "ran"
    env = dict(gpurun.env, GPURUN_CRASH_AT=point)

    crashed = gpurun.run("-g", "1", "--", "touch", str(marker), env=env)
    torn = [gpurun.state_dir / n for n in leftovers(gpurun.state_dir)]
    after_crash = gpurun.ledger_path().read_bytes()

    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert not marker.exists()
    doc = json.loads(after_crash)
    if point == "after-rename":
        assert [(lease["id"], lease["state"]) for lease in doc["leases"]] == [(2, "running")]
    else:
        assert after_crash == old
    if point == "temp-partial":
        # The write was cut off halfway: had it gone to the ledger itself, the ledger would
        # now be torn. The temporary file holds the half that was written.
        assert len(torn) == 1
        with pytest.raises(ValueError):
            json.loads(torn[0].read_bytes())

    # The crashed gpurun is gone, so its lease is dead, its lock free, its leftovers removed.
    gc = gpurun.run("gc", "--json")
    assert gc.returncode == 0, gc.stderr
    assert [lease["id"] for lease in json.loads(gc.stdout)] == (
        [2] if point == "after-rename" else []
    )
    assert leftovers(gpurun.state_dir) == []
    again = gpurun.run("-g", "4", "--no-wait", "--", "touch", str(marker))
    assert again.returncode == 0, again.stderr
    assert marker.exists()
    assert gpurun.ledger()["leases"] == []
    ids = [job["id"] for job in gpurun.ps("-a")]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("point", CRASH_POINTS)
@pytest.mark.parametrize("runs", ["briefly", "long"])
def test_sigkill_at_each_step_of_a_release_loses_no_gpu_and_no_history(gpurun, point, runs):
    # The last change of a launch frees the lease: its gpurun dies there, after the command
    # ended. The lease stays until gc proves the job gone; then every GPU is free again and
    # the job is in history exactly once. It is the second change for a command that ends at
    # once, and the third for one that runs long enough for the ledger to record its pid.
    if runs == "briefly":
        command = ["sh", "-c", f"touch {gpurun.tmp / 'a.end'}; exit 3"]
        env = dict(gpurun.env, GPURUN_CRASH_AT=f"{point}:2")
    else:
        command = gpurun.probe("a", "--exit", "3", "--sleep", "0.5")
        env = dict(gpurun.env, GPURUN_CRASH_AT=f"{point}:3")

    crashed = gpurun.run("-g", "2", "-c", "0", "--", *command, env=env)
    gc = gpurun.run("gc", "--json")

    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert (gpurun.tmp / "a.end").exists()
    assert gc.returncode == 0, gc.stderr
    assert gpurun.ledger()["leases"] == []
    assert gpurun.status()["gpus_free"] == [0, 1, 2, 3]
    assert leftovers(gpurun.state_dir) == []
    history = [(job["id"], job["state"], job["exit_code"]) for job in gpurun.ps("-a")]
    if point == "after-rename":
        assert history == [(1, "exited", 3)]
    else:
        assert len(history) == 1 and history[0][0] == 1, history


@pytest.mark.parametrize("point", ["locked", "temp-written", "after-rename"])
def test_sigkill_during_gc_leaves_a_ledger_that_parses(gpurun, point):
    old = prepare(gpurun)
    env = dict(gpurun.env, GPURUN_CRASH_AT=point)

    crashed = gpurun.run("gc", env=env)

    assert crashed.returncode == -signal.SIGKILL
    doc = json.loads(gpurun.ledger_path().read_bytes())
    assert doc["leases"] == []
    if point != "after-rename":
        assert gpurun.ledger_path().read_bytes() == old
    assert gpurun.run("-g", "1", "--no-wait", "--", "true").returncode == 0


def test_a_lock_file_left_by_a_crash_never_blocks(gpurun):
    prepare(gpurun)
    lock = Path(str(gpurun.ledger_path()) + ".lock")
    job_lock = gpurun.state_dir / "jobs" / f"{gpurun.ledger_path().stem}.2.lock"
    job_lock.write_text("")  # a job lock whose gpurun died before writing the ledger
    os.chmod(lock, 0o600)  # and a lock file another umask made

    result = gpurun.run("-g", "4", "--no-wait", "--", "true")

    assert result.returncode == 0, result.stderr
    assert lock.exists()


# -- a full disk and a read-only state dir --------------------------------------------------


@contextlib.contextmanager
def small_filesystem(size: str = "256k"):
    """A tmpfs of `size` (root only); skips where mounting is not allowed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the RLIMIT_FSIZE test covers the rest")
    where = tempfile.mkdtemp(prefix="gpurun-fs-")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", where],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        os.rmdir(where)
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield Path(where)
    finally:
        subprocess.run(["umount", "-l", where], check=False)
        os.rmdir(where)


def fill(folder: Path) -> None:
    """Take every free byte of the file system `folder` is on."""
    with open(folder / "filler", "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0")


def assert_failed_cleanly(gpurun, result, ledger: Path, old: bytes, marker: Path) -> None:
    assert result.returncode == 125, result.stderr
    line = one_error_line(result.stderr)
    assert str(ledger.parent) in line and "left as it was" in line
    assert ledger.read_bytes() == old
    assert not marker.exists()
    assert leftovers(ledger.parent) == []


def test_a_full_disk_leaves_the_old_ledger_and_starts_nothing(gpurun):
    with small_filesystem() as fs:
        env = dict(gpurun.env, GPURUN_STATE_DIR=str(fs / "state"))
        assert gpurun.run("-g", "1", "--", "true", env=env).returncode == 0
        ledger = next((fs / "state").glob("*.json"))
        old = ledger.read_bytes()
        marker = gpurun.tmp / "ran"
        fill(fs)

        result = gpurun.run("-g", "1", "--", "touch", str(marker), env=env)
        gc = gpurun.run("gc", env=env)

        assert_failed_cleanly(gpurun, result, ledger, old, marker)
        assert gc.returncode == 125 and ledger.read_bytes() == old
        os.unlink(fs / "filler")
        assert gpurun.run("-g", "1", "--", "touch", str(marker), env=env).returncode == 0
        assert marker.exists()


def test_a_read_only_state_dir_leaves_the_old_ledger_and_starts_nothing(gpurun):
    with small_filesystem() as fs:
        env = dict(gpurun.env, GPURUN_STATE_DIR=str(fs / "state"))
        assert gpurun.run("-g", "1", "--", "true", env=env).returncode == 0
        ledger = next((fs / "state").glob("*.json"))
        old = ledger.read_bytes()
        marker = gpurun.tmp / "ran"
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)

        result = gpurun.run("-g", "1", "--", "touch", str(marker), env=env)
        ps = gpurun.run("ps", env=env)

        assert_failed_cleanly(gpurun, result, ledger, old, marker)
        assert "Read-only file system" in result.stderr
        assert ps.returncode == 0


def test_a_file_size_limit_leaves_the_old_ledger_and_starts_nothing(gpurun):
    # The same fault without root: RLIMIT_FSIZE makes writes past the limit fail with EFBIG
    # (Python ignores SIGXFSZ), as a full disk makes them fail with ENOSPC.
    import resource

    assert gpurun.run("-g", "0", "-c", "0", "--", "true").returncode == 0
    ledger = gpurun.ledger_path()
    old = ledger.read_bytes()
    marker = gpurun.tmp / "ran"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(old) // 2, len(old) // 2))

    result = gpurun.run("-g", "1", "--", "touch", str(marker), preexec_fn=limit)

    assert_failed_cleanly(gpurun, result, ledger, old, marker)


# -- a lock held by a stuck process ---------------------------------------------------------


def test_a_stuck_lock_holder_is_named_after_lock_timeout(gpurun):
    prepare(gpurun)
    gpurun.write_config("gpus: 4\ncpus: auto\nlock_timeout: 0.5\n")
    lock = str(gpurun.ledger_path()) + ".lock"
    ready = gpurun.tmp / "locked"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "open(sys.argv[2], 'w').close()\n"
            "time.sleep(600)\n",
            lock,
            str(ready),
        ]
    )
    try:
        wait_for(ready.exists, what="the stuck process to take the lock")
        old = gpurun.ledger_path().read_bytes()

        results = [gpurun.run(*args) for args in (["-g", "1", "--", "true"], ["gc"])]

        for result in results:
            assert result.returncode == 125
            line = one_error_line(result.stderr)
            assert lock in line and "lock_timeout (0.5 s)" in line
            assert f"held by pid {holder.pid}" in line
        assert gpurun.ledger_path().read_bytes() == old
    finally:
        holder.kill()
        holder.wait()
    with open(lock) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def orphan_a_command_that_closed_its_job_lock(gpurun) -> Path:
    """Start a command that drops every inherited descriptor (the job lock among them), as
    daemons do, and kill its gpurun before the ledger learns the command's pid (at its
    second change); return the job's pid file."""
    ready = gpurun.tmp / "ready"
    closer = (
        "import os, time; os.closerange(3, 4096); "
        f"open({str(ready)!r}, 'w').close(); time.sleep(60)"
    )
    env = dict(gpurun.env, GPURUN_CRASH_AT="locked:2")
    crashed = gpurun.start("-g", "4", "--", sys.executable, "-c", closer, env=env)
    assert crashed.wait(timeout=30) == -signal.SIGKILL
    wait_for(ready.exists, what="the command to start")
    [pid_file] = (gpurun.state_dir / "jobs").glob("*.pid")
    return pid_file


def test_a_command_that_closed_its_job_lock_keeps_its_gpus_when_gpurun_dies_before_recording_it(
    gpurun,
):
    pid_file = orphan_a_command_that_closed_its_job_lock(gpurun)
    [lease] = gpurun.ledger()["leases"]
    assert [h["role"] for h in lease["holders"]] == ["gpurun"]

    busy = gpurun.run("-g", "1", "--no-wait", "--", "true")
    gc = gpurun.run("gc", "--json")

    assert busy.returncode == 75, busy.stderr
    assert json.loads(gc.stdout) == []
    assert [lease["id"] for lease in gpurun.ledger()["leases"]] == [lease["id"]]
    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
    wait_for(lambda: not gpurun.run("gc", "--json").stdout.strip("[]\n "), what="the reap")
    assert gpurun.ledger()["leases"] == []


@pytest.mark.skipif(os.geteuid() != 0, reason="gives a file to another user")
def test_a_pid_file_that_is_not_the_jobs_users_keeps_no_lease(gpurun):
    # Every user may replace a file in jobs/ (the folder is writable by all), so a pid file
    # another user wrote, naming a live process, must not keep a dead job's GPUs.
    pid_file = orphan_a_command_that_closed_its_job_lock(gpurun)
    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
    with open(f"/proc/{os.getpid()}/stat") as f:
        start = f.read().rsplit(")", 1)[1].split()[19]
    pid_file.unlink()
    pid_file.write_text(f"{os.getpid()} {start}\n")
    os.chown(pid_file, 65534, 65534)

    gc = gpurun.run("gc", "--json")

    assert [lease["id"] for lease in json.loads(gc.stdout)] == [1]
    assert gpurun.ledger()["leases"] == []
    assert not pid_file.exists()

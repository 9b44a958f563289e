"""Several users on one host: strict umasks, fs.protected_regular, who may end whose job,
and a shared /tmp where a folder or a link may have been planted."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import one_error_line, wait_for

ALICE = 60101
BOB = 60102


@pytest.fixture
def lab(users):
    """A config every user can read, and a state dir root made as an admin would."""
    folder = users.root / "lab"
    folder.mkdir(mode=0o755)
    config = folder / "gpurun.yaml"
    config.write_text(f"state_dir: {folder}/state\ngpus: 4\ncpus: auto\nkill_grace: 1\n")
    config.chmod(0o644)
    subprocess.run(["install", "-d", "-m", "0777", str(folder / "state")], check=True)
    yield config
    subprocess.run(["rm", "-rf", str(folder)], check=False)


def test_users_with_umask_077_take_turns_with_protected_regular(users, lab, protected_regular):
    state = lab.parent / "state"

    turns = [
        users.run(ALICE, lab, "-g", "1", "-c", "0", "--", "true"),
        users.run(BOB, lab, "-g", "2", "--", "true"),
        users.run(BOB, lab, "-d", "-g", "1", "--", "true"),
        users.run(ALICE, lab, "-g", "4", "--", "true"),
        users.run(0, lab, "-g", "1", "--", "true"),
    ]
    waited = users.run(ALICE, lab, "wait", "3")
    gc = users.run(BOB, lab, "gc")
    history = json.loads(users.run(ALICE, lab, "ps", "-a", "--json").stdout)

    for result in turns:
        assert result.returncode == 0, result.stderr
    assert waited.returncode == 0 and gc.returncode == 0, waited.stderr + gc.stderr
    assert [(job["id"], job["user"], job["exit_code"]) for job in history] == [
        (1, str(ALICE), 0),
        (2, str(BOB), 0),
        (3, str(BOB), 0),
        (4, str(ALICE), 0),
        (5, "root", 0),
    ]
    # Every shared file is open to all; a detached job's log is its owner's, by its umask.
    for path in [state, *state.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.parent.name == "logs":
            assert path.stat().st_uid == BOB and mode == 0o600, path
        else:
            assert mode == (0o777 if path.is_dir() else 0o666), path
    assert not [p for p in state.rglob(".*")]


def test_only_the_owner_or_root_may_kill_or_release(users, lab):
    job = subprocess.Popen(
        users.command(ALICE, "-g", "1", "-c", "0", "-n", "long", "--", "sleep", "60"),
        env={"PATH": "/usr/bin:/bin", "HOME": "/", "GPURUN_CONFIG": str(lab)},
    )
    try:
        wait_for(
            lambda: [j for j in json.loads(users.run(0, lab, "ps", "--json").stdout) if j["pid"]],
            what="alice's job to run",
        )
        booked = users.run(ALICE, lab, "alloc", "box", "-g", "1")

        kill = users.run(BOB, lab, "kill", "long")
        release = users.run(BOB, lab, "release", "box")
        still = users.run(0, lab, "ps", "--json")
        by_root = users.run(0, lab, "kill", "long")
        released = users.run(ALICE, lab, "release", "box")

        assert booked.returncode == 0, booked.stderr
        assert kill.returncode == 125
        assert one_error_line(kill.stderr).startswith(f"gpurun: job 1 belongs to {ALICE}")
        assert release.returncode == 125
        assert f"belongs to {ALICE}; only they or root" in one_error_line(release.stderr)
        assert [j["name"] for j in json.loads(still.stdout)] == ["long", "box"]
        assert by_root.returncode == 0, by_root.stderr
        assert job.wait(timeout=30) == 143
        assert released.returncode == 0, released.stderr
    finally:
        job.kill()
        job.wait()


def test_a_state_dir_made_by_another_users_first_gpurun_is_shared(users):
    # Alice ran gpurun first and so made the state dir in a sticky shared folder: hers, 0777,
    # not sticky. Bob and root join it: every user could already rewrite what is in it, so
    # its owner has no power over it that they lack, and links planted in it are refused.
    shared = users.root / "tmp"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    config = shared / "gpurun.yaml"
    config.write_text(f"state_dir: {shared}/gpurun\ngpus: 2\ncpus: auto\n")
    config.chmod(0o644)

    turns = [users.run(uid, config, "-g", "1", "--", "true") for uid in (ALICE, BOB, 0, ALICE)]
    history = json.loads(users.run(BOB, config, "ps", "-a", "--json").stdout)

    for result in turns:
        assert result.returncode == 0, result.stderr
    assert (shared / "gpurun").stat().st_uid == ALICE
    assert [job["user"] for job in history] == [str(ALICE), str(BOB), "root", str(ALICE)]
    subprocess.run(["rm", "-rf", str(shared)], check=False)


def plant(gpurun, what: str) -> Path:
    """Replace part of a working state dir with a symbolic link to a victim file or folder."""
    assert gpurun.run("-g", "1", "--", "true").returncode == 0
    victim = gpurun.tmp / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me\n")
    ledger = gpurun.ledger_path()
    target = {
        "state dir": gpurun.state_dir,
        "ledger": ledger,
        "lock": Path(f"{ledger}.lock"),
        "jobs": gpurun.state_dir / "jobs",
    }[what]
    moved = gpurun.tmp / "moved"
    os.rename(target, moved)
    if what == "state dir":
        os.symlink(moved, target)
    else:
        os.symlink(victim / "precious", target) if target.name != "jobs" else os.symlink(
            victim, target
        )
    return victim


@pytest.mark.parametrize("what", ["state dir", "ledger", "lock", "jobs"])
def test_a_symbolic_link_in_the_state_dir_is_refused(gpurun, what):
    victim = plant(gpurun, what)

    result = gpurun.run("-g", "1", "--", "true")

    assert result.returncode == 125, result.stderr
    line = one_error_line(result.stderr)
    assert "symbolic link" in line and ("remove the link" in line or "real folder" in line)
    assert sorted(p.name for p in victim.iterdir()) == ["precious"]
    assert (victim / "precious").read_text() == "keep me\n"


@pytest.mark.parametrize("slash", ["", "/"])
def test_a_linked_state_dir_is_refused_before_anything_is_made_in_it(gpurun, slash):
    # A fresh state dir that is a link, named with or without a trailing slash (with one,
    # lstat looks through the link): refused by every command, with nothing made behind it.
    victim = gpurun.tmp / "victim"
    victim.mkdir()
    os.symlink(victim, gpurun.tmp / "linked")
    gpurun.write_config("gpus: 2\ncpus: auto\n")
    env = dict(gpurun.env, GPURUN_STATE_DIR=f"{gpurun.tmp / 'linked'}{slash}")

    for argv in (["-g", "1", "--", "true"], ["alloc", "box", "-g", "1"], ["gc"], ["ps"]):
        result = gpurun.run(*argv, env=env)

        assert result.returncode == 125, (argv, result.stderr)
        assert "symbolic link" in one_error_line(result.stderr), argv
        assert list(victim.iterdir()) == [], argv

"""`gpurun doctor`: what it finds in real state dirs, ledgers, inventories and mount tables."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gpurun.config import load_config
from gpurun.doctor import diagnose, doctor_text, mount_of, nfs_lock_problem, parse_mountinfo

FAKE_NVIDIA_SMI = """#!/bin/sh
echo "0, GPU-aaaa, 00000000:01:00.0, Fake GPU, 81920 MiB"
echo "1, GPU-bbbb, 00000000:02:00.0, Fake GPU, 81920 MiB"
"""


@pytest.fixture(autouse=True)
def _no_gpurun_env(monkeypatch):
    """In-process configs must not pick up the environment of whoever runs the tests."""
    for name in ("GPURUN_STATE_DIR", "GPURUN_SERVER", "GPURUN_CONFIG", "GPURUN_NVIDIA_SMI"):
        monkeypatch.delenv(name, raising=False)


def usable_cpu() -> int:
    return min(os.sched_getaffinity(0))


def report_for(gpurun, server: str | None = None, mountinfo: str | None = None) -> dict:
    """Diagnose the fixture's config as `gpurun doctor` on server `server` would."""
    config = load_config(str(gpurun.config), server)
    return diagnose(config, mountinfo)


def test_fresh_state_dir_is_shared_writable_and_local(gpurun):
    assert gpurun.run("-g", "1", "--", "true").returncode == 0

    report = report_for(gpurun)

    state = report["state_dir"]
    assert state["path"] == str(gpurun.state_dir)
    assert state["exists"] is True and state["mode"] == "0777"
    assert state["shared"] is True and state["writable"] is True
    assert state["nfs"] is False
    if shutil.which("findmnt"):
        found = subprocess.run(
            ["findmnt", "-n", "-o", "FSTYPE", "-T", str(gpurun.state_dir)],
            capture_output=True,
            text=True,
            check=True,
        )
        assert state["filesystem"] == found.stdout.strip()
    assert report["config"] == str(gpurun.config)
    assert report["gpus"] == [0, 1, 2, 3]
    assert report["problems"] == []
    text = doctor_text(report)
    assert (
        f"state dir: {gpurun.state_dir} (mode 0777, owner {getpass.getuser()}, shared, writable,"
        in text
    )
    assert "GPUs: 0,1,2,3" in text.splitlines()
    assert "no problems found" in text.splitlines()


@pytest.mark.parametrize(("mode", "says"), [(0o1777, "sticky bit"), (0o755, "mode 0755")])
def test_sticky_or_private_state_dir_is_a_problem(gpurun, mode, says):
    gpurun.state_dir.mkdir()
    os.chmod(gpurun.state_dir, mode)

    report = report_for(gpurun)

    assert report["state_dir"]["mode"] == f"{mode:04o}"
    assert report["state_dir"]["shared"] is False
    [problem] = report["problems"]
    assert str(gpurun.state_dir) in problem and says in problem
    assert f"chmod 0777 {gpurun.state_dir}" in problem
    assert f"problems:\n  - {problem}" in doctor_text(report)


def test_unreadable_ledger_of_a_listed_server_is_a_problem_naming_reset(gpurun):
    gpurun.write_config(
        f"servers:\n"
        f"  - {{name: a, gpus: 2, cpus: [{usable_cpu()}]}}\n"
        f"  - {{name: b, address: 10.9.9.9, gpus: 4, cpus: 8, labels: [prod]}}\n"
    )
    env = dict(gpurun.env, GPURUN_SERVER="a")
    assert gpurun.run("-g", "1", "--", "true", env=env).returncode == 0
    (gpurun.state_dir / "b.json").write_text("this is not JSON {")

    report = report_for(gpurun, "a")

    a, b = report["servers"]
    assert a["name"] == "a" and a["ledger"] == "ok" and a["local"] is True
    assert 0 <= a["heartbeat_age"] < 60
    assert b["name"] == "b" and "cannot be read" in b["ledger"] and b["heartbeat_age"] is None
    [problem] = report["problems"]
    assert problem.startswith("server b: ") and str(gpurun.state_dir / "b.json") in problem
    assert "'gpurun reset --server b'" in problem
    rows = [line.split() for line in doctor_text(report).splitlines()]
    assert ["b", "10.9.9.9", "4", "8", "unreadable", "-", "prod"] in rows


def test_inventory_lists_each_server_and_learns_auto_gpus_from_the_ledger(gpurun):
    fake = gpurun.tmp / "nvidia-smi"
    fake.write_text(FAKE_NVIDIA_SMI)
    fake.chmod(0o755)
    gpurun.write_config(
        "servers:\n"
        f"  - {{name: 'node{{i}}', count: 3, gpus: 2, cpus: [{usable_cpu()}], labels: [dev]}}\n"
        "  - {name: far, gpus: auto, cpus: 16}\n"
    )

    before = report_for(gpurun, "node0")

    assert [s["name"] for s in before["servers"]] == ["node0", "node1", "node2", "far"]
    assert [s["local"] for s in before["servers"]] == [True, False, False, False]
    assert all(s["ledger"] == "none" for s in before["servers"])
    assert [s["gpus"] for s in before["servers"]][1:] == [2, 2, None]
    assert [s["cpus"] for s in before["servers"]][1:] == [1, 1, 16]
    [problem] = before["problems"]
    assert problem.startswith("server far has 'gpus: auto'")
    rows = [line.split() for line in doctor_text(before).splitlines()]
    assert ["SERVER", "ADDRESS", "GPUS", "CPUS", "LEDGER", "HEARTBEAT", "LABELS"] in rows
    for name in ("node1", "node2"):
        assert [name, "-", "2", "1", "none", "-", "dev"] in rows
    assert ["far", "-", "?", "16", "none", "-", "-"] in rows

    env = dict(gpurun.env, GPURUN_SERVER="far", GPURUN_NVIDIA_SMI=str(fake))
    result = gpurun.run("-g", "1", "-c", "0", "--", "true", env=env)
    assert result.returncode == 0, result.stderr
    after = report_for(gpurun, "node0")

    far = after["servers"][3]
    assert far["ledger"] == "ok" and far["gpus"] == 2
    assert after["problems"] == []


def test_config_cpus_the_host_lacks_are_a_problem(gpurun):
    gpurun.write_config(f"servers:\n  - {{name: here, gpus: 1, cpus: [{usable_cpu()}, 4095]}}\n")

    report = report_for(gpurun, "here")

    [problem] = report["problems"]
    assert "CPUs 4095" in problem and "pinned only to the ones it has" in problem


def test_no_gpus_is_a_note_not_a_problem(gpurun):
    gpurun.write_config("gpus: 0\n")

    report = report_for(gpurun)

    assert report["gpus"] == [] and report["problems"] == []
    assert any("no GPUs" in note for note in report["notes"])
    assert "GPUs: none" in doctor_text(report).splitlines()


def sample_mountinfo(root: Path) -> str:
    """A mount table with an NFSv4 mount with working locks and an NFSv3 one without."""
    return (
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard\n"
        f"100 27 0:50 / {root}/lab rw,relatime shared:80 - nfs4 files:/export/lab "
        "rw,vers=4.2,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,"
        "retrans=2,sec=sys,clientaddr=10.0.0.5,local_lock=none,addr=10.0.0.2\n"
        f"101 27 0:51 / {root}/old\\040lab rw,relatime - nfs old:/export "
        "rw,vers=3,rsize=65536,wsize=65536,namlen=255,hard,nolock,proto=tcp,timeo=600,"
        "retrans=2,sec=sys,mountaddr=10.0.0.3,mountvers=3,mountproto=tcp,local_lock=all,"
        "addr=10.0.0.3\n"
        "garbage line\n"
    )


def test_mountinfo_parser_finds_the_mount_and_its_lock_options(tmp_path):
    root = Path(os.path.realpath(tmp_path))
    (root / "lab").mkdir()
    (root / "old lab").mkdir()
    (root / "labx").mkdir()

    mounts = parse_mountinfo(sample_mountinfo(root))

    assert [m.fstype for m in mounts] == ["ext4", "nfs4", "nfs"]
    good = mount_of(str(root / "lab" / "state" / "not-yet"), mounts)
    assert good.mount_point == f"{root}/lab" and good.source == "files:/export/lab"
    assert "local_lock=none" in good.options
    assert nfs_lock_problem(good) == ""
    bad = mount_of(str(root / "old lab" / "state"), mounts)
    assert bad.mount_point == f"{root}/old lab" and bad.fstype == "nfs"
    problem = nfs_lock_problem(bad)
    assert "nolock" in problem and "local_lock=all" in problem and "old:/export" in problem
    assert mount_of(str(root / "labx"), mounts).fstype == "ext4"
    assert mount_of(str(root / "lab"), mounts[::-1]) == good


@pytest.mark.parametrize(("folder", "locks"), [("lab", True), ("old lab", False)])
def test_state_dir_on_nfs_explains_locking(gpurun, folder, locks):
    root = Path(os.path.realpath(gpurun.tmp))
    (root / folder).mkdir()
    state_dir = root / folder / "state"
    gpurun.config.write_text(f"state_dir: {state_dir}\ngpus: 1\n")

    report = report_for(gpurun, mountinfo=sample_mountinfo(root))

    assert report["state_dir"]["nfs"] is True
    assert report["state_dir"]["filesystem"] == ("nfs4" if locks else "nfs")
    assert any("flock" in note and "2.6.12" in note for note in report["notes"])
    lock_problems = [p for p in report["problems"] if "local to each host" in p]
    assert bool(lock_problems) is not locks


def test_cli_doctor_exits_1_only_with_problems(gpurun):
    assert gpurun.run("-g", "1", "--", "true").returncode == 0

    fine = gpurun.run("doctor")
    fine_json = gpurun.run("doctor", "--json")
    os.chmod(gpurun.state_dir, 0o1777)
    sticky = gpurun.run("doctor", "--json")

    assert fine.returncode == 0, fine.stderr
    assert "no problems found" in fine.stdout
    assert json.loads(fine_json.stdout)["problems"] == []
    assert sticky.returncode == 1
    [problem] = json.loads(sticky.stdout)["problems"]
    assert "sticky bit" in problem

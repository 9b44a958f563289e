"""Shared fixtures: a private state dir, a config with fake GPUs, and the real CLI."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
PROBE = str(HERE / "probe.py")
GPURUN = str(Path(sys.executable).with_name("gpurun"))


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    """Poll `predicate` until it returns something true; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def lease_record(lease_id: int = 1, **fields: object) -> dict:
    """A lease as a ledger stores it, with only the fields every schema has (schema 1 has no
    more); `fields` replace the defaults."""
    record = {
        "id": lease_id,
        "kind": "job",
        "state": "running",
        "name": "x",
        "user": "u",
        "uid": 0,
        "host": "h",
        "gpus": [],
        "cpus": [],
        "command": ["x"],
        "created": 1.0,
        "started": 1.0,
        "holders": [],
        "boot": "b",
        "expires": None,
    }
    record.update(fields)
    return record


def one_error_line(stderr: str) -> str:
    """The single `gpurun: ` line a failure prints; fails the test on anything else."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("gpurun: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@contextlib.contextmanager
def held_ledger_lock(gpurun, lock_timeout: float):
    """Hold the ledger's lock (after one job made the ledger) with `lock_timeout` set."""
    assert gpurun.run("-g", "1", "--", "true").returncode == 0
    gpurun.write_config(f"gpus: 4\ncpus: auto\nlock_timeout: {lock_timeout}\n")
    lock = os.open(str(gpurun.ledger_path()) + ".lock", os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(lock)


def read_json(path: Path | str) -> dict:
    with open(path) as f:
        return json.load(f)


def wait_json(path: Path | str, timeout: float = 10.0) -> dict:
    wait_for(lambda: os.path.exists(path), timeout, f"{path}")
    return read_json(path)


class Gpurun:
    """The gpurun CLI run as a real process against a temporary config and state dir."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.state_dir = tmp_path / "state"
        self.config = tmp_path / "gpurun.yaml"
        self.write_config("gpus: 4\ncpus: auto\nkill_grace: 1\nlock_timeout: 10\n")
        self.env = dict(os.environ)
        self.env.pop("GPURUN_STATE_DIR", None)
        self.env["GPURUN_CONFIG"] = str(self.config)
        self.env.pop("OMP_NUM_THREADS", None)
        # A suite run inside a gpurun job, a Slurm job or on a GPU host must not see them.
        for name in (
            "CUDA_VISIBLE_DEVICES",
            "GPURUN_JOB_ID",
            "GPURUN_GPUS",
            "GPURUN_CPUS",
            "GPURUN_NVIDIA_SMI",
            "GPURUN_SYSFS_ROOT",
        ):
            self.env.pop(name, None)
        self.env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
        self.procs: list[subprocess.Popen] = []

    def write_config(self, text: str) -> None:
        self.config.write_text(f"state_dir: {self.state_dir}\n" + text)

    def use_machine(self, name: str, config: str = "", recordings: Path | None = None) -> None:
        """Run against a recorded machine of tests/fixtures: its nvidia-smi outputs (or those
        in `recordings`, a copy to change) and its sysfs tree, with `gpus: auto`."""
        smi = FIXTURES / "fake-nvidia-smi"
        self.env["GPURUN_NVIDIA_SMI"] = f"{smi} {recordings or FIXTURES / name}"
        self.env["GPURUN_SYSFS_ROOT"] = str(FIXTURES / name / "sys")
        self.write_config("gpus: auto\ncpus: auto\nkill_grace: 1\nlock_timeout: 10\n" + config)

    def run(self, *args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        # In the test's folder, so that nothing (such as Slurm's slurm-ID.out) lands in the repo.
        kwargs.setdefault("cwd", self.tmp)
        return subprocess.run(
            [GPURUN, *args],
            env=kwargs.pop("env", self.env),
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,
        )

    def start(self, *args: str, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("cwd", self.tmp)
        proc = subprocess.Popen(
            [GPURUN, *args], env=kwargs.pop("env", self.env), text=True, **kwargs
        )
        self.procs.append(proc)
        return proc

    def probe(self, name: str, *options: str) -> list[str]:
        """The argv of a probe job that writes its records under tmp/NAME.*"""
        return [sys.executable, PROBE, str(self.tmp / name), *options]

    def ps(self, *args: str) -> list[dict]:
        result = self.run("ps", "--json", *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def status(self) -> dict:
        result = self.run("status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["servers"][0]

    def ledger_path(self) -> Path:
        paths = [p for p in self.state_dir.glob("*.json")]
        assert len(paths) == 1, paths
        return paths[0]

    def ledger(self) -> dict:
        return read_json(self.ledger_path())

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream:
                    stream.close()
        # Probes and their children left by a test that failed halfway.
        mark = str(self.tmp).encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if mark in cmdline:
                with contextlib.suppress(OSError):
                    os.kill(int(entry), signal.SIGKILL)


@pytest.fixture
def gpurun(tmp_path: Path):
    g = Gpurun(tmp_path)
    yield g
    g.cleanup()


class Users:
    """Other users of the host, each running gpurun from a venv every user can read."""

    def __init__(self, root: Path, python: str) -> None:
        self.root = root
        self.python = python

    def command(self, uid: int, *args: str, umask: int = 0o077) -> list[str]:
        """The argv that runs `gpurun ARGS` as `uid` (0 for root) with `umask`."""
        prefix = [] if uid == 0 else ["setpriv", f"--reuid={uid}", f"--regid={uid}"]
        prefix += ["--clear-groups"] if uid else []
        shell = f'umask {umask:03o}; exec "$@"'
        return [*prefix, "sh", "-c", shell, "sh", self.python, "-m", "gpurun", *args]

    def run(self, uid: int, config: Path, *args: str, umask: int = 0o077, **kwargs):
        env = {"PATH": "/usr/bin:/bin", "HOME": "/", "GPURUN_CONFIG": str(config)}
        kwargs.setdefault("timeout", 60)
        return subprocess.run(
            self.command(uid, *args, umask=umask), env=env, capture_output=True, text=True, **kwargs
        )


@pytest.fixture(scope="session")
def users():
    """Run gpurun as other users. Their Python is /usr/bin/python3 (the default interpreter
    may live under root's private home) in a venv readable to all, with this gpurun copied
    in and the system's PyYAML; skips with the reason where that cannot be had."""
    import shutil
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("acting as other users needs root")
    if not os.path.exists("/usr/bin/python3") or not shutil.which("setpriv"):
        pytest.skip("needs /usr/bin/python3 and setpriv to act as other users")
    root = Path(tempfile.mkdtemp(prefix="gpurun-users-"))
    venv = root / "venv"
    made = subprocess.run(
        ["/usr/bin/python3", "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        shutil.rmtree(root)
        pytest.skip(f"cannot make a venv from /usr/bin/python3: {made.stderr.strip()[-200:]}")
    python = str(venv / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    shutil.copytree(HERE.parent / "gpurun", Path(site) / "gpurun")
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    check = subprocess.run(
        Users(root, python).command(65534, "--version"), capture_output=True, text=True
    )
    if check.returncode != 0:
        shutil.rmtree(root)
        pytest.skip(f"another user cannot run gpurun here: {check.stderr.strip()[-200:]}")
    yield Users(root, python)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def protected_regular():
    """fs.protected_regular=1 as on most distributions, restored afterwards."""
    path = "/proc/sys/fs/protected_regular"
    try:
        with open(path) as f:
            before = f.read().strip()
        with open(path, "w") as f:
            f.write("1")
    except OSError as exc:
        pytest.skip(f"cannot set fs.protected_regular: {exc.strerror}")
    try:
        yield
    finally:
        with open(path, "w") as f:
            f.write(before)


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep gpurun's config parse cache of in-process calls out of the real home."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

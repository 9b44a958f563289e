"""Shared fixtures: a private state dir, a config with fake GPUs, and the real CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
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
        self.env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
        self.procs: list[subprocess.Popen] = []

    def write_config(self, text: str) -> None:
        self.config.write_text(f"state_dir: {self.state_dir}\n" + text)

    def run(self, *args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
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


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep gpurun's config parse cache of in-process calls out of the real home."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

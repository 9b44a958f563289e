"""Signals to gpurun reach the job; a terminal behaves as if the command ran directly."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import termios

import pytest
from conftest import GPURUN, read_json, wait_for, wait_json


@pytest.mark.parametrize(
    ("signum", "code"),
    [
        (signal.SIGTERM, 143),
        (signal.SIGINT, 130),
        (signal.SIGHUP, 129),
        (signal.SIGUSR1, 138),
        (signal.SIGUSR2, 140),
        (signal.SIGQUIT, 131),
    ],
)
def test_signal_to_gpurun_reaches_the_command(gpurun, signum, code):
    job = gpurun.start("-g", "1", "-c", "0", "--", *gpurun.probe("a", "--sleep", "60"))
    wait_json(gpurun.tmp / "a.start")
    wait_for(lambda: len(gpurun.ledger()["leases"][0]["holders"]) == 2, what="command pid")

    job.send_signal(signum)

    assert job.wait(timeout=10) == code
    if signum in (signal.SIGTERM, signal.SIGINT):
        assert read_json(gpurun.tmp / "a.end")["signal"] == signum.name
    assert gpurun.ledger()["leases"] == []
    assert gpurun.ps("-a")[0]["exit_code"] == code


def test_the_command_exiting_ends_what_it_left_in_the_background(gpurun):
    pidfile = gpurun.tmp / "bg.pid"
    script = f"sleep 300 & echo $! > {pidfile}"

    result = gpurun.run("-g", "1", "-c", "0", "--", "sh", "-c", script)

    assert result.returncode == 0
    orphan = int(pidfile.read_text())
    assert not os.path.exists(f"/proc/{orphan}")
    assert gpurun.ledger()["leases"] == []


def start_on_pty(gpurun, *args: str):
    """gpurun as the foreground job of a new pseudo-terminal; returns (process, master fd)."""
    master, slave = os.openpty()

    def take_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [GPURUN, *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=gpurun.env,
        preexec_fn=take_terminal,
    )
    os.close(slave)
    gpurun.procs.append(proc)
    return proc, master


def drain(master: int) -> None:
    import select

    while select.select([master], [], [], 0)[0]:
        try:
            if not os.read(master, 4096):
                return
        except OSError:
            return


def test_one_ctrl_c_at_a_terminal_reaches_the_command_once(gpurun):
    go = gpurun.tmp / "go"
    proc, master = start_on_pty(
        gpurun,
        "-g",
        "1",
        "-c",
        "0",
        "--",
        *gpurun.probe("a", "--ignore-term", "--wait-for", str(go)),
    )
    wait_json(gpurun.tmp / "a.start")
    wait_for(lambda: len(gpurun.ledger()["leases"][0]["holders"]) == 2, what="command pid")

    os.write(master, b"\x03")  # Ctrl-C: the terminal sends SIGINT to the foreground group
    wait_for(lambda: os.path.exists(gpurun.tmp / "a.signals"), what="SIGINT in the command")
    proc.send_signal(signal.SIGTERM)  # a marker sent after any second SIGINT would be
    wait_for(
        lambda: "SIGTERM" in read_json(gpurun.tmp / "a.signals")["signals"],
        what="the marker signal",
    )
    go.touch()
    drain(master)

    assert read_json(gpurun.tmp / "a.signals")["signals"] == ["SIGINT", "SIGTERM"]
    assert proc.wait(timeout=10) == 0
    os.close(master)


def test_the_command_reads_the_keyboard_at_a_terminal(gpurun):
    proc, master = start_on_pty(
        gpurun, "-g", "1", "-c", "0", "--", *gpurun.probe("a", "--read-line")
    )
    wait_json(gpurun.tmp / "a.start")

    os.write(master, b"typed text\n")
    line = wait_json(gpurun.tmp / "a.line")
    drain(master)

    assert line["line"] == "typed text\n"
    assert proc.wait(timeout=10) == 0
    os.close(master)


def test_kill_ends_the_whole_tree_even_what_ignores_sigterm(gpurun):
    pidfile = gpurun.tmp / "grandchild.pid"
    job = gpurun.start(
        "-g",
        "1",
        "-c",
        "0",
        "-n",
        "tree",
        "--",
        *gpurun.probe("a", "--sleep", "60", "--grandchild", str(pidfile)),
    )
    wait_json(gpurun.tmp / "a.start")
    grandchild = int(pidfile.read_text())

    result = gpurun.run("kill", "tree")

    assert result.returncode == 0, result.stderr
    assert job.wait(timeout=10) == 143
    assert read_json(gpurun.tmp / "a.end")["signal"] == "SIGTERM"
    assert not os.path.exists(f"/proc/{grandchild}")
    assert gpurun.ledger()["leases"] == []


def test_kill_after_gpurun_died_escalates_itself(gpurun):
    pidfile = gpurun.tmp / "grandchild.pid"
    job = gpurun.start(
        "-g",
        "1",
        "-c",
        "0",
        "--",
        *gpurun.probe("a", "--ignore-term", "--sleep", "60", "--grandchild", str(pidfile)),
    )
    start = wait_json(gpurun.tmp / "a.start")
    wait_for(lambda: len(gpurun.ledger()["leases"][0]["holders"]) == 2, what="command pid")
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=10)
    grandchild = int(pidfile.read_text())

    result = gpurun.run("kill", "1")

    assert result.returncode == 0, result.stderr
    assert "sent SIGTERM, SIGKILL" in result.stdout
    assert read_json(gpurun.tmp / "a.signals")["signals"] == ["SIGTERM"]
    wait_for(lambda: not os.path.exists(f"/proc/{start['pid']}"), what="the command to go")
    wait_for(lambda: not os.path.exists(f"/proc/{grandchild}"), what="the grandchild to go")
    assert gpurun.ledger()["leases"] == []


def test_kill_with_a_signal_that_does_not_end_jobs_does_not_escalate(gpurun):
    job = gpurun.start("-g", "1", "-c", "0", "--", *gpurun.probe("a", "--sleep", "60"))
    wait_json(gpurun.tmp / "a.start")

    result = gpurun.run("kill", "1", "-s", "WINCH", "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["signals"] == ["SIGWINCH"]
    assert job.poll() is None
    assert [j["id"] for j in gpurun.ps()] == [1]
    assert gpurun.run("kill", "1", "-s", "NOPE").returncode == 2
    assert gpurun.run("kill", "99").returncode == 125
    job.kill()

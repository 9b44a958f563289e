"""What the adversarial review found, each as a class of fault: resets that forget live jobs,
a second ledger for one machine, files other users cannot open, odd bytes, forged holders."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import GPURUN, held_ledger_lock, lease_record, one_error_line, wait_for, wait_json


def test_reset_of_an_unreadable_ledger_does_not_forget_live_jobs(gpurun):
    job = gpurun.start("-g", "4", "-c", "0", "--", *gpurun.probe("a", "--sleep", "60"))
    wait_json(gpurun.tmp / "a.start")
    assert gpurun.run("-g", "0", "-c", "0", "--", "true").returncode == 0
    gpurun.ledger_path().write_text("garbage")

    refused = gpurun.run("reset", "--yes")
    forced = gpurun.run("reset", "--yes", "--force")
    after = gpurun.run("-g", "1", "-c", "0", "--", "true")

    assert refused.returncode == 125
    assert "still hold leases on" in refused.stderr and "(1)" in refused.stderr
    assert forced.returncode == 0, forced.stderr
    # The new ledger's ids start past every id a live job holds, so nothing collides.
    assert after.returncode == 0, after.stderr
    assert gpurun.ledger()["next_id"] == 4
    job.kill()


def test_a_second_ledger_for_the_same_machine_is_refused(gpurun):
    named = dict(gpurun.env, GPURUN_SERVER="other-name")
    assert gpurun.run("-g", "1", "--", "true", env=named).returncode == 0

    result = gpurun.run("-g", "1", "--", "true")

    assert result.returncode == 125
    assert "GPURUN_SERVER=other-name" in one_error_line(result.stderr)
    assert [p.name for p in gpurun.state_dir.glob("*.json")] == ["other-name.json"]


def test_state_files_open_to_all_users_whatever_the_umask(gpurun):
    nested = gpurun.tmp / "deep" / "er" / "state"
    gpurun.write_config("gpus: 2\ncpus: auto\n")
    env = dict(gpurun.env, GPURUN_STATE_DIR=str(nested))

    result = subprocess.run(
        [GPURUN, "-d", "-g", "1", "--", "true"],
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(0o077),
    )
    subprocess.run([GPURUN, "wait", result.stdout.strip()], env=env, check=True)

    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(os.stat(gpurun.tmp / "deep").st_mode) == 0o755
    for folder in (nested, nested / "jobs", nested / "logs"):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777, folder
    for name in os.listdir(nested):
        path = nested / name
        if path.is_file():
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o666, path
    assert not [n for n in os.listdir(nested) if n.endswith((".tmp", ".new"))]


def test_a_jobs_pid_file_is_readable_by_all_users_whatever_the_umask(gpurun):
    # Other users' gpuruns read it to judge the lease while the ledger lacks the command.
    job = subprocess.Popen(
        [GPURUN, "-g", "1", "--", "sleep", "30"],
        env=gpurun.env,
        preexec_fn=lambda: os.umask(0o077),
    )
    gpurun.procs.append(job)
    [pid_file] = wait_for(lambda: list((gpurun.state_dir / "jobs").glob("*.pid")), what="it")

    assert stat.S_IMODE(pid_file.stat().st_mode) == 0o644


def test_odd_bytes_in_a_command_do_not_break_ps(gpurun):
    env = dict(gpurun.env, PYTHONIOENCODING="utf-8")
    result = subprocess.run([GPURUN.encode(), b"-g", b"1", b"--", b"true", b"\xff\n"], env=env)

    table = gpurun.run("ps", "-a", env=env)
    as_json = gpurun.run("ps", "-a", "--json", env=env)

    assert result.returncode == 0
    assert table.returncode == 0 and "\\udcff" in table.stdout
    assert as_json.returncode == 0 and json.loads(as_json.stdout)[0]["exit_code"] == 0


def test_control_characters_never_split_the_error_line(gpurun):
    for args in (["--", "no\nsuch"], ["kill", "x\ny"], ["kill", "1", "-s", "X\nY"]):
        result = gpurun.run(*args)
        assert result.returncode in (2, 125, 127)
        one_error_line(result.stderr)


def test_strange_values_get_a_clear_error_not_an_internal_one(gpurun):
    assert "no job" in one_error_line(gpurun.run("kill", "\u00b2").stderr)
    assert gpurun.run("kill", "9" * 5000).returncode == 125
    gpurun.write_config("gpus: 2\nkill_grace: .nan\n")
    assert "kill_grace" in one_error_line(gpurun.run("ps").stderr)
    gpurun.write_config("gpus: 2\nlock_timeout: .inf\n")
    assert "lock_timeout" in one_error_line(gpurun.run("ps").stderr)
    gpurun.config.write_text('state_dir: "/tmp/a\\0b"\n')
    assert "state_dir" in one_error_line(gpurun.run("ps").stderr)
    assert "--config needs" in one_error_line(gpurun.run("--config", "", "ps").stderr)


def test_a_ledger_with_impossible_numbers_is_unreadable_not_a_crash(gpurun):
    assert gpurun.run("-g", "1", "--", "true").returncode == 0
    ledger = gpurun.ledger_path()
    doc = json.loads(ledger.read_text())
    lease = lease_record(5, gpus=[0], created=1e308, started=None)
    for created in ("NaN", "Infinity", "1e308"):
        text = json.dumps({**doc, "leases": [lease]}).replace("1e+308", created)
        ledger.write_text(text)
        before = ledger.read_bytes()
        for command in (["ps"], ["status"], ["gc"], ["-g", "1", "--", "true"]):
            result = gpurun.run(*command)
            assert result.returncode == 125, (created, command, result.stderr)
            assert "gpurun reset" in one_error_line(result.stderr)
        assert ledger.read_bytes() == before


def test_scripts_are_checked_before_anything_is_reserved(gpurun, tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/nonexistent/interpreter\necho hi\n")
    bad.chmod(0o755)
    plain = tmp_path / "plain.sh"
    plain.write_text("echo from-plain-script\n")
    plain.chmod(0o755)

    missing = gpurun.run("-g", "1", "--", str(bad))
    ran = gpurun.run("-g", "1", "--", str(plain))

    assert missing.returncode == 127
    assert "bad interpreter '/nonexistent/interpreter'" in one_error_line(missing.stderr)
    assert ran.returncode == 0 and ran.stdout == "from-plain-script\n"
    assert [job["id"] for job in gpurun.ps("-a")] == [1]


def test_closed_stderr_still_gets_the_exit_code(gpurun):
    result = subprocess.run(
        ["sh", "-c", f"{GPURUN} -g 99 -- true 2>&-; echo $?"],
        env=gpurun.env,
        capture_output=True,
        text=True,
    )

    assert result.stdout.strip() == "125"
    assert not gpurun.state_dir.exists() or gpurun.ps() == []


def test_ctrl_c_ends_a_wait_for_the_ledger_lock(gpurun):
    with held_ledger_lock(gpurun, lock_timeout=60):
        waiter = gpurun.start("-g", "1", "--", "true")
        time.sleep(0.5)  # it is now waiting for the lock
        began = time.monotonic()
        waiter.send_signal(signal.SIGINT)
        code = waiter.wait(timeout=10)

    assert code == 130
    assert time.monotonic() - began < 5


def test_kill_refuses_holders_that_are_not_a_gpurun(gpurun):
    # A hand-edited lease whose "gpurun" is a shell with a child: kill must not touch them.
    shell = subprocess.Popen(["sh", "-c", "sleep 60 & wait"])
    wait_for(lambda: os.path.exists(f"/proc/{shell.pid}/task"), what="the shell")
    with open(f"/proc/{shell.pid}/stat") as f:
        start = int(f.read().rsplit(")", 1)[1].split()[19])
    assert gpurun.run("-g", "1", "--", "true").returncode == 0
    ledger = gpurun.ledger_path()
    doc = json.loads(ledger.read_text())
    doc["leases"] = [
        lease_record(
            7,
            name="forged",
            user="root",
            gpus=[0],
            created=time.time(),
            started=time.time(),
            holders=[{"pid": shell.pid, "start": start, "role": "gpurun"}],
            boot=Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        )
    ]
    ledger.write_text(json.dumps(doc))
    try:
        result = gpurun.run("kill", "7")

        assert result.returncode == 125
        assert "not a gpurun process" in one_error_line(result.stderr)
        assert shell.poll() is None
    finally:
        shell.kill()
        shell.wait()


def test_values_at_the_edge_of_the_ledgers_ranges_never_make_it_unreadable(gpurun):
    low = gpurun.run("--priority", "-5", "-g", "1", "--", "true")
    too_low = gpurun.run("--priority", "-99999999", "-g", "1", "--", "true")
    far = [
        gpurun.run("alloc", "forever", "-g", "1", "--ttl", "1200000d"),
        gpurun.run("--time", "200000d", "-g", "1", "--", "true"),
        gpurun.run("--timeout", "1e300", "-g", "1", "--", "true"),
    ]
    ten_years = gpurun.run("alloc", "long", "-g", "1", "-c", "0", "--ttl", "3650d", "--json")
    listing = gpurun.run("ps", "--json")

    assert low.returncode == 0, low.stderr
    assert too_low.returncode == 2 and "from -1000000 to 1000000" in one_error_line(too_low.stderr)
    for result in far:
        assert result.returncode == 2 and "ten years" in one_error_line(result.stderr)
    assert ten_years.returncode == 0, ten_years.stderr
    assert listing.returncode == 0, listing.stderr
    assert [job["name"] for job in json.loads(listing.stdout)] == ["long"]


def test_a_pid_out_of_range_in_the_ledger_is_a_clear_error_for_every_command(gpurun):
    assert gpurun.run("-g", "1", "--", "true").returncode == 0
    ledger = gpurun.ledger_path()
    doc = json.loads(ledger.read_text())
    assert gpurun.run("alloc", "box", "-g", "1").returncode == 0
    doc = json.loads(ledger.read_text())
    doc["leases"][0]["holders"] = [{"pid": 2**40, "start": 1, "role": "gpurun"}]
    ledger.write_text(json.dumps(doc))

    for command in (["ps"], ["status"], ["gc"], ["kill", "1"], ["-g", "1", "--", "true"]):
        result = gpurun.run(*command)
        assert result.returncode == 125, (command, result.stderr)
        assert "is not a process id" in one_error_line(result.stderr)
    assert gpurun.run("reset", "--yes").returncode == 0
    assert gpurun.run("-g", "1", "--", "true").returncode == 0


def test_alloc_export_lines_are_quoted_for_eval(gpurun, tmp_path):
    marker = tmp_path / "injected"
    name = f"dbg;touch {marker}"

    script = f'eval "$({GPURUN} alloc "$1" -g 1 -c 0)"; echo "$GPURUN_RESERVATION"'
    result = subprocess.run(
        ["sh", "-c", script, "-", name],
        env=gpurun.env,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == name
    assert not marker.exists()


def test_a_newline_in_an_argument_keeps_one_row_per_job_in_ps(gpurun):
    go, started = gpurun.tmp / "go", gpurun.tmp / "started"
    script = f"touch {started}; while [ ! -e {go} ]; do sleep 0.05; done"
    job = gpurun.start("-g", "1", "--", "sh", "-c", script, "sh", "two\nlines\tand tab")
    wait_for(started.exists, what="the job to start")

    table = gpurun.run("ps").stdout.splitlines()
    go.touch()

    assert len(table) == 2, table
    assert "two\\nlines\\tand tab" in table[1]
    assert job.wait(timeout=20) == 0


def test_kill_reaches_what_a_job_left_running_after_its_gpurun_was_killed(gpurun):
    leftover = gpurun.tmp / "leftover.pid"
    job = gpurun.start(
        "-g", "1", "-n", "leaky", "--", "sh", "-c", f"sleep 60 & echo $! > {leftover}; sleep 0.3"
    )
    wait_for(lambda: leftover.exists() and leftover.read_text().strip(), what="the leftover")
    pid = int(leftover.read_text())
    holders = wait_for(
        lambda: (
            len(gpurun.ledger()["leases"][0]["holders"]) == 2
            and gpurun.ledger()["leases"][0]["holders"]
        ),
        what="the ledger to record the command",
    )
    os.kill(job.pid, signal.SIGKILL)
    job.wait(timeout=10)
    command = next(h["pid"] for h in holders if h["role"] == "command")
    wait_for(lambda: not os.path.exists(f"/proc/{command}") or _zombie(command), what="sh to end")

    killed = gpurun.run("kill", "leaky")
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), what="the leftover to end")
    after = gpurun.run("kill", "leaky")
    assert gpurun.run("gc").returncode == 0

    assert killed.returncode == 0, killed.stderr
    assert after.returncode == 125
    assert gpurun.ledger()["leases"] == []


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_kill_of_a_reservation_is_refused_with_125(gpurun):
    assert gpurun.run("alloc", "box", "-g", "1").returncode == 0

    result = gpurun.run("kill", "box")

    assert result.returncode == 125
    assert "use 'gpurun release'" in one_error_line(result.stderr)


def test_a_server_template_padded_too_wide_is_refused_at_once(gpurun):
    gpurun.write_config("servers: {count: 2, name: 'n{i:99999999999d}', gpus: 1, cpus: 1}\n")

    result = gpurun.run("status", timeout=20)

    assert result.returncode == 125
    assert "too wide" in one_error_line(result.stderr)


def test_options_a_command_does_not_take_are_refused_before_its_name(gpurun):
    result = gpurun.run("--backend", "local", "status")

    assert result.returncode == 2
    assert "unrecognized arguments: --backend" in one_error_line(result.stderr)


def test_a_fifo_planted_as_the_config_cache_never_hangs_a_command(gpurun, tmp_path):
    cache = tmp_path / "cache" / "gpurun"
    assert gpurun.run("ps").returncode == 0
    [entry] = list(cache.iterdir())
    entry.unlink()
    os.mkfifo(entry)

    result = gpurun.run("ps", timeout=20)

    assert result.returncode == 0, result.stderr


def test_doctor_names_a_symbolic_link_as_the_state_dir(gpurun, tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o777)
    real.chmod(0o777)
    gpurun.state_dir.symlink_to(real)

    result = gpurun.run("doctor")

    assert result.returncode == 1
    assert "is a symbolic link" in result.stdout


def test_a_history_line_nested_too_deep_is_skipped_not_a_crash(gpurun):
    assert gpurun.run("-g", "1", "--", "true").returncode == 0
    history = gpurun.state_dir / f"{gpurun.ledger()['server']}.history.jsonl"
    with open(history, "a") as f:
        f.write('{"id":7,"x":' + "[" * 100_000 + "]" * 100_000 + "}\n")
        f.write("[" * 100_000 + "\n")

    listed = gpurun.run("ps", "-a", "--json")
    waited = gpurun.run("wait", "1")

    assert listed.returncode == 0, listed.stderr
    assert [job["id"] for job in json.loads(listed.stdout)] == [1]
    assert waited.returncode == 0, waited.stderr


def test_a_history_line_of_the_wrong_kinds_shows_as_missing_not_a_crash(gpurun):
    # Every user may write the history file: one bad line must not break `ps -a` for all.
    assert gpurun.run("-g", "1", "--", "true").returncode == 0
    history = gpurun.state_dir / f"{gpurun.ledger()['server']}.history.jsonl"
    with open(history, "a") as f:
        for line in (
            '{"id":"x","name":3}',
            '{"id":8,"gpus":5,"cpus":[true],"user":["u"]}',
            '{"id":14,"duration":NaN,"started":1e300,"ended":-1}',
            '{"id":7,"command":[1,2],"request":{"gpus":"2"},"priority":0.5}',
            '{"id":9,"exit_code":"0","state":"exited","time_limit":Infinity}',
        ):
            f.write(line + "\n")

    table = gpurun.run("ps", "-a")
    listed = gpurun.run("ps", "-a", "--json")
    ended = [gpurun.run(command, "9") for command in ("kill", "logs", "wait")]

    assert table.returncode == 0, table.stderr
    assert listed.returncode == 0, listed.stderr
    jobs = json.loads(listed.stdout, parse_constant=lambda name: pytest.fail(name))
    assert [job["id"] for job in jobs] == [None, 1, 7, 8, 9, 14]
    assert [job["gpus"] for job in jobs if job["id"] == 8] == [None]
    for result in ended:
        assert result.returncode in (0, 125) and "internal error" not in result.stderr
    assert ended[2].returncode == 125 and "no exit code" in ended[2].stderr  # "0" is no code


def test_no_fifo_planted_in_the_state_folder_hangs_anyone(gpurun):
    # Every user may make files in the state folder; a FIFO where gpurun opens a file would
    # hold the open forever, and with it every gpurun behind the ledger lock.
    assert gpurun.run("-g", "0", "-c", "0", "--", "true").returncode == 0
    state = gpurun.state_dir
    server = gpurun.ledger_path().stem
    next_id = gpurun.ledger()["next_id"]
    for name in (
        f"jobs/{server}.{next_id}.lock",  # the next job's lock
        f"jobs/{server}.{next_id + 1}.lock",
        f"logs/{server}.{next_id + 1}.log",  # the next detached job's log
    ):
        os.mkfifo(state / name)

    ran = gpurun.run("-g", "1", "-c", "0", "--", "true", timeout=20)
    detached = gpurun.run("-d", "-g", "1", "-c", "0", "--", "echo", "out", timeout=20)
    job = detached.stdout.strip()
    wait_for(lambda: gpurun.ps("-a")[-1]["state"] == "exited", what="the detached job")
    log = gpurun.run("logs", job, timeout=20)

    assert ran.returncode == 0, ran.stderr
    assert detached.returncode == 0, detached.stderr
    assert log.returncode == 0 and log.stdout == "out\n", log.stderr
    assert stat.S_ISREG((state / f"logs/{server}.{job}.log").stat().st_mode)
    # A folder where the next detached job's log goes: one clear line, not a traceback.
    (state / f"logs/{server}.{int(job) + 2}.log").mkdir()
    gpurun.run("-g", "0", "-c", "0", "--", "true")
    blocked = gpurun.run("-d", "-g", "1", "-c", "0", "--", "true", timeout=20)
    assert blocked.returncode != 0 and "cannot make the job's log" in one_error_line(blocked.stderr)
    # With no ledger yet, gpurun looks at the other ledgers in the folder (one of this
    # machine under another name?): a FIFO among them is no ledger.
    os.mkfifo(state / "planted.json")
    (state / f"{server}.json").rename(state / "moved.bak")
    fresh = gpurun.run("-g", "0", "-c", "0", "--", "true", timeout=20)
    assert fresh.returncode == 0, fresh.stderr
    # The ledger, its lock and history as FIFOs: a clear error, at once, for each command.
    for name in (f"{server}.history.jsonl", f"{server}.json.lock", f"{server}.json"):
        (state / name).unlink()
        os.mkfifo(state / name)
        for argv in (["ps", "-a"], ["status"], ["gc"], ["-g", "1", "--", "true"]):
            result = gpurun.run(*argv, timeout=20)
            assert result.returncode in (0, 125), (name, argv, result.stderr)
            if result.returncode:
                assert one_error_line(result.stderr), (name, argv)


def test_a_file_gpurun_makes_afresh_is_its_own_whatever_was_there(tmp_path):
    # Temporary files and logs have names others can guess, in folders others can write.
    from gpurun.ledger import create_afresh

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "theirs").write_text("planted")
    (tmp_path / "theirs").chmod(0o666)
    for name in ("fifo", "theirs", "new"):
        fd = create_afresh(str(tmp_path / name), os.O_WRONLY, 0o600)
        os.write(fd, b"ours")
        os.close(fd)

        info = (tmp_path / name).stat()
        assert stat.S_ISREG(info.st_mode) and info.st_mode & 0o777 == 0o600, name
        assert (tmp_path / name).read_bytes() == b"ours", name

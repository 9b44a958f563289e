"""Bad input: one `gpurun: ` line, the documented exit code, no traceback, nothing on disk."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest
from conftest import lease_record, one_error_line

from gpurun.cli import main
from gpurun.ledger import SCHEMA


def tree_digest(folder) -> dict[str, str]:
    if not os.path.exists(folder):
        return {}
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ("gpus: [0, 1\ncpus: auto\n", "line 3"),
        ("gpus: 4\ncolour: blue\n", "key 'colour': unknown key"),
        ("gpus: 0,1\n", "write a list: gpus: [0, 1]"),
        ("cpus: 16:31\n", "base-60"),
        ("gpus: [1, 1]\n", "listed twice"),
        ("gpus: !!python/object:os.system echo\n", "not valid YAML"),
    ],
)
def test_config_errors_exit_125_and_touch_nothing(gpurun, config, needle):
    gpurun.config.write_text(f"state_dir: {gpurun.state_dir}\n" + config)

    result = gpurun.run("-g", "1", "--", "true")

    assert result.returncode == 125
    line = one_error_line(result.stderr)
    assert needle in line
    assert str(gpurun.config) in line
    assert not gpurun.state_dir.exists()


def test_top_level_list_is_refused(gpurun):
    gpurun.config.write_text("- just\n- a list\n")

    result = gpurun.run("status")

    assert result.returncode == 125
    assert "must be a mapping" in one_error_line(result.stderr)


def test_yaml_syntax_error_names_the_line(gpurun):
    gpurun.config.write_text(f"state_dir: {gpurun.state_dir}\ngpus: 4\ncpus: [0,\n  : x\n")

    result = gpurun.run("ps")

    assert result.returncode == 125
    assert ", line " in one_error_line(result.stderr)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-g", "-1", "--", "true"], "-g/--gpus"),
        (["-g", "abc", "--", "true"], "expected a whole number >= 0, got 'abc'"),
        (["-c", "1.5", "--", "true"], "-c/--cpus"),
        (["-g", "1"], "no command given"),
        ([], "no command given; 'gpurun --help' lists the commands"),
        (["--gpu-ids", "0,x", "--", "true"], "--gpu-ids"),
        (["-g", "2", "--gpu-ids", "0", "--", "true"], "disagrees"),
        (["--timeout", "soon", "--", "true"], "--timeout"),
        (["ps", "--bogus"], "unrecognized arguments"),
        (["kill"], "the following arguments are required: job"),
    ],
)
def test_usage_errors_exit_2(gpurun, monkeypatch, capsys, args, needle):
    monkeypatch.setenv("GPURUN_CONFIG", str(gpurun.config))

    code = main(args)

    assert code == 2
    assert needle in one_error_line(capsys.readouterr().err)
    assert not gpurun.state_dir.exists()


def test_command_not_found_is_127_and_not_executable_is_126(gpurun, tmp_path):
    script = tmp_path / "plain.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)

    missing = gpurun.run("-g", "1", "--", "no-such-command-xyz")
    denied = gpurun.run("-g", "1", "--", str(script))

    assert missing.returncode == 127
    assert "command not found" in one_error_line(missing.stderr)
    assert denied.returncode == 126
    assert "permission denied" in one_error_line(denied.stderr)
    assert gpurun.ps() == []
    assert gpurun.ps("-a") == []


def test_request_larger_than_the_server_is_125_and_says_what_it_has(gpurun):
    too_many_gpus = gpurun.run("-g", "5", "--", "true")
    too_many_cpus = gpurun.run("-c", "100000", "--", "true")
    unknown_id = gpurun.run("--gpu-ids", "9", "--", "true")

    assert too_many_gpus.returncode == 125
    assert "this server has 4 GPUs" in one_error_line(too_many_gpus.stderr)
    assert too_many_cpus.returncode == 125
    assert "CPUs" in one_error_line(too_many_cpus.stderr)
    assert unknown_id.returncode == 125
    assert "no GPU 9" in one_error_line(unknown_id.stderr)


def test_corrupt_ledger_is_left_untouched(gpurun):
    assert gpurun.run("-g", "1", "--", "true").returncode == 0
    ledger = gpurun.ledger_path()
    ledger.write_bytes(b'{"schema": 1, "leases": [tru')
    before = tree_digest(gpurun.state_dir)

    results = [
        gpurun.run("-g", "1", "--", "true"),
        gpurun.run("ps"),
        gpurun.run("gc"),
        gpurun.run("status"),
    ]

    for result in results:
        assert result.returncode == 125
        line = one_error_line(result.stderr)
        assert str(ledger) in line and "gpurun reset" in line
    assert tree_digest(gpurun.state_dir) == before


def test_ledger_from_a_newer_gpurun_is_refused_not_rewritten(gpurun):
    assert gpurun.run("-g", "1", "--", "true").returncode == 0
    ledger = gpurun.ledger_path()
    doc = json.loads(ledger.read_text())
    doc["schema"] = 99
    ledger.write_text(json.dumps(doc))
    before = tree_digest(gpurun.state_dir)

    results = [
        gpurun.run(*argv)
        for argv in (["-g", "1", "--", "true"], ["ps"], ["gc"], ["status"], ["kill", "1"])
    ]
    results.append(gpurun.run("alloc", "box", "-g", "1"))

    for result in results:
        assert result.returncode == 125
        line = one_error_line(result.stderr)
        assert f"newer gpurun (schema 99; this one reads up to {SCHEMA})" in line
        assert "upgrade gpurun" in line
    assert tree_digest(gpurun.state_dir) == before


def test_ledger_from_an_older_gpurun_is_read_and_upgraded_out_loud(gpurun):
    # A schema 1 ledger (gpurun 0.1) lacks the fields from `request` on.
    assert gpurun.run("-g", "1", "--", "true").returncode == 0
    ledger = gpurun.ledger_path()
    lease = lease_record(
        2, kind="reservation", name="old", user="root", gpus=[3], command=[], boot=""
    )
    ledger.write_text(json.dumps({"schema": 1, "next_id": 3, "leases": [lease]}))
    before = ledger.read_bytes()

    listed = gpurun.ps()
    unchanged = ledger.read_bytes()
    written = gpurun.run("-g", "1", "--", "true")

    assert [job["name"] for job in listed] == ["old"]
    assert unchanged == before
    assert written.returncode == 0
    line = one_error_line(written.stderr)
    assert f"upgraded the ledger from schema 1 to {SCHEMA}" in line and "upgrade those too" in line
    doc = json.loads(ledger.read_text())
    assert doc["schema"] == SCHEMA and [lease["name"] for lease in doc["leases"]] == ["old"]
    assert gpurun.run("-g", "1", "--", "true").stderr == ""


def test_reset_moves_a_corrupt_ledger_aside(gpurun):
    assert gpurun.run("-g", "1", "--", "true").returncode == 0
    ledger = gpurun.ledger_path()
    ledger.write_bytes(b"garbage")

    unconfirmed = gpurun.run("reset", stdin=subprocess.DEVNULL)
    result = gpurun.run("reset", "--yes")

    assert unconfirmed.returncode == 2
    assert "not confirmed" in one_error_line(unconfirmed.stderr)
    assert result.returncode == 0, result.stderr
    kept = list(gpurun.state_dir.glob("*.json.*.bak"))
    assert len(kept) == 1 and kept[0].read_bytes() == b"garbage"
    assert json.loads(ledger.read_text())["leases"] == []
    assert gpurun.run("-g", "1", "--", "true").returncode == 0
    ids = [job["id"] for job in gpurun.ps("-a")]
    assert len(set(ids)) == len(ids) == 2

"""The launch path's shortcuts give the same answers as the long way: the quick parser
agrees with argparse, and the config parse cache never serves a stale file."""

from __future__ import annotations

import os

import pytest
from conftest import held_ledger_lock

from gpurun.cli import build_parser, quick_args
from gpurun.config import _cache_path, load_config

PLAIN = [
    ["true"],
    ["-g", "1", "-c", "1", "--", "true"],
    ["-g", "2", "python", "train.py", "--gpus", "3"],
    ["--gpus=2", "--cpus=0", "-n", "eval", "--no-wait", "--", "sh", "-c", "exit 3"],
    ["-d", "--time", "1h30m", "--priority", "0", "--after", "4,7", "--", "x"],
    ["--after-any", "3", "--timeout", "2.5", "-v", "--config", "/x.yaml", "--", "x"],
    ["--gpu-ids", "0,3", "-r", "dbg", "--server", "lab1", "--detach", "--", "x"],
    ["-g", "1", "-g", "2", "--name", "a", "--verbose", "--", "x"],
    ["--", "--weird"],
    [],
]
# Forms the quick parser leaves to argparse: bundled, abbreviated, odd or wrong.
LEFT_TO_ARGPARSE = [
    ["-g1", "--", "x"],
    ["--gpu", "1", "--", "x"],
    ["-dv", "--", "x"],
    ["--priority", "-1", "--", "x"],
    ["-g", "--", "x"],
    ["-g", "x", "--", "x"],
    ["-g"],
    ["--no-wait=1", "x"],
    ["-n=a", "x"],
    ["--after", "1", "--after-any", "2", "x"],
    ["-h"],
    ["--server", "bad/name", "x"],
    ["--time", "0", "x"],
]


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    at = argv.index("--") if "--" in argv else len(argv)
    return argv[:at], argv[at + 1 :]


# ps and status in watch loops and scripts: their plain forms, and the rest.
PLAIN_VIEWS = [
    ("ps", []),
    ("ps", ["-a", "--json"]),
    ("ps", ["--all", "--backend", "slurm", "-v", "--config=/x.yaml"]),
    ("status", []),
    ("status", ["--detail", "--server", "lab1", "--json", "--verbose"]),
]
VIEWS_LEFT_TO_ARGPARSE = [
    ("ps", ["-aj"]),
    ("ps", ["--al"]),
    ("ps", ["extra"]),
    ("ps", ["--detail"]),
    ("ps", ["--backend", "nowhere"]),
    ("status", ["-a"]),
    ("status", ["--server", "bad/name"]),
    ("status", ["--json=1"]),
    ("status", ["--help"]),
]


@pytest.mark.parametrize("argv", PLAIN, ids=" ".join)
def test_quick_run_parser_agrees_with_argparse(argv):
    options, _ = split(argv)

    quick = quick_args("run", options)
    full = build_parser("run").parse_args(options)

    assert quick is not None
    assert vars(quick) == vars(full)


@pytest.mark.parametrize("argv", LEFT_TO_ARGPARSE, ids=" ".join)
def test_quick_run_parser_leaves_the_rest_to_argparse(argv):
    options, _ = split(argv)

    assert quick_args("run", options) is None


@pytest.mark.parametrize(("command", "options"), PLAIN_VIEWS, ids=str)
def test_quick_parser_of_ps_and_status_agrees_with_argparse(command, options):
    quick = quick_args(command, options)
    full = build_parser(command).parse_args(options)

    assert quick is not None
    assert vars(quick) == vars(full)


@pytest.mark.parametrize(("command", "options"), VIEWS_LEFT_TO_ARGPARSE, ids=str)
def test_quick_parser_of_ps_and_status_leaves_the_rest_to_argparse(command, options):
    assert quick_args(command, options) is None


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("GPURUN_STATE_DIR", raising=False)
    monkeypatch.delenv("GPURUN_SERVER", raising=False)
    path = tmp_path / "gpurun.yaml"
    path.write_text("gpus: 4\nkill_grace: 3\n")
    return path


def test_config_cache_is_used_and_follows_every_edit(config_file):
    first = load_config(str(config_file))
    cache = _cache_path(str(config_file))
    assert os.path.exists(cache) and os.stat(cache).st_mode & 0o077 == 0
    info = os.stat(config_file)

    # Same size, same mtime: only the text tells the two files apart.
    config_file.write_text("gpus: 4\nkill_grace: 5\n")
    os.utime(config_file, ns=(info.st_atime_ns, info.st_mtime_ns))
    second = load_config(str(config_file))
    again = load_config(str(config_file))

    assert (first.gpus, first.kill_grace) == ((0, 1, 2, 3), 3.0)
    assert (second.gpus, second.kill_grace) == ((0, 1, 2, 3), 5.0)
    assert again == second


def test_config_cache_that_lies_or_is_foreign_is_ignored(config_file):
    load_config(str(config_file))
    cache = _cache_path(str(config_file))

    with open(cache, "w") as f:
        f.write('{"text": "gpus: 4\\nkill_grace: 3\\n", "data": {"gpus": 1}, "lines": {}}')
    os.chmod(cache, 0o666)
    shared = load_config(str(config_file))
    with open(cache, "w") as f:
        f.write("not json")
    broken = load_config(str(config_file))

    assert shared.gpus == (0, 1, 2, 3)
    assert broken.gpus == (0, 1, 2, 3)


def test_config_errors_come_through_the_cache_too(config_file):
    from gpurun.errors import ConfigError

    load_config(str(config_file))
    config_file.write_text("gpus: 4\ncpus: 16:31\n")

    with pytest.raises(ConfigError, match="base-60"):
        load_config(str(config_file))
    with pytest.raises(ConfigError, match="base-60"):
        load_config(str(config_file))


@pytest.mark.parametrize("zone", ["UTC", "Europe/Paris", "America/St_Johns", "Asia/Kolkata"])
def test_iso_time_writes_what_datetime_writes(monkeypatch, zone):
    import time
    from datetime import datetime

    from gpurun.jobs import iso_time

    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        for when in (0.0, 1.9999996, 1_700_000_000.5, 1_720_000_000.25, 1_735_689_599.9999):
            expected = datetime.fromtimestamp(when).astimezone().isoformat(timespec="seconds")
            assert iso_time(when) == expected
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_a_held_ledger_lock_still_times_out(gpurun):
    with held_ledger_lock(gpurun, lock_timeout=0.5):
        result = gpurun.run("-g", "1", "--", "true")

    assert result.returncode == 125
    assert "still locked after lock_timeout (0.5 s); held by pid" in result.stderr
    assert gpurun.run("-g", "1", "--", "true").returncode == 0

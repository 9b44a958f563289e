"""Placement, cpulist and config rules, called directly."""

from __future__ import annotations

import pytest
from conftest import lease_record

from gpurun.config import build_config, load_config
from gpurun.cpulist import format_cpulist, online_cpus, parse_cpulist
from gpurun.errors import CapacityError, ConfigError
from gpurun.ledger import Request
from gpurun.placement import check_possible, pick_cpus, place


def test_place_takes_lowest_free_gpus_and_a_contiguous_cpu_run():
    spot = place(Request(2, 3, None), (0, 1, 2, 3), tuple(range(8)), {0}, {1, 2})

    assert spot == ((1, 2), (3, 4, 5))


def test_place_returns_none_when_gpus_or_cpus_are_short():
    assert place(Request(2, 1, None), (0, 1, 2), (0, 1), {0, 1}, set()) is None
    assert place(Request(1, 2, None), (0, 1, 2), (0, 1), set(), {1}) is None


def test_place_honours_exact_gpu_ids():
    assert place(Request(2, 0, (0, 3)), (0, 1, 2, 3), (), {1}, set()) == ((0, 3), ())
    assert place(Request(2, 0, (0, 3)), (0, 1, 2, 3), (), {3}, set()) is None


def test_pick_cpus_prefers_a_run_then_falls_back_to_lowest():
    assert pick_cpus([0, 2, 3, 5, 6, 7], 3) == [5, 6, 7]
    assert pick_cpus([0, 2, 4], 2) == [0, 2]
    assert pick_cpus([4], 0) == []


def test_check_possible_names_what_the_server_has():
    with pytest.raises(CapacityError, match="asked for 5 GPUs but this server has 4 GPUs"):
        check_possible(Request(5, 0, None), (0, 1, 2, 3), (0, 1))
    with pytest.raises(CapacityError, match="no GPU 7"):
        check_possible(Request(1, 0, (7,)), (0, 1, 2, 3), (0, 1))
    with pytest.raises(CapacityError, match="asked for 3 CPUs"):
        check_possible(Request(0, 3, None), (0,), (0, 1))


@pytest.mark.parametrize(
    ("text", "ids"),
    [("0-3,8", [0, 1, 2, 3, 8]), ("5", [5]), ("", []), ("2,0-1", [0, 1, 2]), ("1-1", [1])],
)
def test_parse_cpulist(text, ids):
    assert parse_cpulist(text) == ids
    assert parse_cpulist(format_cpulist(ids)) == ids


@pytest.mark.parametrize("text", ["3-1", "a", "1,,2", "1-", "-2", "0:3"])
def test_parse_cpulist_rejects(text):
    with pytest.raises(ValueError):
        parse_cpulist(text)


def test_format_cpulist_merges_runs():
    assert format_cpulist([8, 0, 1, 2, 3, 10, 11]) == "0-3,8,10-11"


def test_defaults_without_a_file(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPURUN_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi: 0 GPUs

    if __import__("os").path.exists("/etc/gpurun/gpurun.yaml"):
        pytest.skip("this host has /etc/gpurun/gpurun.yaml")

    config = load_config(None)

    assert config.path == ""
    assert config.gpus == ()
    assert list(config.cpus) == sorted(__import__("os").sched_getaffinity(0))


def test_cpus_per_gpu_auto_rounds_down_but_gives_at_least_one():
    cpus = online_cpus()
    three = build_config({"gpus": 3, "cpus": len(cpus)}, "x.yaml")
    many = build_config({"gpus": len(cpus) + 1, "cpus": len(cpus)}, "x.yaml")
    none = build_config({"gpus": 0, "cpus": len(cpus)}, "x.yaml")

    assert three.cpus_per_gpu == max(1, len(cpus) // 3)
    assert many.cpus_per_gpu == 1
    assert none.cpus_per_gpu == 0


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"gpus": "0,1"}, "write a list: gpus: [0, 1]"),
        ({"gpus": -1}, "must be from 0 to 1024"),
        ({"gpus": 10**20}, "must be from 0 to 1024"),
        ({"cpus": "0-99999999999"}, "CPU id 99999999999 is too large"),
        ({"cpus": 10**12}, "a CPU count must be at most 8192"),
        ({"gpus": [0, 0]}, "listed twice"),
        ({"gpus": True}, "must be 'auto'"),
        ({"cpus": [0, 99999]}, "this host has no CPU 99999"),
        ({"cpus": "0-4000"}, "this host has no CPU"),
        ({"cpus": "16:31"}, "base-60"),
        ({"cpus_per_gpu": -2}, "cpus_per_gpu"),
        ({"lock_timeout": 0}, "lock_timeout"),
        ({"kill_grace": "soon"}, "kill_grace"),
        ({"colour": "blue"}, "unknown key"),
        ({"state_dir": ""}, "state_dir"),
    ],
)
def test_bad_values_name_file_and_key(raw, needle):
    with pytest.raises(ConfigError) as caught:
        build_config(raw, "/etc/x.yaml")

    assert needle in str(caught.value)
    assert str(caught.value).startswith("/etc/x.yaml")
    assert caught.value.key == next(iter(raw))


def test_the_ledger_refuses_to_record_a_lease_its_reader_would_refuse():
    from gpurun.errors import LedgerError
    from gpurun.ledger import Holder, Lease, State

    lease = Lease.from_json(
        lease_record(
            state="waiting",
            command=["true"],
            started=None,
            holders=[{"pid": 5, "start": 1, "role": "gpurun"}],
        )
    )
    state = State([], 1, 0.0)

    state.add(lease._replace(priority=-3))
    for bad in (
        {"priority": 2**40},
        {"expires": 1e12},
        {"holders": (Holder(2**40, 1, "gpurun"),)},
    ):
        with pytest.raises(LedgerError, match="refusing to record lease 1"):
            state.add(lease._replace(**bad))
    assert [entry.priority for entry in state.leases] == [-3]


@pytest.mark.parametrize(
    ("raw", "code"),
    [(0, 0), (3 << 8, 3), (15, 143), (9, 137), ({"return_code": 4}, 4), (None, None), (-1, None)],
)
def test_slurm_exit_codes_read_as_gpurun_would_exit(raw, code):
    from gpurun.slurm import exit_code

    assert exit_code(raw) == code


def test_a_slurm_comment_is_one_line_whatever_the_command():
    from gpurun.slurm import job_comment

    comment = job_comment(["sh", "-c", "echo a\necho b"])

    assert "\n" not in comment and comment.endswith("'echo a\\necho b'")

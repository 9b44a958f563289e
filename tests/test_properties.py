"""Hostile input, generated: config text, ledger content and command-line values.

Whatever hypothesis makes up, gpurun (called in-process through `cli.main`) never shows a
traceback, exits with a documented code, says why in one `gpurun: ` line when it fails, and a
failed command changes nothing on disk. Example counts are small so the file runs in seconds;
the commands that start processes are left to the tests that use real ones.
"""

from __future__ import annotations

import contextlib
import io
import json
import string

import pytest
from conftest import lease_record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_errors import tree_digest

from gpurun.cli import main

DOCUMENTED = {0, 1, 2, 75, 125, 126, 127, 130}
FAST = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A config and state dir in tmp_path, for in-process runs."""
    config = tmp_path / "gpurun.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\ngpus: 4\ncpus: auto\nlock_timeout: 2\n")
    monkeypatch.setenv("GPURUN_CONFIG", str(config))
    monkeypatch.setenv("GPURUN_SERVER", "prop")
    monkeypatch.delenv("GPURUN_STATE_DIR", raising=False)
    monkeypatch.delenv("GPURUN_CRASH_AT", raising=False)
    return tmp_path


def call(*argv: str) -> tuple[int, str]:
    """Run `gpurun ARGV` in-process; return its exit code and what it wrote on stderr."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, err.getvalue()


def assert_clean(code: int, stderr: str, what: object) -> None:
    assert code in DOCUMENTED, (code, what, stderr)
    assert "Traceback" not in stderr and "internal error" not in stderr, (what, stderr)
    if code not in (0, 1):
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gpurun: "), (what, stderr)


KEYS = st.sampled_from(
    [
        "gpus",
        "cpus",
        "cpus_per_gpu",
        "lock_timeout",
        "kill_grace",
        "stale_after",
        "limits",
        "label_limits",
        "servers",
        "on_finish",
        "colour",
    ]
)
SCALARS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(string.printable, max_size=12),
    st.sampled_from(["auto", "0-3", "0,1", "16:31", "[0, 1]", "{a: 1}", "~", "- x", "!!binary"]),
)


@FAST
@given(
    st.one_of(
        st.dictionaries(KEYS, SCALARS, max_size=4).map(
            lambda d: "".join(f"{k}: {v}\n" for k, v in d.items())
        ),
        st.text(max_size=80),
    )
)
def test_any_config_text_gives_a_clear_answer(home, text):
    (home / "gpurun.yaml").write_text(text)

    for argv in (["ps"], ["status"], ["gc", "--dry-run"]):
        code, stderr = call(*argv)

        assert code in (0, 125), (text, argv, stderr)
        assert_clean(code, stderr, text)
    assert not (home / "state").exists() or code == 0


LEASE_FIELDS = {
    "id": st.integers(-2, 2**64),
    "kind": st.sampled_from(["job", "reservation", "other"]),
    "state": st.sampled_from(["running", "waiting", "dead"]),
    "gpus": st.lists(st.integers(-1, 9), max_size=3),
    "cpus": st.lists(st.integers(-1, 3), max_size=2),
    "holders": st.lists(
        st.fixed_dictionaries(
            {"pid": st.integers(2**22, 2**30), "start": st.integers(0, 9), "role": st.text()}
        ),
        max_size=2,
    ),
    "created": st.one_of(st.floats(), st.integers(), st.none()),
    "expires": st.one_of(st.floats(), st.none()),
    "request": st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.integers())),
}
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


def valid_lease(lease_id: int) -> dict:
    return lease_record(lease_id, gpus=[lease_id % 4], boot="another-boot")


@FAST
@given(
    st.one_of(
        st.tuples(
            st.just("lease"),
            st.lists(st.tuples(st.sampled_from(sorted(LEASE_FIELDS)), st.data()), max_size=3),
        ),
        st.tuples(st.just("leases"), JSON),
        st.tuples(st.just("bytes"), st.binary(max_size=60)),
    ),
    st.one_of(st.sampled_from([1, 2, 3, 0, -1, True, "2", None]), JSON),
)
def test_any_ledger_content_gives_a_clear_answer_and_a_failure_changes_nothing(
    home, content, schema
):
    state = home / "state"
    state.mkdir(exist_ok=True)
    ledger = state / "prop.json"
    kind, value = content
    if kind == "bytes":
        ledger.write_bytes(value)
    elif kind == "lease":
        lease = valid_lease(1)
        for field, data in value:
            lease[field] = data.draw(LEASE_FIELDS[field])
        doc = {"schema": schema, "next_id": 2, "leases": [lease, valid_lease(2)]}
        ledger.write_text(json.dumps(doc))
    else:
        ledger.write_text(json.dumps({"schema": schema, "next_id": 1, "leases": value}))

    for argv in (["ps", "-a"], ["status", "--detail"], ["gc"], ["release", "x"], ["wait", "1"]):
        before = tree_digest(state)

        code, stderr = call(*argv)

        assert_clean(code, stderr, (content, argv))
        if code != 0:
            assert tree_digest(state) == before, (content, argv, stderr)
        else:
            json.loads(ledger.read_bytes())


def written_record() -> dict:
    """A lease record as gpurun writes it: every schema 3 field, with the types JSON gives."""
    from gpurun.ledger import Lease

    record = lease_record(
        7,
        gpus=[1, 2],
        cpus=[4],
        command=["python", "train.py"],
        created=1700000000.5,
        started=1700000001.25,
        holders=[{"pid": 4242, "start": 99, "role": "gpurun"}],
        request={"gpus": 2, "cpus": 1, "gpu_ids": [1, 2]},
        priority=-3,
        time_limit=3600.0,
        after=[5],
        after_any=True,
        log="/tmp/x.log",
        placed=1700000000.75,
        reservation=3,
        gpu_mask=[1, 2, 3],
    )
    return json.loads(json.dumps(Lease.from_json(record).to_json()))


# Values at and beyond the edges of what the ledger's checks accept, and of other types.
EDGES = st.sampled_from(
    [
        *(0, 1, -1, 2**31 - 1, 2**31, -(2**31), 2**63 - 1, 2**63),
        *(0.0, -0.0, 1.0, 99999999999.0, 1e11, float("nan"), float("inf")),
        *(True, False, None, "", "job", "running", "()", [0], [-1], [True], [1.0]),
    ]
) | st.sampled_from([[], {}]).map(type)
NESTED = ("request.gpus", "request.cpus", "request.gpu_ids", "holders.pid", "holders.start")


def outcome(build, record: dict) -> str:
    """What building a lease from `record` gives, as text that tells 1 from 1.0 and True."""
    try:
        return repr(build(record))
    except ValueError as exc:
        return f"ValueError: {exc}"


@FAST
@given(
    st.lists(
        st.tuples(
            st.sampled_from([*sorted(written_record()), *NESTED, "holders.role"]),
            st.one_of(EDGES, JSON, st.just("(missing)")),
        ),
        max_size=3,
    )
)
def test_the_quick_reading_of_a_lease_accepts_and_builds_what_the_checks_do(changes):
    from gpurun.ledger import Lease, _checked_lease, _written_lease

    record = written_record()
    for field, value in changes:
        where, _, key = field.rpartition(".")
        target = record.get(where) if where else record
        if where == "holders":
            target = target[0] if isinstance(target, list) and target else None
        if not isinstance(target, dict):
            continue
        if isinstance(value, type):
            value = value()
        if value == "(missing)":
            target.pop(key, None)
        else:
            target[key] = value

    checked = outcome(_checked_lease, record)
    quick = _written_lease(record)

    assert quick is None or repr(quick) == checked, (changes, quick, checked)
    assert outcome(Lease.from_json, record) == checked, changes


def test_a_lease_as_gpurun_writes_it_takes_the_quick_reading():
    from gpurun.ledger import _checked_lease, _written_lease

    record = written_record()

    assert _written_lease(record) is not None
    assert repr(_written_lease(record)) == repr(_checked_lease(record))


# Each field the ledger leaves out at its default, with its default and other values.
LEFT_OUT = {
    "priority": st.sampled_from([0, 1, -5]),
    "time_limit": st.sampled_from([None, 0.0, 60.0]),
    "after": st.sampled_from([[], [0], [3, 4]]),
    "after_any": st.booleans(),
    "log": st.sampled_from([None, "", "/tmp/x.log"]),
    "placed": st.sampled_from([None, 0.0, 1700000000.75]),
    "reservation": st.sampled_from([None, 0, 3]),
    "gpu_mask": st.sampled_from([None, [], [1, 2]]),
}


# Requests for the 2 GPUs and 1 CPU of written_record(): the first two are what it holds.
REQUESTS = st.sampled_from(
    [
        None,
        {"gpus": 2, "cpus": 1, "gpu_ids": None},
        {"gpus": 2, "cpus": 1, "gpu_ids": [1, 2]},
        {"gpus": 3, "cpus": 1, "gpu_ids": None},
        {"gpus": 2, "cpus": 0, "gpu_ids": None},
    ]
)


@FAST
@given(st.fixed_dictionaries(LEFT_OUT), REQUESTS)
def test_the_ledger_leaves_out_defaults_and_reads_them_back(values, request):
    from gpurun.ledger import _LEFT_OUT, Lease, _checked_lease, _ledger_record

    lease = Lease.from_json({**written_record(), **values, "request": request})
    kept = json.loads(json.dumps(_ledger_record(lease)))

    defaults = dict(_LEFT_OUT)
    assert sorted(LEFT_OUT) == sorted(defaults)
    for field, value in values.items():
        at_default = value == defaults[field] and type(value) is type(defaults[field])
        assert (field not in kept) == at_default, (field, value)
    holds = request is None or request == {"gpus": 2, "cpus": 1, "gpu_ids": None}
    assert ("request" not in kept) == holds, request
    assert Lease.from_json(kept) == lease
    # What a gpurun reading schema 3 without the quick path makes of it: the same lease.
    assert _checked_lease(kept) == lease


TOKENS = st.one_of(
    st.sampled_from(
        [
            "-g",
            "-c",
            "-s",
            "-a",
            "-f",
            "--json",
            "--dry-run",
            "--detail",
            "--server",
            "--ttl",
            "--yes",
            "--force",
            "--all",
            "--config",
            "-v",
            "1",
            "0",
            "-1",
            "99999999999999999999",
            "auto",
            "TERM",
            "1e9",
            "nan",
            "",
        ]
    ),
    st.text(max_size=10),
)
COMMANDS = st.sampled_from(
    ["ps", "gc", "status", "kill", "alloc", "release", "wait", "logs", "doctor", "reset"]
)


@FAST
@given(COMMANDS, st.lists(TOKENS, max_size=5))
def test_any_command_line_gives_a_clear_answer_and_a_failure_changes_nothing(home, command, tokens):
    state = home / "state"
    before = tree_digest(state)

    code, stderr = call(command, *tokens)

    assert_clean(code, stderr, (command, tokens))
    if code != 0:
        assert tree_digest(state) == before, (command, tokens, stderr)

"""The launch path's own JSON, signal, record and C-library code does what the standard
modules it replaces would do, and the path imports none of those modules."""

from __future__ import annotations

import collections
import json
import math
import signal
import subprocess
import sys

import pytest
from conftest import GPURUN, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from gpurun import codec, signals
from gpurun.errors import UsageError
from gpurun.jobs import parse_signal
from gpurun.record import record

# Heavy modules a plain launch must not import (bench/ measures what each costs).
HEAVY = {
    "json", "re", "enum", "signal", "ctypes", "collections", "argparse", "yaml", "logging",
    "subprocess",
}  # fmt: skip

# gpurun's own modules that `ps` and `status` do without when no job waits.
LAUNCH_SIDE = {
    "gpurun.launch", "gpurun.placement", "gpurun.admission", "gpurun.topology", "gpurun.signals",
    "gpurun.supervise",
}  # fmt: skip

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def imported_by(argv: list[str], env: dict[str, str]) -> set[str]:
    """The names of the modules `argv` (a gpurun command line) imports, from -X importtime."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", GPURUN, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    found = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            found.add(line.rsplit("|", 1)[1].strip())
    return found


def test_a_launch_imports_none_of_the_heavy_modules(gpurun):
    gpurun.run("-g", "1", "--", "true")  # parses the config once and caches the parse

    modules = imported_by(["-g", "1", "-c", "1", "--", "true"], gpurun.env)

    assert "gpurun.launch" in modules
    assert modules & HEAVY == set()


def test_ps_and_status_import_none_of_the_heavy_modules(gpurun):
    gpurun.run("-g", "1", "--", "true")
    gpurun.start("-g", "1", "--", "sleep", "30")
    wait_for(lambda: gpurun.ledger()["leases"], what="the job's lease")

    for command in ("ps", "status"):
        modules = imported_by([command], gpurun.env)
        assert modules & HEAVY == set(), command
        # Nor the launch side of gpurun: reading a ledger needs no placement, queue rules
        # or signals (each module costs a view a few tenths of a millisecond).
        assert modules & LAUNCH_SIDE == set(), command


@settings(max_examples=200, deadline=None, database=None)
@given(JSON_VALUES)
def test_codec_writes_and_reads_what_json_does(value):
    assert codec.dumps(value) == json.dumps(value, separators=(",", ":"))
    text = json.dumps(value, indent=1)
    assert codec.loads(text) == json.loads(text)
    assert codec.loads(text.encode()) == json.loads(text)


def test_codec_reads_the_constants_json_reads():
    assert codec.loads("[NaN, Infinity, -Infinity]")[1:] == [math.inf, -math.inf]
    assert math.isnan(codec.loads("NaN"))


@pytest.mark.parametrize(
    "text", ["", " ", "{", "[1,]", "1 2", "[1] x", "nul", "{'a': 1}", '"\\x"', '"a\nb"', "\x00"]
)
def test_codec_refuses_what_json_refuses(text):
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        codec.loads(text)


@pytest.mark.parametrize(
    "data",
    [
        b'\xef\xbb\xbf{"a": 1}',
        '{"a": 1}'.encode("utf-16"),
        '{"a": 1}'.encode("utf-32-le"),
        '{"a": "\ud800"}'.encode("utf-8", "surrogatepass"),
    ],
    ids=["bom", "utf-16", "utf-32", "surrogate"],
)
def test_codec_reads_bytes_as_json_does(data):
    assert repr(codec.loads(data)) == repr(json.loads(data))


def test_codec_refuses_what_is_not_json_data():
    with pytest.raises(TypeError):
        codec.dumps({"when": object()})
    with pytest.raises(ValueError):
        codec.loads(b"\xff")


def test_signal_names_are_the_signal_modules():
    assert {member.value: member.name for member in signal.Signals} == signals.NAMES
    assert parse_signal("iot") == signal.SIGABRT
    assert parse_signal("TERM") == parse_signal("SIGTERM") == parse_signal("15") == 15
    assert signals.name(signal.SIGRTMIN + 6) == f"signal {signal.SIGRTMIN + 6}"
    assert parse_signal(str(signal.SIGRTMIN + 6)) == signal.SIGRTMIN + 6
    for wrong in ("0", str(signal.NSIG), "-15", "SIGNOPE", ""):
        with pytest.raises(UsageError):
            parse_signal(wrong)


def test_a_job_ended_by_a_signal_with_no_name_is_reported(gpurun):
    number = signal.SIGRTMIN + 6

    result = gpurun.run("-g", "1", "--", "sh", "-c", f"kill -{number} $$")

    assert result.returncode == 128 + number
    assert f"was ended by signal {number}" in result.stderr
    assert "internal error" not in result.stderr


def test_a_record_behaves_as_the_namedtuple_it_replaces():
    ours = record("Point", "x y label", defaults=("none",))
    theirs = collections.namedtuple("Point", "x y label", defaults=("none",))

    for args, kwargs in [((1, 2), {}), ((1,), {"y": 2, "label": "a"}), ((), {"y": 2, "x": 1})]:
        a, b = ours(*args, **kwargs), theirs(*args, **kwargs)
        assert tuple(a) == tuple(b) and a == b and hash(a) == hash(b)
        assert repr(a) == repr(b)
        assert a._asdict() == b._asdict()
        assert a._replace(y=5) == b._replace(y=5) and type(a._replace(y=5)) is ours
        assert (a.x, a.y, a.label) == (b.x, b.y, b.label)
    assert ours._fields == theirs._fields
    for args, kwargs in [((), {}), ((1, 2, 3, 4), {}), ((1,), {"x": 1}), ((1, 2), {"z": 3})]:
        with pytest.raises(TypeError):
            theirs(*args, **kwargs)
        with pytest.raises(TypeError):
            ours(*args, **kwargs)
    with pytest.raises(TypeError):
        ours(1, 2)._replace(z=1)
    with pytest.raises(AttributeError):
        ours(1, 2).x = 3


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.text(), max_size=4))
def test_shell_join_quotes_as_shlex_does(words):
    import shlex

    from gpurun.slurm import shell_join

    assert shell_join(words) == shlex.join(words)

"""Find, read and check `gpurun.yaml`.

The config is read on every launch, so this module builds a `Config` namedtuple, not a
dataclass (`dataclasses` alone costs more to import than the interpreter takes to start), and
imports PyYAML only when the file's text is not in the parse cache: importing and running it
costs about as much as the interpreter's start. The cache (`$XDG_CACHE_HOME/gpurun/`, else
`~/.cache/gpurun/`, private to the user) keeps the text it was parsed from and is used only
when the file reads exactly that text now, so an edit takes effect on the next command. It
holds the parse, not the checked config: checks that depend on the host (its CPUs, GPUs and
names) run every time.
"""

from __future__ import annotations

import os
from collections import namedtuple

from gpurun.cpulist import online_cpus, parse_cpulist
from gpurun.errors import ConfigError

# Only for annotations: importing `typing` costs the launch path a few milliseconds.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from gpurun.inventory import Limits, Server

SEARCH_PATHS = (
    "./gpurun.yaml",
    "~/.config/gpurun/gpurun.yaml",
    "/etc/gpurun/gpurun.yaml",
)
DEFAULT_STATE_DIR = "/tmp/gpurun"
DEFAULT_STALE_AFTER = 600.0
KEYS = (
    "state_dir",
    "gpus",
    "cpus",
    "cpus_per_gpu",
    "lock_timeout",
    "kill_grace",
    "on_finish",
    "servers",
    "limits",
    "label_limits",
    "stale_after",
)

_ConfigBase = namedtuple(
    "_ConfigBase",
    "path state_dir server server_named gpus cpus cpus_per_gpu lock_timeout kill_grace on_finish"
    " servers entry chosen_by limits stale_after",
)


class Config(_ConfigBase):
    """The checked settings of one run.

    path: the file read ("" for built-in defaults); state_dir: str; server: the name of this
    host's ledger, its short hostname unless $GPURUN_SERVER names it (server_named: bool);
    gpus, cpus: sorted tuples of ids; cpus_per_gpu: int; lock_timeout, kill_grace: float
    seconds; on_finish: a shell command run after each job ends, with the job's record as
    JSON on stdin, or None.

    servers: the inventory (a tuple of inventory.Server, empty without `servers:`); entry: the
    one that is this host, or None when this host is not listed (then gpus and cpus come from
    the top-level keys); chosen_by: how this server was picked, for `doctor`; limits: the
    per-job inventory.Limits for this server; stale_after: seconds after which another
    server's ledger heartbeat counts as stale.
    """

    __slots__ = ()


def find_config_path(explicit: str | None) -> str | None:
    """Return the config file to read: `--config`, `$GPURUN_CONFIG`, then the search paths."""
    if explicit:
        return explicit
    from_env = os.environ.get("GPURUN_CONFIG")
    if from_env:
        return from_env
    for candidate in SEARCH_PATHS:
        path = os.path.expanduser(candidate)
        if os.path.isfile(path):
            return path
    return None


def load_config(explicit: str | None = None, server: str | None = None) -> Config:
    """Read and check the config; raise ConfigError naming the file, key and line.

    `server` (from --server) names this host's server, as $GPURUN_SERVER does.
    """
    path = find_config_path(explicit)
    raw: dict[str, object] = {}
    lines: dict[str, int] = {}
    if path is not None:
        raw, lines = _read_yaml(path)
    return build_config(raw, path or "", lines, server)


def build_config(
    raw: dict[str, object],
    path: str,
    lines: dict[str, int] | None = None,
    server: str | None = None,
) -> Config:
    """Check the parsed keys and fill in defaults."""
    lines = lines or {}
    where = path or "built-in defaults"

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(where, problem, key=key, line=lines.get(key, 0))

    for key in raw:
        if key not in KEYS:
            known = ", ".join(KEYS)
            raise fail(str(key), f"unknown key; the known keys are {known}")

    from_env = os.environ.get("GPURUN_STATE_DIR")
    if from_env:
        if "\0" in from_env:
            raise ConfigError("$GPURUN_STATE_DIR", "is not a folder path")
        state_dir = os.path.abspath(os.path.expanduser(from_env))
    else:
        state_dir = raw.get("state_dir", DEFAULT_STATE_DIR)
        if not isinstance(state_dir, str) or not state_dir.strip() or "\0" in state_dir:
            raise fail("state_dir", "must be a folder path")
        state_dir = os.path.expanduser(state_dir)
        if path and not os.path.isabs(state_dir):
            state_dir = os.path.join(os.path.dirname(os.path.abspath(path)), state_dir)

    servers, limits = _inventory(raw, fail)
    entry, named, chosen_by = _choose_server(servers, server, where)
    if entry is not None:
        gpus = list(entry.gpus) if entry.gpus is not None else _gpu_ids("auto")
        cpus = list(entry.cpus) if entry.cpus is not None else _cpu_ids("auto")
        limits = entry.limits
        name = entry.name
    else:
        try:
            gpus = _gpu_ids(raw.get("gpus", "auto"))
        except ValueError as exc:
            raise fail("gpus", str(exc)) from None
        try:
            cpus = _cpu_ids(raw.get("cpus", "auto"))
        except ValueError as exc:
            raise fail("cpus", str(exc)) from None
        name = named or os.uname().nodename.split(".")[0] or "localhost"

    per_gpu = raw.get("cpus_per_gpu", "auto")
    if per_gpu == "auto":
        per_gpu = len(cpus) // len(gpus) if gpus else 0
    elif not _is_int(per_gpu) or per_gpu < 0:
        raise fail("cpus_per_gpu", f"must be 'auto' or a whole number >= 0, not {_yaml(per_gpu)}")

    lock_timeout = raw.get("lock_timeout", 60)
    if not _is_number(lock_timeout) or lock_timeout <= 0:
        raise fail("lock_timeout", f"must be a number of seconds > 0, not {_yaml(lock_timeout)}")
    kill_grace = raw.get("kill_grace", 10)
    if not _is_number(kill_grace) or kill_grace < 0:
        raise fail("kill_grace", f"must be a number of seconds >= 0, not {_yaml(kill_grace)}")

    on_finish = raw.get("on_finish")
    if on_finish is not None and (not isinstance(on_finish, str) or not on_finish.strip()):
        raise fail("on_finish", "must be a shell command, such as 'mail -s done me'")

    stale_after = raw.get("stale_after", DEFAULT_STALE_AFTER)
    if isinstance(stale_after, str):
        from gpurun.cli import parse_duration

        try:
            stale_after = parse_duration(stale_after)
        except ValueError:
            raise fail("stale_after", "must be a duration like 10m or 600") from None
    if not _is_number(stale_after) or stale_after <= 0:
        raise fail("stale_after", f"must be a duration above 0, not {_yaml(stale_after)}")

    return Config(
        path=path,
        state_dir=state_dir,
        server=name,
        server_named=bool(named),
        gpus=tuple(gpus),
        cpus=tuple(cpus),
        cpus_per_gpu=int(per_gpu),
        lock_timeout=float(lock_timeout),
        kill_grace=float(kill_grace),
        on_finish=on_finish,
        servers=tuple(servers),
        entry=entry,
        chosen_by=chosen_by,
        limits=limits,
        stale_after=float(stale_after),
    )


def _inventory(raw: dict[str, object], fail: object) -> tuple[list[Server], Limits]:
    """Check `limits:`, `label_limits:` and `servers:`; return the servers and default limits."""
    from gpurun.inventory import InventoryError, parse_limits, parse_servers

    try:
        limits = parse_limits(raw.get("limits"), "limits")
        label_limits = raw.get("label_limits") or {}
        if not isinstance(label_limits, dict):
            raise InventoryError("label_limits", "must map labels to limits, like {dev: {...}}")
        label_limits = {
            str(label): parse_limits(value, f"label_limits.{label}", limits)
            for label, value in label_limits.items()
        }
        if "servers" not in raw or raw["servers"] is None:
            return [], limits
        servers = parse_servers(
            raw["servers"],
            raw.get("gpus", "auto"),
            raw.get("cpus", "auto"),
            limits,
            label_limits,
            _remote_gpu_ids,
            _remote_cpu_ids,
        )
    except InventoryError as exc:
        top = exc.key.split(".")[0].split("[")[0]
        error = fail(top, str(exc))
        raise ConfigError(error.path, str(exc), key=exc.key, line=error.line) from None
    return servers, limits


def _remote_gpu_ids(value: object, local: bool) -> list[int] | None:
    return None if value == "auto" else _gpu_ids(value)


def _remote_cpu_ids(value: object, local: bool) -> list[int] | None:
    from gpurun.inventory import bookkeeping_cpus

    return bookkeeping_cpus(value)


def _choose_server(
    servers: list[Server], wanted: str | None, where: str
) -> tuple[Server | None, str, str]:
    """This host's inventory entry (or None), the name given explicitly ("" if none), and how
    the server was chosen."""
    from gpurun.inventory import find_local

    source = "--server"
    if not wanted:
        wanted = os.environ.get("GPURUN_SERVER") or ""
        source = "$GPURUN_SERVER"
    if wanted:
        if not _is_name(wanted):
            raise ConfigError(
                source, f"'{wanted}' is not a server name; use letters, digits, '.', '_' and '-'"
            )
        if not servers:
            return None, wanted, f"named by {source}"
        for server in servers:
            if server.name == wanted:
                return server, wanted, f"named by {source}"
        names = ", ".join(server.name for server in servers)
        raise ConfigError(
            where, f"{source} names '{wanted}', which is not among the servers: {names}"
        )
    entry, reason = find_local(servers)
    if entry is not None:
        return entry, "", reason
    if servers:
        return None, "", "this host is not in 'servers:'; using the top-level gpus and cpus"
    return None, "", "the host's name"


def _yaml(value: object) -> str:
    """A value as YAML spells it, for messages: null, true, 'text'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, (list, dict)):
        return "a list" if isinstance(value, list) else "a mapping"
    return str(value)


def _is_name(text: str) -> bool:
    return (
        0 < len(text) <= 64
        and text[0] != "."
        and all(c.isascii() and (c.isalnum() or c in "._-") for c in text)
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite int or float: YAML's .nan and .inf are not seconds."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return -1e12 < value < 1e12


def _id_list(value: object, what: str) -> list[int]:
    """Check a YAML list of ids: whole numbers >= 0, no duplicates."""
    assert isinstance(value, list)
    ids: list[int] = []
    for item in value:
        if not _is_int(item) or item < 0:
            raise ValueError(f"{what} ids must be whole numbers >= 0, not {_yaml(item)}")
        if item in ids:
            raise ValueError(f"{what} id {item} is listed twice")
        ids.append(item)
    return sorted(ids)


def _gpu_ids(value: object) -> list[int]:
    if value == "auto":
        from gpurun.gpus import discover_gpu_ids

        return discover_gpu_ids()
    if _is_int(value):
        if value < 0:
            raise ValueError(f"a GPU count must be >= 0, not {value}")
        return list(range(value))
    if isinstance(value, list):
        return _id_list(value, "GPU")
    if isinstance(value, str) and "," in value:
        raise ValueError(
            f"YAML reads {value} as the string '{value}', not a list; "
            f"write a list: gpus: [{value.replace(',', ', ')}]"
        )
    raise ValueError(f"must be 'auto', a count or a list of ids like [0, 2, 3], not {_yaml(value)}")


def _cpu_ids(value: object) -> list[int]:
    host = online_cpus()
    if value == "auto":
        return sorted(os.sched_getaffinity(0))
    if _is_int(value):
        if value < 0:
            raise ValueError(f"a CPU count must be >= 0, not {value}")
        ids = list(range(value))
    elif isinstance(value, list):
        ids = _id_list(value, "CPU")
    elif isinstance(value, str):
        if ":" in value:
            raise ValueError(
                f"'{value}' is not a cpulist; unquoted, YAML 1.1 would read it as a base-60 "
                f'number; write a quoted range like "{value.replace(":", "-")}"'
            )
        ids = parse_cpulist(value)
    else:
        raise ValueError(
            f"must be 'auto', a count, a list or a cpulist like \"0-7\", not {_yaml(value)}"
        )
    missing = sorted(set(ids) - set(host))
    if missing:
        from gpurun.cpulist import format_cpulist

        raise ValueError(
            f"this host has no CPU {format_cpulist(missing)}; it has CPUs {format_cpulist(host)}"
        )
    return ids


class _Sexagesimal(str):
    """The text of a YAML 1.1 base-60 integer such as 16:31, kept as written."""


CACHE_FORMAT = 1
# Bounds on what the cache keeps: a config is a few dozen values; anything far larger (an
# alias bomb, say) is parsed each time instead.
CACHE_MAX_NODES = 10_000
CACHE_MAX_DEPTH = 20


def _read_yaml(path: str) -> tuple[dict[str, object], dict[str, int]]:
    """Parse the file; return the top-level mapping and the line of each top-level key."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(path, f"cannot read the config file: {reason}") from None

    cache = _cache_path(path)
    cached = _cached_parse(cache, text) if cache else None
    if cached is not None:
        return cached
    data, lines = _parse_yaml(path, text)
    if cache:
        _store_parse(cache, text, data, lines)
    return data, lines


def _cache_path(path: str) -> str:
    """Where the parse of the config at `path` is cached ("" when there is no home)."""
    import binascii

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):
        return ""
    key = binascii.crc32(os.fsencode(os.path.abspath(path)))
    return os.path.join(base, "gpurun", f"config-{CACHE_FORMAT}-{key:08x}.json")


def _cached_parse(cache: str, text: str) -> tuple[dict[str, object], dict[str, int]] | None:
    """The cached parse of `text`, or None when the cache holds another text or is not ours."""
    import json

    try:
        with open(cache, "rb") as f:
            info = os.fstat(f.fileno())
            if info.st_uid != os.geteuid() or info.st_mode & 0o022:
                return None
            entry = json.loads(f.read())
        if entry["text"] != text or not isinstance(entry["data"], dict):
            return None
        if not isinstance(entry["lines"], dict):
            return None
        return entry["data"], entry["lines"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store_parse(cache: str, text: str, data: dict[str, object], lines: dict[str, int]) -> None:
    """Cache the parse if it is plain JSON data; a cache that cannot be written is skipped."""
    import json

    if not _plain(data, [CACHE_MAX_NODES], 0):
        return
    folder = os.path.dirname(cache)
    tmp = f"{cache}.{os.getpid()}.tmp"
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with open(fd, "w", encoding="utf-8") as f:
            json.dump({"text": text, "data": data, "lines": lines}, f)
        os.rename(tmp, cache)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _plain(value: object, budget: list[int], depth: int) -> bool:
    """Whether JSON gives `value` back exactly: str keys, no str subclasses such as
    _Sexagesimal, finite floats, no dates, no cycles (YAML anchors can make them)."""
    budget[0] -= 1
    if budget[0] < 0 or depth > CACHE_MAX_DEPTH:
        return False
    kind = type(value)
    if value is None or kind in (str, bool, int):
        return True
    if kind is float:
        return -1e300 < value < 1e300
    if kind is list:
        return all(_plain(item, budget, depth + 1) for item in value)
    if kind is dict:
        return all(
            type(key) is str and _plain(item, budget, depth + 1) for key, item in value.items()
        )
    return False


def _parse_yaml(path: str, text: str) -> tuple[dict[str, object], dict[str, int]]:
    """Parse `text`, read from `path`, with PyYAML; check its top level."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_yaml_int(self, node: yaml.ScalarNode) -> object:
            if ":" in str(node.value):
                return _Sexagesimal(node.value)
            return super().construct_yaml_int(node)

    Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_yaml_int)

    loader = Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        problem = exc.problem or exc.context or "not valid YAML"
        raise ConfigError(path, f"not valid YAML: {problem}", line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()

    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(path, "the top level must be a mapping of keys such as 'gpus: 4'", line=1)
    lines = {
        str(key.value): key.start_mark.line + 1
        for key, _ in node.value
        if isinstance(key, yaml.ScalarNode)
    }
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(path, f"key {key!r} is not a name", line=lines.get(str(key), 0))
    return data, lines

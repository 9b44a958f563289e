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

from gpurun.cpulist import MAX_CPUS, online_cpus, parse_cpulist
from gpurun.errors import ConfigError
from gpurun.record import record

# Only for annotations: importing `typing` costs the launch path a few milliseconds.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from gpurun.gpus import Discovery
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
    "visible_devices",
    "external",
    "external_memory_mb",
    "sysfs_root",
    "nvidia_smi",
    "backend",
    "slurm_partition",
    "slurm_account",
)
DEFAULT_EXTERNAL_MB = 1024
# More GPUs than any one server holds; a larger count is a typo, not an inventory.
MAX_GPUS = 1024
BACKENDS = ("local", "slurm")

_ConfigBase = record(
    "_ConfigBase",
    "path state_dir server server_named gpus cpus cpus_per_gpu lock_timeout kill_grace on_finish"
    " servers entry chosen_by limits stale_after devices discovery topology visible_devices"
    " external external_memory_mb sysfs_root nvidia_smi gpu_mask mask_form mask_note parent_job"
    " backend slurm_partition slurm_account",
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

    devices: {id: gpus.Gpu} for discovered GPUs (empty when `gpus:` declares ids); discovery:
    the gpus.Discovery when discovery ran, else None; topology: a topology.Topology, or None
    when there is none to read; visible_devices: "index" or "uuid"; external: "avoid" or
    "ignore"; external_memory_mb: int; sysfs_root: str; nvidia_smi: the configured command or
    None. gpu_mask: the ids an inherited $CUDA_VISIBLE_DEVICES allows, or None; mask_form:
    "index" or "uuid", how it named them (and so how to export them); mask_note: what the
    mask named that this server does not have ("" if nothing); parent_job: the id of the job
    this gpurun provably runs inside (masks.parent_lease), whose lease it subdivides, or None.
    backend: "local" (gpurun runs jobs itself) or "slurm" (it hands them to srun and sbatch);
    slurm_partition, slurm_account: passed to Slurm as --partition and --account, or None.
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
    config = build_config(raw, path or "", lines, server)
    if "SLURM_JOB_ID" in os.environ:
        from gpurun.slurm import inside_allocation

        config = inside_allocation(config)
    return config


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

    smi = raw.get("nvidia_smi")
    if smi is not None and (not isinstance(smi, str) or not _is_command(smi)):
        raise fail("nvidia_smi", "must be a command, such as /usr/bin/nvidia-smi")
    smi_env = os.environ.get("GPURUN_NVIDIA_SMI")
    if smi_env and not _is_command(smi_env):
        raise ConfigError(
            "$GPURUN_NVIDIA_SMI", f"'{smi_env}' is not a command line, such as /usr/bin/nvidia-smi"
        )
    root = raw.get("sysfs_root")
    if root is not None and (not isinstance(root, str) or not os.path.isdir(root)):
        raise fail("sysfs_root", f"must be a folder that exists, not {_yaml(root)}")
    from_env_root = os.environ.get("GPURUN_SYSFS_ROOT")
    root_set = bool(from_env_root or root)
    root = from_env_root or root or "/sys"
    if root_set and not os.path.isdir(root):
        raise ConfigError("$GPURUN_SYSFS_ROOT", f"'{root}' is not a folder")

    servers, limits = _inventory(raw, fail)
    entry, named, chosen_by = _choose_server(servers, server, where)
    discovery = None
    if entry is not None:
        gpus_value = list(entry.gpus) if entry.gpus is not None else "auto"
        cpus_value = list(entry.cpus) if entry.cpus is not None else "auto"
        limits = entry.limits
        name = entry.name
    else:
        gpus_value = raw.get("gpus", "auto")
        cpus_value = raw.get("cpus", "auto")
        name = named or os.uname().nodename.split(".")[0] or "localhost"
    try:
        gpus, discovery = _gpu_ids(gpus_value, smi)
    except ValueError as exc:
        raise fail("gpus", str(exc)) from None
    if entry is not None and entry.cpus is not None:
        # Not checked against this host: one entry may describe a group, and tests act as
        # bigger servers. Jobs are pinned only to CPUs the host has; doctor names the others.
        cpus = list(entry.cpus)
    else:
        try:
            cpus = _cpu_ids(cpus_value, root if root_set else None)
        except ValueError as exc:
            raise fail("cpus", str(exc)) from None
    devices = {gpu.id: gpu for gpu in discovery.gpus} if discovery else {}

    visible = raw.get("visible_devices", "index")
    if visible not in ("index", "uuid"):
        raise fail("visible_devices", f"must be 'index' or 'uuid', not {_yaml(visible)}")
    if visible == "uuid" and not devices:
        raise fail(
            "visible_devices",
            "'uuid' needs the GPUs' UUIDs: use gpus: auto or list UUIDs in gpus:",
        )
    external = raw.get("external", "avoid")
    if external not in ("avoid", "ignore"):
        raise fail("external", f"must be 'avoid' or 'ignore', not {_yaml(external)}")
    external_mb = raw.get("external_memory_mb", DEFAULT_EXTERNAL_MB)
    if not _is_int(external_mb) or external_mb < 0:
        raise fail(
            "external_memory_mb", f"must be a whole number of MiB >= 0, not {_yaml(external_mb)}"
        )

    from gpurun.masks import inherited_mask, parent_lease

    gpu_mask, mask_form, mask_note = inherited_mask(gpus, devices)
    parent = parent_lease(state_dir, name)
    if parent is not None:
        # Inside a gpurun job: its lease, as its ledger records it, is this gpurun's whole
        # server, in a private ledger. An inherited mask can only narrow it.
        folder, lease = parent
        gpus = [g for g in gpus if g in lease.gpus and (gpu_mask is None or g in gpu_mask)]
        cpus = [c for c in cpus if c in lease.cpus]
        gpu_mask = None
        state_dir = os.path.join(folder, "jobs", f"{name}.{lease.id}.d")

    topology = None
    buses = {gpu.id: gpu.bus_id for gpu in devices.values() if gpu.bus_id}
    if buses or root_set:
        from gpurun.topology import read_topology

        links = discovery.links if discovery else {}
        topology = read_topology(root, buses, links)

    per_gpu = raw.get("cpus_per_gpu", "auto")
    if per_gpu == "auto":
        per_gpu = max(1, len(cpus) // len(gpus)) if gpus and cpus else 0
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

    backend = raw.get("backend", "local")
    if backend not in BACKENDS:
        raise fail("backend", f"must be 'local' or 'slurm', not {_yaml(backend)}")
    slurm = {}
    for key in ("slurm_partition", "slurm_account"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not _is_slurm_word(value)):
            raise fail(key, f"must be a Slurm {key[6:]} name, not {_yaml(value)}")
        slurm[key] = value

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
        devices=devices,
        discovery=discovery,
        topology=topology,
        visible_devices=visible,
        external=external,
        external_memory_mb=external_mb,
        sysfs_root=root,
        nvidia_smi=smi,
        gpu_mask=gpu_mask,
        mask_form=mask_form,
        mask_note=mask_note,
        parent_job=str(parent[1].id) if parent else None,
        backend=backend,
        **slurm,
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
    if value == "auto":
        return None
    if isinstance(value, list) and any(isinstance(item, str) for item in value):
        raise ValueError("UUIDs may be listed only in the top-level gpus:, not in servers:")
    return _gpu_ids(value, None)[0]


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


def _is_command(text: str) -> bool:
    """Whether a shell-like command line splits into words, as gpus.smi_command splits it."""
    import shlex

    try:
        return bool(shlex.split(text))
    except ValueError:
        return False


def _is_slurm_word(text: str) -> bool:
    return 0 < len(text) <= 64 and all(c.isascii() and (c.isalnum() or c in "._-") for c in text)


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
        if not _is_int(item) or not 0 <= item < 2**20:
            raise ValueError(
                f"{what} ids must be whole numbers from 0 to {2**20 - 1}, not {_yaml(item)}"
            )
        if item in ids:
            raise ValueError(f"{what} id {item} is listed twice")
        ids.append(item)
    return sorted(ids)


def _gpu_ids(value: object, smi: str | None) -> tuple[list[int], Discovery | None]:
    """The GPU ids `gpus:` names, and the discovery when it had to ask the GPUs."""
    if value == "auto" or (isinstance(value, list) and any(isinstance(i, str) for i in value)):
        from gpurun.gpus import discover

        discovery = discover(smi)
        if value == "auto":
            return sorted(gpu.id for gpu in discovery.gpus), discovery
        return _named_gpus(value, discovery), discovery
    if _is_int(value):
        if not 0 <= value <= MAX_GPUS:
            raise ValueError(f"a GPU count must be from 0 to {MAX_GPUS}, not {value}")
        return list(range(value)), None
    if isinstance(value, list):
        return _id_list(value, "GPU"), None
    if isinstance(value, str) and "," in value:
        raise ValueError(
            f"YAML reads {value} as the string '{value}', not a list; "
            f"write a list: gpus: [{value.replace(',', ', ')}]"
        )
    raise ValueError(
        f"must be 'auto', a count or a list of ids or UUIDs like [0, 2, 3], not {_yaml(value)}"
    )


def _named_gpus(value: list, discovery: Discovery) -> list[int]:
    """Ids for a `gpus:` list of indices and UUIDs, each checked against what was found."""
    by_uuid = {gpu.uuid: gpu.id for gpu in discovery.gpus}
    found = {gpu.id for gpu in discovery.gpus}
    ids: list[int] = []
    for item in value:
        if isinstance(item, str) and item in by_uuid:
            gpu_id = by_uuid[item]
        elif _is_int(item) and item in found:
            gpu_id = item
        else:
            have = ", ".join(gpu.uuid for gpu in discovery.gpus) or f"none ({discovery.problem})"
            raise ValueError(f"this host has no GPU {_yaml(item)}; its GPUs are {have}")
        if gpu_id in ids:
            raise ValueError(f"GPU {_yaml(item)} is listed twice (as its index and its UUID?)")
        ids.append(gpu_id)
    return sorted(ids)


def _cpu_ids(value: object, fake_root: str | None) -> list[int]:
    """CPU ids for `cpus:`; with a sysfs root set, `auto` and the check use that tree's CPUs."""
    if fake_root is not None:
        from gpurun.topology import online_cpus as tree_cpus

        host = tree_cpus(fake_root)
    else:
        host = online_cpus()
    if value == "auto":
        return host if fake_root is not None else sorted(os.sched_getaffinity(0))
    if _is_int(value):
        if value < 0:
            raise ValueError(f"a CPU count must be >= 0, not {value}")
        if value > MAX_CPUS:
            raise ValueError(f"a CPU count must be at most {MAX_CPUS}, not {value}")
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


CACHE_FORMAT = 2
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
        raise ConfigError(
            path,
            f"cannot read the config file: {reason}; check the path given by --config or "
            "$GPURUN_CONFIG",
        ) from None

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
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):
        return ""
    # FNV-1a: binascii or zlib for crc32 would be one more extension module to load.
    key = 0x811C9DC5
    for byte in os.fsencode(os.path.abspath(path)):
        key = ((key ^ byte) * 0x01000193) & 0xFFFFFFFF
    return os.path.join(base, "gpurun", f"config-{CACHE_FORMAT}-{key:08x}.json")


def _cached_parse(cache: str, text: str) -> tuple[dict[str, object], dict[str, int]] | None:
    """The cached parse of `text`, or None when the cache holds another text or is not ours."""
    import stat

    from gpurun import codec

    try:
        # O_NONBLOCK: a FIFO planted under the cache's name must not hang every command.
        fd = os.open(cache, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                return None
            if info.st_uid != os.geteuid() or info.st_mode & 0o022:
                return None
            entry = codec.loads(f.read())
        if entry["text"] != text or not isinstance(entry["data"], dict):
            return None
        if not isinstance(entry["lines"], dict):
            return None
        return entry["data"], entry["lines"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def _store_parse(cache: str, text: str, data: dict[str, object], lines: dict[str, int]) -> None:
    """Cache the parse if it is plain JSON data; a cache that cannot be written is skipped."""
    from gpurun import codec

    if not _plain(data, [CACHE_MAX_NODES], 0):
        return
    folder = os.path.dirname(cache)
    tmp = f"{cache}.{os.getpid()}.tmp"
    try:
        base = folder
        while not os.path.isdir(base) and os.path.dirname(base) != base:
            base = os.path.dirname(base)
        if os.stat(base).st_uid != os.geteuid():
            # Another user's home (root with sudo -E): folders made there would be taken
            # from their owner.
            return
        os.makedirs(folder, mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(codec.dumps({"text": text, "data": data, "lines": lines}))
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

    # Everything PyYAML does with the text is inside the try: its reader checks the
    # characters when the loader is made, and constructors of values such as a timestamp
    # ("2001-13-45") raise ValueError rather than a YAMLError.
    loader = None
    try:
        loader = Loader(text)
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        problem = exc.problem or exc.context or "not valid YAML"
        raise ConfigError(path, f"not valid YAML: {problem}", line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, f"not valid YAML: {exc}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ConfigError(path, f"not valid YAML: a value cannot be read ({exc})") from None
    finally:
        if loader is not None:
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

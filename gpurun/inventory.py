"""The `servers:` inventory: several hosts in one config, and which of them is this one.

One config file serves every host of a lab. Each entry describes a server; the entry whose
name or address is this host's is the local one, whose GPUs and CPUs gpurun hands out. The
others are bookkeeping for `status` and `alloc`: their CPU ids are not checked against this
host, and their `gpus: auto` means "what that host last wrote in its ledger".
"""

from __future__ import annotations

import itertools
import os

from gpurun.cpulist import MAX_CPUS, parse_cpulist
from gpurun.record import record

# Only for annotations (see config.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from gpurun.config import Config
    from gpurun.ledger import State

SERVER_KEYS = ("name", "address", "gpus", "cpus", "labels", "limits")
GROUP_KEYS = ("count", "start", *SERVER_KEYS)
LIMIT_KEYS = ("min_gpus", "max_gpus", "max_cpus")

_ServerBase = record("_ServerBase", "name address gpus cpus labels limits")
_LimitsBase = record("_LimitsBase", "min_gpus max_gpus max_cpus")


class Server(_ServerBase):
    """One server: name, address (str or None), gpus and cpus (tuples of ids, or None for
    `auto` on another host), labels (tuple of str), limits (Limits)."""

    __slots__ = ()


class Limits(_LimitsBase):
    """Per-job limits: min_gpus, max_gpus, max_cpus (ints, or None for no limit)."""

    __slots__ = ()


NO_LIMITS = Limits(None, None, None)


class InventoryError(ValueError):
    """A problem in `servers:` or `limits:`; `key` is the dotted path of the bad value."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key


def parse_limits(value: object, key: str, base: Limits = NO_LIMITS) -> Limits:
    """Check a `limits:` mapping; keys it leaves out keep `base`'s values."""
    if value is None:
        return base
    if not isinstance(value, dict):
        raise InventoryError(key, "must be a mapping such as {max_gpus: 4}")
    found = dict(base._asdict())
    for name, limit in value.items():
        if name not in LIMIT_KEYS:
            raise InventoryError(
                f"{key}.{name}", f"unknown limit; the limits are {', '.join(LIMIT_KEYS)}"
            )
        if not _is_int(limit) or limit < 0:
            raise InventoryError(f"{key}.{name}", "must be a whole number >= 0")
        found[name] = limit
    limits = Limits(**found)
    if limits.max_gpus is not None and (limits.min_gpus or 0) > limits.max_gpus:
        raise InventoryError(key, f"min_gpus {limits.min_gpus} is above max_gpus {limits.max_gpus}")
    return limits


def parse_servers(
    value: object,
    default_gpus: object,
    default_cpus: object,
    limits: Limits,
    label_limits: dict[str, Limits],
    gpu_ids: object,
    cpu_ids: object,
) -> list[Server]:
    """Check `servers:` (a list of entries and groups, or one group) and expand the groups.

    `gpu_ids(value, local)` and `cpu_ids(value, local)` turn a `gpus:`/`cpus:` value into ids
    (None for `auto` on another host); `local` is decided later, so both are called with
    local=False here and the local entry is resolved again by the caller.
    """
    if isinstance(value, dict):
        entries = [("servers", value)]
    elif isinstance(value, list):
        entries = [(f"servers[{i}]", item) for i, item in enumerate(value)]
    else:
        raise InventoryError("servers", "must be a list of servers or a mapping with 'count'")

    servers: list[Server] = []
    seen: dict[str, str] = {}
    for key, entry in entries:
        if not isinstance(entry, dict):
            raise InventoryError(key, "each server must be a mapping with at least a 'name'")
        for name, spec in _expand(key, entry):
            server = _parse_server(
                name, spec, default_gpus, default_cpus, limits, label_limits, gpu_ids, cpu_ids
            )
            if server.name in seen:
                raise InventoryError(
                    name, f"server name '{server.name}' is used twice (also {seen[server.name]})"
                )
            seen[server.name] = name
            servers.append(server)
    return servers


def _expand(key: str, entry: dict) -> list[tuple[str, dict]]:
    """One entry, or a group with `count` expanded into entries named from a template."""
    allowed = GROUP_KEYS if "count" in entry else SERVER_KEYS
    for name in entry:
        if name not in allowed:
            raise InventoryError(f"{key}.{name}", f"unknown key; a server has {', '.join(allowed)}")
    if "name" not in entry or entry["name"] is None:
        raise InventoryError(key, "a server needs a 'name'")
    if "count" not in entry:
        return [(key, entry)]

    count = entry["count"]
    start = entry.get("start", 0)
    if not _is_int(count) or not 0 < count <= 10000:
        raise InventoryError(f"{key}.count", "must be a whole number from 1 to 10000")
    if not _is_int(start) or start < 0:
        raise InventoryError(f"{key}.start", "must be a whole number >= 0")
    template = entry["name"]
    if not isinstance(template, str) or "{" not in template:
        raise InventoryError(
            f"{key}.name", "a group needs a name template with {i}, such as 'gpu-{i:02d}'"
        )
    import re

    for field in ("name", "address"):
        # A width like {i:99999999999d} would build a string of that many characters.
        if isinstance(entry.get(field), str) and re.search(r"\{[^}]*\d{3,}", entry[field]):
            raise InventoryError(
                f"{key}.{field}", f"'{entry[field]}' pads {{i}} too wide; use a width like 02"
            )
    expanded = []
    for i in range(start, start + count):
        spec = {k: v for k, v in entry.items() if k not in ("count", "start")}
        for field in ("name", "address"):
            if isinstance(spec.get(field), str):
                try:
                    spec[field] = spec[field].format(i=i)
                except (ValueError, KeyError, IndexError, AttributeError) as exc:
                    raise InventoryError(
                        f"{key}.{field}",
                        f"'{entry[field]}' is not a template with {{i}} such as 'node{{i:02d}}' "
                        f"({exc})",
                    ) from None
        expanded.append((f"{key} (i={i})", spec))
    return expanded


def _parse_server(
    key: str,
    spec: dict,
    default_gpus: object,
    default_cpus: object,
    limits: Limits,
    label_limits: dict[str, Limits],
    gpu_ids: object,
    cpu_ids: object,
) -> Server:
    name = spec["name"]
    if not isinstance(name, str) or not is_name(name):
        raise InventoryError(
            f"{key}.name",
            f"{name!r} is not a server name; use letters, digits, '.', '_' and '-'",
        )
    address = spec.get("address")
    if address is not None and (not isinstance(address, str) or not address.strip()):
        raise InventoryError(f"{key}.address", "must be a hostname or an IP address")
    labels = spec.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        raise InventoryError(f"{key}.labels", "must be a list of words, such as [prod]")
    try:
        gpus = gpu_ids(spec.get("gpus", default_gpus), False)
    except ValueError as exc:
        raise InventoryError(f"{key}.gpus", str(exc)) from None
    try:
        cpus = cpu_ids(spec.get("cpus", default_cpus), False)
    except ValueError as exc:
        raise InventoryError(f"{key}.cpus", str(exc)) from None

    for label in labels:
        if label in label_limits:
            limits = label_limits[label]
            break
    limits = parse_limits(spec.get("limits"), f"{key}.limits", limits)
    return Server(
        name=name,
        address=address.strip() if address else None,
        gpus=None if gpus is None else tuple(gpus),
        cpus=None if cpus is None else tuple(cpus),
        labels=tuple(labels),
        limits=limits,
    )


def find_local(servers: list[Server]) -> tuple[Server | None, str]:
    """The entry that names this host, and how it was recognised ("" when none does).

    Matched by hostname (full or short) against names and addresses, then by this host's IP
    addresses against addresses that look like IPs. No DNS lookups: they can hang for seconds
    on a lab network, and every launch reads the config.
    """
    node = os.uname().nodename
    hostnames = {node, node.split(".")[0]}
    for server in servers:
        if server.name in hostnames:
            return server, f"name '{server.name}' is this host's name"
        if server.address in hostnames:
            return server, f"address '{server.address}' is this host's name"
    if not any(server.address and _looks_like_ip(server.address) for server in servers):
        return None, ""
    addresses = local_addresses()
    for server in servers:
        if server.address and _normal_ip(server.address) in addresses:
            return server, f"address {server.address} is one of this host's"
    return None, ""


def local_addresses() -> set[str]:
    """This host's IPv4 and IPv6 addresses, read from /proc without any network call."""
    found: set[str] = set()
    try:
        with open("/proc/net/fib_trie") as f:
            lines = f.read().splitlines()
        for before, line in itertools.pairwise(lines):
            if "/32 host LOCAL" in line:
                found.add(before.split()[-1])
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                raw = line.split()[0]
                found.add(_normal_ip(":".join(raw[i : i + 4] for i in range(0, 32, 4))))
    except (OSError, IndexError):
        pass
    return found


def _looks_like_ip(text: str) -> bool:
    return ":" in text or all(part.isdigit() for part in text.split("."))


def _normal_ip(text: str) -> str:
    """An IP address in one spelling, so ::1 and 0:0:...:1 compare equal."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        return text


def is_name(text: str) -> bool:
    return (
        0 < len(text) <= 64
        and text[0] != "."
        and all(c.isascii() and (c.isalnum() or c in "._-") for c in text)
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def bookkeeping_cpus(value: object) -> list[int] | None:
    """CPU ids of a server that may not be this host: counts, lists and cpulists, unchecked."""
    if value == "auto":
        return None
    if _is_int(value):
        if value < 0:
            raise ValueError(f"a CPU count must be >= 0, not {value}")
        if value > MAX_CPUS:
            raise ValueError(f"a CPU count must be at most {MAX_CPUS}, not {value}")
        return list(range(value))
    if isinstance(value, list):
        if not all(_is_int(x) and 0 <= x < MAX_CPUS for x in value) or len(set(value)) != len(
            value
        ):
            raise ValueError(f"CPU ids must be distinct whole numbers from 0 to {MAX_CPUS - 1}")
        return sorted(value)
    if isinstance(value, str) and ":" not in value:
        return parse_cpulist(value)
    raise ValueError(f"must be 'auto', a count, a list or a cpulist like \"0-7\", not {value!r}")


def server_inventory(
    config: Config, server: str, state: State
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """A server's GPU and CPU ids: this host's from its config, another's from the inventory,
    or for `auto`, what its host last wrote in its ledger; None when unknown."""
    if server == config.server:
        return config.gpus, config.cpus
    entry = next((s for s in config.servers if s.name == server), None)
    recorded = state.inventory or {}
    gpus = entry.gpus if entry is not None and entry.gpus is not None else recorded.get("gpus")
    cpus = entry.cpus if entry is not None and entry.cpus is not None else recorded.get("cpus")
    if gpus is None or cpus is None:
        return None
    return tuple(gpus), tuple(cpus)


def server_names(config: Config) -> list[str]:
    """Every server of the inventory, this host's first."""
    names = [config.server]
    names.extend(s.name for s in config.servers if s.name != config.server)
    return names

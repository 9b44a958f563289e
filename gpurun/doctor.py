"""`gpurun doctor`: check the config, the state dir and the servers' ledgers, and say what is wrong.

Each check states a fact the other commands rely on without checking it every time: that every
user can write the state dir, that the ledgers parse, that the lock really is shared when the
state dir is on NFS. `diagnose` returns the facts and the problems as JSON-ready data and
`doctor_text` renders them; the CLI exits 1 when there are problems.
"""

from __future__ import annotations

import os
import re
import stat
import time

from gpurun.cpulist import format_cpulist
from gpurun.errors import LedgerError
from gpurun.ledger import Ledger
from gpurun.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from gpurun.config import Config
    from gpurun.inventory import Server

MOUNTINFO = "/proc/self/mountinfo"

# Mount options with which flock(2) on NFS stays local to the host: two hosts could then both
# hold a ledger's lock and hand out the same GPUs (nfs(5), "local_lock" and "lock / nolock").
LOCAL_LOCK_OPTIONS = ("nolock", "local_lock=all", "local_lock=flock")

_MountBase = record("_MountBase", "mount_point fstype source options")


class Mount(_MountBase):
    """One line of mountinfo: mount_point and source (unescaped str), fstype (str, such as
    "nfs4" or "ext4"), options (tuple of str: the per-mount options, then the filesystem's)."""

    __slots__ = ()


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts in the text of /proc/PID/mountinfo, in its order; malformed lines skipped.

    The format is in proc(5): fields 5 and 6 are the mount point and its options, then come
    optional fields up to a lone "-", then the filesystem type, the source and the
    filesystem's own options (where NFS shows `nolock` and `local_lock=`).
    """
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        if len(fields) < dash + 3:
            continue
        options = fields[5].split(",") + (
            fields[dash + 3].split(",") if len(fields) > dash + 3 else []
        )
        mounts.append(
            Mount(
                mount_point=_unescape(fields[4]),
                fstype=fields[dash + 1],
                source=_unescape(fields[dash + 2]),
                options=tuple(options),
            )
        )
    return mounts


def _unescape(field: str) -> str:
    """Undo the kernel's octal escapes of space, tab, newline and backslash (\\040 and so on)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount that holds `path`, or would hold it once created: the longest mount point
    containing its nearest existing folder. Of mounts stacked on one point the last wins, as
    the kernel shows the topmost last."""
    where = _nearest_existing(path)
    best: Mount | None = None
    for mount in mounts:
        point = mount.mount_point.rstrip("/") or "/"
        inside = point == "/" or where == point or where.startswith(point + "/")
        if inside and (best is None or len(point) >= len(best.mount_point.rstrip("/") or "/")):
            best = mount
    return best


def nfs_lock_problem(mount: Mount | None) -> str:
    """Why flock(2) would not be shared between hosts on this NFS mount ("" when it is, or when
    the mount is not NFS).

    Since Linux 2.6.12 the NFS client emulates flock(2) with byte-range locks sent to the
    server's lock manager, so hosts exclude each other; with `nolock`, `local_lock=all` or
    `local_lock=flock` the lock is taken on this host only.
    """
    if mount is None or not mount.fstype.startswith("nfs"):
        return ""
    found = [option for option in LOCAL_LOCK_OPTIONS if option in mount.options]
    if not found:
        return ""
    return (
        f"the state dir is on NFS ({mount.source} on {mount.mount_point}) mounted with "
        f"{' and '.join(found)}, so the ledger lock (flock) is local to each host and two "
        "hosts may hand out the same GPUs; remount it on every host with locking on "
        "(local_lock=none, without nolock)"
    )


def diagnose(
    config: Config, mountinfo: str | None = None, now: float | None = None
) -> dict[str, object]:
    """Check this host's view of gpurun; return a JSON-ready report with `problems` (things to
    fix, one line each) and `notes` (facts worth knowing that need no fix).

    `mountinfo` is the text of /proc/self/mountinfo (read when None); `now` the Unix time the
    heartbeat ages count to. Writability is what os.access says for this user, so for root
    it is always true: run doctor as an ordinary user to check what users meet.
    """
    now = time.time() if now is None else now
    if mountinfo is None:
        try:
            with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
                mountinfo = f.read()
        except OSError:
            mountinfo = ""
    problems: list[str] = []
    notes: list[str] = []

    state_dir = _state_dir_report(config.state_dir, parse_mountinfo(mountinfo), problems, notes)
    servers = [_server_report(config, server, now, problems) for server in config.servers]
    if not config.servers:
        _ledger_state(config, config.server, now, problems)
    _check_orphaned(config, problems)
    if config.sysfs_root == "/sys":
        _check_cpus(config, problems)
    else:
        notes.append(
            f"CPUs and NUMA nodes are read from the sysfs tree {config.sysfs_root}, not this "
            "host's /sys; jobs are pinned only to the CPUs this host has"
        )
    gpus = gpu_report(config, problems, notes)

    return {
        "config": os.path.abspath(config.path) if config.path else None,
        "server": config.server,
        "chosen_by": config.chosen_by,
        "gpus": list(config.gpus),
        "cpus": format_cpulist(config.cpus),
        "limits": config.limits._asdict(),
        "discovery": gpus["discovery"],
        "devices": gpus["devices"],
        "topology": gpus["topology"],
        "state_dir": state_dir,
        "servers": servers,
        "problems": problems,
        "notes": notes,
    }


def _nearest_existing(path: str) -> str:
    """The real path of `path`, or of its nearest existing parent folder."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return os.path.realpath(path)


def _state_dir_report(
    path: str, mounts: list[Mount], problems: list[str], notes: list[str]
) -> dict[str, object]:
    mount = mount_of(path, mounts)
    fstype = mount.fstype if mount else None
    nfs = bool(fstype and fstype.startswith("nfs"))
    report: dict[str, object] = {
        "path": path,
        "exists": os.path.exists(path),
        "mode": None,
        "owner": None,
        "shared": None,
        "writable": None,
        "filesystem": fstype,
        "nfs": nfs,
        "mount_point": mount.mount_point if mount else None,
        "mount_options": list(mount.options) if mount else [],
    }

    private = os.path.basename(path).startswith("gpurun-slurm-")
    if os.path.islink(path):
        problems.append(
            f"the state dir {path} is a symbolic link (to {os.path.realpath(path)}); gpurun "
            "refuses to follow one; set state_dir to the real folder"
        )
    elif private:
        notes.append(
            f"the state dir {path} is private to this Slurm job (mode 0700, this user only), "
            "so allocations never see each other"
        )
    if os.path.isdir(path):
        info = os.stat(path)
        mode = stat.S_IMODE(info.st_mode)
        report["mode"] = f"{mode:04o}"
        report["owner"] = _user_of(info.st_uid)
        report["shared"] = _is_shared(mode)
        report["writable"] = os.access(path, os.W_OK | os.X_OK)
        for folder in (path, os.path.join(path, "jobs"), os.path.join(path, "logs")):
            if not private:
                _check_shared(folder, problems)
        if not report["writable"]:
            problems.append(
                f"this user cannot write the state dir {path}; gpurun cannot change the "
                "ledger; its owner or root can run 'chmod 0777' on it"
            )
    elif os.path.exists(path):
        problems.append(f"the state dir {path} is not a folder; set state_dir to a folder path")
    else:
        parent = _nearest_existing(path)
        if not os.access(parent, os.W_OK | os.X_OK):
            problems.append(
                f"the state dir {path} does not exist and this user cannot create it in "
                f"{parent}; set state_dir or $GPURUN_STATE_DIR to a folder every user can write"
            )
        else:
            notes.append(
                f"the state dir {path} does not exist yet; the first gpurun command creates it "
                "with mode 0777"
            )

    lock_problem = nfs_lock_problem(mount)
    if lock_problem:
        problems.append(lock_problem)
    if nfs:
        notes.append(
            "the state dir is on NFS: the ledger lock (flock) is shared between hosts only "
            "because Linux since 2.6.12 sends it to the NFS lock manager as a byte-range lock, "
            "so every host must mount it with locking on (not nolock, local_lock=all or "
            "local_lock=flock); renames are atomic on the NFS server, so no one reads a torn "
            "ledger; inotify does not see other hosts' writes, which is fine because each "
            "host queues only on its own ledger"
        )
    return report


def _is_shared(mode: int) -> bool:
    """Every user may create and rename files in it: rwx for all and no sticky bit (a sticky
    folder lets only a file's owner rename over it, and the ledger is replaced by rename)."""
    return mode & 0o777 == 0o777 and not mode & stat.S_ISVTX


def _user_of(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _check_shared(folder: str, problems: list[str]) -> None:
    try:
        mode = stat.S_IMODE(os.stat(folder).st_mode)
    except OSError:
        return
    if mode & stat.S_ISVTX:
        problems.append(
            f"{folder} has the sticky bit (mode {mode:04o}): only a file's owner may replace "
            f"it there, so other users' gpurun cannot update the ledger; its owner or root "
            f"can run 'chmod 0777 {folder}'"
        )
    elif mode & 0o777 != 0o777:
        problems.append(
            f"{folder} is mode {mode:04o}, so other users cannot create or replace files in "
            f"it; its owner or root can run 'chmod 0777 {folder}'"
        )


def _ledger_state(
    config: Config, name: str, now: float, problems: list[str]
) -> tuple[str, float | None, dict[str, list[int]] | None]:
    """A server's ledger as "none", "ok" or the error reading it; its heartbeat's age in
    seconds (None if never written by its host); the inventory its host recorded."""
    ledger = Ledger(config.state_dir, name, config.lock_timeout, named=True, owner=False)
    if not os.path.lexists(ledger.path):
        return "none", None, None
    try:
        state = ledger.read()
    except LedgerError as exc:
        fix = f"'gpurun reset --server {name}'" if name != config.server else "'gpurun reset'"
        message = str(exc).replace("'gpurun reset'", fix)
        problems.append(f"server {name}: {message}")
        return message, None, None
    age = round(now - state.heartbeat, 1) if state.heartbeat else None
    return "ok", age, state.inventory


def _server_report(
    config: Config, server: Server, now: float, problems: list[str]
) -> dict[str, object]:
    local = server.name == config.server
    ledger, age, inventory = _ledger_state(config, server.name, now, problems)
    recorded = inventory or {}
    if local:
        gpus: list[int] | tuple[int, ...] | None = config.gpus
        cpus: list[int] | tuple[int, ...] | None = config.cpus
    else:
        gpus = server.gpus if server.gpus is not None else recorded.get("gpus")
        cpus = server.cpus if server.cpus is not None else recorded.get("cpus")
    if not local and server.gpus is None and inventory is None and ledger in ("none", "ok"):
        problems.append(
            f"server {server.name} has 'gpus: auto' and its ledger records no inventory yet, "
            "so this host cannot know its GPUs; run a job on it once, or list its GPUs in "
            "the config"
        )
    return {
        "name": server.name,
        "address": server.address,
        "labels": list(server.labels),
        "local": local,
        "gpus": None if gpus is None else len(gpus),
        "cpus": None if cpus is None else len(cpus),
        "ledger": ledger,
        "heartbeat_age": age,
    }


def gpu_report(config: Config, problems: list[str], notes: list[str]) -> dict[str, object]:
    """How gpurun found the GPUs, each GPU with its node and outside use, and the topology
    placement follows; adds what a user should know to `notes`."""
    from gpurun.external import external_use, process_owner

    discovery = config.discovery
    if discovery is None:
        source = {"source": "config", "problem": ""}
    else:
        source = {"source": discovery.source, "problem": discovery.problem}
        if (discovery.source != "none" and config.nvidia_smi) or discovery.source == "nvidia-smi":
            source["command"] = " ".join(_smi(config))
    # Inside a job, its GPUs are its own: nothing on them is outside use (external.py).
    outside = {} if config.parent_job is not None else external_use(config, discovery)
    owners = {}
    if discovery is not None:
        for process in discovery.processes:
            owners.setdefault(process.gpu, process_owner(process.pid))
    topology = config.topology
    devices = []
    for gpu_id in config.gpus:
        gpu = config.devices.get(gpu_id)
        devices.append(
            {
                "id": gpu_id,
                "uuid": gpu.uuid if gpu else None,
                "bus_id": gpu.bus_id if gpu else None,
                "name": gpu.name if gpu else None,
                "memory_mb": gpu.memory_mb if gpu else None,
                "mig_of": gpu.parent if gpu else None,
                "numa_node": topology.gpu_node.get(gpu_id) if topology else None,
                "allowed": config.gpu_mask is None or gpu_id in config.gpu_mask,
                "external": outside.get(gpu_id),
                "external_user": owners.get(gpu_id),
            }
        )
    nodes: dict[int, list[int]] = {}
    threads = 1
    if topology is not None:
        for cpu, node in topology.cpu_node.items():
            if cpu in config.cpus:
                nodes.setdefault(node, []).append(cpu)
        threads = max((len(core) for core in topology.cpu_core.values()), default=1)
    topo = {
        "read": topology is not None,
        "nodes": {str(n): format_cpulist(cpus) for n, cpus in sorted(nodes.items())},
        "threads_per_core": threads,
        "links": bool(topology and topology.gpu_links),
    }

    if not config.gpus:
        why = f" ({discovery.problem})" if discovery is not None and discovery.problem else ""
        found = "the config lists none" if discovery is None else "discovery found none" + why
        notes.append(f"this host has no GPUs: {found}; only jobs with -g 0 can run here")
    if outside:
        mode = config.external
        listed = "; ".join(f"GPU {g}: {why}" for g, why in sorted(outside.items()))
        notes.append(
            f"busy outside gpurun: {listed}; "
            + (
                "they are not handed out (external: avoid)"
                if mode == "avoid"
                else "handed out anyway (external: ignore)"
            )
        )
    if discovery is not None and discovery.apps_problem:
        problems.append(
            f"{discovery.apps_problem}: whether the GPUs are busy outside gpurun is unknown, "
            + (
                "so none is handed out until the query works again (set external: ignore to "
                "hand them out anyway)"
                if config.external == "avoid"
                else "and external: ignore hands them out anyway"
            )
        )
    if config.gpu_mask is not None:
        notes.append(
            "$CUDA_VISIBLE_DEVICES is set: jobs get only GPUs "
            f"{','.join(map(str, config.gpu_mask)) or 'none'}, exported by {config.mask_form}"
        )
    if config.mask_note:
        problems.append(config.mask_note)
    if config.parent_job is not None:
        notes.append(
            f"inside gpurun job {config.parent_job}: its GPUs and CPUs are this gpurun's whole "
            "server, in a ledger private to the job"
        )
    return {"discovery": source, "devices": devices, "topology": topo}


def _smi(config: Config) -> list[str]:
    from gpurun.gpus import smi_command

    return smi_command(config.nvidia_smi) or ["nvidia-smi"]


def _check_cpus(config: Config, problems: list[str]) -> None:
    """CPUs the config gives this host that this process may not use (the config of a listed
    server is not checked against the host, and a cpuset may have narrowed it since)."""
    usable = os.sched_getaffinity(0)
    missing = sorted(set(config.cpus) - usable)
    if missing:
        problems.append(
            f"the config gives this host CPUs {format_cpulist(missing)}, which it does not "
            f"have (it may use {format_cpulist(sorted(usable))}); jobs are pinned only to the "
            "ones it has"
        )


def _check_orphaned(config: Config, problems: list[str]) -> None:
    """Leases on GPUs or CPUs the config no longer lists, as `status` shows them."""
    from gpurun.jobs import server_status

    try:
        servers = server_status(config)["servers"]
    except LedgerError:
        return
    for server in servers:
        for lease in server["leases"]:
            if lease["orphaned"]:
                problems.append(
                    f"server {server['name']}: lease {lease['id']} ({lease['name']}) holds "
                    "GPUs or CPUs the config no longer lists; they are never handed out "
                    "again, and go when it ends ('gpurun release' for a reservation)"
                )


def _found_by(report: dict[str, object]) -> str:
    found = report["discovery"]
    if found["source"] == "config":
        return ""
    if found["source"] == "none":
        return f" (gpus: auto found none: {found['problem']})"
    how = f" (asked {found['source']}"
    if found.get("command"):
        how += f": {found['command']}"
    return how + ")"


def _topology_line(topology: dict[str, object]) -> str:
    if not topology["read"]:
        return "none read; placement takes the lowest free ids"
    nodes = "; ".join(f"node {n}: CPUs {cpus}" for n, cpus in topology["nodes"].items())
    threads = topology["threads_per_core"]
    return f"{len(topology['nodes'])} NUMA node(s) ({nodes}), {threads} thread(s) per core" + (
        ", GPU links known" if topology["links"] else ""
    )


def _gpu_use(gpu: dict[str, object]) -> str:
    if not gpu["allowed"]:
        return "outside $CUDA_VISIBLE_DEVICES"
    if gpu["external"]:
        user = f" ({gpu['external_user']})" if gpu["external_user"] else ""
        return f"external: {gpu['external']}{user}"
    if gpu["mig_of"] is not None:
        return f"MIG slice of GPU {gpu['mig_of']}"
    return "ok"


def doctor_text(report: dict[str, object]) -> str:
    """The report as people read it: facts, the servers, then problems and notes."""
    from gpurun.render import duration, table

    state = report["state_dir"]
    if state["exists"]:
        facts = [
            f"mode {state['mode']}",
            f"owner {state['owner']}",
            "shared" if state["shared"] else "not shared",
            "writable" if state["writable"] else "not writable",
        ]
    else:
        facts = ["does not exist yet"]
    facts.append(state["filesystem"] or "unknown filesystem")
    limits = ", ".join(f"{k} {v}" for k, v in report["limits"].items() if v is not None)
    lines = [
        f"config: {report['config'] or 'none (built-in defaults)'}",
        f"server: {report['server']} ({report['chosen_by']})",
        f"GPUs: {','.join(map(str, report['gpus'])) or 'none'}{_found_by(report)}",
        f"CPUs: {report['cpus'] or 'none'}",
        f"topology: {_topology_line(report['topology'])}",
        f"limits: {limits or 'none'}",
        f"state dir: {state['path']} ({', '.join(facts)})",
    ]

    if report["devices"] and report["discovery"]["source"] != "config":
        rows = [
            [
                str(gpu["id"]),
                gpu["uuid"] or "-",
                gpu["bus_id"] or "-",
                "-" if gpu["numa_node"] is None else str(gpu["numa_node"]),
                f"{gpu['memory_mb']} MiB" if (gpu["memory_mb"] or -1) >= 0 else "-",
                gpu["name"] or "-",
                _gpu_use(gpu),
            ]
            for gpu in report["devices"]
        ]
        headers = ["GPU", "UUID", "BUS", "NODE", "MEMORY", "NAME", "USE"]
        lines += ["", table(headers, rows)]

    if report["servers"]:
        rows = [
            [
                server["name"],
                server["address"] or "-",
                "?" if server["gpus"] is None else str(server["gpus"]),
                "?" if server["cpus"] is None else str(server["cpus"]),
                server["ledger"] if server["ledger"] in ("none", "ok") else "unreadable",
                "-" if server["heartbeat_age"] is None else duration(server["heartbeat_age"]),
                ",".join(server["labels"]) or "-",
            ]
            for server in report["servers"]
        ]
        headers = ["SERVER", "ADDRESS", "GPUS", "CPUS", "LEDGER", "HEARTBEAT", "LABELS"]
        lines += ["", table(headers, rows)]

    lines.append("")
    if report["problems"]:
        lines.append("problems:")
        lines += [f"  - {problem}" for problem in report["problems"]]
    else:
        lines.append("no problems found")
    if report["notes"]:
        lines.append("notes:")
        lines += [f"  - {note}" for note in report["notes"]]
    return "\n".join(lines)

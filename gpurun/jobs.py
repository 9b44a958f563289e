"""The commands that look at and change leases: ps, gc, status, kill, reset.

Each returns plain data (lists and dicts ready for JSON); `render` turns it into text.
"""

from __future__ import annotations

import os
import time

from gpurun import liveness
from gpurun.config import Config
from gpurun.cpulist import format_cpulist
from gpurun.errors import GpurunError, LedgerError, NotFoundError, RefusedError, UsageError
from gpurun.inventory import server_inventory, server_names
from gpurun.ledger import (
    Holder,
    Lease,
    Ledger,
    State,
    Watcher,
    _int,
    _ints,
    _num,
    _signed,
    _str,
    _strs,
    open_ledger,
    open_shared,
)
from gpurun.log import get_logger

# Only for annotations (see config.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

log = get_logger(__name__)


# The "+HH:MM" of each UTC offset iso_time has met, since `ps` writes one time per lease.
_zones: dict[int, str] = {}


def iso_time(when: float | None) -> str | None:
    """Local time in ISO 8601 with its UTC offset, to the second, as datetime's isoformat
    writes it; built from time.localtime, which costs `ps` on 1,000 leases a tenth of what
    importing and calling datetime does."""
    if when is None:
        return None
    # datetime rounds to the microsecond first, then drops the fraction; rounding can only
    # change the second of a time less than a microsecond before the next one.
    t = time.localtime(when if when % 1.0 < 0.999999 else round(when, 6))
    zone = _zones.get(t.tm_gmtoff)
    if zone is None:
        offset = t.tm_gmtoff
        sign = "-" if offset < 0 else "+"
        minutes, seconds = divmod(abs(offset), 60)
        zone = f"{sign}{minutes // 60:02d}:{minutes % 60:02d}" + (
            f":{seconds:02d}" if seconds else ""
        )
        _zones[offset] = zone
    # %-formatting takes half the time of an f-string with six format specs here.
    return "%04d-%02d-%02dT%02d:%02d:%02d" % t[:6] + zone  # noqa: UP031


def shown_state(lease: Lease, alive: bool) -> str:
    """What `ps` calls a lease's state: its own while live, else dead (a reservation: expired)."""
    return lease.state if alive else ("expired" if lease.kind == "reservation" else "dead")


def lease_view(lease: Lease, alive: bool, now: float) -> dict[str, object]:
    """A live or dead lease as `ps --json` shows it."""
    return {
        "id": lease.id,
        "name": lease.name,
        "user": lease.user,
        "host": lease.host,
        "pid": lease.shown_pid(),
        "gpus": list(lease.gpus),
        "cpus": list(lease.cpus),
        "state": shown_state(lease, alive),
        "kind": lease.kind,
        "started": iso_time(lease.started or lease.created),
        "elapsed": round(now - (lease.started or lease.created), 3),
        "command": list(lease.command),
        "request": {"gpus": lease.request.gpus, "cpus": lease.request.cpus},
        "priority": lease.priority,
        "time_limit": lease.time_limit,
        "after": list(lease.after),
        "log": lease.log,
    }


def history_view(record: dict[str, object]) -> dict[str, object]:
    """A finished job from history as `ps -a --json` shows it.

    Every user may write the history file, so a field the ledger's own checks refuse (a text
    id, a number of GPUs, NaN) is shown as missing rather than breaking `ps -a` for everyone."""
    get = record.get
    view: dict[str, object] = {"id": _or_none(_int, get("id"))}
    for key in ("name", "user", "host"):
        view[key] = _or_none(_str, get(key))
    view["pid"] = _or_none(_int, get("pid"))
    view["gpus"] = _or_none(_ints, get("gpus"))
    view["cpus"] = _or_none(_ints, get("cpus"))
    for key in ("state", "kind"):
        view[key] = _or_none(_str, get(key))
    view["command"] = _or_none(_strs, get("command"))
    for key in ("log", "reason"):
        view[key] = _or_none(_str, get(key))
    request = get("request") if type(get("request")) is dict else {}
    view["request"] = {
        "gpus": _or_none(_int, request.get("gpus")),
        "cpus": _or_none(_int, request.get("cpus")),
    }
    view["priority"] = _or_none(_signed, get("priority", 0))
    view["time_limit"] = _or_none(_num, get("time_limit"))
    view["after"] = _or_none(_ints, get("after")) or []
    started = _or_none(_num, get("started")) or _or_none(_num, get("created"))
    view["started"] = iso_time(started)
    view["ended"] = iso_time(_or_none(_num, get("ended")))
    # A duration alone may be below 0, when the clock was set back while the job ran.
    duration = get("duration")
    view["elapsed"] = (
        duration if type(duration) in (int, float) and -1e11 < duration < 1e11 else None
    )
    view["exit_code"] = _or_none(_signed, get("exit_code"))
    return view


def _or_none(check: Callable[[object], object], value: object) -> object:
    """`check(value)` (one of the ledger's field checks), or None where it refuses it."""
    try:
        return check(value)
    except TypeError:
        return None


def list_jobs(config: Config, include_finished: bool = False) -> list[dict[str, object]]:
    """Live jobs as lease_view shows them, oldest first; with include_finished, the finished
    ones before them."""
    ledger, leases, live, positions, now = _listing(config)
    rows = _finished_views(ledger) if include_finished else []
    for lease in leases:
        view = lease_view(lease, lease.id in live, now)
        if lease.id in positions:
            view["position"] = positions[lease.id]
        rows.append(view)
    return rows


def list_table(config: Config, include_finished: bool = False) -> list[list[str]]:
    """The rows of the `ps` table for what list_jobs lists, in its order. Each live one is
    made from its lease (render.lease_cells) rather than from its view: `ps` makes one per
    lease, and the view's dict was a third of what a row took."""
    from gpurun.render import job_cells, lease_cells

    ledger, leases, live, positions, now = _listing(config)
    rows = [job_cells(view) for view in _finished_views(ledger)] if include_finished else []
    get = positions.get
    for lease in leases:
        alive = lease.id in live
        elapsed = round(now - (lease.started or lease.created), 3)
        rows.append(lease_cells(lease, shown_state(lease, alive), elapsed, get(lease.id)))
    return rows


def _listing(config: Config) -> tuple[Ledger, list[Lease], set[int], dict[int, int], float]:
    """The ledger, its leases, the ids of the live ones, the queue position of each waiting
    one, and the time they were judged at."""
    ledger = open_ledger(config)
    state = ledger.read()
    now = time.time()
    positions = {}
    if any(lease.state == "waiting" for lease in state.leases):
        # Only a queue needs the admission rules (and their imports).
        from gpurun.admission import queue_order

        positions = {lease.id: i + 1 for i, lease in enumerate(queue_order(state.leases))}
    return ledger, state.leases, ledger.live_ids(state.leases, now), positions, now


def _finished_views(ledger: Ledger) -> list[dict[str, object]]:
    finished = [history_view(record) for record in ledger.read_history()]
    return sorted(finished, key=lambda view: view["id"] or 0)


def collect_garbage(config: Config, dry_run: bool = False) -> list[dict[str, object]]:
    """Drop every dead lease (only report them with dry_run); return what was dropped."""
    from gpurun.launch import forget_dead, reap_dead

    ledger = open_ledger(config)
    now = time.time()
    if dry_run:
        state = ledger.read()
        dead = [lease for lease in state.leases if not ledger.alive(lease, now)]
    else:
        ledger.ensure_dirs()
        with ledger.transaction() as state:
            dead = reap_dead(ledger, state, now)
            for path in ledger.remove_leftovers(state):
                log.info("removed %s, left by a gpurun killed while writing", path)
            # Written even when nothing died: the write stamps this host's heartbeat, which
            # other hosts read to tell a quiet server from a stale one.
            state.changed = True
        forget_dead(ledger, dead, now)
    return [lease_view(lease, False, now) for lease in dead]


def server_status(
    config: Config, server: str | None = None, full: bool = True
) -> dict[str, object]:
    """Every server of the inventory (or the one named): GPUs and CPUs, free and held, by
    which lease, and the server's state; with a total over them.

    Without `full`, a summary: each server's counts and GPUs, without its CPU groups and
    leases (`status` without --json or --detail prints no more, and on 1,000 leases the
    views of them were a tenth of what it took)."""
    names = server_names(config)
    if server is not None:
        if server not in names:
            raise NotFoundError(f"no server named '{server}'; the servers are {', '.join(names)}")
        names = [server]
    now = time.time()
    servers = [_server_view(config, name, now, full) for name in names]
    total = {
        key: sum(view[key] for view in servers)
        for key in ("gpus_total", "cpus_total", "cpus_free", "jobs", "waiting")
    }
    total["gpus_free"] = sum(len(view["gpus_free"]) for view in servers)
    return {"servers": servers, "total": total}


def _server_view(config: Config, name: str, now: float, full: bool) -> dict[str, object]:
    ledger = open_ledger(config, name)
    problems = []
    try:
        state = ledger.read()
    except LedgerError as exc:
        if name == config.server:
            raise
        state = None
        problems.append("unreadable")
        log.warning("%s", exc)
    # An unreadable ledger says nothing of what is free there: none of it is counted.
    inventory = None if state is None else server_inventory(config, name, state)
    if state is None:
        state = State([], 1, 0.0)
    elif inventory is None:
        problems.append("unknown size")
    if inventory is None:
        inventory = ((), ())
    inventory_gpus, inventory_cpus = inventory
    gpu_set, cpu_set = set(inventory_gpus), set(inventory_cpus)

    live = ledger.live_ids(state.leases, now)
    # A reservation shows as the holder of its ids; jobs run inside it are listed as leases.
    # A job whose reservation expired or was reset away holds its ids itself.
    listed = {lease.id for lease in state.leases}
    outer = [lease for lease in state.leases if lease.reservation not in listed]
    orphaned = {
        lease.id
        for lease in state.leases
        if not (gpu_set.issuperset(lease.gpus) and cpu_set.issuperset(lease.cpus))
    }
    views = {
        lease.id: dict(
            lease_view(lease, lease.id in live, now),
            orphaned=lease.id in orphaned,
            reservation=lease.reservation,
        )
        for lease in (state.leases if full else [lease for lease in outer if lease.gpus])
    }
    gpu_holder = {gpu: views[lease.id] for lease in outer for gpu in lease.gpus}
    cpu_held = {cpu for lease in outer for cpu in lease.cpus}

    gpus = [_gpu_row(gpu, gpu_holder.get(gpu)) for gpu in inventory_gpus]
    if name == config.server and config.discovery is not None:
        _mark_outside_use(config, state, gpus, now)
    gone = sorted(set(gpu_holder) - gpu_set)
    gpus.extend(dict(_gpu_row(gpu, gpu_holder[gpu]), state="orphaned") for gpu in gone)
    free_cpus = [c for c in inventory_cpus if c not in cpu_held]
    cpu_groups = []
    if full:
        cpu_groups = [
            _cpu_group(
                list(lease.cpus), views[lease.id], "orphaned" if lease.id in orphaned else None
            )
            for lease in outer
            if lease.cpus
        ]
        if free_cpus:
            cpu_groups.append(_cpu_group(free_cpus, None, "free"))

    heartbeat = state.heartbeat or None
    if name != config.server:
        if heartbeat is None:
            problems.append("unseen")
        elif heartbeat is not None and now - heartbeat > config.stale_after:
            problems.append("stale")
    if orphaned:
        problems.append("orphaned")
    entry = config.entry if name == config.server else None
    entry = entry or next((s for s in config.servers if s.name == name), None)
    return {
        "name": name,
        "address": (entry.address if entry else None)
        or (os.uname().nodename if name == config.server else None),
        "labels": list(entry.labels) if entry else [],
        "local": name == config.server,
        "gpus_total": len(inventory_gpus),
        "gpus_free": [g["id"] for g in gpus if g["state"] == "free"],
        "cpus_total": len(inventory_cpus),
        "cpus_free": len(free_cpus),
        "jobs": sum(
            1
            for lease in state.leases
            if lease.id in live and lease.state == "running" and lease.kind == "job"
        ),
        "reservations": sum(1 for lease in state.leases if lease.kind == "reservation"),
        "waiting": sum(
            1 for lease in state.leases if lease.id in live and lease.state == "waiting"
        ),
        "state": ", ".join(problems) or "ok",
        "heartbeat": iso_time(heartbeat),
        "heartbeat_age": None if heartbeat is None else round(now - heartbeat, 1),
        "gpus": gpus,
        **({"cpus": cpu_groups, "leases": list(views.values())} if full else {}),
    }


def _mark_outside_use(
    config: Config, state: State, rows: list[dict[str, object]], now: float
) -> None:
    """Mark this host's GPUs that processes use outside their leases: `external` (no live
    job's process; a GPU no lease holds then shows state external) and `violation` (a job's
    process, or a descendant's, on a GPU its lease does not hold)."""
    from gpurun.external import process_owner

    discovery = config.discovery
    by_gpu = {row["id"]: row for row in rows}
    owner_job: dict[int, Lease] = {}
    for lease in state.leases:
        if lease.state == "running" and lease.kind == "job":
            for pid in _job_processes(lease, "", checked=True):
                owner_job[pid] = lease
    for process in discovery.processes:
        row = by_gpu.get(process.gpu)
        if row is None:
            continue
        job = owner_job.get(process.pid)
        if job is None:
            row.setdefault(
                "external",
                {
                    "pid": process.pid,
                    "user": process_owner(process.pid),
                    "memory_mb": None if process.used_mb < 0 else process.used_mb,
                    "process": process.name or None,
                },
            )
        elif process.gpu not in job.gpus:
            row.setdefault("violation", {"job": job.id, "user": job.user, "pid": process.pid})
    for gpu in discovery.gpus:
        row = by_gpu.get(gpu.id)
        if (
            row is not None
            and "external" not in row
            and row["state"] == "free"
            and gpu.used_mb > config.external_memory_mb
        ):
            row["external"] = {"pid": None, "user": None, "memory_mb": gpu.used_mb}
    for row in rows:
        row.setdefault("external", None)
        row.setdefault("violation", None)
        if row["state"] == "free" and (row["external"] or row["violation"]):
            row["state"] = "external" if config.external == "avoid" else "free"


# The states of a listed lease whose GPUs and CPUs the next gpurun or `gc` frees.
GONE = ("dead", "expired")


def _gpu_row(gpu: int, holder: dict[str, object] | None) -> dict[str, object]:
    return {
        "id": gpu,
        "state": "free" if holder is None else ("dead" if holder["state"] in GONE else "held"),
        "job": None if holder is None else holder["id"],
        "user": None if holder is None else holder["user"],
        "name": None if holder is None else holder["name"],
    }


def _cpu_group(
    ids: list[int], holder: dict[str, object] | None, state: str | None
) -> dict[str, object]:
    if state is None:
        state = "dead" if holder["state"] in GONE else "held"
    return {
        "cpulist": format_cpulist(ids),
        "ids": ids,
        "count": len(ids),
        "job": None if holder is None else holder["id"],
        "user": None if holder is None else holder["user"],
        "name": None if holder is None else holder["name"],
        "state": state,
    }


def is_id(text: str) -> bool:
    """Whether `text` is a job id: ASCII digits only, of a sane length."""
    return text.isascii() and text.isdigit() and len(text) <= 18


def find_lease(state: State, ref: str) -> Lease:
    """The lease named by `ref`: a job id, or a name that only one lease has."""
    if is_id(ref):
        lease = state.find(int(ref))
        if lease is None:
            raise NotFoundError(f"no job {ref} in the ledger; 'gpurun ps' lists the live jobs")
        return lease
    matches = [lease for lease in state.leases if lease.name == ref]
    if not matches:
        raise NotFoundError(f"no job named '{ref}'; 'gpurun ps' lists the live jobs")
    if len(matches) > 1:
        ids = ", ".join(str(lease.id) for lease in matches)
        raise NotFoundError(f"{len(matches)} jobs are named '{ref}' ({ids}); name one by id")
    return matches[0]


def parse_signal(text: str) -> int:
    """A signal from 'TERM', 'SIGTERM' or '15'."""
    from gpurun import signals

    if is_id(text) and 0 < int(text) < signals.NSIG:
        return int(text)
    name = text.upper()
    number = signals.NUMBERS.get(name if name.startswith("SIG") else "SIG" + name)
    if number is None:
        raise UsageError(
            f"unknown signal '{text}'; use a name like TERM or a number from 1 to "
            f"{signals.NSIG - 1}"
        )
    return number


def kill_job(config: Config, ref: str, signum: int) -> dict[str, object]:
    """Signal every process of a job; after TERM-like signals, KILL what is left after the
    grace period. Returns the job as `ps` shows it, with the signals sent."""
    # Imported here, as in parse_signal: `ps` and `status` need none of it.
    from gpurun import signals

    ledger = open_ledger(config)
    try:
        lease = find_lease(ledger.read(), ref)
    except NotFoundError:
        ended = ledger.finished_jobs({int(ref)}).get(int(ref)) if is_id(ref) else None
        if ended is None:
            raise
        how = ended.get("exit_code")
        outcome = f"exit {how}" if how is not None else ended.get("state")
        raise NotFoundError(f"job {ref} has already ended ({outcome})") from None
    if os.getuid() not in (0, lease.uid):
        raise RefusedError(
            f"job {lease.id} belongs to {lease.user}; only its owner or root may kill it"
        )
    if lease.kind != "job":
        raise RefusedError(f"{lease.id} is a reservation, not a job; use 'gpurun release'")

    sent = [signals.name(signum)]
    lock_path = ledger.job_lock_path(lease.id)
    if not _signal_job(lease, lock_path, signum):
        raise NotFoundError(
            f"job {lease.id} has no processes left to signal; its lease goes with the next "
            "'gpurun gc'"
        )
    if signum in (signals.SIGTERM, signals.SIGINT, signals.SIGHUP, signals.SIGQUIT):
        if not _wait_gone(lease, lock_path, config.kill_grace):
            _signal_job(lease, lock_path, signals.SIGKILL, checked=True)
            sent.append("SIGKILL")
            _wait_gone(lease, lock_path, 5.0)
        _wait_released(ledger, lease, 5.0)
    view = lease_view(lease, True, time.time())
    view["signals"] = sent
    return view


def _job_processes(lease: Lease, lock_path: str, checked: bool = False) -> list[int]:
    """The job's processes now: below its live gpurun, else its command and what is below,
    else (both gone: gpurun was killed and the command ended) whatever still holds the job
    lock at `lock_path` ("" to skip that search), which every process the job started
    inherits, and what is below those.

    Unless `checked` (the holders passed this check before), refuses holders that cannot be
    a gpurun or a job: init, this process's own parents, a "gpurun" running something else.
    """
    holders = {h.role: h for h in lease.holders}
    written = liveness.unrecorded_command(lease, lock_path) if lock_path else None
    if written is not None:
        holders["command"] = Holder(*written, "command")
    gpurun = holders.get("gpurun")
    gpurun_alive = gpurun is not None and liveness.holder_alive(gpurun.pid, gpurun.start)
    if gpurun_alive and not checked and not _is_gpurun(gpurun.pid):
        raise RefusedError(
            f"job {lease.id}'s recorded gpurun (pid {gpurun.pid}) is not a gpurun "
            "process; the ledger was edited by hand, so nothing was signalled"
        )
    if gpurun_alive:
        below = liveness.descendants(gpurun.pid)
        if below or "command" in holders:
            return below
        # A waiting gpurun, or one about to start its command, has nothing below it yet; it
        # takes its lease out of the ledger (or passes the signal on) itself.
        return [gpurun.pid]
    command = holders.get("command")
    if command is not None and liveness.holder_alive(command.pid, command.start):
        if not checked and (command.pid <= 1 or command.pid in _ancestors()):
            raise RefusedError(
                f"job {lease.id}'s recorded command is pid {command.pid}, this "
                "process or one of its parents; nothing was signalled"
            )
        return [command.pid, *liveness.descendants(command.pid)]
    if not lock_path:
        return []
    mine = {os.getpid(), *_ancestors()}
    holding = [pid for pid in liveness.lock_holders(lock_path) if pid not in mine]
    return [p for pid in holding for p in (pid, *liveness.descendants(pid))]


def _is_gpurun(pid: int) -> bool:
    """Whether `pid` runs gpurun, so a hand-edited ledger cannot aim `kill` at, say, init."""
    if pid <= 1 or pid in _ancestors():
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"gpurun" in f.read()
    except OSError:
        return False


def _ancestors() -> set[int]:
    return set(liveness.ancestry())


def _signal_job(lease: Lease, lock_path: str, signum: int, checked: bool = False) -> bool:
    """Send `signum` to every process of the job; False if it had none."""
    pids = _job_processes(lease, lock_path, checked)
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise RefusedError(f"not allowed to signal pid {pid} of job {lease.id}") from None
    return bool(pids)


def _wait_gone(lease: Lease, lock_path: str, seconds: float) -> bool:
    """Wait until the job has no processes left; True if that happened in time."""
    deadline = time.monotonic() + seconds
    while _job_processes(lease, lock_path, checked=True):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _wait_released(ledger: Ledger, lease: Lease, seconds: float) -> None:
    """Give the job's gpurun time to free the lease; reap it ourselves if gpurun is gone."""
    from gpurun.launch import forget_dead, reap_dead

    deadline = time.monotonic() + seconds
    gpurun = [h for h in lease.holders if h.role == "gpurun"]
    supervised = any(liveness.holder_alive(h.pid, h.start) for h in gpurun)
    while supervised and time.monotonic() < deadline:
        if ledger.read().find(lease.id) is None:
            return
        time.sleep(0.02)
    now = time.time()
    with ledger.transaction() as state:
        dead = reap_dead(ledger, state, now)
    forget_dead(ledger, dead, now)


def reset_ledger(
    config: Config, force: bool = False, server: str | None = None
) -> dict[str, object]:
    """Move a server's ledger aside (kept, timestamped) and start an empty one.

    Refuses while live leases remain, unless `force`; on another server's ledger every job
    lease counts as live, since only its own host can tell. A ledger that cannot be read is
    moved aside as it is.
    """
    ledger = open_ledger(config, server)
    ledger.ensure_dirs()
    fd = ledger.lock()
    try:
        next_id = 1
        try:
            state = ledger.read()
        except LedgerError:
            state = None
        now = time.time()
        unlisted = set(ledger.live_job_locks())
        listed: set[int] = set()
        if state is not None:
            listed = {lease.id for lease in state.leases if ledger.alive(lease, now)}
            next_id = state.next_id
        unlisted -= listed
        live = listed | unlisted
        if live and not force:
            if listed or state is None:
                ids = ", ".join(map(str, sorted(live)))
                what = f"live jobs or reservations still hold leases on {ledger.server} ({ids})"
            else:
                ids = ", ".join(map(str, sorted(unlisted)))
                what = (
                    f"jobs {ids} still run on {ledger.server} outside the ledger (an earlier "
                    "forced reset forgot them)"
                )
            raise GpurunError(
                f"{what}; end them first, or use 'gpurun reset --force' to forget them (their "
                "GPUs may then be given out twice)"
            )
        next_id = max(next_id, ledger.last_history_id() + 1, max(live, default=0) + 1)
        # The new ledger is written first, so a full disk leaves the old one in place.
        fresh = State([], next_id, 0.0)
        if state is not None and not ledger.owner:
            fresh = State([], next_id, state.heartbeat, state.boot, state.inventory)
        tmp = ledger.write_temp(fresh)
        try:
            aside = ledger.move_aside()
            os.rename(tmp, ledger.path)
            # Waiting gpuruns whose entries the reset forgot learn it now, not at their poll.
            ledger.ring()
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)
    return {"server": ledger.server, "ledger": ledger.path, "moved_to": aside}


def find_any(config: Config, ref: str) -> dict[str, object]:
    """A job by id or name among live leases, else by id in history, as `ps` shows it."""
    ledger = open_ledger(config)
    state = ledger.read()
    try:
        lease = find_lease(state, ref)
    except NotFoundError:
        if not is_id(ref):
            raise
        record = ledger.finished_jobs({int(ref)}).get(int(ref))
        if record is None:
            raise NotFoundError(f"no job {ref}; 'gpurun ps -a' lists the jobs") from None
        return history_view(record)
    return lease_view(lease, True, time.time())


def show_log(config: Config, ref: str, follow: bool = False) -> int:
    """Copy a detached job's log to stdout; with `follow`, until the job has ended."""
    job = find_any(config, ref)
    path = job.get("log")
    if not path:
        raise NotFoundError(
            f"job {job['id']} ran in the foreground; its output went to its terminal, not a log"
        )
    ledger = open_ledger(config)
    job_id = int(job["id"])
    try:
        copy_output(str(path), lambda: follow and _still_listed(ledger, job_id), 0.1, shared=True)
    except FileNotFoundError:
        raise NotFoundError(f"the log of job {job['id']} ({path}) is gone") from None
    except OSError as exc:
        raise LedgerError(str(path), f"cannot read the log: {exc.strerror}") from None
    return 0


def copy_output(path: str, running: object, pause: float, shared: bool = False) -> None:
    """Copy the file to stdout as it grows, while `running()` says its writer runs; raise
    FileNotFoundError when there is no such file. `shared`: it is in the state folder, so it
    is opened as ledger.open_shared opens files there."""
    import sys

    out = sys.stdout.buffer
    with open(open_shared(path) if shared else path, "rb") as f:
        while True:
            chunk = f.read(65536)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not running():
                out.write(f.read())
                out.flush()
                return
            time.sleep(pause)


def _still_listed(ledger: Ledger, lease_id: int) -> bool:
    lease = ledger.read().find(lease_id)
    return lease is not None and liveness.lease_alive(
        lease, ledger.job_lock_path(lease.id), time.time()
    )


def wait_for_jobs(config: Config, ids: list[int]) -> int:
    """Block until every job ends; return 0, or the code of the first (in `ids`) that failed.

    A job that was cancelled or reaped dead counts as failed with 125.
    """
    ledger = open_ledger(config)
    live = {lease.id for lease in ledger.read().leases}
    unknown = set(ids) - live
    if unknown:
        unknown -= set(ledger.finished_jobs(unknown))
    if unknown:
        listed = ", ".join(map(str, sorted(unknown)))
        raise NotFoundError(f"no job {listed}; 'gpurun ps -a' lists the jobs")

    watcher = Watcher(ledger.state_dir)
    try:
        remaining = set(ids)
        while remaining:
            state = ledger.read()
            now = time.time()
            dead = False
            for lease_id in list(remaining):
                lease = state.find(lease_id)
                if lease is None:
                    remaining.discard(lease_id)
                elif not ledger.alive(lease, now):
                    dead = True
            if dead:
                collect_garbage(config)
            elif remaining:
                watcher.wait(0.5)
    finally:
        watcher.close()

    results = ledger.finished_jobs(set(ids))
    for lease_id in ids:
        # As `ps -a` shows it: an exit code of the wrong kind (anyone may write history) is
        # no exit code.
        view = history_view(results[lease_id]) if lease_id in results else {}
        code = view.get("exit_code")
        if code is not None and code != 0:
            return code
        if code is None:
            how = view.get("state") or "without a record in history"
            reason = f" ({view['reason']})" if view.get("reason") else ""
            raise GpurunError(f"job {lease_id} ended {how}{reason}, so it has no exit code")
    return 0

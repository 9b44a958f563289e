"""Reservations: leases with no process (`alloc`, `release`) and jobs run inside them (`-r`).

A reservation is a lease of kind "reservation" with no holder; it lives until `release` or
until its expiry passes, so any host may judge it, and any host may write one into another
server's ledger (the only write a host makes to a ledger not its own). It enters the queue's
rules like a job arriving now: it is granted only if it fits at once and delays no job
already waiting; otherwise `alloc` fails with exit 75 rather than wait, since there is no
process to hold its place.
"""

from __future__ import annotations

import os
import time

from gpurun import signals, supervise
from gpurun.admission import READY, admit
from gpurun.config import Config
from gpurun.cpulist import format_cpulist
from gpurun.errors import BusyError, CapacityError, GpurunError, NotFoundError, RefusedError
from gpurun.external import busy_outside
from gpurun.inventory import server_inventory, server_names
from gpurun.launch import (
    Spec,
    _new_entry,
    _new_job,
    _user_name,
    admit_on,
    forget_dead,
    mask_note,
    not_handed_out,
    open_ledger,
    reap_dead,
    run_reserved,
    usable_gpus,
    visible_devices,
)
from gpurun.ledger import NAMES_LOCK, Lease, Ledger, Request, State
from gpurun.placement import check_limits, check_possible, place, plural


def allocate(
    config: Config,
    name: str,
    gpus: int,
    cpus: int | None,
    server: str | None,
    ttl: float | None,
) -> dict[str, object]:
    """Reserve GPUs and CPUs with no process; return what `alloc --json` prints.

    A reservation's name is unique across every server, so two hosts booking one name on
    two servers at once must not both see it free: the check and the write happen under a
    lock of the whole state dir, `names.lock`, taken before any ledger's lock (and
    never after one, so the two cannot deadlock).
    """
    local = open_ledger(config)
    local.ensure_dirs()
    names = local.lock(os.path.join(config.state_dir, NAMES_LOCK))
    try:
        _check_unique(config, name)
        if server == "auto":
            server = _pick_server(config, gpus, cpus)
        server = server or config.server
        if server not in server_names(config):
            known = ", ".join(server_names(config))
            raise NotFoundError(f"no server named '{server}'; the servers are {known}")

        ledger = open_ledger(config, server)
        ledger.ensure_dirs()
        outside = busy_outside(config) if server == config.server else {}
        with ledger.transaction() as state:
            now = time.time()
            dead = reap_dead(ledger, state, now)
            inventory = _known_inventory(config, server, state)
            request = _request(config, server, inventory, gpus, cpus)
            for lease in state.leases:
                if lease.name == name and ledger.alive(lease, now):
                    raise RefusedError(f"a live lease on {server} is already named '{name}'")
            spot = _admitted_spot(config, server, state, inventory, request, now, outside)
            if spot is None:
                busy = _busy(config, state, inventory, request, server, outside)
            else:
                # The probe the queue's rules judged, now granted: no holder, its spot.
                lease = _new_probe(state, request, now)._replace(
                    id=state.take_id(),
                    state="running",
                    name=name,
                    user=_user_name(),
                    uid=os.getuid(),
                    host=os.uname().nodename,
                    gpus=spot[0],
                    cpus=spot[1],
                    started=now,
                    holders=(),
                    expires=None if ttl is None else now + ttl,
                    placed=now,
                )
                state.add(lease)
        forget_dead(ledger, dead, now)
        if spot is None:
            raise BusyError(busy)
        return reservation_view(config, lease, server)
    finally:
        os.close(names)


def reservation_view(config: Config, lease: Lease, server: str) -> dict[str, object]:
    """What `alloc` and `release` print. CUDA_VISIBLE_DEVICES is exported as a job's would be
    (launch.visible_devices: MIG slices and `visible_devices: uuid` by UUID); a reservation on
    another server, whose UUIDs this host does not know, gets indices."""
    from gpurun.jobs import iso_time

    gpus = ",".join(map(str, lease.gpus))
    exported = visible_devices(config, lease.gpus) if server == config.server else gpus
    env = {
        "CUDA_VISIBLE_DEVICES": exported,
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "GPURUN_RESERVATION": lease.name,
        "GPURUN_GPUS": gpus,
        "GPURUN_CPUS": format_cpulist(lease.cpus),
    }
    if lease.cpus:
        env["OMP_NUM_THREADS"] = str(len(lease.cpus))
    return {
        "name": lease.name,
        "id": lease.id,
        "server": server,
        "user": lease.user,
        "gpus": list(lease.gpus),
        "cpus": list(lease.cpus),
        "expires": iso_time(lease.expires),
        "expires_in": None if lease.expires is None else round(lease.expires - time.time(), 3),
        "env": env,
    }


def release(config: Config, ref: str, server: str | None = None) -> dict[str, object]:
    """End a reservation (owner or root); refuse while jobs run inside it."""
    ledger, lease = find_reservation(config, ref, server)
    with ledger.transaction() as state:
        now = time.time()
        current = state.find(lease.id)
        if current is None or current.kind != "reservation":
            raise NotFoundError(f"reservation '{ref}' on {ledger.server} has just ended")
        _check_owner(current, "release")
        inside = [
            other.id
            for other in state.leases
            if other.reservation == current.id and ledger.alive(other, now)
        ]
        if inside:
            ids = ", ".join(map(str, inside))
            raise RefusedError(
                f"reservation '{current.name}' still runs job {ids}; end it first "
                f"('gpurun kill {inside[0]}')"
            )
        state.finish(current.id, ledger.server, "released")
    return reservation_view(config, current, ledger.server)


def find_reservation(config: Config, ref: str, server: str | None = None) -> tuple[Ledger, Lease]:
    """The live reservation named `ref` (a name or an id), looked for on this host's server
    first, then on every other server; an id found on several servers needs --server."""
    names = [server] if server else server_names(config)
    found: list[tuple[Ledger, Lease]] = []
    now = time.time()
    for name in names:
        ledger = open_ledger(config, name)
        for lease in ledger.read().leases:
            if lease.kind != "reservation" or not ledger.alive(lease, now):
                continue
            if lease.name == ref or (ref.isdigit() and lease.id == int(ref)):
                found.append((ledger, lease))
    by_name = [pair for pair in found if pair[1].name == ref]
    if by_name:
        found = by_name
    if not found:
        where = f"on server {server}" if server else "on any server"
        raise NotFoundError(f"no live reservation '{ref}' {where}; 'gpurun ps' lists them")
    if len(found) > 1:
        servers = ", ".join(ledger.server for ledger, _ in found)
        raise GpurunError(f"'{ref}' is a reservation on {servers}; say which with --server")
    return found[0]


def run_inside(config: Config, spec: Spec, executable: str, argv: list[str]) -> int:
    """Run a job on a reservation's GPUs and CPUs (all of them, or -g/-c of them)."""
    ledger, reservation = find_reservation(config, spec.reservation)
    if ledger.server != config.server:
        raise RefusedError(
            f"reservation '{reservation.name}' is on server {ledger.server}, and this host is "
            f"{config.server}; run the command on {ledger.server}"
        )
    _check_owner(reservation, "run inside")
    ledger.ensure_dirs()
    outside = busy_outside(config)
    usable = usable_gpus(config)

    with ledger.transaction(block=supervise.BLOCKED) as state:
        now = time.time()
        dead = reap_dead(ledger, state, now)
        current = state.find(reservation.id)
        if current is None:
            raise NotFoundError(f"reservation '{reservation.name}' has just ended")
        request = spec.request or Request(len(current.gpus), len(current.cpus), None)
        if request.cpus is None:
            per_gpu = len(current.cpus) // len(current.gpus) if current.gpus else 0
            request = request._replace(cpus=min(max(1, request.gpus * per_gpu), len(current.cpus)))
        # Placed as a launch places a job: within an inherited mask, near its GPUs, and never
        # on a GPU busy outside gpurun.
        allowed = tuple(g for g in current.gpus if g in usable)
        check_possible(request, allowed, current.cpus, mask_note(config))
        inside = [lease for lease in state.leases if lease.reservation == current.id]
        held_gpus = {g for lease in inside for g in lease.gpus}
        held_cpus = {c for lease in inside for c in lease.cpus}
        spot = place(
            request,
            allowed,
            current.cpus,
            held_gpus,
            held_cpus,
            config.topology,
            frozenset(outside),
        )
        if spot is not None:
            lease_id, lock_fd = _new_job(ledger, state)
            entry = _new_entry(ledger, spec._replace(request=request), lease_id, now, False)
            entry = entry._replace(
                state="running", gpus=spot[0], cpus=spot[1], placed=now, reservation=current.id
            )
            state.add(entry)
    forget_dead(ledger, dead, now)
    if spot is None:
        signals.pthread_sigmask(signals.SIG_UNBLOCK, supervise.BLOCKED)
        ids = ", ".join(str(lease.id) for lease in inside)
        free_gpus = len(current.gpus) - len(held_gpus)
        free_cpus = len(current.cpus) - len(held_cpus)
        running = f"job {ids} runs inside it, leaving" if ids else "it has"
        raise BusyError(
            f"reservation '{current.name}' has too little left: {running} "
            f"{plural(free_gpus, 'GPU')} and {plural(free_cpus, 'CPU')}"
            f"{not_handed_out(config, outside, held_gpus)}; ask for at most that with -g and "
            "-c (-c 0 for no CPUs)"
        )
    return run_reserved(ledger, config, entry, lock_fd, executable, argv)


def _check_unique(config: Config, name: str) -> None:
    now = time.time()
    for server in server_names(config):
        ledger = open_ledger(config, server)
        try:
            leases = ledger.read().leases
        except GpurunError:
            continue
        if any(lease.name == name and ledger.alive(lease, now) for lease in leases):
            raise RefusedError(
                f"a live lease on {server} is already named '{name}'; pick another name"
            )


def _known_inventory(
    config: Config, server: str, state: State
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    inventory = server_inventory(config, server, state)
    if inventory is None:
        raise GpurunError(
            f"the GPUs and CPUs of server {server} are unknown: its config says auto and its "
            f"host has not written its ledger yet; run 'gpurun gc' on {server} or list them"
        )
    return inventory


def _request(
    config: Config,
    server: str,
    inventory: tuple[tuple[int, ...], tuple[int, ...]],
    gpus: int,
    cpus: int | None,
) -> Request:
    """The request on `server`: -c defaults as for a job, from that server's CPUs per GPU."""
    all_gpus, all_cpus = inventory
    if cpus is None:
        if server == config.server:
            per_gpu = config.cpus_per_gpu
        else:
            per_gpu = max(1, len(all_cpus) // len(all_gpus)) if all_gpus and all_cpus else 0
        cpus = min(max(1, gpus * per_gpu), len(all_cpus))
    request = Request(gpus, cpus, None)
    if server == config.server:
        check_possible(request, usable_gpus(config), all_cpus, mask_note(config))
    else:
        check_possible(request, all_gpus, all_cpus)
    entry = next((s for s in config.servers if s.name == server), None)
    check_limits(request, entry.limits if entry else config.limits, server, config.path)
    return request


def _admitted_spot(
    config: Config,
    server: str,
    state: State,
    inventory: tuple[tuple[int, ...], tuple[int, ...]],
    request: Request,
    now: float,
    outside: dict[int, str],
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Where the request goes if, arriving now behind every waiting job, it may start now.

    On this host's server it is placed as a launch places a job (launch.admit_on): within an
    inherited mask, by the topology, never on a GPU busy outside gpurun. Another server's
    topology and outside use are unknown here, so there only the queue's rules apply."""
    probe = _new_probe(state, request, now)
    if server == config.server:
        probe = probe._replace(gpu_mask=config.gpu_mask)
        admitted = admit_on(config, [*state.leases, probe], now, lambda lease: READY, outside)
    else:
        admitted = admit([*state.leases, probe], *inventory, now, lambda lease: READY)
    return admitted.get(probe.id)


def _new_probe(state: State, request: Request, now: float) -> Lease:
    """A waiting entry standing for the reservation while the queue's rules judge it."""
    from gpurun.ledger import Holder

    return Lease(
        id=state.next_id,
        kind="reservation",
        state="waiting",
        name="",
        user="",
        uid=0,
        host="",
        gpus=(),
        cpus=(),
        command=(),
        created=now,
        started=None,
        holders=(Holder(0, 0, "alloc"),),
        boot="",
        expires=None,
        request=request,
        priority=0,
        time_limit=None,
        after=(),
        after_any=False,
        log=None,
        placed=None,
        reservation=None,
    )


def _busy(
    config: Config,
    state: State,
    inventory: tuple[tuple[int, ...], tuple[int, ...]],
    request: Request,
    server: str,
    outside: dict[int, str],
) -> str:
    gpus, cpus = inventory
    held_gpus = {g for lease in state.leases for g in lease.gpus if g in gpus}
    held_cpus = {c for lease in state.leases for c in lease.cpus if c in cpus}
    waiting = sum(1 for lease in state.leases if lease.state == "waiting")
    text = (
        f"server {server} cannot reserve {plural(request.gpus, 'GPU')} and "
        f"{plural(request.cpus, 'CPU')} now: "
        f"{len(held_gpus)} of {len(gpus)} GPUs and {len(held_cpus)} of {len(cpus)} CPUs are held"
    )
    if server == config.server:
        text += not_handed_out(config, outside, held_gpus)
    if waiting:
        text += f"; {waiting} waiting jobs come first"
    return text + "; try later or another server (--server auto)"


def _pick_server(config: Config, gpus: int, cpus: int | None) -> str:
    """The server with the most free GPUs (then CPUs) where the reservation may start now."""
    best: tuple[int, int, str] | None = None
    reasons = []
    never = []
    now = time.time()
    for name in server_names(config):
        ledger = open_ledger(config, name)
        try:
            state = ledger.read()
            inventory = _known_inventory(config, name, state)
            request = _request(config, name, inventory, gpus, cpus)
        except CapacityError as exc:
            reasons.append(f"{name}: {exc}")
            never.append(name)
            continue
        except GpurunError as exc:
            reasons.append(f"{name}: {exc}")
            continue
        live = [lease for lease in state.leases if ledger.alive(lease, now)]
        state = State(live, state.next_id, state.heartbeat)
        outside = busy_outside(config) if name == config.server else {}
        if _admitted_spot(config, name, state, inventory, request, now, outside) is None:
            reasons.append(f"{name}: busy")
            continue
        held_gpus = {g for lease in live for g in lease.gpus}
        held_cpus = {c for lease in live for c in lease.cpus}
        free = (
            sum(1 for g in inventory[0] if g not in held_gpus),
            sum(1 for c in inventory[1] if c not in held_cpus),
        )
        if best is None or free > best[:2]:
            best = (*free, name)
    if best is None:
        why = "; ".join(reasons)
        if len(why) > 400:
            why = why[:400].rsplit(" ", 1)[0] + " ..."
        if len(never) == len(reasons):
            raise CapacityError(
                f"no server can ever hold {plural(gpus, 'GPU')} ({why}); ask for fewer"
            )
        raise BusyError(f"no server can reserve {plural(gpus, 'GPU')} now ({why}); try later")
    return best[2]


def _check_owner(lease: Lease, action: str) -> None:
    if os.getuid() not in (0, lease.uid):
        raise RefusedError(
            f"reservation '{lease.name}' belongs to {lease.user}; only they or root may {action} it"
        )

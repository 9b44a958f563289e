"""The queue's rules: which waiting jobs may start now.

Pure functions over a ledger's leases, so every waiting gpurun, deciding for itself under the
ledger lock, reaches the same answer.

Order: higher priority first, then arrival (the lease id). A job may start when it fits in
what is free and it delays no job ahead of it: with W1..Wk the jobs passed over so far,
(free now - what it takes) + (held by running jobs) must cover W1..Wk together, for GPUs and
CPUs alike. That is, the job plus everything ahead of it must fit in what the server will have
once the running jobs end. Reservations without an expiry never end, so they do not count as
coming back.

With masks, exact ids or MIG slices, counting is not enough: a job ahead that may use only
GPUs 0 and 1, or needs two whole GPUs where the rest are slices, is delayed by a job that takes
one of those even when the counts add up. So when a job ahead is limited that way, the jobs
ahead must also be placeable, all together, on what the server will have with the new job in
its place; and the new job is offered GPUs outside what the jobs ahead are limited to first.

Backfill: a job with a time limit may also start on what the jobs ahead need, if it ends before
the first of them could start anyway. That start time is only known when every running job has
a limit (or expiry); otherwise nothing backfills.
"""

from __future__ import annotations

from gpurun.gpuids import is_mig
from gpurun.ledger import Lease
from gpurun.placement import place

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from gpurun.topology import Topology

READY = "ready"
BLOCKED = "blocked"
FAILED = "failed"


def queue_order(leases: list[Lease]) -> list[Lease]:
    """The waiting leases, first to start first."""
    return sorted(
        (lease for lease in leases if lease.state == "waiting"),
        key=lambda lease: (-lease.priority, lease.id),
    )


def admit(
    leases: list[Lease],
    gpus: tuple[int, ...],
    cpus: tuple[int, ...],
    now: float,
    dependencies: Callable[[Lease], str],
    topology: Topology | None = None,
    unavailable: frozenset[int] = frozenset(),
) -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Return {lease id: (gpus, cpus)} for every waiting lease that may start now.

    `dependencies(lease)` says whether its --after jobs let it start (READY), not yet
    (BLOCKED) or never (FAILED); only READY ones are considered, and the others hold nothing
    back, since they could not start anyway. `topology` guides where each goes (see
    placement.place); `unavailable` GPUs, busy outside gpurun, are given to no one and count
    as held for as long as that lasts. A lease with a gpu_mask is placed only on those GPUs.
    """
    running = [lease for lease in leases if lease.state == "running"]
    held_gpus = {g for lease in running for g in lease.gpus}
    held_cpus = {c for lease in running for c in lease.cpus}
    fixed_gpus = {g for lease in running if _never_ends(lease) for g in lease.gpus}
    fixed_gpus |= unavailable
    fixed_cpus = {c for lease in running if _never_ends(lease) for c in lease.cpus}
    eventual = (fixed_gpus, fixed_cpus, gpus, cpus)
    # What comes back when a lease ends: only ids of this inventory (a lease on a GPU removed
    # from the config gives nothing back), and nothing for a job inside a reservation that
    # still exists, whose ids come back with the reservation.
    reservations = {lease.id for lease in leases if lease.kind == "reservation"}
    gpu_set, cpu_set = set(gpus), set(cpus)
    ends = [
        (
            _end_time(lease),
            sum(1 for g in lease.gpus if g in gpu_set),
            sum(1 for c in lease.cpus if c in cpu_set),
        )
        for lease in running
        if not _never_ends(lease) and lease.reservation not in reservations
    ]

    def free() -> tuple[int, int]:
        return (
            sum(1 for g in gpus if g not in held_gpus and g not in unavailable),
            sum(1 for c in cpus if c not in held_cpus),
        )

    admitted: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    ahead: list[Lease] = []
    free_gpus, free_cpus = free()
    for lease in queue_order(leases):
        if dependencies(lease) != READY:
            continue
        request = lease.request
        needed = request.gpus if request.gpu_ids is None else len(set(request.gpu_ids))
        if needed > free_gpus or request.cpus > free_cpus:
            # It cannot fit now whatever the rules, as place() would find: the usual case
            # of a long queue on a full server, judged without the rules' look at every
            # lease ahead, which made admission (under the lock) quadratic in the queue.
            ahead.append(lease)
            continue
        kept_gpus = {g for w in ahead if w.request.gpu_ids for g in w.request.gpu_ids}
        allowed = gpus if lease.gpu_mask is None else tuple(g for g in gpus if g in lease.gpu_mask)
        # First try GPUs that no job ahead is limited to, then any the ones ahead did not
        # name exactly: with masks and MIG, which GPUs a job takes decides whom it delays.
        wanted = _wanted_by(ahead, gpus) - kept_gpus
        spot = None
        for kept in (kept_gpus | wanted, kept_gpus) if wanted else (kept_gpus,):
            candidate = place(
                lease.request, allowed, cpus, held_gpus | kept, held_cpus, topology, unavailable
            )
            if candidate is not None and not _delays_anyone(
                lease, candidate, ahead, eventual, free_gpus, free_cpus, ends, now
            ):
                spot = candidate
                break
        if spot is not None:
            admitted[lease.id] = spot
            held_gpus.update(spot[0])
            held_cpus.update(spot[1])
            free_gpus, free_cpus = free()
            ends.append(
                (now + lease.time_limit if lease.time_limit else None, len(spot[0]), len(spot[1]))
            )
        else:
            ahead.append(lease)
    return admitted


def _wanted_by(ahead: list[Lease], gpus: tuple[int, ...]) -> set[int]:
    """The GPUs jobs ahead are limited to: their masks, and whole GPUs for a job that needs
    several (a MIG slice cannot be one of them). A job that may use any GPU wants none."""
    wanted: set[int] = set()
    for waiting in ahead:
        if waiting.gpu_mask is not None:
            wanted.update(waiting.gpu_mask)
        elif waiting.request.gpus > 1:
            wanted.update(g for g in gpus if not is_mig(g))
    return wanted


def _never_ends(lease: Lease) -> bool:
    return lease.kind == "reservation" and lease.expires is None


def _end_time(lease: Lease) -> float | None:
    """When the lease ends at the latest, or None if it has no limit."""
    if lease.kind == "reservation":
        return lease.expires
    if lease.time_limit is None:
        return None
    return (lease.started or lease.created) + lease.time_limit


def _delays_anyone(
    lease: Lease,
    spot: tuple[tuple[int, ...], tuple[int, ...]],
    ahead: list[Lease],
    eventual: tuple[set[int], set[int], tuple[int, ...], tuple[int, ...]],
    free_gpus: int,
    free_cpus: int,
    ends: list[tuple[float | None, int, int]],
    now: float,
) -> bool:
    """Whether `lease` on `spot` could delay a job ahead of it (see the module docstring)."""
    if not ahead:
        return False
    fixed_gpus, fixed_cpus, gpus, cpus = eventual
    capacity_gpus = sum(1 for g in gpus if g not in fixed_gpus)
    capacity_cpus = sum(1 for c in cpus if c not in fixed_cpus)
    need_gpus = sum(w.request.gpus for w in ahead)
    need_cpus = sum(w.request.cpus for w in ahead)
    fits = (
        capacity_gpus - lease.request.gpus >= need_gpus
        and capacity_cpus - lease.request.cpus >= need_cpus
    )
    if fits and _constrained(ahead, gpus):
        # Counts are not enough when jobs ahead may use only some GPUs: they must still be
        # placeable, all together, once running jobs end, with this lease on its spot. If
        # they are not placeable even without it, it is not what delays them.
        fits = not _placeable(ahead, eventual, ((), ())) or _placeable(ahead, eventual, spot)
    if fits:
        return False
    if lease.time_limit is None:
        return True
    first_start = _earliest_start(ahead[0], free_gpus, free_cpus, ends)
    return first_start is None or now + lease.time_limit > first_start


def _constrained(ahead: list[Lease], gpus: tuple[int, ...]) -> bool:
    """Whether some job ahead cannot use just any GPU: a mask, exact ids, or several GPUs on
    a server with MIG slices."""
    mig = any(is_mig(g) for g in gpus)
    return any(
        w.gpu_mask is not None or w.request.gpu_ids is not None or (mig and w.request.gpus > 1)
        for w in ahead
    )


def _placeable(
    ahead: list[Lease],
    eventual: tuple[set[int], set[int], tuple[int, ...], tuple[int, ...]],
    taken: tuple[tuple[int, ...], tuple[int, ...]],
) -> bool:
    """Whether every job ahead finds a place on what the server has once running jobs end
    (all but `fixed`), besides `taken`: the most constrained first, each on what the ones
    before it left."""
    fixed_gpus, fixed_cpus, gpus, cpus = eventual
    held_gpus = set(fixed_gpus) | set(taken[0])
    held_cpus = set(fixed_cpus) | set(taken[1])

    def order(w: Lease) -> tuple[int, int]:
        if w.request.gpu_ids is not None:
            return (0, len(w.request.gpu_ids))
        if w.gpu_mask is not None:
            return (1, len(w.gpu_mask))
        return (2, -w.request.gpus)

    for waiting in sorted(ahead, key=order):
        mask = waiting.gpu_mask
        allowed = gpus if mask is None else tuple(g for g in gpus if g in mask)
        spot = place(waiting.request, allowed, cpus, held_gpus, held_cpus)
        if spot is None:
            return False
        held_gpus.update(spot[0])
        held_cpus.update(spot[1])
    return True


def _earliest_start(
    first: Lease,
    free_gpus: int,
    free_cpus: int,
    ends: list[tuple[float | None, int, int]],
) -> float | None:
    """When the first job ahead could start if running jobs end at their limits (None: unknown)."""
    if any(end is None for end, _, _ in ends):
        return None
    need_gpus, need_cpus = first.request.gpus, first.request.cpus
    if free_gpus >= need_gpus and free_cpus >= need_cpus:
        return 0.0
    for end, gpus, cpus in sorted(ends):
        free_gpus += gpus
        free_cpus += cpus
        if free_gpus >= need_gpus and free_cpus >= need_cpus:
            return end
    return None

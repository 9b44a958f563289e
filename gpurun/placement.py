"""Where a request goes: which GPUs and CPUs of a server, given what leases hold.

Pure functions over ids, so the rules are tested without processes or files.
"""

from __future__ import annotations

from gpurun.cpulist import format_cpulist
from gpurun.errors import CapacityError
from gpurun.gpuids import MIG_BASE
from gpurun.topology import NO_TOPOLOGY, Topology

# Only for annotations (see config.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from gpurun.ledger import Request


def check_possible(
    request: Request, gpus: tuple[int, ...], cpus: tuple[int, ...], hidden: str = ""
) -> None:
    """Raise CapacityError when the request could never fit this server, even empty.

    `hidden`: what keeps other GPUs of the server from it (an inherited mask), said with the
    GPUs it has."""
    where = f"; {hidden}" if hidden else ""
    have = (
        f"this server has {plural(len(gpus), 'GPU')} ({_ids(gpus)}{where}) and "
        f"{plural(len(cpus), 'CPU')} ({_cpus(cpus)})"
    )
    if request.gpu_ids is not None:
        unknown = [i for i in request.gpu_ids if i not in gpus]
        if unknown:
            raise CapacityError(f"no GPU {','.join(map(str, unknown))}: {have}; pick ids it has")
    if request.gpus > len(gpus):
        raise CapacityError(f"asked for {plural(request.gpus, 'GPU')} but {have}; ask for fewer")
    picked = request.gpu_ids if request.gpu_ids is not None else ()
    whole = [g for g in gpus if not _is_mig(g)]
    if (len(picked) > 1 and any(_is_mig(g) for g in picked)) or (
        request.gpu_ids is None and request.gpus > max(1, len(whole))
    ):
        raise CapacityError(
            f"asked for {plural(request.gpus, 'GPU')}, but this server has "
            f"{plural(len(whole), 'whole GPU')} and CUDA can use only one MIG slice per "
            "process; ask for -g 1 to get one slice"
        )
    if request.cpus > len(cpus):
        raise CapacityError(
            f"asked for {plural(request.cpus, 'CPU')} but {have}; ask for fewer with -c"
        )


def check_limits(request: Request, limits: object, server: str, path: str) -> None:
    """Raise CapacityError when the request breaks the server's per-job `limits`."""
    where = f"server {server} allows"
    source = f" (limits in {path})" if path else ""
    if limits.max_gpus is not None and request.gpus > limits.max_gpus:
        raise CapacityError(
            f"asked for {plural(request.gpus, 'GPU')} but {where} at most "
            f"{limits.max_gpus} per job{source}"
        )
    if limits.min_gpus is not None and request.gpus < limits.min_gpus:
        raise CapacityError(
            f"asked for {plural(request.gpus, 'GPU')} but {where} no fewer than "
            f"{limits.min_gpus} per job{source}"
        )
    if limits.max_cpus is not None and request.cpus > limits.max_cpus:
        raise CapacityError(
            f"asked for {plural(request.cpus, 'CPU')} but {where} at most "
            f"{limits.max_cpus} per job{source}; ask for fewer with -c"
        )


def place(
    request: Request,
    gpus: tuple[int, ...],
    cpus: tuple[int, ...],
    held_gpus: set[int],
    held_cpus: set[int],
    topology: Topology | None = None,
    unavailable: frozenset[int] | set[int] = frozenset(),
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Choose GPUs and CPUs for the request among the free ones, or None if it does not fit.

    GPUs: the exact ids asked for, else `pick_gpus`; `unavailable` ones (busy outside
    gpurun) are never chosen. CPUs: `pick_cpus_near` when the topology knows the CPUs, else
    the lowest run of consecutive free ids long enough, else the lowest free ids. A job gets
    at most one MIG slice, and never a slice together with other GPUs: CUDA can use only one
    MIG device per process. No id is ever chosen twice, even when `gpus` or `cpus` list one
    twice or the topology's cores overlap.
    """
    gpus, cpus = tuple(dict.fromkeys(gpus)), tuple(dict.fromkeys(cpus))
    free_gpus = [g for g in gpus if g not in held_gpus and g not in unavailable]
    if request.gpu_ids is not None:
        if any(g not in free_gpus for g in request.gpu_ids):
            return None
        chosen_gpus = tuple(dict.fromkeys(request.gpu_ids))
    else:
        if request.gpus > 1:
            free_gpus = [g for g in free_gpus if not _is_mig(g)]
        if len(free_gpus) < request.gpus:
            return None
        chosen_gpus = pick_gpus(free_gpus, request.gpus, topology or NO_TOPOLOGY)

    free_cpus = [c for c in cpus if c not in held_cpus]
    if len(free_cpus) < request.cpus:
        return None
    if topology is not None and topology.cpu_node:
        near = {topology.gpu_node[g] for g in chosen_gpus if g in topology.gpu_node}
        chosen_cpus = tuple(pick_cpus_near(free_cpus, request.cpus, near, topology))
    else:
        chosen_cpus = tuple(pick_cpus(free_cpus, request.cpus))
    assert len(set(chosen_gpus)) == len(chosen_gpus), f"GPU chosen twice: {chosen_gpus}"
    assert len(set(chosen_cpus)) == len(chosen_cpus), f"CPU chosen twice: {chosen_cpus}"
    return chosen_gpus, chosen_cpus


# Beyond this many candidate groups, GPUs are picked greedily instead of by trying them all.
MAX_GROUPS = 5000


def pick_gpus(free: list[int], count: int, topology: Topology) -> tuple[int, ...]:
    """The best `count` GPUs of `free` (whole GPUs first, then MIG slices).

    In order: fewest NUMA nodes spanned; closest links between them (NVLink before a PCIe
    switch before the host bridge before another node); best fit, the fewest free GPUs left
    in the nodes it touches, so small jobs fill nodes that are already partly used and large
    groups stay free; the fewest close free neighbours left without a partner; lowest ids.
    """
    if count == 0:
        return ()
    free = sorted(free, key=lambda g: (_is_mig(g), g))
    if not topology.gpu_node and not topology.gpu_links:
        return tuple(sorted(free[:count]))
    import itertools
    import math

    if math.comb(len(free), count) > MAX_GROUPS:
        return _pick_greedy(free, count, topology)
    best = min(itertools.combinations(free, count), key=lambda group: _cost(group, free, topology))
    return tuple(best)


def _cost(group: tuple[int, ...], free: list[int], topology: Topology) -> tuple:
    node = topology.gpu_node
    nodes = {node.get(g, -1) for g in group}
    links = sum(_link(topology, a, b) for i, a in enumerate(group) for b in group[i + 1 :])
    rest = [g for g in free if g not in group]
    left_in_nodes = sum(1 for g in rest if node.get(g, -1) in nodes)
    orphaned = 0
    for g in group:
        # Its closest partner of all (from the reported links), so that taking a GPU whose
        # partner is already busy counts as breaking nothing.
        known = [d for (a, _), d in topology.gpu_links.items() if a == g]
        others = (_link(topology, g, other) for other in free if other != g)
        closest = min(known) if known else min(others, default=None)
        if closest is not None:
            orphaned += sum(1 for other in rest if _link(topology, g, other) == closest)
    mig = sum(1 for g in group if _is_mig(g))
    return (mig, len(nodes), links, left_in_nodes, orphaned, group)


def _pick_greedy(free: list[int], count: int, topology: Topology) -> tuple[int, ...]:
    """For many GPUs: fill from the node with the fewest free GPUs that holds the whole job,
    else from the fullest nodes first, each GPU next to the ones already taken."""
    by_node: dict[int, list[int]] = {}
    for g in free:
        by_node.setdefault(topology.gpu_node.get(g, -1), []).append(g)
    fitting = [n for n, ids in by_node.items() if len(ids) >= count]
    if fitting:
        order = [min(fitting, key=lambda n: (len(by_node[n]), n))]
    else:
        order = sorted(by_node, key=lambda n: (-len(by_node[n]), n))
    chosen: list[int] = []
    for n in order:
        pool = list(by_node[n])
        while pool and len(chosen) < count:
            pick = min(pool, key=lambda g: (sum(_link(topology, g, c) for c in chosen), g))
            pool.remove(pick)
            chosen.append(pick)
    return tuple(sorted(chosen))


def _link(topology: Topology, a: int, b: int) -> int:
    distance = topology.gpu_links.get((a, b))
    if distance is not None:
        return distance
    node_a, node_b = topology.gpu_node.get(a), topology.gpu_node.get(b)
    if node_a is None or node_b is None:
        return 14
    return 13 if node_a == node_b else 14


def pick_cpus_near(free: list[int], count: int, near: set[int], topology: Topology) -> list[int]:
    """`count` CPUs of `free`: from the nodes in `near` (the job's GPUs') first, then from the
    others, nearest first; in each node, whole cores first.

    Within a node: whole free cores (all hyperthread siblings free) while the job needs a
    whole core's worth, then threads of cores another job already split, and only then one
    whole core split. A job without GPUs goes to the node with the fewest free CPUs that
    holds it entirely (best fit), so nodes with many free CPUs stay free for GPU jobs.
    """
    if count == 0:
        return []
    free_set = set(free)
    by_node: dict[int, list[int]] = {}
    for cpu in free:
        by_node.setdefault(topology.cpu_node.get(cpu, -1), []).append(cpu)

    def distance(node: int) -> int:
        if not near:
            return 0
        return min(topology.node_distance.get((n, node), 10 if n == node else 20) for n in near)

    if near:
        order = sorted(by_node, key=lambda n: (n not in near, distance(n), n))
    else:
        order = sorted(by_node, key=lambda n: (len(by_node[n]) < count, len(by_node[n]), n))

    chosen: list[int] = []
    for node in order:
        need = count - len(chosen)
        if need == 0:
            break
        chosen.extend(_take_from_node(by_node[node], need, free_set, topology))
    return sorted(chosen)


def _take_from_node(cpus: list[int], need: int, free: set[int], topology: Topology) -> list[int]:
    whole: list[tuple[int, ...]] = []
    split: list[int] = []
    seen: set[int] = set()
    for cpu in cpus:
        if cpu in seen:
            continue
        core = tuple(c for c in topology.cpu_core.get(cpu, (cpu,)) if c not in seen) or (cpu,)
        seen.update(core)
        if all(c in free for c in core):
            whole.append(core)
        else:
            split.extend(c for c in core if c in free and c in cpus)
    taken: list[int] = []
    for core in whole[:]:
        if len(core) <= need - len(taken):
            taken.extend(core)
            whole.remove(core)
    for cpu in split:
        if len(taken) == need:
            break
        taken.append(cpu)
    for core in whole:
        for cpu in core:
            if len(taken) == need:
                break
            taken.append(cpu)
    return taken


def pick_cpus(free: list[int], count: int) -> list[int]:
    """The lowest run of `count` consecutive ids in sorted `free`, else its first `count`."""
    if count == 0:
        return []
    run_start = 0
    for i in range(1, len(free) + 1):
        if i - run_start >= count:
            return free[run_start : run_start + count]
        if i < len(free) and free[i] != free[i - 1] + 1:
            run_start = i
    return free[:count]


def plural(count: int, noun: str) -> str:
    """'1 GPU', '2 GPUs': counts in messages."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _ids(ids: tuple[int, ...]) -> str:
    return ",".join(map(str, ids)) or "none"


def _cpus(ids: tuple[int, ...]) -> str:
    return format_cpulist(ids) or "none"


def _is_mig(gpu_id: int) -> bool:
    return gpu_id >= MIG_BASE

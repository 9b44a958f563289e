"""Where a request goes: which GPUs and CPUs of a server, given what leases hold.

Pure functions over ids, so the rules are tested without processes or files.
"""

from __future__ import annotations

from collections import namedtuple

from gpurun.cpulist import format_cpulist
from gpurun.errors import CapacityError

_RequestBase = namedtuple("_RequestBase", "gpus cpus gpu_ids")


class Request(_RequestBase):
    """What a job asks for: gpus (count), cpus (count), gpu_ids (tuple of exact ids or None)."""

    __slots__ = ()


def check_possible(request: Request, gpus: tuple[int, ...], cpus: tuple[int, ...]) -> None:
    """Raise CapacityError when the request could never fit this server, even empty."""
    have = (
        f"this server has {_plural(len(gpus), 'GPU')} ({_ids(gpus)}) and "
        f"{_plural(len(cpus), 'CPU')} ({_cpus(cpus)})"
    )
    if request.gpu_ids is not None:
        unknown = [i for i in request.gpu_ids if i not in gpus]
        if unknown:
            raise CapacityError(f"no GPU {','.join(map(str, unknown))}: {have}; pick ids it has")
    if request.gpus > len(gpus):
        raise CapacityError(f"asked for {_plural(request.gpus, 'GPU')} but {have}; ask for fewer")
    if request.cpus > len(cpus):
        raise CapacityError(
            f"asked for {_plural(request.cpus, 'CPU')} but {have}; ask for fewer with -c"
        )


def check_limits(request: Request, limits: object, server: str, path: str) -> None:
    """Raise CapacityError when the request breaks the server's per-job `limits`."""
    where = f"server {server} allows"
    source = f" (limits in {path})" if path else ""
    if limits.max_gpus is not None and request.gpus > limits.max_gpus:
        raise CapacityError(
            f"asked for {_plural(request.gpus, 'GPU')} but {where} at most "
            f"{limits.max_gpus} per job{source}"
        )
    if limits.min_gpus is not None and request.gpus < limits.min_gpus:
        raise CapacityError(
            f"asked for {_plural(request.gpus, 'GPU')} but {where} no fewer than "
            f"{limits.min_gpus} per job{source}"
        )
    if limits.max_cpus is not None and request.cpus > limits.max_cpus:
        raise CapacityError(
            f"asked for {_plural(request.cpus, 'CPU')} but {where} at most "
            f"{limits.max_cpus} per job{source}; ask for fewer with -c"
        )


def place(
    request: Request,
    gpus: tuple[int, ...],
    cpus: tuple[int, ...],
    held_gpus: set[int],
    held_cpus: set[int],
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Choose GPUs and CPUs for the request among the free ones, or None if it does not fit.

    GPUs: the exact ids asked for, else the lowest free ids. CPUs: the lowest run of
    consecutive free ids long enough, else the lowest free ids.
    """
    free_gpus = [g for g in gpus if g not in held_gpus]
    if request.gpu_ids is not None:
        if any(g not in free_gpus for g in request.gpu_ids):
            return None
        chosen_gpus = tuple(request.gpu_ids)
    else:
        if len(free_gpus) < request.gpus:
            return None
        chosen_gpus = tuple(free_gpus[: request.gpus])

    free_cpus = [c for c in cpus if c not in held_cpus]
    if len(free_cpus) < request.cpus:
        return None
    return chosen_gpus, tuple(pick_cpus(free_cpus, request.cpus))


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


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _ids(ids: tuple[int, ...]) -> str:
    return ",".join(map(str, ids)) or "none"


def _cpus(ids: tuple[int, ...]) -> str:
    return format_cpulist(ids) or "none"

"""GPUs busy outside gpurun: compute processes no lease accounts for, or memory in use.

A GPU that no lease holds is `external` when compute processes run on it, or when more than
`external_memory_mb` of its memory is in use (a process in another container or PID
namespace is invisible, but its memory is not). With `external: avoid` (the default) such a
GPU is handed to no job; `external: ignore` turns the check off. Only discovered GPUs can be
checked: a config that declares `gpus:` has no one to ask.

The facts come from discovery (gpus.py), which runs when the config is read; a gpurun that
places jobs long after that (a job ending, a waiting job waking) asks again first.

When the compute processes cannot be listed (the query failed or timed out), outside use is
unknown, and with `avoid` every GPU counts as busy outside gpurun until a later query answers:
handing out a GPU that may be someone else's is the failure `avoid` exists to prevent, while
waiting costs only time, and `external: ignore` lifts it.

Inside a gpurun job (config.parent_job), the inventory is the job's own lease: the processes
and memory on those GPUs are the job's (its gpurun can tell them from nobody else's), and a
process of anyone else there is already a violation the shared ledger's `status` shows. So
nothing there counts as outside use: inner jobs never wait behind their parent's process.
"""

from __future__ import annotations

import time

from gpurun.log import get_logger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from gpurun.config import Config
    from gpurun.gpus import Discovery

log = get_logger(__name__)

_latest: dict[str, object] = {}


def current_discovery(config: Config, max_age: float | None = None) -> Discovery | None:
    """The config's discovery, asked again when it is older than `max_age` seconds."""
    if config.discovery is None:
        return None
    found = _latest.get("discovery", config.discovery)
    if max_age is not None and time.monotonic() - _latest.get("when", 0.0) > max_age:
        from gpurun.gpus import discover

        fresh = discover(config.nvidia_smi)
        if fresh.source != "none":
            found = fresh
        _latest.update(discovery=found, when=time.monotonic())
    return found


def busy_outside(config: Config, max_age: float | None = None) -> dict[int, str]:
    """{GPU id: why} for GPUs in use outside any lease that holds them; {} with `ignore`."""
    if config.external == "ignore" or config.parent_job is not None:
        return {}
    return external_use(config, current_discovery(config, max_age))


def external_use(config: Config, discovery: Discovery | None) -> dict[int, str]:
    """{GPU id: why} for the GPUs of the inventory that show compute processes or memory in
    use (whether a lease holds them is the caller's to judge)."""
    if discovery is None:
        return {}
    found: dict[int, str] = {}
    for process in discovery.processes:
        if process.gpu in config.devices:
            used = f", {process.used_mb} MiB" if process.used_mb >= 0 else ""
            found.setdefault(process.gpu, f"pid {process.pid}{used}")
    for gpu in discovery.gpus:
        if gpu.id not in found and gpu.used_mb > config.external_memory_mb:
            found[gpu.id] = (
                f"{gpu.used_mb} MiB in use (above external_memory_mb {config.external_memory_mb})"
            )
    if discovery.apps_problem:
        for gpu_id in config.gpus:
            found.setdefault(
                gpu_id, f"unknown, processes cannot be listed ({discovery.apps_problem})"
            )
    if found:
        log.debug("GPUs busy outside gpurun: %s", found)
    return found


def process_owner(pid: int) -> str | None:
    """The user name a pid runs as, when this host shows it."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    uid = int(line.split()[1])
                    break
            else:
                return None
    except (OSError, ValueError, IndexError):
        return None
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)

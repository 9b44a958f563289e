"""GPUs narrowed from outside: an inherited $CUDA_VISIBLE_DEVICES, and gpurun inside a job.

A gpurun started with CUDA_VISIBLE_DEVICES set (by Slurm, a container, a parent gpurun) may
hand out only those GPUs. Their names are read as CUDA reads them (the CUDA C Programming
Guide, "CUDA Environment Variables"): indices, which gpurun takes as nvidia-smi's (PCI bus
order, the order CUDA_DEVICE_ORDER=PCI_BUS_ID gives), or UUIDs (GPU-..., MIG-..., or a unique
prefix of one); the list ends at the first name that is neither, as it does for CUDA.
"""

from __future__ import annotations

import os

from gpurun.cpulist import parse_cpulist

TYPE_CHECKING = False
if TYPE_CHECKING:
    from gpurun.gpus import Gpu


def inherited_mask(
    gpus: list[int], devices: dict[int, Gpu]
) -> tuple[tuple[int, ...] | None, str, str]:
    """(the ids $CUDA_VISIBLE_DEVICES allows, or None when unset; "index" or "uuid", the form
    it used; what it named that is not a GPU of this server, "" if nothing)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None, "index", ""
    allowed: list[int] = []
    missing: list[str] = []
    form = "index"
    for name in (part.strip() for part in value.split(",")):
        if not name:
            break
        if name.isdigit():
            gpu_id = int(name)
        elif name.startswith(("GPU-", "MIG-")):
            form = "uuid"
            gpu_id = _by_uuid(name, devices)
        else:
            break
        if gpu_id is None or gpu_id not in gpus:
            missing.append(name)
        elif gpu_id not in allowed:
            allowed.append(gpu_id)
    note = ""
    if missing:
        note = f"$CUDA_VISIBLE_DEVICES names {','.join(missing)}, which this server does not have"
    return tuple(sorted(allowed)), form, note


def _by_uuid(name: str, devices: dict[int, Gpu]) -> int | None:
    matches = [gpu.id for gpu in devices.values() if gpu.uuid.startswith(name)]
    exact = [gpu.id for gpu in devices.values() if gpu.uuid == name]
    if exact:
        return exact[0]
    return matches[0] if len(matches) == 1 else None


def parent_job() -> tuple[str, set[int]] | None:
    """(the job id, its CPUs) when this gpurun runs inside a gpurun job, else None.

    A job's environment has GPURUN_JOB_ID together with GPURUN_GPUS and GPURUN_CPUS; an
    `on_finish` hook gets GPURUN_JOB_ID alone and is no job.
    """
    job = os.environ.get("GPURUN_JOB_ID")
    if not job or "GPURUN_GPUS" not in os.environ or "GPURUN_CPUS" not in os.environ:
        return None
    if not job.isdigit():
        from gpurun.errors import ConfigError

        raise ConfigError("$GPURUN_JOB_ID", f"'{job}' is not a job id")
    try:
        cpus = set(parse_cpulist(os.environ["GPURUN_CPUS"]))
    except ValueError:
        cpus = set()
    if not cpus:
        cpus = set(os.sched_getaffinity(0))
    return job, cpus


def export_gpus(ids: tuple[int, ...], devices: dict[int, Gpu], form: str) -> str:
    """CUDA_VISIBLE_DEVICES for a job on `ids`: indices or UUIDs as `form` says; a MIG slice
    always by its UUID, the only way CUDA can name one."""
    names = []
    for gpu_id in ids:
        gpu = devices.get(gpu_id)
        if gpu is not None and (form == "uuid" or gpu.parent is not None):
            names.append(gpu.uuid)
        else:
            names.append(str(gpu_id))
    return ",".join(names)

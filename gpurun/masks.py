"""GPUs narrowed from outside: an inherited $CUDA_VISIBLE_DEVICES, and gpurun inside a job.

A gpurun started with CUDA_VISIBLE_DEVICES set (by Slurm, a container, a parent gpurun) may
hand out only those GPUs. Their names are read as CUDA reads them (the CUDA C Programming
Guide, "CUDA Environment Variables"): indices, which gpurun takes as nvidia-smi's (PCI bus
order, the order CUDA_DEVICE_ORDER=PCI_BUS_ID gives), or UUIDs (GPU-..., MIG-..., or a unique
prefix of one); the list ends at the first name that is neither, as it does for CUDA. An
index is ASCII digits only: CUDA reads nothing else as a number, so an Arabic-Indic one
or a superscript two ends the list instead of naming GPU 1 or 2.

A gpurun inside a gpurun job subdivides the job's lease, but only when it can prove that it
runs inside that job (`parent_lease`); environment variables alone prove nothing, since anyone
can set them.
"""

from __future__ import annotations

import os

from gpurun.log import get_logger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from gpurun.gpus import Gpu
    from gpurun.ledger import Lease

log = get_logger(__name__)


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
        if name.isascii() and name.isdigit():
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


def parent_lease(state_dir: str, server: str) -> tuple[str, Lease] | None:
    """(the folder of its ledger, the lease) of the gpurun job this process provably runs in.

    Proof is the job's lock, `jobs/SERVER.ID.lock` in the state dir of the ledger that holds
    the job (see liveness.py): gpurun passes it to the command as an open descriptor, so every
    process of the job has it open, and no process outside the job can. The lease must also be
    live, and its id the one $GPURUN_JOB_ID names. A job inside a job has its lock under the
    parent's private state dir (`jobs/SERVER.ID.d/`), so the deepest lock open here names the
    innermost job. A process that closed the descriptors it inherited (Python's subprocess
    does, unless told close_fds=False) is proven instead by one of the job's holders (its
    gpurun or command, by pid and start time) among its ancestors; that works for a job of
    the shared ledger, not for one nested inside another. Anything short of proof (the
    variables set by hand, a copied environment) gives None: this gpurun then uses the
    shared ledger, as one started outside any job does. Costs nothing without
    $GPURUN_JOB_ID, else one ledger read.
    """
    job = os.environ.get("GPURUN_JOB_ID")
    if not job:
        return None
    if not (job.isascii() and job.isdigit()):
        log.debug("$GPURUN_JOB_ID %r is no job id; running as a top-level gpurun", job)
        return None
    found = _deepest_job_lock(os.path.realpath(state_dir), server)
    if found is None:
        # Python's subprocess closes inherited descriptors unless told close_fds=False: then
        # proof is a holder of the job (its gpurun or command, by pid and start time) among
        # this process's ancestors. Only a job of the shared ledger is found this way.
        found = (state_dir, int(job))
        by_ancestry = True
    elif found[1] != int(job):
        log.debug("no lock of job %s is open in this process; running as a top-level gpurun", job)
        return None
    else:
        by_ancestry = False
    folder, lease_id = found

    import time

    from gpurun.errors import LedgerError
    from gpurun.ledger import Ledger

    ledger = Ledger(folder, server)
    try:
        lease = ledger.read().find(lease_id)
    except LedgerError as exc:
        log.debug("job %s's ledger cannot be read (%s); running as a top-level gpurun", job, exc)
        return None
    if lease is None or lease.kind != "job" or lease.state != "running":
        log.debug("job %s holds no lease in %s; running as a top-level gpurun", job, ledger.path)
        return None
    if by_ancestry:
        from gpurun.liveness import ancestry

        mine = ancestry()
        if not any(mine.get(holder.pid) == holder.start for holder in lease.holders):
            log.debug("job %s is not an ancestor of this process; running as top-level", job)
            return None
    if not ledger.alive(lease, time.time()):
        return None
    return folder, lease


def _deepest_job_lock(state_dir: str, server: str) -> tuple[str, int] | None:
    """(the state dir, the job id) of the deepest job lock of `server` under `state_dir` that
    this process has open, checked by inode against the file now at that path."""
    prefix = f"{server}."
    best: tuple[str, int] | None = None
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        folder, name = os.path.split(path)
        if os.path.basename(folder) != "jobs" or not name.startswith(prefix):
            continue
        number = name[len(prefix) :].removesuffix(".lock")
        if not name.endswith(".lock") or not (number.isascii() and number.isdigit()):
            continue
        owner_dir = os.path.dirname(folder)
        if not _inside(owner_dir, state_dir, server):
            continue
        try:
            opened, current = os.fstat(int(fd)), os.stat(path)
        except OSError:
            continue
        if (opened.st_dev, opened.st_ino) != (current.st_dev, current.st_ino):
            continue
        if best is None or len(owner_dir) > len(best[0]):
            best = (owner_dir, int(number))
    return best


def _inside(folder: str, state_dir: str, server: str) -> bool:
    """Whether `folder` is `state_dir` or a job's private state dir nested below it."""
    while folder != state_dir:
        parent, name = os.path.split(folder)
        number = name[len(server) + 1 :].removesuffix(".d")
        if (
            os.path.basename(parent) != "jobs"
            or not name.startswith(f"{server}.")
            or not name.endswith(".d")
            or not (number.isascii() and number.isdigit())
        ):
            return False
        folder = os.path.dirname(parent)
    return True


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

"""Find this host's GPUs for `gpus: auto`: NVML first, then `nvidia-smi`, else none.

What a GPU is to gpurun: an int id in the ledger. A whole GPU's id is its index, the number
`nvidia-smi` shows (PCI bus order). A MIG slice gets `mig_id(index, slice)`, 1000 times its
GPU's index plus one, plus the slice's MIG device index, so slice 2 of GPU 0 is 1002: ids stay
ints (the ledger is unchanged) and never clash with whole GPUs. UUIDs are looked up only to
export them.

NVML (the `pynvml` module of nvidia-ml-py) is imported only here and only when discovery runs;
a host without the library or the driver falls back to `nvidia-smi`, whose command can be set
with $GPURUN_NVIDIA_SMI or `nvidia_smi:` (tests point it at recorded outputs). With either set,
NVML is not tried.
"""

from __future__ import annotations

import os

from gpurun.gpuids import mig_id
from gpurun.log import get_logger
from gpurun.record import record

log = get_logger(__name__)

QUERY = "index,uuid,pci.bus_id,name,memory.total,memory.used,mig.mode.current"
APPS_QUERY = "gpu_uuid,pid,used_memory,process_name"
# Seconds each nvidia-smi call may take. Discovery runs on every launch and before every
# hand-off, so a hung driver must cost little: the inventory query gets a few seconds, the
# others (processes, MIG list, links), which only refine it, less.
QUERY_TIMEOUT = 8.0
SECONDARY_TIMEOUT = 3.0

# Link distances, smaller is closer, from `nvidia-smi topo -m`'s legend: NV# (NVLink with #
# links) beats a single PCIe switch (PIX), several switches (PXB), a host bridge (PHB), the
# same NUMA node (NODE) and the SMP interconnect between nodes (SYS).
LINK_DISTANCE = {"PIX": 10, "PXB": 11, "PHB": 12, "NODE": 13, "SYS": 14}
FARTHEST = 15

_GpuBase = record("_GpuBase", "id index uuid bus_id name memory_mb used_mb parent")
_ProcessBase = record("_ProcessBase", "gpu pid used_mb name")
_DiscoveryBase = record(
    "_DiscoveryBase", "source gpus processes links problem apps_problem", defaults=("",)
)


class Gpu(_GpuBase):
    """A device gpurun hands out: id (int, see the module docstring), index (the MIG device's
    index within its GPU for a slice), uuid, bus_id (PCI, "" unknown), name, memory_mb and
    used_mb (ints, -1 unknown), parent (the GPU's index for a MIG slice, else None)."""

    __slots__ = ()


class Process(_ProcessBase):
    """A compute process on a GPU: gpu (the device's id), pid, used_mb (-1 unknown), name."""

    __slots__ = ()


class Discovery(_DiscoveryBase):
    """What discovery found: source ("nvml", "nvidia-smi" or "none"), gpus (tuple of Gpu, MIG
    slices in place of the GPUs they split), processes (tuple of Process), links ({(a, b):
    distance} between whole GPUs, both orders, empty when unknown), problem ("" or why none
    were found, for `doctor`), apps_problem ("" or why the compute processes could not be
    listed: then `processes` is empty and outside use is unknown, see external.py)."""

    __slots__ = ()


def smi_command(configured: str | None = None) -> list[str] | None:
    """The nvidia-smi command line to run: $GPURUN_NVIDIA_SMI, `nvidia_smi:`, or the PATH's."""
    import shlex
    import shutil

    text = os.environ.get("GPURUN_NVIDIA_SMI") or configured
    if text:
        return shlex.split(text)
    found = shutil.which("nvidia-smi")
    return [found] if found else None


def discover(configured_smi: str | None = None, processes: bool = True) -> Discovery:
    """Ask NVML, else nvidia-smi, for the GPUs, their compute processes and their links.

    Runs on each command that needs the inventory, so a host with `gpus: auto` pays for it
    on every launch; declaring `gpus:` in the config skips it (and with it the check for
    processes outside gpurun).
    """
    problems = []
    if not (os.environ.get("GPURUN_NVIDIA_SMI") or configured_smi):
        try:
            return _discover_nvml(processes)
        except _Unavailable as exc:
            problems.append(f"NVML: {exc}")
            log.debug("NVML unavailable (%s); trying nvidia-smi", exc)
    command = smi_command(configured_smi)
    if command is None:
        problems.append("nvidia-smi: not found on PATH")
        return Discovery("none", (), (), {}, "; ".join(problems))
    try:
        return _discover_smi(command, processes)
    except _Unavailable as exc:
        problems.append(f"nvidia-smi: {exc}")
        log.debug("nvidia-smi failed: %s", exc)
        return Discovery("none", (), (), {}, "; ".join(problems))


def compute_processes(configured_smi: str | None = None) -> tuple[Process, ...]:
    """Only the compute processes, asked again (for a placement long after discovery)."""
    return discover(configured_smi, processes=True).processes


def discover_gpu_ids() -> list[int]:
    """The ids discovery finds; kept for callers that want ids only."""
    return sorted(gpu.id for gpu in discover(processes=False).gpus)


class _Unavailable(Exception):
    """This way of asking for GPUs does not work on this host."""


def _run(command: list[str], *args: str, timeout: float = SECONDARY_TIMEOUT) -> str:
    import subprocess

    try:
        result = subprocess.run(
            [*command, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise _Unavailable(f"cannot run {command[0]}: {exc}") from None
    if result.returncode != 0:
        said = (result.stdout.strip() or result.stderr.strip()).splitlines()
        raise _Unavailable(f"exited {result.returncode}: {said[0] if said else 'no output'}")
    return result.stdout


def _discover_smi(command: list[str], processes: bool) -> Discovery:
    text = _run(
        command, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", timeout=QUERY_TIMEOUT
    )
    whole = []
    mig_on = set()
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 5 or not _digits(fields[0]):
            continue
        index = int(fields[0])
        if any(gpu.index == index or gpu.uuid == fields[1] for gpu in whole):
            log.debug("nvidia-smi listed GPU %d twice; keeping the first line", index)
            continue
        whole.append(
            Gpu(
                index,
                index,
                fields[1],
                _bus_id(fields[2]),
                fields[3],
                _mb(fields[4]),
                _mb(fields[5]) if len(fields) > 5 else -1,
                None,
            )
        )
        if len(fields) > 6 and fields[6].lower() == "enabled":
            mig_on.add(index)
    # The queries after the first only refine what it found, so one that fails or hangs
    # loses what it would have added, never the GPUs: a GPU whose MIG slices cannot be listed
    # has none to hand out, and unknown processes are reported as such.
    slices: dict[int, list[Gpu]] = {}
    if mig_on:
        try:
            slices = parse_mig_list(_run(command, "-L"), whole)
        except _Unavailable as exc:
            log.debug("cannot list MIG slices: %s", exc)
    gpus = _with_slices(whole, mig_on, slices)
    found = []
    apps_problem = ""
    if processes and gpus:
        try:
            apps = _run(
                command, f"--query-compute-apps={APPS_QUERY}", "--format=csv,noheader,nounits"
            )
            found = parse_apps(apps, whole, gpus)
        except _Unavailable as exc:
            apps_problem = f"nvidia-smi --query-compute-apps: {exc}"
            log.debug("cannot list compute processes: %s", exc)
    links: dict[tuple[int, int], int] = {}
    if len(whole) > 1:
        try:
            links = parse_topo(_run(command, "topo", "-m"))
        except _Unavailable as exc:
            log.debug("no link topology: %s", exc)
    return Discovery("nvidia-smi", tuple(gpus), tuple(found), links, "", apps_problem)


def parse_mig_list(text: str, whole: list[Gpu]) -> dict[int, list[Gpu]]:
    """MIG slices by GPU index from `nvidia-smi -L`, whose lines read
    `GPU 0: NAME (UUID: GPU-...)` then `  MIG 1g.5gb Device 0: (UUID: MIG-...)`."""
    slices: dict[int, list[Gpu]] = {}
    parent = None
    by_index = {gpu.index: gpu for gpu in whole}
    for line in text.splitlines():
        words = line.strip()
        if words.startswith("GPU ") and ":" in words:
            number = words[4 : words.index(":")]
            parent = int(number) if _digits(number) else None
        elif words.startswith("MIG ") and parent in by_index and "UUID: " in words:
            head, _, rest = words.partition(" Device ")
            number = rest.split(":", 1)[0].strip()
            uuid = rest.split("UUID: ", 1)[1].rstrip(") ").strip()
            if not _digits(number):
                continue
            if any(g.id == mig_id(parent, int(number)) for g in slices.get(parent, ())):
                continue
            gpu = by_index[parent]
            slices.setdefault(parent, []).append(
                Gpu(
                    mig_id(parent, int(number)),
                    int(number),
                    uuid,
                    gpu.bus_id,
                    f"{gpu.name} {head[4:].strip()}",
                    -1,
                    -1,
                    parent,
                )
            )
    return slices


def parse_apps(text: str, whole: list[Gpu], gpus: list[Gpu]) -> list[Process]:
    """Compute processes from `--query-compute-apps=gpu_uuid,pid,used_memory,process_name`.

    A process on a GPU with MIG on is reported with the GPU's UUID, not its slice's, so it is
    kept under the GPU's index, which is no id of the inventory: it is shown, but blocks no
    slice."""
    by_uuid = {gpu.uuid: gpu.index for gpu in whole}
    by_uuid.update({gpu.uuid: gpu.id for gpu in gpus})
    found = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",", 3)]
        if len(fields) < 2 or not _digits(fields[1]):
            continue
        gpu_id = by_uuid.get(fields[0])
        if gpu_id is None:
            continue
        used = _mb(fields[2]) if len(fields) > 2 else -1
        found.append(Process(gpu_id, int(fields[1]), used, fields[3] if len(fields) > 3 else ""))
    return found


def parse_topo(text: str) -> dict[tuple[int, int], int]:
    """The link distance between each pair of GPUs in `nvidia-smi topo -m`'s matrix."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return {}
    columns = lines[0].split()
    gpu_columns = [i for i, name in enumerate(columns) if name.startswith("GPU")]
    links: dict[tuple[int, int], int] = {}
    for line in lines[1:]:
        cells = line.split()
        if not cells or not cells[0].startswith("GPU") or not _digits(cells[0][3:]):
            continue
        a = int(cells[0][3:])
        for column in gpu_columns:
            if column + 1 >= len(cells) or not _digits(columns[column][3:]):
                continue
            b = int(columns[column][3:])
            if a != b:
                links[(a, b)] = link_distance(cells[column + 1])
    return links


def link_distance(label: str) -> int:
    """NV12 -> 1 (more NVLinks are closer), PIX -> 10 ... SYS -> 14, anything else farthest."""
    if label.startswith("NV") and _digits(label[2:]):
        return max(1, 10 - int(label[2:]))
    return LINK_DISTANCE.get(label, FARTHEST)


def _with_slices(whole: list[Gpu], mig_on: set[int], slices: dict[int, list[Gpu]]) -> list[Gpu]:
    """Whole GPUs, each with MIG on replaced by its slices (none if it has none yet)."""
    gpus = []
    for gpu in sorted(whole, key=lambda g: g.index):
        if gpu.index in mig_on:
            gpus.extend(sorted(slices.get(gpu.index, []), key=lambda g: g.id))
        else:
            gpus.append(gpu)
    return gpus


def _bus_id(text: str) -> str:
    """A PCI bus id as sysfs spells it: nvidia-smi's 00000000:07:00.0 is 0000:07:00.0."""
    text = text.strip().lower()
    if text.count(":") == 2 and len(text.split(":")[0]) == 8:
        text = text[4:]
    return text


def _digits(text: str) -> bool:
    """Whether `text` is a whole number in ASCII digits, the only ones int() should get here
    (str.isdigit() is true for "²", which int() refuses)."""
    return text.isascii() and text.isdigit()


def _mb(text: str) -> int:
    text = text.strip().removesuffix("MiB").strip()
    return int(text) if _digits(text) else -1


def _discover_nvml(processes: bool) -> Discovery:
    try:
        import pynvml
    except ImportError:
        raise _Unavailable("nvidia-ml-py is not installed") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise _Unavailable(str(exc)) from None
    try:
        return _ask_nvml(pynvml, processes)
    except pynvml.NVMLError as exc:
        raise _Unavailable(str(exc)) from None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _ask_nvml(nvml: object, processes: bool) -> Discovery:
    whole, handles, mig_on = [], {}, set()
    slices: dict[int, list[Gpu]] = {}
    found: list[Process] = []
    apps_problem = ""
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        handles[index] = handle
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        gpu = Gpu(
            index,
            index,
            _text(nvml.nvmlDeviceGetUUID(handle)),
            _bus_id(_text(nvml.nvmlDeviceGetPciInfo(handle).busId)),
            _text(nvml.nvmlDeviceGetName(handle)),
            memory.total // 2**20,
            memory.used // 2**20,
            None,
        )
        whole.append(gpu)
        try:
            current, _ = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError:
            current = 0
        if current:
            mig_on.add(index)
            for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                try:
                    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
                except nvml.NVMLError:
                    continue
                size = nvml.nvmlDeviceGetMemoryInfo(mig)
                slices.setdefault(index, []).append(
                    Gpu(
                        mig_id(index, slot),
                        slot,
                        _text(nvml.nvmlDeviceGetUUID(mig)),
                        gpu.bus_id,
                        _text(nvml.nvmlDeviceGetName(mig)),
                        size.total // 2**20,
                        size.used // 2**20,
                        index,
                    )
                )
        if processes and not apps_problem:
            try:
                apps = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except nvml.NVMLError as exc:
                apps_problem = f"NVML compute processes: {exc}"
                found = []
                apps = []
            for app in apps:
                used = app.usedGpuMemory
                found.append(Process(index, app.pid, -1 if used is None else used // 2**20, ""))
    links: dict[tuple[int, int], int] = {}
    for a in handles:
        for b in handles:
            if a < b:
                distance = _nvml_distance(nvml, handles[a], handles[b], whole[b].bus_id)
                links[(a, b)] = links[(b, a)] = distance
    gpus = _with_slices(whole, mig_on, slices)
    return Discovery("nvml", tuple(gpus), tuple(found), links, "", apps_problem)


def _nvml_distance(nvml: object, a: object, b: object, b_bus: str) -> int:
    """The link distance NVML reports: NVLinks from a to b first, else their PCIe ancestor."""
    links = 0
    for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            if not nvml.nvmlDeviceGetNvLinkState(a, link):
                continue
            remote = _bus_id(_text(nvml.nvmlDeviceGetNvLinkRemotePciInfo(a, link).busId))
        except nvml.NVMLError:
            break
        if remote == b_bus:
            links += 1
    if links:
        return max(1, 10 - links)
    try:
        level = nvml.nvmlDeviceGetTopologyCommonAncestor(a, b)
    except nvml.NVMLError:
        return FARTHEST
    # NVML_TOPOLOGY_INTERNAL 0, SINGLE 10, MULTIPLE 20, HOSTBRIDGE 30, NODE 40, SYSTEM 50.
    return {0: 10, 10: 10, 20: 11, 30: 12, 40: 13, 50: 14}.get(int(level), FARTHEST)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

"""Where GPUs and CPUs sit: NUMA nodes, hyperthread siblings and GPU links, read from sysfs.

Read only when there is something to place by: GPUs with PCI bus ids (from discovery, or
`gpus:` listing UUIDs), or a sysfs root set with $GPURUN_SYSFS_ROOT or `sysfs_root:`. A config
that declares `gpus: 4` on the real /sys reads nothing, and placement falls back to lowest ids.
The files are those of sysfs-devices-node and sysfs-devices-system-cpu in the kernel's
Documentation/ABI: `bus/pci/devices/BUS/numa_node`, `devices/system/node/nodeN/cpulist` and
`distance`, and `devices/system/cpu/cpuN/topology/thread_siblings_list`.
"""

from __future__ import annotations

import os

from gpurun.cpulist import parse_cpulist
from gpurun.record import record

DEFAULT_SYSFS = "/sys"

_TopologyBase = record("_TopologyBase", "gpu_node gpu_links cpu_node cpu_core node_distance")


class Topology(_TopologyBase):
    """gpu_node: {gpu id: NUMA node}; gpu_links: {(a, b): link distance, smaller closer};
    cpu_node: {cpu: node}; cpu_core: {cpu: tuple of its core's threads}; node_distance:
    {(a, b): the kernel's distance, 10 for a node to itself}. Unknown entries are missing."""

    __slots__ = ()


NO_TOPOLOGY = Topology({}, {}, {}, {}, {})


def sysfs_root(configured: str | None = None) -> str:
    return os.environ.get("GPURUN_SYSFS_ROOT") or configured or DEFAULT_SYSFS


def read_topology(
    root: str, gpu_buses: dict[int, str], links: dict[tuple[int, int], int]
) -> Topology:
    """Read the NUMA nodes of the GPUs (by id, from their bus ids) and of every CPU.

    A machine without NUMA (no node folders) reads as one node 0; a GPU whose numa_node is
    -1 (the kernel's "unknown") is left out and placed as if it had no node.
    """
    gpu_node = {}
    for gpu_id, bus in gpu_buses.items():
        if not bus:
            continue
        value = _read(os.path.join(root, "bus", "pci", "devices", bus, "numa_node"))
        if value is not None and value.lstrip("-").isdigit() and int(value) >= 0:
            gpu_node[gpu_id] = int(value)

    cpu_node: dict[int, int] = {}
    node_distance: dict[tuple[int, int], int] = {}
    node_dir = os.path.join(root, "devices", "system", "node")
    try:
        names = os.listdir(node_dir)
    except OSError:
        names = []
    nodes = sorted(
        int(name[4:]) for name in names if name.startswith("node") and name[4:].isdigit()
    )
    for node in nodes:
        text = _read(os.path.join(node_dir, f"node{node}", "cpulist"))
        for cpu in _cpulist(text):
            cpu_node[cpu] = node
        distances = (_read(os.path.join(node_dir, f"node{node}", "distance")) or "").split()
        for other, distance in zip(nodes, distances, strict=False):
            if distance.isdigit():
                node_distance[(node, other)] = int(distance)

    cpu_core: dict[int, tuple[int, ...]] = {}
    cpu_dir = os.path.join(root, "devices", "system", "cpu")
    online = _cpulist(_read(os.path.join(cpu_dir, "online")))
    for cpu in online:
        if cpu in cpu_core:
            continue
        path = os.path.join(cpu_dir, f"cpu{cpu}", "topology", "thread_siblings_list")
        # Cores must not overlap: a sibling list that names a thread another core already
        # has (an asymmetric tree, cpu16 saying "0,16" while cpu0 says "0,32") keeps only the
        # threads no core has yet, and always the CPU itself.
        listed = _cpulist(_read(path))
        siblings = tuple(sorted({cpu, *(s for s in listed if s not in cpu_core)}))
        for sibling in siblings:
            cpu_core[sibling] = siblings
    if not nodes:
        cpu_node = dict.fromkeys(online, 0)
    return Topology(gpu_node, dict(links), cpu_node, cpu_core, node_distance)


def online_cpus(root: str) -> list[int]:
    """The online CPUs of the tree at `root` (for a fake tree, not this host's)."""
    return _cpulist(_read(os.path.join(root, "devices", "system", "cpu", "online")))


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cpulist(text: str | None) -> list[int]:
    try:
        return parse_cpulist(text or "")
    except ValueError:
        return []

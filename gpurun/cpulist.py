"""Linux cpulist strings ("0-3,8,10-11"), as in cpuset(7) and /sys/devices/system/cpu/online."""

from __future__ import annotations

# The kernel's largest NR_CPUS (CONFIG_NR_CPUS_RANGE_END); no id in a real cpulist is higher.
MAX_CPUS = 8192


def parse_cpulist(text: str) -> list[int]:
    """Return the sorted, unique ids in a cpulist; raise ValueError naming the bad part.

    An empty string is the empty list, as the kernel writes it for an empty set.
    """
    ids: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            if text.strip():
                raise ValueError(f"empty item in cpulist '{text}'")
            continue
        low, sep, high = part.partition("-")
        if not (low.strip().isdigit() and (not sep or high.strip().isdigit())):
            raise ValueError(f"'{part}' is not a CPU id or a range like 0-7")
        first = int(low)
        last = int(high) if sep else first
        if last < first:
            raise ValueError(f"range '{part}' runs backwards")
        if last >= MAX_CPUS:
            raise ValueError(f"CPU id {last} is too large; Linux counts at most {MAX_CPUS} CPUs")
        ids.update(range(first, last + 1))
    return sorted(ids)


def format_cpulist(ids: list[int] | tuple[int, ...]) -> str:
    """Return the shortest cpulist for `ids` ("" when empty)."""
    runs: list[str] = []
    ordered = sorted(set(ids))
    start = 0
    while start < len(ordered):
        end = start
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[end] + 1:
            end += 1
        first, last = ordered[start], ordered[end]
        runs.append(str(first) if first == last else f"{first}-{last}")
        start = end + 1
    return ",".join(runs)


def online_cpus() -> list[int]:
    """The CPUs the kernel has online on this host, whatever this process's affinity."""
    try:
        with open("/sys/devices/system/cpu/online") as f:
            return parse_cpulist(f.read())
    except (OSError, ValueError):
        import os

        return list(range(os.cpu_count() or 1))

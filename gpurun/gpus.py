"""Find this host's GPUs for `gpus: auto`."""

from __future__ import annotations

import os
import shutil

from gpurun.log import get_logger

log = get_logger(__name__)

QUERY = "index,uuid,pci.bus_id,name,memory.total"


def discover_gpu_ids() -> list[int]:
    """Return the GPU indices `nvidia-smi` reports; none when it is missing or fails.

    The query runs on each command that needs the inventory, so a host with `gpus: auto`
    pays for one `nvidia-smi` call; declare `gpus:` in the config to skip it.
    """
    command = os.environ.get("GPURUN_NVIDIA_SMI") or shutil.which("nvidia-smi")
    if not command:
        log.debug("no nvidia-smi on PATH; 0 GPUs")
        return []
    import subprocess

    try:
        result = subprocess.run(
            [command, f"--query-gpu={QUERY}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("nvidia-smi failed: %s", exc)
        return []
    if result.returncode != 0:
        log.debug("nvidia-smi exited %d: %s", result.returncode, result.stderr.strip())
        return []
    ids = []
    for line in result.stdout.splitlines():
        first = line.split(",", 1)[0].strip()
        if first.isdigit():
            ids.append(int(first))
    return sorted(set(ids))

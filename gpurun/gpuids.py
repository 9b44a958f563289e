"""GPU ids as the ledger keeps them, apart from discovery so that placing and admitting jobs
on declared GPUs imports none of it: a whole GPU's id is its index, a MIG slice's is
MIG_BASE * (GPU index + 1) + the slice's index (see gpus.py)."""

from __future__ import annotations

MIG_BASE = 1000


def mig_id(index: int, slice_index: int) -> int:
    return MIG_BASE * (index + 1) + slice_index


def is_mig(gpu_id: int) -> bool:
    return gpu_id >= MIG_BASE

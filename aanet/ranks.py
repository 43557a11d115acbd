"""Which process of a ``torchrun`` launch this one is (rank 0 alone logs, draws and writes)."""

from __future__ import annotations

import os

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``: the process group's once joined, else what ``torchrun`` put in the
    environment (``RANK``, ``WORLD_SIZE``); ``(0, 1)`` for a plain process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this is rank 0 (or the only process)."""
    return rank_and_world()[0] == 0

"""Which process of a ``torchrun`` launch this one is (rank 0 alone logs, draws and writes)."""

from __future__ import annotations

import os

import torch.distributed as dist


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"{name}: expected a whole number (torchrun sets it), got {text!r}"
        ) from None


def _given(*names: str) -> str:
    """The variables ``names`` as the environment has them (``RANK=1, WORLD_SIZE unset``)."""
    return ", ".join(
        f"{name}={os.environ[name]}" if name in os.environ else f"{name} unset" for name in names
    )


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``: the process group's once joined, else what ``torchrun`` put in the
    environment (``RANK``, ``WORLD_SIZE``); ``(0, 1)`` for a plain process. Values that no launch
    sets are refused: a ``RANK`` of 1 left in a shell without ``WORLD_SIZE`` made one process that
    trained as a rank other than 0, writing and logging nothing."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(
            f"{_given('RANK', 'WORLD_SIZE')}: not a process of a torchrun launch, which sets "
            "0 <= RANK < WORLD_SIZE; unset them to run one process, or start it with torchrun"
        )
    return rank, world


def local_rank() -> int:
    """``LOCAL_RANK``, this process's index on its machine (its GPU under ``torchrun``): 0 when
    unset."""
    local = _env_int("LOCAL_RANK", 0)
    if local < 0:
        raise ValueError(f"LOCAL_RANK: cannot be negative, got {local}")
    return local


def is_main_process() -> bool:
    """Whether this is rank 0 (or the only process)."""
    return rank_and_world()[0] == 0

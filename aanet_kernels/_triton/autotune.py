"""Block sizes and warps for the attention_2d Triton kernels.

A key tile is ``BLOCK_N`` columns of one row of the key grid (tiles.py), so ``BLOCK_N`` follows the
row length (:func:`key_block`) and is not tuned. Each kernel autotunes its query block ``BLOCK_M``,
warps and pipeline stages over a small set keyed on ``(L, DKH, DVH, COLS, ROW_STRIDE)`` (Triton
adds the tensor dtypes), pruned of configurations that spill registers at common shapes
(``benchmarks/kernel_resources.py`` prints what each one asks of sm_80 and sm_90). Under the
interpreter (``TRITON_INTERPRET=1``) every kernel gets one fixed configuration with tiles small
enough that CPU tests cross several query tiles, row chunks and masked tails without timing
anything; ``AANET_KERNELS_TRITON_AUTOTUNE=0`` pins each kernel to its first configuration on a GPU.
"""

from __future__ import annotations

import os

import triton

from aanet_kernels.backends import triton_interpreted

AUTOTUNE_KEY = ["L", "DKH", "DVH", "COLS", "ROW_STRIDE"]

# Widest key tile: a wider image row is split into chunks of this many columns.
MAX_KEY_BLOCK = 64
INTERPRETED_KEY_BLOCK = 16


# (BLOCK_M, warps, stages) of each kernel's configurations; the first is the one used when
# autotuning is off. Picked with benchmarks/kernel_resources.py: every one is spill-free on sm_80
# and sm_90 at the benchmark shapes.
GPU_CONFIGS = {
    "fwd": [(32, 4, 2), (128, 8, 3), (64, 4, 3), (64, 8, 2), (16, 4, 1)],
    "dkdv": [(32, 4, 2), (64, 8, 2), (64, 4, 2), (32, 8, 2), (16, 4, 1)],
    "dq": [(32, 8, 2), (64, 8, 2), (32, 4, 2), (16, 8, 1), (16, 4, 1)],
}
# Under the interpreter: BLOCK_M != BLOCK_N, so that tests cross query tiles and key tiles apart.
INTERPRETED_BLOCK_M = {"fwd": 32, "dkdv": 16, "dq": 32}
AUTOTUNE_ENV = "AANET_KERNELS_TRITON_AUTOTUNE"


def autotuning() -> bool:
    """``False`` when ``AANET_KERNELS_TRITON_AUTOTUNE=0``: each kernel then runs its first
    configuration. Autotuning compiles and times every configuration for each new (shape,
    dtype), seconds per shape, which a test suite with dozens of shapes does not need
    (tests/conftest.py)."""
    return os.environ.get(AUTOTUNE_ENV, "1") != "0"


def _config(block_m: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=stages)


def configs(kernel: str, every: bool = False) -> list[triton.Config]:
    """The configurations ``kernel`` (``"fwd"``, ``"dkdv"`` or ``"dq"``) autotunes over, as this
    process runs it (one under the interpreter or with autotuning off); ``every=True``: the whole
    GPU list regardless."""
    if every:
        return [_config(*c) for c in GPU_CONFIGS[kernel]]
    if triton_interpreted():
        return [_config(INTERPRETED_BLOCK_M[kernel], 4, 1)]
    if not autotuning():
        return [_config(*GPU_CONFIGS[kernel][0])]
    return [_config(*c) for c in GPU_CONFIGS[kernel]]


def padded_dim(size: int) -> int:
    """A head dim or row width padded to a power of two of at least 16 (what ``tl.dot`` takes)."""
    return max(16, triton.next_power_of_2(size))


def key_block(row_length: int) -> int:
    """``BLOCK_N``: the whole row padded to a power of two, up to the widest key tile."""
    widest = INTERPRETED_KEY_BLOCK if triton_interpreted() else MAX_KEY_BLOCK
    return min(padded_dim(row_length), widest)


def tile_fill(row_length: int) -> float:
    """The fraction of key-tile slots that hold a key when rows of this length are tiled."""
    block = key_block(row_length)
    return row_length / (triton.cdiv(row_length, block) * block)


def preprocess_block(dv_padded: int) -> int:
    """Rows per program of the backward preprocess (not autotuned): two ``rows x dv`` tiles in
    registers, about 2048 elements each, which stays spill-free up to head dim 256."""
    return max(8, min(64, 2048 // dv_padded))

"""Block sizes and warps for the attention_2d Triton kernels.

Each kernel autotunes over a small, hand-pruned set keyed on ``(L, DKH, DVH)`` (Triton adds the
tensor dtypes to the key). Under the interpreter (``TRITON_INTERPRET=1``) every kernel gets one
fixed, small configuration with ``BLOCK_M != BLOCK_N``, so that CPU tests cross several tiles and
masked tails without timing anything.
"""

from __future__ import annotations

import triton

from aanet_kernels.backends import triton_interpreted

AUTOTUNE_KEY = ["L", "DKH", "DVH"]

# Widest head dim the kernels take: q/k/v tiles and accumulators live in registers.
MAX_HEAD_DIM = 256


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages
    )


def _pick(
    gpu: list[tuple[int, int, int, int]], interpreted: tuple[int, int]
) -> list[triton.Config]:
    if triton_interpreted():
        return [_config(*interpreted, 4, 1)]
    return [_config(*c) for c in gpu]


def forward_configs() -> list[triton.Config]:
    """Forward: BLOCK_M queries per program, BLOCK_N keys per inner step."""
    return _pick(
        [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 1)],
        interpreted=(32, 16),
    )


def dkdv_configs() -> list[triton.Config]:
    """dK/dV: BLOCK_N keys per program, BLOCK_M queries per inner step."""
    return _pick(
        [(64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 1)],
        interpreted=(16, 32),
    )


def dq_configs() -> list[triton.Config]:
    """dQ and bias gradients: BLOCK_M queries per program, BLOCK_N keys per inner step."""
    return _pick(
        [(128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1)],
        interpreted=(32, 16),
    )


def padded_dim(size: int) -> int:
    """A head dim or table width padded to a power of two of at least 16 (what ``tl.dot`` takes)."""
    return max(16, triton.next_power_of_2(size))

"""The size limits of the GPU kernels. Each GPU backend refuses a call past its limits, naming the
argument; ``auto`` passes over a backend whose limits a call exceeds, to the next one in its order.
"""

from __future__ import annotations

from torch import Tensor

# Widest head dim (max of dkh, dvh) each kernel takes: the Triton kernels keep q/k/v tiles and
# accumulators in registers; the CUDA ones compile tile shapes up to 128 (attention_2d_cuda.cpp).
MAX_HEAD_DIM = {"triton": 256, "cuda": 128}
# CUDA's limit on grid axes 1 and 2, where both GPU backends put heads and batch.
MAX_GRID_YZ = 65535
# The Triton kernels index q, k, v, out and grad_out within one (batch, head) slice with int32
# offsets (batch and head offsets, and every offset into the bias tables, are int64).
TRITON_MAX_SLICE_OFFSET = 2**31 - 1
# The longest L the CUDA kernels take (they count positions in int; the check is in
# attention_2d_cuda.cpp).
CUDA_MAX_LENGTH = (2**31 - 1) // 2


def slice_reach(t: Tensor) -> int:
    """The largest element offset within one (batch, head) slice of a ``(B, Nh, L, d)`` tensor:
    ``L * d - 1`` when contiguous, further through a strided view's strides."""
    length, dim = t.shape[2], t.shape[3]
    return max((length - 1) * t.stride(2) + (dim - 1) * t.stride(3), length * dim - 1)


def exceeds_limits(backend: str, q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether ``backend`` would refuse a call on ``q``, ``k``, ``v`` for its size (the CPU and
    reference backends have no such limits)."""
    if backend not in MAX_HEAD_DIM:
        return False
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM[backend]:
        return True
    if q.shape[0] > MAX_GRID_YZ or q.shape[1] > MAX_GRID_YZ:
        return True
    if backend == "cuda":
        return q.shape[2] > CUDA_MAX_LENGTH
    return max(slice_reach(t) for t in (q, k, v)) > TRITON_MAX_SLICE_OFFSET

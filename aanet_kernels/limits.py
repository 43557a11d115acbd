"""The size limits of the kernels. Each backend refuses a call past its limits, naming the
argument; ``auto`` passes over a backend whose limits a call exceeds, to the next one in its order.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from aanet_kernels._extension import has_kernel

# The head dims the CUDA kernels are compiled for: a call's larger of dkh and dvh is padded up to
# one of them (kHeadDims in csrc/cuda/attention_2d_cuda.h).
CUDA_HEAD_DIMS = (16, 32, 64, 128)
# Widest head dim (max of dkh, dvh) each kernel takes: the Triton kernels keep q/k/v tiles and
# accumulators in registers; the CUDA ones compile tile shapes up to 128.
MAX_HEAD_DIM = {"triton": 256, "cuda": CUDA_HEAD_DIMS[-1]}
# CUDA's limit on grid axes 1 and 2, where both GPU backends put heads and batch.
MAX_GRID_YZ = 65535
# The Triton kernels index q, k, v, out and grad_out within one (batch, head) slice with int32
# offsets (batch and head offsets, and every offset into the bias tables, are int64).
TRITON_MAX_SLICE_OFFSET = 2**31 - 1
# The longest L the CUDA kernels take (they count positions in int; the check is in
# attention_2d_cuda.cpp).
CUDA_MAX_LENGTH = (2**31 - 1) // 2
# The CPU kernel hands head dims (and key blocks, up to the map width) to BLAS, whose sizes are int
# (check_blas_sizes in attention_2d_cpu.cpp). A width past it needs L >= 2^31: no memory holds that.
CPU_MAX_HEAD_DIM = 2**31 - 1


def slice_reach(t: Tensor) -> int:
    """The largest element offset within one (batch, head) slice of a ``(B, Nh, L, d)`` tensor:
    ``L * d - 1`` when contiguous, further through a strided view's strides."""
    length, dim = t.shape[2], t.shape[3]
    return max((length - 1) * t.stride(2) + (dim - 1) * t.stride(3), length * dim - 1)


@functools.cache
def cuda_smem_bytes(dtype: torch.dtype, head_dim: int, backward: bool) -> int:
    """The most shared memory one block of the ``cuda`` backend's forward (or backward) kernels
    asks for on ``dtype`` at ``head_dim``, as the built extension computes it (host arithmetic:
    no GPU needed). Needs the extension built with its CUDA kernels."""
    op = torch.ops.aanet_kernels.attention_2d_cuda_smem_bytes
    return op(dtype, head_dim, head_dim, backward)


def cuda_smem_exceeds(dtype: torch.dtype, head_dim: int, needs_grad: bool, limit: int) -> bool:
    """Whether a call at ``head_dim`` on ``dtype`` (and its backward, if ``needs_grad``) has a
    ``cuda`` kernel whose block needs more shared memory than ``limit`` bytes. On sm_86/sm_89
    (101,376 bytes a block) the fp64 backward at head dims past 64 does."""
    passes = (False, True) if needs_grad else (False,)
    return any(cuda_smem_bytes(dtype, head_dim, backward) > limit for backward in passes)


# Traced as a constant under torch.compile: the device's limit and the extension's figures are
# fixed for a process, and Dynamo cannot trace the op call (no tensors in or out).
@torch.compiler.assume_constant_result
def _exceeds_device_smem(
    device: torch.device, dtype: torch.dtype, head_dim: int, needs_grad: bool
) -> bool:
    if not has_kernel("attention_2d_fwd", "CUDA"):
        return False  # no cuda backend to pass over
    properties = torch.cuda.get_device_properties(device)
    limit = getattr(properties, "shared_memory_per_block_optin", None)
    return limit is not None and cuda_smem_exceeds(dtype, head_dim, needs_grad, limit)


def exceeds_limits(backend: str, q: Tensor, k: Tensor, v: Tensor, needs_grad: bool = False) -> bool:
    """Whether ``backend`` would refuse a call on ``q``, ``k``, ``v`` (and, if ``needs_grad``,
    its backward) for its size (the reference backend has no such limits)."""
    head_dim = max(q.shape[-1], v.shape[-1])
    if backend == "cpu":
        return head_dim > CPU_MAX_HEAD_DIM
    if backend not in MAX_HEAD_DIM:
        return False
    if head_dim > MAX_HEAD_DIM[backend]:
        return True
    if q.shape[0] > MAX_GRID_YZ or q.shape[1] > MAX_GRID_YZ:
        return True
    if backend == "cuda":
        if q.shape[2] > CUDA_MAX_LENGTH:
            return True
        if q.device.type != "cuda":
            return False
        padded = next(size for size in CUDA_HEAD_DIMS if head_dim <= size)
        return _exceeds_device_smem(q.device, q.dtype, padded, needs_grad)
    return max(slice_reach(t) for t in (q, k, v)) > TRITON_MAX_SLICE_OFFSET

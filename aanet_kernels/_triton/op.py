"""The Triton ops ``aanet_kernels::attention_2d_triton_fwd`` / ``attention_2d_triton_bwd``.

Declared with ``torch.library.triton_op`` and launched through ``wrap_triton``, so that
``torch.compile(fullgraph=True)`` sees the kernels; ``triton_op`` derives the fake (meta)
implementations by running these functions on fake tensors, which gives the same shapes and dtypes
as ``ops.fake_attention_2d_fwd/bwd``. Autograd is the shared ``ops.register_attention_2d_autograd``.
The schemas are those of the C++ ops in ``csrc/ops.cpp`` (torch 2.11 ignores ``schema=`` and infers
the same arguments, with ``SymInt`` sizes and unnamed returns; a symbolic ``height``/``width`` is
then specialised, as every constexpr argument of a traced Triton kernel is).
"""

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from aanet_kernels._triton.autotune import MAX_HEAD_DIM, key_block, padded_dim, preprocess_block
from aanet_kernels._triton.backward import (
    attention_2d_bwd_dkdv_kernel,
    attention_2d_bwd_dq_kernel,
    attention_2d_bwd_preprocess_kernel,
)
from aanet_kernels._triton.forward import attention_2d_fwd_kernel
from aanet_kernels.backends import triton_interpreted
from aanet_kernels.ops import lse_dtype, register_attention_2d_autograd

FWD_NAME = "aanet_kernels::attention_2d_triton_fwd"
BWD_NAME = "aanet_kernels::attention_2d_triton_bwd"


def _launcher(kernel):
    """``wrap_triton(kernel)``, which lets ``torch.compile`` trace the launch; under the
    interpreter the kernel itself (torch 2.11's ``wrap_triton`` refuses an interpreted
    ``@triton.jit`` kernel, newer versions hand it back unchanged)."""
    return kernel if triton_interpreted() else wrap_triton(kernel)


_FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? bias_h, Tensor? bias_w, int height, int width, "
    "float scale) -> (Tensor out, Tensor lse)"
)
_BWD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? bias_h, Tensor? bias_w, Tensor out, "
    "Tensor lse, int height, int width, float scale) -> "
    "(Tensor dq, Tensor dk, Tensor dv, Tensor dbias_h, Tensor dbias_w)"
)


def _check_head_dims(q: Tensor, v: Tensor) -> None:
    for name, size in (("q", q.shape[-1]), ("v", v.shape[-1])):
        if size > MAX_HEAD_DIM:
            raise ValueError(
                f"{name}: the triton backend takes head dims up to {MAX_HEAD_DIM}, got {size}; "
                "use backend='cuda' or 'reference'"
            )


def _bias_args(bias: Tensor | None, q: Tensor, size: int) -> tuple[Tensor, int, int, int, int]:
    """The bias (or ``q`` as an unused placeholder) and its four strides at full size; a broadcast
    dim reads with stride 0."""
    if bias is None:
        return q, 0, 0, 0, 0
    full = bias.expand(q.shape[0], q.shape[1], q.shape[2], size)
    return full, *full.stride()


def _common(q: Tensor, scale: float) -> tuple[Tensor, dict[str, object]]:
    """The scale as a one-element tensor in the accumulator dtype (a Python float argument would
    reach the kernel as fp32, too coarse for fp64), and the ``tl.dot`` precision: IEEE (no TF32)
    for fp32/fp64; fp16/bf16 products run on tensor cores whatever this says."""
    scale_t = torch.full((1,), scale, dtype=lse_dtype(q.dtype), device=q.device)
    wide = q.dtype in (torch.float32, torch.float64)
    return scale_t, {"PRECISION": "ieee" if wide else "tf32"}


@triton_op(FWD_NAME, mutates_args=(), schema=_FWD_SCHEMA)
def attention_2d_triton_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias_h: Tensor | None,
    bias_w: Tensor | None,
    height: int,
    width: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Forward: ``(out, lse)``, both contiguous; see ``aanet_kernels.attention_2d`` for the math."""
    _check_head_dims(q, v)
    batch, heads, length, dkh = q.shape
    dvh = v.shape[-1]
    out = q.new_empty((batch, heads, length, dvh))
    lse = q.new_empty((batch, heads, length), dtype=lse_dtype(q.dtype))
    scale_t, meta = _common(q, scale)
    bh, *bh_strides = _bias_args(bias_h, q, height)
    bw, *bw_strides = _bias_args(bias_w, q, width)
    if out.numel() == 0:  # an empty batch: nothing to launch
        return out, lse

    def grid(launch: dict[str, int]) -> tuple[int, int]:
        return (triton.cdiv(length, launch["BLOCK_M"]), batch * heads)

    _launcher(attention_2d_fwd_kernel)[grid](
        q, k, v, bh, bw, scale_t, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *bh_strides, *bw_strides, *out.stride(),
        heads, length, dkh, dvh, height, width,
        HAS_BH=bias_h is not None, HAS_BW=bias_w is not None,
        DK=padded_dim(dkh), DV=padded_dim(dvh), BLOCK_N=key_block(width), **meta,
    )  # fmt: skip
    return out, lse


@triton_op(BWD_NAME, mutates_args=(), schema=_BWD_SCHEMA)
def attention_2d_triton_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias_h: Tensor | None,
    bias_w: Tensor | None,
    out: Tensor,
    lse: Tensor,
    height: int,
    width: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward: ``(dq, dk, dv, dbias_h, dbias_w)``, contiguous; a bias gradient is full size
    ``(B, Nh, L, height|width)``, or a 0-element tensor when that bias is absent."""
    _check_head_dims(q, v)
    batch, heads, length, dkh = q.shape
    dvh = v.shape[-1]
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    dq = q.new_empty(q.shape)
    dk = q.new_empty(k.shape)
    dv = q.new_empty(v.shape)
    # dbias_h in the accumulator dtype: the dQ kernel adds to it once per chunk of a wide row.
    dbias_h = q.new_empty(
        (batch, heads, length, height) if bias_h is not None else (0,), dtype=lse.dtype
    )
    dbias_w = q.new_empty((batch, heads, length, width) if bias_w is not None else (0,))
    scale_t, meta = _common(q, scale)
    bh, *bh_strides = _bias_args(bias_h, q, height)
    bw, *bw_strides = _bias_args(bias_w, q, width)
    dk_pad, dv_pad, block_n = padded_dim(dkh), padded_dim(dvh), key_block(width)
    if q.numel() == 0:  # an empty batch: nothing to launch
        return dq, dk, dv, dbias_h.to(q.dtype), dbias_w

    _launcher(attention_2d_bwd_preprocess_kernel)[
        (triton.cdiv(length, preprocess_block(dv_pad)), batch * heads)
    ](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, length, dvh,
        DV=dv_pad, BLOCK_M=preprocess_block(dv_pad),
    )  # fmt: skip

    shared = (
        *q.stride(), *k.stride(), *v.stride(), *bh_strides, *bw_strides, *grad_out.stride(),
    )  # fmt: skip
    has = {"HAS_BH": bias_h is not None, "HAS_BW": bias_w is not None}

    def key_grid(launch: dict[str, int]) -> tuple[int, int]:
        return (height * triton.cdiv(width, block_n), batch * heads)

    def query_grid(launch: dict[str, int]) -> tuple[int, int]:
        return (triton.cdiv(length, launch["BLOCK_M"]), batch * heads)

    _launcher(attention_2d_bwd_dkdv_kernel)[key_grid](
        q, k, v, bh, bw, scale_t, grad_out, lse, delta, dk, dv,
        *shared, heads, length, dkh, dvh, width,
        **has, DK=dk_pad, DV=dv_pad, BLOCK_N=block_n, **meta,
    )  # fmt: skip
    _launcher(attention_2d_bwd_dq_kernel)[query_grid](
        q, k, v, bh, bw, scale_t, grad_out, lse, delta, dq,
        dbias_h if bias_h is not None else dq, dbias_w if bias_w is not None else dq,
        *shared, heads, length, dkh, dvh, height, width,
        **has, DK=dk_pad, DV=dv_pad, BLOCK_N=block_n, **meta,
    )  # fmt: skip
    return dq, dk, dv, dbias_h.to(q.dtype), dbias_w


register_attention_2d_autograd(FWD_NAME, torch.ops.aanet_kernels.attention_2d_triton_bwd.default)


def attention_2d_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias_h: Tensor | None,
    bias_w: Tensor | None,
    height: int,
    width: int,
    scale: float,
) -> Tensor:
    """``attention_2d`` on the Triton kernels, with autograd (the caller has checked the inputs)."""
    out, _ = torch.ops.aanet_kernels.attention_2d_triton_fwd(
        q, k, v, bias_h, bias_w, height, width, scale
    )
    return out

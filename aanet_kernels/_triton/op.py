"""The Triton ops ``aanet_kernels::attention_2d_triton_fwd`` / ``attention_2d_triton_bwd``.

Declared with ``torch.library.triton_op`` and launched through ``wrap_triton``, so that
``torch.compile(fullgraph=True)`` sees the kernels; ``triton_op`` derives the fake (meta)
implementations by running these functions on fake tensors, which gives the same shapes and dtypes
as ``ops.fake_attention_2d_fwd/bwd``. Autograd is the shared ``_autograd.attention_2d_autograd``.
The schemas are those of the C++ ops in ``csrc/ops.cpp`` (torch 2.11 ignores ``schema=`` and infers
the same arguments, with ``SymInt`` sizes and unnamed returns; a symbolic ``height``/``width`` is
then specialised, as every constexpr argument of a traced Triton kernel is).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from aanet_kernels._autograd import Bias, attention_2d_autograd
from aanet_kernels._triton.autotune import (
    key_block,
    padded_dim,
    preprocess_block,
    tile_fill,
)
from aanet_kernels._triton.backward import (
    attention_2d_bwd_dkdv_kernel,
    attention_2d_bwd_dq_kernel,
    attention_2d_bwd_preprocess_kernel,
)
from aanet_kernels._triton.forward import attention_2d_fwd_kernel
from aanet_kernels.backends import triton_interpreted
from aanet_kernels.limits import MAX_GRID_YZ, MAX_HEAD_DIM, TRITON_MAX_SLICE_OFFSET, slice_reach
from aanet_kernels.ops import accumulator_dtype, lse_dtype

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


def _check_supported(q: Tensor, v: Tensor) -> None:
    """B and Nh within the grid, head dims within the compiled range, and no bf16 under the
    interpreter, whose ``tl.dot`` on bf16 operands returns garbage (a wrong answer must not pass
    for a result)."""
    if q.dtype == torch.bfloat16 and triton_interpreted():
        raise TypeError(
            "q: bfloat16 does not run under TRITON_INTERPRET=1 (the Triton interpreter computes "
            "bf16 tl.dot wrongly); use float16/float32 there, or run the triton backend on a GPU"
        )
    if q.shape[0] > MAX_GRID_YZ or q.shape[1] > MAX_GRID_YZ:
        raise ValueError(
            f"q: the triton backend launches one grid layer per head and per batch element, so "
            f"B and Nh must be at most {MAX_GRID_YZ}, got B={q.shape[0]}, Nh={q.shape[1]}; "
            "split the batch"
        )
    for name, size in (("q", q.shape[-1]), ("v", v.shape[-1])):
        if size > MAX_HEAD_DIM["triton"]:
            raise ValueError(
                f"{name}: the triton backend takes head dims up to {MAX_HEAD_DIM['triton']}, "
                f"got {size}; use backend='reference'"
            )


def _check_slice_offsets(**tensors: Tensor) -> None:
    """Refuse a tensor whose (batch, head) slice reaches past int32 offsets."""
    for name, t in tensors.items():
        if slice_reach(t) > TRITON_MAX_SLICE_OFFSET:
            raise ValueError(
                f"{name}: one (batch, head) slice of shape {tuple(t.shape[2:])} with strides "
                f"{tuple(t.stride()[2:])} reaches past the triton kernels' 32-bit offsets "
                f"({TRITON_MAX_SLICE_OFFSET + 1} elements); use backend='cuda', or a contiguous "
                "copy if it is a strided view"
            )


def _on_device_of(q: Tensor) -> contextlib.AbstractContextManager:
    """Make ``q``'s GPU the current device for the launches: Triton launches on the current device
    and its current stream, not on the tensors' device as ATen ops do, so a model on ``cuda:1``
    would otherwise fault (triton-lang/triton#2441)."""
    return torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()


def _head_dims(q: Tensor, v: Tensor) -> tuple[int, int]:
    """``(dkh, dvh)`` as ints: they are compile-time constants of the kernels, so under
    ``torch.compile(dynamic=True)`` ``int()`` pins them (a guard), as the schema's ``int`` does the
    map size."""
    return int(q.shape[-1]), int(v.shape[-1])


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
    scale_t = torch.full((1,), scale, dtype=accumulator_dtype(q.dtype), device=q.device)
    wide = q.dtype in (torch.float32, torch.float64)
    return scale_t, {"PRECISION": "ieee" if wide else "tf32"}


@dataclass(frozen=True)
class _KeyGrid:
    """How the kernels walk the keys (tiles.py): ``rows`` runs of ``cols`` keys, key
    ``j = row * row_stride + col * col_stride``, with ``row_bias`` indexed by the row and
    ``col_bias`` by the column. The image rows, or for a map that fills key tiles better by its
    columns (a narrow map: 70 x 1 would otherwise use one slot in 16), the image columns with the
    two bias tables trading places."""

    rows: int
    cols: int
    row_stride: int
    col_stride: int
    transposed: bool

    @staticmethod
    def of(height: int, width: int) -> _KeyGrid:
        if tile_fill(height) > tile_fill(width):
            return _KeyGrid(width, height, 1, width, transposed=True)
        return _KeyGrid(height, width, width, 1, transposed=False)

    def tables(self, bias_h: Bias, bias_w: Bias) -> tuple[Bias, Bias]:
        """``(row_bias, col_bias)`` from ``(bias_h, bias_w)``, and back: the swap is its own
        inverse."""
        return (bias_w, bias_h) if self.transposed else (bias_h, bias_w)

    def kernel_args(self, row_bias: Bias, col_bias: Bias) -> dict[str, object]:
        return dict(
            ROW_STRIDE=self.row_stride,
            COL_STRIDE=self.col_stride,
            HAS_RB=row_bias is not None,
            HAS_CB=col_bias is not None,
            BLOCK_N=key_block(self.cols),
        )


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
    _check_supported(q, v)
    _check_slice_offsets(q=q, k=k, v=v)
    batch, heads, length, _ = q.shape
    dkh, dvh = _head_dims(q, v)
    out = q.new_empty((batch, heads, length, dvh))
    lse = q.new_empty((batch, heads, length), dtype=lse_dtype(q.dtype))
    scale_t, meta = _common(q, scale)
    keys = _KeyGrid.of(height, width)
    row_bias, col_bias = keys.tables(bias_h, bias_w)
    rb, *rb_strides = _bias_args(row_bias, q, keys.rows)
    cb, *cb_strides = _bias_args(col_bias, q, keys.cols)
    if out.numel() == 0:  # an empty batch: nothing to launch
        return out, lse

    def grid(launch: dict[str, int]) -> tuple[int, int, int]:
        return (triton.cdiv(length, launch["BLOCK_M"]), heads, batch)

    with _on_device_of(q):
        _launcher(attention_2d_fwd_kernel)[grid](
            q, k, v, rb, cb, scale_t, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *rb_strides, *cb_strides, *out.stride(),
            heads, length, dkh, dvh, keys.rows, keys.cols,
            DK=padded_dim(dkh), DV=padded_dim(dvh), **keys.kernel_args(row_bias, col_bias), **meta,
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
    _check_supported(q, v)
    # out too: the preprocess kernel reads it through its strides (a caller of the op may pass
    # a strided view of the forward output).
    _check_slice_offsets(q=q, k=k, v=v, grad_out=grad_out, out=out)
    batch, heads, length, _ = q.shape
    dkh, dvh = _head_dims(q, v)
    lse = lse.contiguous()
    delta = torch.empty_like(lse, dtype=accumulator_dtype(q.dtype))
    dq = q.new_empty(q.shape)
    dk = q.new_empty(k.shape)
    dv = q.new_empty(v.shape)
    keys = _KeyGrid.of(height, width)
    row_bias, col_bias = keys.tables(bias_h, bias_w)
    # The row table's gradient in the accumulator dtype: the dQ kernel adds to it once per chunk
    # of a long row.
    d_row_bias = q.new_empty(
        (batch, heads, length, keys.rows) if row_bias is not None else (0,), dtype=delta.dtype
    )
    d_col_bias = q.new_empty((batch, heads, length, keys.cols) if col_bias is not None else (0,))
    scale_t, meta = _common(q, scale)
    rb, *rb_strides = _bias_args(row_bias, q, keys.rows)
    cb, *cb_strides = _bias_args(col_bias, q, keys.cols)
    dk_pad, dv_pad = padded_dim(dkh), padded_dim(dvh)
    if q.numel() == 0:  # an empty batch: nothing to launch
        return dq, dk, dv, *keys.tables(d_row_bias.to(q.dtype), d_col_bias)

    shared = (
        *q.stride(), *k.stride(), *v.stride(), *rb_strides, *cb_strides, *grad_out.stride(),
    )  # fmt: skip
    tiling = {"DK": dk_pad, "DV": dv_pad, **keys.kernel_args(row_bias, col_bias), **meta}

    def key_grid(launch: dict[str, int]) -> tuple[int, int, int]:
        return (keys.rows * triton.cdiv(keys.cols, tiling["BLOCK_N"]), heads, batch)

    def query_grid(launch: dict[str, int]) -> tuple[int, int, int]:
        return (triton.cdiv(length, launch["BLOCK_M"]), heads, batch)

    with _on_device_of(q):
        _launcher(attention_2d_bwd_preprocess_kernel)[
            (triton.cdiv(length, preprocess_block(dv_pad)), heads, batch)
        ](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, length, dvh,
            DV=dv_pad, BLOCK_M=preprocess_block(dv_pad),
        )  # fmt: skip
        _launcher(attention_2d_bwd_dkdv_kernel)[key_grid](
            q, k, v, rb, cb, scale_t, grad_out, lse, delta, dk, dv,
            *shared, heads, length, dkh, dvh, keys.cols, **tiling,
        )  # fmt: skip
        _launcher(attention_2d_bwd_dq_kernel)[query_grid](
            q, k, v, rb, cb, scale_t, grad_out, lse, delta, dq,
            d_row_bias if row_bias is not None else dq, d_col_bias if col_bias is not None else dq,
            *shared, heads, length, dkh, dvh, keys.rows, keys.cols, **tiling,
        )  # fmt: skip
    dbias_h, dbias_w = keys.tables(d_row_bias.to(q.dtype), d_col_bias)
    return dq, dk, dv, dbias_h, dbias_w


triton_attention_2d = attention_2d_autograd(
    torch.ops.aanet_kernels.attention_2d_triton_fwd.default,
    torch.ops.aanet_kernels.attention_2d_triton_bwd.default,
)


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
    return triton_attention_2d(q, k, v, bias_h, bias_w, height, width, scale)

"""Triton helpers shared by the forward and backward kernels: masked tile loads and the logits tile.

The logits of a (query tile, key tile) pair are ``scale * q k^T`` from ``tl.dot`` plus the two bias
tables read by key row ``j // width`` and key column ``j % width``. The table entries are read from
the query tile's own rows of ``bias_h`` / ``bias_w`` (``BLOCK_M x height`` and ``BLOCK_M x width``
values, which stay in L1/L2 across key tiles), so nothing of size ``L x L`` is ever written.
"""

import triton
import triton.language as tl


@triton.jit
def load_tile(ptr, rows, cols, stride_row, stride_col, n_rows, n_cols):
    """Load ``ptr[rows, cols]`` through strides; out-of-range rows and columns read as 0."""
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return tl.load(
        ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0
    )


@triton.jit
def biased_logits(
    q,
    k,
    scale,
    bh_ptr,
    bw_ptr,
    offs_m,
    offs_n,
    L,
    WIDTH,
    stride_bh_l,
    stride_bh_y,
    stride_bw_l,
    stride_bw_x,
    HAS_BH: tl.constexpr,
    HAS_BW: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``S[i, j] = scale * q_i . k_j + bias_h[i, j // W] + bias_w[i, j % W]`` for one tile, in
    ``ACC``; keys past ``L`` are ``-inf`` so they get no weight."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * scale
    key_ok = offs_n < L
    mask = (offs_m < L)[:, None] & key_ok[None, :]
    rows = offs_m[:, None]
    if HAS_BH:
        cols = (offs_n // WIDTH)[None, :]
        s += tl.load(bh_ptr + rows * stride_bh_l + cols * stride_bh_y, mask=mask, other=0.0).to(ACC)
    if HAS_BW:
        cols = (offs_n % WIDTH)[None, :]
        s += tl.load(bw_ptr + rows * stride_bw_l + cols * stride_bw_x, mask=mask, other=0.0).to(ACC)
    return tl.where(key_ok[None, :], s, float("-inf"))


@triton.jit
def softmax_weights(s, lse, row_ok):
    """``P = exp(S - lse)`` from the saved log-sum-exp; a fully masked row (``lse = -inf``, all
    logits ``-inf``) and rows past ``L`` get weight 0 instead of NaN."""
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    p = tl.exp(s - lse[:, None])
    return tl.where(row_ok[:, None], p, 0.0)

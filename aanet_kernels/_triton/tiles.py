"""Triton helpers shared by the forward and backward kernels: key tiles, masked loads, logits.

A key tile is never a run of ``BLOCK_N`` arbitrary keys: it is ``BLOCK_N`` consecutive columns
``x0 .. x0 + BLOCK_N`` of one image row ``y`` (keys ``j = y * width + x``; ``BLOCK_N`` covers the
whole row unless the row is wider than the largest tile). Inside such a tile every key shares the
row ``y`` and the columns are contiguous, so the two bias tables need no gather:

- ``bias_h[i, j // W]`` is one column ``bias_h[:, y]`` of the query tile, broadcast along the keys;
- ``bias_w[i, j % W]`` is the block ``bias_w[:, x0:x0 + BLOCK_N]``, the same for every row ``y``:
  the kernels that walk the rows of a query tile load it once per column chunk, outside the loop.

Nothing of size ``L x L`` is written, and the bias costs ``BLOCK_M`` loads per key tile instead of
two gathers per logit (which, in an earlier version, held the forward and dQ kernels at 255
registers with hundreds of bytes of spills per thread at 64 x 64 tiles: README, "GPU kernels, read
without a GPU"). Columns past the row end are masked to ``-inf``; the padding this costs is at
most the row's round-up to a power of two.
"""

import triton
import triton.language as tl


@triton.jit
def chunk_columns(chunk, WIDTH, BLOCK_N: tl.constexpr):
    """Columns ``x`` of column chunk ``chunk`` of every image row, and which exist (``x < W``)."""
    offs_x = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_x, offs_x < WIDTH


@triton.jit
def load_tile(ptr, rows, cols, stride_row, stride_col, row_ok, col_ok):
    """Load ``ptr[rows, cols]`` through strides; entries outside ``row_ok x col_ok`` read as 0."""
    mask = row_ok[:, None] & col_ok[None, :]
    return tl.load(
        ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0
    )


@triton.jit
def column_bias(
    bw_ptr,
    offs_m,
    row_ok,
    offs_x,
    key_ok,
    stride_bw_l,
    stride_bw_x,
    HAS_BW: tl.constexpr,
    ACC: tl.constexpr,
):
    """``bias_w[i, x]`` for the query rows and one column chunk, in ``ACC``, with the key mask
    folded in: ``-inf`` at columns past the row end (a ``1 x BLOCK_N`` mask without ``bias_w``).
    The same block serves every image row, so the kernels that walk rows load it once."""
    if HAS_BW:
        block = load_tile(bw_ptr, offs_m, offs_x, stride_bw_l, stride_bw_x, row_ok, key_ok)
        block = tl.where(key_ok[None, :], block.to(ACC), float("-inf"))
    else:
        block = tl.where(key_ok, 0.0, float("-inf")).to(ACC)[None, :]
    return block


@triton.jit
def biased_logits(
    q,
    k,
    scale,
    column_block,
    bh_ptr,
    offs_m,
    row_ok,
    y,
    stride_bh_l,
    stride_bh_y,
    HAS_BH: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``S[i, (y, x)] = scale * q_i . k_(y, x) + bias_h[i, y] + bias_w[i, x]`` for a key tile of
    row ``y``, in ``ACC``; ``column_block`` is :func:`column_bias` of the tile's columns, so
    columns past the row end come out ``-inf`` and get no weight."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * scale + column_block
    if HAS_BH:
        column = tl.load(bh_ptr + offs_m * stride_bh_l + y * stride_bh_y, mask=row_ok, other=0.0)
        s += column.to(ACC)[:, None]
    return s


@triton.jit
def softmax_weights(s, lse, row_ok):
    """``P = exp(S - lse)`` from the saved log-sum-exp; a fully masked row (``lse = -inf``, all
    logits ``-inf``) and rows past ``L`` get weight 0 instead of NaN."""
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    p = tl.exp(s - lse[:, None])
    return tl.where(row_ok[:, None], p, 0.0)

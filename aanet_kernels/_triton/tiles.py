"""Triton helpers shared by the forward and backward kernels: key tiles, masked loads, logits.

The kernels see the keys as a grid of ``ROWS`` runs of ``COLS`` keys, key ``(y, x)`` being
``j = y * ROW_STRIDE + x * COL_STRIDE``: the image rows (``ROW_STRIDE = W``, ``COL_STRIDE = 1``),
or, for a map narrower than it is tall, the image columns (``ROW_STRIDE = 1``, ``COL_STRIDE = W``;
op.py picks whichever fills the tiles better). The row bias table ``RB`` is indexed by ``y`` and
the column table ``CB`` by ``x``: ``bias_h`` and ``bias_w``, or the other way round.

A key tile is never a run of ``BLOCK_N`` arbitrary keys: it is ``BLOCK_N`` consecutive columns
``x0 .. x0 + BLOCK_N`` of one row ``y`` (the whole row unless it is longer than the largest tile).
Every key of a tile shares its row and the columns are consecutive, so the bias tables need no
gather:

- ``RB[i, y]`` is one value per query, broadcast along the tile's keys;
- ``CB[i, x0:x0 + BLOCK_N]`` is a block that is the same for every row ``y``: the kernels that walk
  the rows of a query tile load it once per column chunk, outside the loop.

Nothing of size ``L x L`` is written, and the bias costs ``BLOCK_M`` loads per key tile instead of
two gathers per logit (which, in an earlier version, held the forward and dQ kernels at 255
registers with hundreds of bytes of spills per thread at 64 x 64 tiles: README, "GPU kernels, read
without a GPU"). Columns past the row end are masked to ``-inf``; the padding this costs is at
most the row's round-up to a power of two.
"""

import triton
import triton.language as tl


@triton.jit
def program_batch_head(NH):
    """``(b, h, b * NH + h)`` of this program, as int64 (offsets of large tensors must not
    overflow). Grid axes 1 and 2 are heads and batch, each at most 65535 (CUDA's limit on those
    axes); one axis of ``B * Nh`` would stop at 65535 slices."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    return b, h, b * NH + h


@triton.jit
def chunk_columns(chunk, COLS, BLOCK_N: tl.constexpr):
    """Columns ``x`` of column chunk ``chunk`` of every row, and which exist (``x < COLS``)."""
    offs_x = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_x, offs_x < COLS


@triton.jit
def load_tile(ptr, rows, cols, stride_row, stride_col, row_ok, col_ok):
    """Load ``ptr[rows, cols]`` through strides; entries outside ``row_ok x col_ok`` read as 0."""
    mask = row_ok[:, None] & col_ok[None, :]
    return tl.load(
        ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0
    )


@triton.jit
def load_keys(
    K,
    V,
    y,
    offs_x,
    key_ok,
    offs_dk,
    offs_dv,
    dk_ok,
    dv_ok,
    stride_kl,
    stride_kd,
    stride_vl,
    stride_vd,
    ROW_STRIDE: tl.constexpr,
    COL_STRIDE: tl.constexpr,
):
    """The key indices ``j = y * ROW_STRIDE + x * COL_STRIDE`` of the key tile (row ``y``, columns
    ``offs_x``), and its K and V tiles; columns past the row end read as 0."""
    offs_n = y * ROW_STRIDE + offs_x * COL_STRIDE
    k = load_tile(K, offs_n, offs_dk, stride_kl, stride_kd, key_ok, dk_ok)
    v = load_tile(V, offs_n, offs_dv, stride_vl, stride_vd, key_ok, dv_ok)
    return offs_n, k, v


@triton.jit
def table_rows(offs_m):
    """Query rows as int64, for offsets into the bias tables and their gradients: a table's
    (batch, head) slice holds ``L * H`` elements, past 2^31 from maps of about 1291 x 1291 (``q``,
    ``k`` and ``v`` hold ``L * d``: op.py refuses slices past 2^31 there)."""
    return offs_m.to(tl.int64)


@triton.jit
def column_bias(
    cb_ptr,
    offs_m,
    row_ok,
    offs_x,
    key_ok,
    stride_cb_l,
    stride_cb_x,
    HAS_CB: tl.constexpr,
    ACC: tl.constexpr,
):
    """``CB[i, x]`` for the query rows and one column chunk, in ``ACC``, with the key mask folded
    in: ``-inf`` at columns past the row end (a ``1 x BLOCK_N`` mask without ``CB``). The same
    block serves every row, so the kernels that walk rows load it once."""
    if HAS_CB:
        rows = table_rows(offs_m)
        block = load_tile(cb_ptr, rows, offs_x, stride_cb_l, stride_cb_x, row_ok, key_ok)
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
    rb_ptr,
    offs_m,
    row_ok,
    y,
    stride_rb_l,
    stride_rb_y,
    HAS_RB: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``S[i, (y, x)] = scale * q_i . k_(y, x) + RB[i, y] + CB[i, x]`` for a key tile of
    row ``y``, in ``ACC``; ``column_block`` is :func:`column_bias` of the tile's columns, so
    columns past the row end come out ``-inf`` and get no weight."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * scale + column_block
    if HAS_RB:
        rows = table_rows(offs_m)
        column = tl.load(rb_ptr + rows * stride_rb_l + y * stride_rb_y, mask=row_ok, other=0.0)
        s += column.to(ACC)[:, None]
    return s


@triton.jit
def softmax_weights(s, lse, row_ok):
    """``P = exp(S - lse)`` from the saved log-sum-exp; a fully masked row (``lse = -inf``, all
    logits ``-inf``) and rows past ``L`` get weight 0 instead of NaN. An lse wider than ``S``
    (fp64 for fp32 inputs, ``ops.lse_dtype``) enters as two parts in ``S``'s dtype,
    ``exp((S - hi) - lo)``: ``S - hi`` is exact where the weight is large."""
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    if lse.dtype != s.dtype:
        hi = lse.to(s.dtype)
        lo = (lse - hi.to(lse.dtype)).to(s.dtype)
        p = tl.exp((s - hi[:, None]) - lo[:, None])
    else:
        p = tl.exp(s - lse[:, None])
    return tl.where(row_ok[:, None], p, 0.0)

"""Backward kernels of attention_2d: preprocess, dK/dV, and dQ with the bias-table gradients.

With ``P = exp(S - lse)``, ``dP = dO V^T``, ``dS = P * (dP - delta)`` and
``delta = rowsum(dO * O)``:
``dV = P^T dO``, ``dK = scale * dS^T Q``, ``dQ = scale * dS K``,
``dbias_h[i, y] = sum_{j in key row y} dS[i, j]`` and ``dbias_w[i, x] = sum_{j in key column x}
dS[i, j]``. Every output element is written by exactly one program that sums in a fixed order:
no atomics, so gradients are bit-identical run to run.

The bias gradients are reduced inside the dQ kernel, which walks all keys of its query tile one row
tile at a time (tiles.py: rows and columns of the key grid, the image's or transposed): the
row-table gradient ``dRB[:, y]`` is the row sum of the ``dS`` tiles of row ``y``, and the
column-table gradient ``dCB[:, x0:x0 + BLOCK_N]`` the sum over rows of the ``dS`` tiles of that
column chunk, kept in registers. When a row is longer than one tile, the chunks are the outer loop
and ``dRB`` (accumulator dtype) is read, added to and written back by the one program that owns
those queries.

Precision: fp32/fp64 inputs use ``input_precision="ieee"`` everywhere (no TF32). For fp16/bf16
inputs the Q/K/V products run on tensor cores in the input dtype with fp32 accumulation (``dS`` and
``P`` rounded to the input dtype, as in flash attention), and the bias gradients are summed from
``dS`` in fp32.
"""

import triton
import triton.language as tl

from aanet_kernels._triton.autotune import AUTOTUNE_KEY, configs
from aanet_kernels._triton.tiles import (
    biased_logits,
    chunk_columns,
    column_bias,
    load_keys,
    load_tile,
    program_batch_head,
    softmax_weights,
    table_rows,
)


@triton.jit
def attention_2d_bwd_preprocess_kernel(
    OUT, DO, DELTA,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_gb, stride_gh, stride_gl, stride_gd,
    NH, L, DVH: tl.constexpr,
    DV: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """``delta[i] = sum_d dO[i, d] * O[i, d]`` in the dtype of ``DELTA`` (the accumulator's)."""
    ACC = DELTA.dtype.element_ty
    pid_m = tl.program_id(0)
    b, h, pid_bh = program_batch_head(NH)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < L
    offs_dv = tl.arange(0, DV)
    dv_ok = offs_dv < DVH
    o = load_tile(
        OUT + b * stride_ob + h * stride_oh, offs_m, offs_dv, stride_ol, stride_od, row_ok, dv_ok
    )
    do = load_tile(
        DO + b * stride_gb + h * stride_gh, offs_m, offs_dv, stride_gl, stride_gd, row_ok, dv_ok
    )
    delta = tl.sum(o.to(ACC) * do.to(ACC), 1)
    tl.store(DELTA + pid_bh * L + offs_m, delta, mask=row_ok)


@triton.autotune(configs=configs("dkdv"), key=AUTOTUNE_KEY)
@triton.jit
def attention_2d_bwd_dkdv_kernel(
    Q, K, V, RB, CB, SCALE, DO, LSE, DELTA, DK_OUT, DV_OUT,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_rbb, stride_rbh, stride_rbl, stride_rby,
    stride_cbb, stride_cbh, stride_cbl, stride_cbx,
    stride_gb, stride_gh, stride_gl, stride_gd,
    NH, L, DKH: tl.constexpr, DVH: tl.constexpr, COLS: tl.constexpr,
    ROW_STRIDE: tl.constexpr, COL_STRIDE: tl.constexpr,
    HAS_RB: tl.constexpr, HAS_CB: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program owns one key tile (``BLOCK_N`` columns of one row) and walks every query
    tile; writes contiguous ``dk``, ``dv``."""
    pid_n = tl.program_id(0)
    ACC = SCALE.dtype.element_ty  # fp32, or fp64 for fp64 inputs
    b, h, pid_bh = program_batch_head(NH)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    RB += b * stride_rbb + h * stride_rbh
    CB += b * stride_cbb + h * stride_cbh
    DO += b * stride_gb + h * stride_gh
    LSE += pid_bh * L
    DELTA += pid_bh * L

    n_chunks = tl.cdiv(COLS, BLOCK_N)
    y = pid_n // n_chunks
    offs_x, key_ok = chunk_columns(pid_n % n_chunks, COLS, BLOCK_N)
    offs_dk = tl.arange(0, DK)
    offs_dv = tl.arange(0, DV)
    dk_ok = offs_dk < DKH
    dv_ok = offs_dv < DVH
    scale = tl.load(SCALE)
    offs_n, k, v = load_keys(
        K, V, y, offs_x, key_ok, offs_dk, offs_dv, dk_ok, dv_ok,
        stride_kl, stride_kd, stride_vl, stride_vd, ROW_STRIDE, COL_STRIDE,
    )  # fmt: skip

    dk = tl.zeros([BLOCK_N, DK], ACC)
    dv = tl.zeros([BLOCK_N, DV], ACC)
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < L
        q = load_tile(Q, offs_m, offs_dk, stride_ql, stride_qd, row_ok, dk_ok)
        do = load_tile(DO, offs_m, offs_dv, stride_gl, stride_gd, row_ok, dv_ok)
        lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        column_block = column_bias(
            CB, offs_m, row_ok, offs_x, key_ok, stride_cbl, stride_cbx, HAS_CB, ACC
        )
        s = biased_logits(
            q, k, scale, column_block, RB, offs_m, row_ok, y, stride_rbl, stride_rby,
            HAS_RB, ACC, PRECISION,
        )  # fmt: skip
        p = softmax_weights(s, lse, row_ok)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION, out_dtype=ACC)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION, out_dtype=ACC)

    dk_ptrs = DK_OUT + pid_bh * L * DKH + offs_n[:, None] * DKH + offs_dk[None, :]
    dv_ptrs = DV_OUT + pid_bh * L * DVH + offs_n[:, None] * DVH + offs_dv[None, :]
    dk_mask = key_ok[:, None] & dk_ok[None, :]
    tl.store(dk_ptrs, (dk * scale).to(DK_OUT.dtype.element_ty), mask=dk_mask)
    tl.store(dv_ptrs, dv.to(DV_OUT.dtype.element_ty), mask=key_ok[:, None] & dv_ok[None, :])


@triton.autotune(configs=configs("dq"), key=AUTOTUNE_KEY)
@triton.jit
def attention_2d_bwd_dq_kernel(
    Q, K, V, RB, CB, SCALE, DO, LSE, DELTA, DQ_OUT, DRB_OUT, DCB_OUT,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_rbb, stride_rbh, stride_rbl, stride_rby,
    stride_cbb, stride_cbh, stride_cbl, stride_cbx,
    stride_gb, stride_gh, stride_gl, stride_gd,
    NH, L, DKH: tl.constexpr, DVH: tl.constexpr, ROWS, COLS: tl.constexpr,
    ROW_STRIDE: tl.constexpr, COL_STRIDE: tl.constexpr,
    HAS_RB: tl.constexpr, HAS_CB: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program owns ``BLOCK_M`` queries and walks every key tile; writes ``dq`` and the
    full-size ``(B, Nh, L, ROWS|COLS)`` bias gradients, all contiguous; ``DRB_OUT`` is in the
    accumulator dtype (it is read back when a row spans several tiles)."""
    pid_m = tl.program_id(0)
    ACC = SCALE.dtype.element_ty  # fp32, or fp64 for fp64 inputs
    b, h, pid_bh = program_batch_head(NH)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    RB += b * stride_rbb + h * stride_rbh
    CB += b * stride_cbb + h * stride_cbh
    DO += b * stride_gb + h * stride_gh
    LSE += pid_bh * L
    DELTA += pid_bh * L
    base = pid_bh * L
    DRB_OUT += base * ROWS
    DCB_OUT += base * COLS

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < L
    offs_dk = tl.arange(0, DK)
    offs_dv = tl.arange(0, DV)
    dk_ok = offs_dk < DKH
    dv_ok = offs_dv < DVH
    scale = tl.load(SCALE)
    q = load_tile(Q, offs_m, offs_dk, stride_ql, stride_qd, row_ok, dk_ok)
    do = load_tile(DO, offs_m, offs_dv, stride_gl, stride_gd, row_ok, dv_ok)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, DK], ACC)
    # Column chunks outside, rows inside: dCB of a chunk is complete when its rows are done.
    for chunk in range(0, tl.cdiv(COLS, BLOCK_N)):
        offs_x, key_ok = chunk_columns(chunk, COLS, BLOCK_N)
        column_block = column_bias(
            CB, offs_m, row_ok, offs_x, key_ok, stride_cbl, stride_cbx, HAS_CB, ACC
        )
        dcb = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        for y in range(0, ROWS):
            _, k, v = load_keys(
                K, V, y, offs_x, key_ok, offs_dk, offs_dv, dk_ok, dv_ok,
                stride_kl, stride_kd, stride_vl, stride_vd, ROW_STRIDE, COL_STRIDE,
            )  # fmt: skip
            s = biased_logits(
                q, k, scale, column_block, RB, offs_m, row_ok, y, stride_rbl, stride_rby,
                HAS_RB, ACC, PRECISION,
            )  # fmt: skip
            p = softmax_weights(s, lse, row_ok)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC)
            if HAS_RB:
                row_sum = tl.sum(ds, 1)
                drb_ptrs = DRB_OUT + table_rows(offs_m) * ROWS + y
                if chunk > 0:  # this program wrote the earlier chunks' part of the same entries
                    row_sum += tl.load(drb_ptrs, mask=row_ok, other=0.0)
                tl.store(drb_ptrs, row_sum, mask=row_ok)
            if HAS_CB:
                dcb += ds
        if HAS_CB:
            ptrs = DCB_OUT + table_rows(offs_m)[:, None] * COLS + offs_x[None, :]
            mask = row_ok[:, None] & key_ok[None, :]
            tl.store(ptrs, dcb.to(DCB_OUT.dtype.element_ty), mask=mask)
        # The next chunk reads dRB entries that another thread of this block may have written.
        tl.debug_barrier()

    dq_ptrs = DQ_OUT + (base + offs_m[:, None]) * DKH + offs_dk[None, :]
    dq_mask = row_ok[:, None] & dk_ok[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ_OUT.dtype.element_ty), mask=dq_mask)

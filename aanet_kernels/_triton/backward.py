"""Backward kernels of attention_2d: preprocess, dK/dV, and dQ with the bias-table gradients.

With ``P = exp(S - lse)``, ``dP = dO V^T``, ``dS = P * (dP - delta)`` and
``delta = rowsum(dO * O)``:
``dV = P^T dO``, ``dK = scale * dS^T Q``, ``dQ = scale * dS K``,
``dbias_h[i, y] = sum_{j in key row y} dS[i, j]`` and ``dbias_w[i, x] = sum_{j in key column x}
dS[i, j]``. Every output element is written by exactly one program that sums in a fixed order:
no atomics, so gradients are bit-identical run to run.

The bias gradients are reduced inside the dQ kernel, which walks all keys of its query tile: the
key tile's ``dS`` (``BLOCK_M x BLOCK_N``) times a one-hot matrix (``BLOCK_N x PAD``, ``onehot[j, y]
= (j // width == y)``) is the tile's contribution, accumulated in registers across key tiles.

Precision: fp32/fp64 inputs use ``input_precision="ieee"`` everywhere (no TF32). For fp16/bf16
inputs the Q/K/V products run on tensor cores in the input dtype with fp32 accumulation (``dS`` and
``P`` rounded to the input dtype, as in flash attention), and the bias-gradient product keeps
``dS`` in fp32 with ``input_precision="tf32x3"`` (three TF32 tensor-core products, close to fp32;
the one-hot side is exact in TF32).
"""

import triton
import triton.language as tl

from aanet_kernels._triton.autotune import AUTOTUNE_KEY, dkdv_configs, dq_configs
from aanet_kernels._triton.tiles import biased_logits, load_tile, softmax_weights


@triton.jit
def attention_2d_bwd_preprocess_kernel(
    OUT, DO, DELTA,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_gb, stride_gh, stride_gl, stride_gd,
    NH, L, DVH,
    DV: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """``delta[i] = sum_d dO[i, d] * O[i, d]`` in the dtype of ``DELTA`` (that of ``lse``)."""
    ACC = DELTA.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NH).to(tl.int64)
    h = (pid_bh % NH).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, DV)
    o = load_tile(
        OUT + b * stride_ob + h * stride_oh, offs_m, offs_dv, stride_ol, stride_od, L, DVH
    )
    do = load_tile(
        DO + b * stride_gb + h * stride_gh, offs_m, offs_dv, stride_gl, stride_gd, L, DVH
    )
    delta = tl.sum(o.to(ACC) * do.to(ACC), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * L + offs_m, delta, mask=offs_m < L)


@triton.autotune(configs=dkdv_configs(), key=AUTOTUNE_KEY)
@triton.jit
def attention_2d_bwd_dkdv_kernel(
    Q, K, V, BH, BW, SCALE, DO, LSE, DELTA, DK_OUT, DV_OUT,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_bhb, stride_bhh, stride_bhl, stride_bhy,
    stride_bwb, stride_bwh, stride_bwl, stride_bwx,
    stride_gb, stride_gh, stride_gl, stride_gd,
    NH, L, DKH, DVH, WIDTH,
    HAS_BH: tl.constexpr, HAS_BW: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program owns ``BLOCK_N`` keys and walks every query tile; writes contiguous ``dk``,
    ``dv``."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    ACC = LSE.dtype.element_ty  # fp32, or fp64 for fp64 inputs
    b = (pid_bh // NH).to(tl.int64)
    h = (pid_bh % NH).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    BH += b * stride_bhb + h * stride_bhh
    BW += b * stride_bwb + h * stride_bwh
    DO += b * stride_gb + h * stride_gh
    LSE += pid_bh.to(tl.int64) * L
    DELTA += pid_bh.to(tl.int64) * L

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, DK)
    offs_dv = tl.arange(0, DV)
    scale = tl.load(SCALE)
    k = load_tile(K, offs_n, offs_dk, stride_kl, stride_kd, L, DKH)
    v = load_tile(V, offs_n, offs_dv, stride_vl, stride_vd, L, DVH)

    dk = tl.zeros([BLOCK_N, DK], ACC)
    dv = tl.zeros([BLOCK_N, DV], ACC)
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < L
        q = load_tile(Q, offs_m, offs_dk, stride_ql, stride_qd, L, DKH)
        do = load_tile(DO, offs_m, offs_dv, stride_gl, stride_gd, L, DVH)
        lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        s = biased_logits(
            q, k, scale, BH, BW, offs_m, offs_n, L, WIDTH,
            stride_bhl, stride_bhy, stride_bwl, stride_bwx,
            HAS_BH, HAS_BW, ACC, PRECISION,
        )  # fmt: skip
        p = softmax_weights(s, lse, row_ok)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION, out_dtype=ACC)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION, out_dtype=ACC)

    key_ok = (offs_n < L)[:, None]
    dk_ptrs = DK_OUT + pid_bh.to(tl.int64) * L * DKH + offs_n[:, None] * DKH + offs_dk[None, :]
    dv_ptrs = DV_OUT + pid_bh.to(tl.int64) * L * DVH + offs_n[:, None] * DVH + offs_dv[None, :]
    tl.store(
        dk_ptrs, (dk * scale).to(DK_OUT.dtype.element_ty), mask=key_ok & (offs_dk < DKH)[None, :]
    )
    tl.store(dv_ptrs, dv.to(DV_OUT.dtype.element_ty), mask=key_ok & (offs_dv < DVH)[None, :])


@triton.jit
def bias_grad_tile(ds, table_index, PAD: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """``sum_j ds[i, j] * (table_index[j] == t)`` for ``t < PAD``, as a ``(BLOCK_M, PAD)`` tile."""
    onehot = (table_index[:, None] == tl.arange(0, PAD)[None, :]).to(ACC)
    return tl.dot(ds, onehot, input_precision=PRECISION, out_dtype=ACC)


@triton.autotune(configs=dq_configs(), key=AUTOTUNE_KEY)
@triton.jit
def attention_2d_bwd_dq_kernel(
    Q, K, V, BH, BW, SCALE, DO, LSE, DELTA, DQ_OUT, DBH_OUT, DBW_OUT,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_bhb, stride_bhh, stride_bhl, stride_bhy,
    stride_bwb, stride_bwh, stride_bwl, stride_bwx,
    stride_gb, stride_gh, stride_gl, stride_gd,
    NH, L, DKH, DVH, HEIGHT, WIDTH,
    HAS_BH: tl.constexpr, HAS_BW: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, HPAD: tl.constexpr, WPAD: tl.constexpr,
    PRECISION: tl.constexpr, BIAS_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program owns ``BLOCK_M`` queries and walks every key tile; writes ``dq`` and the
    full-size ``(B, Nh, L, height|width)`` bias gradients, all contiguous."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    ACC = LSE.dtype.element_ty  # fp32, or fp64 for fp64 inputs
    b = (pid_bh // NH).to(tl.int64)
    h = (pid_bh % NH).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    BH += b * stride_bhb + h * stride_bhh
    BW += b * stride_bwb + h * stride_bwh
    DO += b * stride_gb + h * stride_gh
    LSE += pid_bh.to(tl.int64) * L
    DELTA += pid_bh.to(tl.int64) * L

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < L
    offs_dk = tl.arange(0, DK)
    offs_dv = tl.arange(0, DV)
    scale = tl.load(SCALE)
    q = load_tile(Q, offs_m, offs_dk, stride_ql, stride_qd, L, DKH)
    do = load_tile(DO, offs_m, offs_dv, stride_gl, stride_gd, L, DVH)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, DK], ACC)
    dbh = tl.zeros([BLOCK_M, HPAD], ACC)
    dbw = tl.zeros([BLOCK_M, WPAD], ACC)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(K, offs_n, offs_dk, stride_kl, stride_kd, L, DKH)
        v = load_tile(V, offs_n, offs_dv, stride_vl, stride_vd, L, DVH)
        s = biased_logits(
            q, k, scale, BH, BW, offs_m, offs_n, L, WIDTH,
            stride_bhl, stride_bhy, stride_bwl, stride_bwx,
            HAS_BH, HAS_BW, ACC, PRECISION,
        )  # fmt: skip
        p = softmax_weights(s, lse, row_ok)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC)
        if HAS_BH:
            dbh += bias_grad_tile(ds, offs_n // WIDTH, HPAD, ACC, BIAS_PRECISION)
        if HAS_BW:
            dbw += bias_grad_tile(ds, offs_n % WIDTH, WPAD, ACC, BIAS_PRECISION)

    base = pid_bh.to(tl.int64) * L
    dq_ptrs = DQ_OUT + (base + offs_m[:, None]) * DKH + offs_dk[None, :]
    tl.store(
        dq_ptrs,
        (dq * scale).to(DQ_OUT.dtype.element_ty),
        mask=row_ok[:, None] & (offs_dk < DKH)[None, :],
    )
    if HAS_BH:
        offs_y = tl.arange(0, HPAD)
        ptrs = DBH_OUT + (base + offs_m[:, None]) * HEIGHT + offs_y[None, :]
        tl.store(
            ptrs,
            dbh.to(DBH_OUT.dtype.element_ty),
            mask=row_ok[:, None] & (offs_y < HEIGHT)[None, :],
        )
    if HAS_BW:
        offs_x = tl.arange(0, WPAD)
        ptrs = DBW_OUT + (base + offs_m[:, None]) * WIDTH + offs_x[None, :]
        tl.store(
            ptrs, dbw.to(DBW_OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_x < WIDTH)[None, :]
        )

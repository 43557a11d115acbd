"""Forward kernel of attention_2d: flash-style online softmax over key tiles.

One program owns ``BLOCK_M`` queries of one (batch, head) and walks the keys one row tile at a time
(``BLOCK_N`` columns of one row of the key grid, see tiles.py), keeping the running max, the
running sum and the output accumulator in ``ACC`` (fp32 for fp16/bf16/fp32 inputs, fp64 for fp64).
Writes ``out`` (input dtype) and ``lse`` (``ops.lse_dtype``: fp64 for fp32 inputs too).

Precision: for fp32 and fp64 inputs every ``tl.dot`` runs with ``input_precision="ieee"`` (no
TF32), so fp32 results match an fp32 reference to rounding; fp16/bf16 use tensor cores with fp32
accumulation, and the softmax weights are rounded to the input dtype before ``P @ V``.
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
)


@triton.autotune(configs=configs("fwd"), key=AUTOTUNE_KEY)
@triton.jit
def attention_2d_fwd_kernel(
    Q, K, V, RB, CB, SCALE, OUT, LSE,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_rbb, stride_rbh, stride_rbl, stride_rby,
    stride_cbb, stride_cbh, stride_cbl, stride_cbx,
    stride_ob, stride_oh, stride_ol, stride_od,
    NH, L, DKH: tl.constexpr, DVH: tl.constexpr, ROWS, COLS: tl.constexpr,
    ROW_STRIDE: tl.constexpr, COL_STRIDE: tl.constexpr,
    HAS_RB: tl.constexpr, HAS_CB: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    # Accumulators and softmax statistics in the scale's dtype: fp32, or fp64 for fp64 inputs.
    ACC = SCALE.dtype.element_ty
    b, h, pid_bh = program_batch_head(NH)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    RB += b * stride_rbb + h * stride_rbh
    CB += b * stride_cbb + h * stride_cbh
    OUT += b * stride_ob + h * stride_oh
    LSE += pid_bh * L

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < L
    offs_dk = tl.arange(0, DK)
    offs_dv = tl.arange(0, DV)
    dk_ok = offs_dk < DKH
    dv_ok = offs_dv < DVH
    scale = tl.load(SCALE)
    q = load_tile(Q, offs_m, offs_dk, stride_ql, stride_qd, row_ok, dk_ok)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, DV], ACC)
    # Column chunks outside (usually one: the whole row), rows inside.
    for chunk in range(0, tl.cdiv(COLS, BLOCK_N)):
        offs_x, key_ok = chunk_columns(chunk, COLS, BLOCK_N)
        column_block = column_bias(
            CB, offs_m, row_ok, offs_x, key_ok, stride_cbl, stride_cbx, HAS_CB, ACC
        )
        for y in range(0, ROWS):
            _, k, v = load_keys(
                K, V, y, offs_x, key_ok, offs_dk, offs_dv, dk_ok, dv_ok,
                stride_kl, stride_kd, stride_vl, stride_vd, ROW_STRIDE, COL_STRIDE,
            )  # fmt: skip
            s = biased_logits(
                q, k, scale, column_block, RB, offs_m, row_ok, y, stride_rbl, stride_rby,
                HAS_RB, ACC, PRECISION,
            )  # fmt: skip
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # While a row has seen only -inf logits, shift by 0 so exp gives 0 rather than NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION, out_dtype=ACC)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

    # A fully masked row has l_i = 0 and m_i = -inf: output 0 and lse = m_i + log(1) = -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    # Summed in the lse dtype: m_i + log(l_i) rounded to fp32 would lose what the backward needs.
    lse = m_i.to(LSE.dtype.element_ty) + tl.log(l_safe).to(LSE.dtype.element_ty)
    out_ptrs = OUT + offs_m[:, None] * stride_ol + offs_dv[None, :] * stride_od
    tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    tl.store(LSE + offs_m, lse, mask=row_ok)

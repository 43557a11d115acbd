"""The pure-PyTorch reference path: the paper's formula with materialized logits.

This is the oracle every backend is tested against and the fallback for users without a
compiler or a GPU. It is written for clarity: it builds the full ``(B, Nh, L, L)`` logits.
"""

from __future__ import annotations

import torch
from torch import Tensor


def expand_bias_tables(
    bias_h: Tensor | None, bias_w: Tensor | None, height: int, width: int
) -> Tensor | None:
    """Turn the two tables into the dense additive bias ``(..., L, L)`` over keys.

    Key ``j`` sits at row ``j // width`` and column ``j % width``, so
    ``dense[..., i, j] = bias_h[..., i, j // width] + bias_w[..., i, j % width]``.
    """
    dense = None
    if bias_h is not None:
        rows = bias_h.unsqueeze(-1).expand(*bias_h.shape, width)
        dense = rows.reshape(*bias_h.shape[:-1], height * width)
    if bias_w is not None:
        cols = bias_w.unsqueeze(-2).expand(*bias_w.shape[:-1], height, width)
        cols = cols.reshape(*bias_w.shape[:-1], height * width)
        dense = cols if dense is None else dense + cols
    return dense


def safe_softmax(logits: Tensor) -> Tensor:
    """Softmax over the last dim where a row of only ``-inf`` gives zeros (not NaN).

    NaN in a row still propagates to that row, as the contract requires.
    """
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    weights = torch.exp(logits - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(denom == 0, torch.ones_like(denom), denom)


def attention_2d_logits(
    q: Tensor,
    k: Tensor,
    bias_h: Tensor | None,
    bias_w: Tensor | None,
    *,
    height: int,
    width: int,
    scale: float = 1.0,
) -> Tensor:
    """``S = scale * q k^T + bias_h[:, row(j)] + bias_w[:, col(j)]``, shape ``(B, Nh, L, L)``."""
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    dense = expand_bias_tables(bias_h, bias_w, height, width)
    return logits if dense is None else logits + dense


def attention_2d_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias_h: Tensor | None = None,
    bias_w: Tensor | None = None,
    *,
    height: int,
    width: int,
    scale: float = 1.0,
) -> Tensor:
    """Reference 2D relative-position attention, ``softmax(S) @ v``, differentiable by autograd."""
    logits = attention_2d_logits(q, k, bias_h, bias_w, height=height, width=width, scale=scale)
    return torch.matmul(safe_softmax(logits), v)


def attention_2d_reference_lse(
    q: Tensor,
    k: Tensor,
    bias_h: Tensor | None = None,
    bias_w: Tensor | None = None,
    *,
    height: int,
    width: int,
    scale: float = 1.0,
) -> Tensor:
    """Log-sum-exp of each logits row, ``(B, Nh, L)``: what the fused kernels save for backward."""
    logits = attention_2d_logits(q, k, bias_h, bias_w, height=height, width=width, scale=scale)
    return torch.logsumexp(logits, dim=-1)


def attention_2d_reference_jvp(
    primals: tuple[Tensor | None, ...],
    tangents: tuple[Tensor | None, ...],
    *,
    height: int,
    width: int,
    scale: float = 1.0,
) -> Tensor:
    """Forward-mode derivative of ``attention_2d``: the tangent of the output for tangents of
    ``(q, k, v, bias_h, bias_w)`` (``None`` where an input is held constant or absent).

    With ``P = softmax(S)`` and ``dS`` the tangent of the logits,
    ``dO = (P * (dS - rowsum(P * dS))) @ v + P @ dv``: a row of only ``-inf`` logits has ``P = 0``
    and a zero tangent."""
    q, k, v, bias_h, bias_w = primals
    dq, dk, dv, dbias_h, dbias_w = tangents
    probs = safe_softmax(
        attention_2d_logits(q, k, bias_h, bias_w, height=height, width=width, scale=scale)
    )
    bias_term = expand_bias_tables(dbias_h, dbias_w, height, width)
    terms = [bias_term] if bias_term is not None else []
    if dq is not None:
        terms.append(torch.matmul(dq, k.transpose(-1, -2)) * scale)
    if dk is not None:
        terms.append(torch.matmul(q, dk.transpose(-1, -2)) * scale)
    dout = probs.new_zeros((*probs.shape[:-1], v.shape[-1])) if dv is None else probs @ dv
    if terms:
        dlogits = sum(terms[1:], terms[0])
        dprobs = probs * (dlogits - (probs * dlogits).sum(dim=-1, keepdim=True))
        dout = dout + torch.matmul(dprobs, v)
    return dout

"""Relative-position logits: the two small bias tables of AA-Conv (Bello et al., 2019)."""

from __future__ import annotations

import torch
from torch import Tensor

from aanet_kernels._checks import SUPPORTED_DTYPES, autocast_mixes, check_dense, check_map_size


def _relative_index(size: int, device: torch.device) -> Tensor:
    """``index[i, j] = j - i + size - 1``: the table row for key ``j`` seen from query ``i``."""
    pos = torch.arange(size, device=device)
    return pos[None, :] - pos[:, None] + size - 1


def relative_logits(
    q: Tensor, rel_h: Tensor, rel_w: Tensor, height: int, width: int
) -> tuple[Tensor, Tensor]:
    """Bias tables from the relative embeddings.

    Args:
        q: queries ``(B, Nh, L, dkh)``, already scaled as the logits need, ``L = height * width``.
        rel_h: ``(2 * height - 1, dkh)`` embeddings of the vertical offsets ``y - iy``.
        rel_w: ``(2 * width - 1, dkh)`` embeddings of the horizontal offsets ``x - ix``.
            Both of ``q``'s floating dtype, or (under autocast) any floating dtype.

    Returns:
        ``bias_h (B, Nh, L, height)``, ``bias_h[..., i, y] = q_i . rel_h[y - iy + height - 1]``, and
        ``bias_w (B, Nh, L, width)`` with ``bias_w[..., i, x] = q_i . rel_w[x - ix + width - 1]``.
    """
    for name, t in (("q", q), ("rel_h", rel_h), ("rel_w", rel_w)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        check_dense(name, t)
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q: expected a floating dtype in {SUPPORTED_DTYPES}, got {q.dtype}")
    # Under autocast the tables may keep another floating dtype (fp32 parameters, bf16 q), as
    # they would in a plain product there; they are cast to q's dtype below.
    for name, table in (("rel_h", rel_h), ("rel_w", rel_w)):
        if table.dtype != q.dtype and not autocast_mixes(q, table):
            raise TypeError(
                f"{name}: expected dtype {q.dtype} (the dtype of q; another floating dtype only "
                f"under autocast), got {table.dtype}"
            )
    for name, table in (("rel_h", rel_h), ("rel_w", rel_w)):
        # Not left to indexing and einsum: a table on another device gave a bias table there (a
        # meta table, a meta bias_h beside a CPU bias_w) or an error that named neither table.
        if table.device != q.device:
            raise ValueError(
                f"{name}: expected device {q.device} (the device of q), got {table.device}"
            )
    height, width = check_map_size(height, width)
    if q.dim() != 4:
        raise ValueError(f"q: expected a 4-D tensor (B, Nh, L, dkh), got shape {tuple(q.shape)}")
    batch, heads, length, dkh = q.shape
    if length != height * width:
        raise ValueError(
            f"q: L = {length} does not equal height * width = {height} * {width} = {height * width}"
        )
    for name, table, size in (("rel_h", rel_h, height), ("rel_w", rel_w, width)):
        if table.shape != (2 * size - 1, dkh):
            raise ValueError(
                f"{name}: expected shape ({2 * size - 1}, {dkh}) = (2 * "
                f"{'height' if name == 'rel_h' else 'width'} - 1, dkh), got {tuple(table.shape)}"
            )
    q_grid = q.reshape(batch, heads, height, width, dkh)
    # Gather each query row's / column's window of the table, then one batched contraction:
    # (height, height, dkh) windows are tiny next to q, so no loop over positions is needed.
    rows = rel_h[_relative_index(height, q.device)]  # (iy, y, dkh)
    cols = rel_w[_relative_index(width, q.device)]  # (ix, x, dkh)
    bias_h = torch.einsum("bnhwd,hyd->bnhwy", q_grid, rows.to(q.dtype))
    bias_w = torch.einsum("bnhwd,wxd->bnhwx", q_grid, cols.to(q.dtype))
    return bias_h.reshape(batch, heads, length, height), bias_w.reshape(batch, heads, length, width)

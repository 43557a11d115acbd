"""relative_logits against a literal per-position loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aanet_kernels import attention_2d, available_backends, relative_logits
from aanet_kernels.functional import sam_relative_logits


def _literal(q, rel_h, rel_w, height, width):
    batch, heads, _, _ = q.shape
    bias_h = torch.zeros(batch, heads, height * width, height, dtype=q.dtype)
    bias_w = torch.zeros(batch, heads, height * width, width, dtype=q.dtype)
    for iy in range(height):
        for ix in range(width):
            i = iy * width + ix
            for y in range(height):
                bias_h[:, :, i, y] = q[:, :, i] @ rel_h[y - iy + height - 1]
            for x in range(width):
                bias_w[:, :, i, x] = q[:, :, i] @ rel_w[x - ix + width - 1]
    return bias_h, bias_w


@pytest.mark.parametrize(("height", "width", "dkh"), [(3, 4, 2), (1, 5, 3), (4, 1, 1), (2, 2, 5)])
def test_matches_literal_loop(height: int, width: int, dkh: int):
    q = torch.randn(2, 3, height * width, dkh, dtype=torch.float64)
    rel_h = torch.randn(2 * height - 1, dkh, dtype=torch.float64)
    rel_w = torch.randn(2 * width - 1, dkh, dtype=torch.float64)
    for got, want in zip(
        relative_logits(q, rel_h, rel_w, height, width),
        _literal(q, rel_h, rel_w, height, width),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_is_differentiable():
    q = torch.randn(1, 2, 6, 3, dtype=torch.float64, requires_grad=True)
    rel_h = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    rel_w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: relative_logits(*t, 2, 3), (q, rel_h, rel_w))


def test_bad_table_shape_names_the_argument():
    q = torch.randn(1, 1, 6, 3)
    with pytest.raises(ValueError, match=r"rel_w: expected shape \(5, 3\)"):
        relative_logits(q, torch.randn(3, 3), torch.randn(4, 3), 2, 3)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda q, t: relative_logits(q, t(3), t(5), 2.0, 3),
            ValueError,
            "height, width: expected",
        ),
        (lambda q, t: relative_logits(q, t(3), t(5), 0, 3), ValueError, "height, width: expected"),
        (lambda q, t: relative_logits(q, t(3).numpy(), t(5), 2, 3), TypeError, "rel_h: expected a"),
        (lambda q, t: sam_relative_logits(q, t(3), t(5), 0, 3), ValueError, "height, width: expe"),
    ],
)
def test_bad_map_sizes_and_tables_name_the_argument(call, error, message):
    q = torch.randn(1, 1, 6, 3)
    with pytest.raises(error, match=message):
        call(q, lambda rows: torch.randn(rows, 3))


def _sam_attention_literal(q, k, v, rel_pos_h, rel_pos_w, height, width, scale):
    """SAM / ViTDet's attention with decomposed relative positions, position by position: the
    logit of query (iy, ix) for key (y, x) gains q . rel_pos_h[iy - y + H - 1] and
    q . rel_pos_w[ix - x + W - 1] (tables indexed by query minus key)."""
    logits = scale * q @ k.transpose(-1, -2)
    extra = torch.zeros_like(logits)
    for i in range(height * width):
        iy, ix = divmod(i, width)
        for j in range(height * width):
            y, x = divmod(j, width)
            rel = rel_pos_h[iy - y + height - 1] + rel_pos_w[ix - x + width - 1]
            extra[:, :, i, j] = q[:, :, i] @ rel
    return torch.softmax(logits + extra, dim=-1) @ v


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("table_sizes", [None, (9, 5)], ids=["exact", "resized"])
def test_sam_relative_logits_give_sams_attention(backend: str, table_sizes):
    # An independent oracle: SAM's formula by loops, against the fused op fed by the helper, with
    # SAM's unscaled queries in the tables and its scale on q . k only; gradients included.
    height, width, dkh = 3, 4, 5
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, height * width, dkh, generator=gen, dtype=torch.float64)
               for _ in range(3))  # fmt: skip
    n_h, n_w = table_sizes or (2 * height - 1, 2 * width - 1)
    rel_pos_h = torch.randn(n_h, dkh, generator=gen, dtype=torch.float64)
    rel_pos_w = torch.randn(n_w, dkh, generator=gen, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (q, k, v, rel_pos_h, rel_pos_w)]
    scale = dkh**-0.5

    def sam_resized(table, size):  # SAM's get_rel_pos: linear, half-pixel centres
        if table.shape[0] == 2 * size - 1:
            return table
        return F.interpolate(table.t()[None], size=2 * size - 1, mode="linear")[0].t()

    expected = _sam_attention_literal(
        q, k, v, sam_resized(rel_pos_h, height), sam_resized(rel_pos_w, width), height, width, scale
    )
    bias_h, bias_w = sam_relative_logits(q, rel_pos_h, rel_pos_w, height, width)
    got = attention_2d(
        q, k, v, bias_h, bias_w, height=height, width=width, scale=scale, backend=backend
    )
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    for g, e in zip(
        torch.autograd.grad(got, inputs, grad_out),
        torch.autograd.grad(expected, inputs, grad_out),
        strict=True,
    ):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)

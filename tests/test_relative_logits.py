"""relative_logits against a literal per-position loop."""

from __future__ import annotations

import pytest
import torch

from aanet_kernels import relative_logits


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

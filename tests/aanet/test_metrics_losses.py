"""Metrics on hand-computed cases; losses against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from aanet.losses import adaptive_wing, build_loss, gaussian_heatmaps, wing
from aanet.metrics import auc, failure_rate, nme, summarize


def _face(num_points: int, left: int, right: int) -> torch.Tensor:
    points = torch.rand(1, num_points, 2, generator=torch.Generator().manual_seed(num_points)) * 50
    points[0, left] = torch.tensor([20.0, 30.0])
    points[0, right] = torch.tensor([28.0, 36.0])  # inter-ocular distance 10
    return points


@pytest.mark.parametrize(("num_points", "left", "right"), [(98, 60, 72), (68, 36, 45)])
def test_nme_uses_the_outer_eye_corners(num_points, left, right):
    target = _face(num_points, left, right)
    shifted = target + torch.tensor([3.0, 4.0])  # every point 5 px off
    assert nme(shifted, target).item() == pytest.approx(0.5)
    one_off = target.clone()
    one_off[0, 7, 0] += 10.0  # one point 10 px off: 10 / N / 10
    assert nme(one_off, target).item() == pytest.approx(1.0 / num_points)


def test_nme_rejects_bad_shapes_and_unknown_schemes():
    with pytest.raises(ValueError, match="pred, target"):
        nme(torch.zeros(1, 98, 2), torch.zeros(1, 98, 3))
    with pytest.raises(ValueError, match="num_points"):
        nme(torch.rand(1, 5, 2), torch.rand(1, 5, 2))


def test_failure_rate_and_auc_by_hand():
    errors = torch.tensor([0.0, 0.05, 0.1, 0.2])
    assert failure_rate(errors) == pytest.approx(0.25)  # only 0.2 is above 0.1
    # Areas under the CED per face: 1, 0.5, 0, 0 -> mean 0.375.
    assert auc(errors) == pytest.approx(0.375)
    summary = summarize(errors)
    assert summary["nme"] == pytest.approx(0.0875) and summary["count"] == 4


def test_auc_matches_numeric_integration_of_the_ced_curve():
    errors = torch.rand(200, generator=torch.Generator().manual_seed(0)) * 0.15
    grid = torch.linspace(0, 0.1, 100001)
    ced = (errors[None, :] <= grid[:, None]).float().mean(dim=1)
    numeric = torch.trapezoid(ced, grid).item() / 0.1
    assert auc(errors) == pytest.approx(numeric, abs=1e-4)


def test_coordinate_losses():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 98, 2, generator=g) * 5, torch.randn(2, 98, 2, generator=g) * 5
    logits = torch.zeros(2, 98, 8, 8)
    diff = pred - target
    assert build_loss("mse")(pred, logits, target, 4).item() == pytest.approx(
        diff.pow(2).mean().item()
    )
    assert build_loss("l1")(pred, logits, target, 4).item() == pytest.approx(
        diff.abs().mean().item()
    )
    with pytest.raises(ValueError, match="loss"):
        build_loss("huber")


def test_wing_by_hand_and_continuous():
    c = 10 - 10 * math.log(1 + 10 / 2)
    assert wing(torch.tensor([1.0])).item() == pytest.approx(10 * math.log(1.5))
    assert wing(torch.tensor([-20.0])).item() == pytest.approx(20 - c)
    assert wing(torch.tensor([10.0 - 1e-6])).item() == pytest.approx(
        wing(torch.tensor([10.0])).item()
    )


def test_adaptive_wing_branches_meet_at_theta():
    for y in (0.0, 0.3, 1.0):
        target = torch.tensor([y])
        below = adaptive_wing(target + 0.5 - 1e-6, target)
        above = adaptive_wing(target + 0.5 + 1e-6, target)
        assert below.item() == pytest.approx(above.item(), abs=1e-4)
    assert adaptive_wing(torch.tensor([0.7]), torch.tensor([0.7])).item() == 0.0


def test_gaussian_heatmaps_peak_at_targets():
    target = torch.tensor([[[13.5, 5.5]]])  # crop pixels; stride 4 -> heat-map cell (3, 1)
    maps = gaussian_heatmaps(target, 8, 8, 4)
    assert maps[0, 0].argmax().item() == 1 * 8 + 3
    assert maps.max().item() == pytest.approx(1.0)

"""Metrics on hand-computed cases; losses against their formulas."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from aanet.losses import (
    adaptive_wing,
    build_loss,
    build_training_loss,
    gaussian_heatmaps,
    heatmap_divergence,
    wing,
)
from aanet.metrics import (
    auc,
    confidence_summary,
    failure_rate,
    nme,
    point_errors,
    rank_correlation,
    summarize,
)


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


def test_training_loss_adds_the_weighted_heatmap_divergence():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.rand(2, 98, 2, generator=g) * 32, torch.rand(2, 98, 2, generator=g) * 32
    logits = torch.randn(2, 98, 8, 8, generator=g)
    plain = build_loss("l1")(pred, logits, target, 4)
    assert build_training_loss("l1", 0.0)(pred, logits, target, 4).item() == plain.item()
    divergence = heatmap_divergence(logits, target, 4)
    assert divergence.item() > 0.01  # random maps are far from the Gaussians
    assert build_training_loss("l1", 300.0)(pred, logits, target, 4).item() == pytest.approx(
        (plain + 300.0 * divergence).item()
    )


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


def _js_by_hand(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence of two distributions, from the definition."""
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> float:
        keep = a > 0
        return float((a[keep] * (a[keep] / b[keep]).log()).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_heatmap_divergence_matches_its_definition():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 6, 7, generator=generator, dtype=torch.float64)
    target = torch.rand(2, 3, 2, generator=generator, dtype=torch.float64) * 24
    got = heatmap_divergence(logits, target, stride=4).item()
    gauss = gaussian_heatmaps(target, 6, 7, 4).flatten(2)
    gauss = gauss / gauss.sum(-1, keepdim=True)
    prob = torch.softmax(logits.flatten(2), -1)
    expected = sum(_js_by_hand(prob[b, n], gauss[b, n]) for b in range(2) for n in range(3)) / 6
    assert got == pytest.approx(expected, rel=1e-5)


def test_heatmap_divergence_is_zero_at_the_gaussian_and_grows_as_the_map_spreads():
    target = torch.tensor([[[13.5, 9.5]]])  # crop pixels; cell (3, 2) of a stride-4 map
    gauss = gaussian_heatmaps(target, 8, 8, 4)
    at_target = heatmap_divergence(gauss.clamp_min(1e-30).log(), target, 4).item()
    sharp_wrong = torch.full((1, 1, 8, 8), -30.0)
    sharp_wrong[0, 0, 7, 7] = 0.0
    flat = torch.zeros(1, 1, 8, 8)
    assert at_target == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < heatmap_divergence(flat, target, 4).item() < math.log(2)
    assert heatmap_divergence(sharp_wrong, target, 4).item() == pytest.approx(math.log(2), rel=1e-3)


def test_heatmap_divergence_is_finite_in_half_and_for_targets_off_the_map():
    logits = torch.randn(1, 2, 8, 8, dtype=torch.float16, requires_grad=True)
    target = torch.tensor([[[16.0, 16.0], [1e4, -1e4]]])  # the second far outside the crop
    value = heatmap_divergence(logits, target, 4)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 1].abs().max() < 1e-6  # nothing to learn from an all-zero Gaussian


def test_point_errors_average_to_the_nme():
    target = _face(98, 60, 72)
    pred = target + torch.randn(1, 98, 2, generator=torch.Generator().manual_seed(4))
    per_point = point_errors(pred, target)
    assert per_point.shape == (1, 98)
    assert per_point.mean().item() == pytest.approx(nme(pred, target).item())
    assert per_point[0, 5].item() == pytest.approx((pred - target)[0, 5].norm().item() / 10)


def test_rank_correlation_by_hand():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rank_correlation(a, a * 10) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    # ranks (0, 1, 2, 3) against (1, 0, 3, 2): 1 - 6 * 4 / (4 * 15) = 0.6
    assert rank_correlation(a, torch.tensor([2.0, 1.0, 4.0, 3.0])) == pytest.approx(0.6)


def test_confidence_summary_tells_informative_from_useless_confidences():
    generator = torch.Generator().manual_seed(5)
    errors = torch.rand(40, 98, generator=generator) * 0.1
    informative = confidence_summary(errors, 1.0 - errors * 5)  # sure where accurate
    useless = confidence_summary(errors, torch.rand(40, 98, generator=generator))
    assert informative["rank_correlation"] == pytest.approx(-1.0)
    assert informative["error_least_sure_quarter"] > 3 * informative["error_most_sure_quarter"]
    assert abs(useless["rank_correlation"]) < 0.1
    assert informative["median"] == pytest.approx(float(np.median(1.0 - errors.numpy() * 5)))


def test_confidence_summary_leaves_out_points_without_a_finite_prediction():
    """Until 2026-12-06 a model whose every prediction was NaN (weights gone non-finite under
    ``--on-nan skip``) was reported with "rank correlation with the error +1.00": NaNs sort as
    numbers. Over the finite points only, and undefined when none is."""
    nan = torch.full((8, 98), float("nan"))
    summary = confidence_summary(nan, nan)
    assert all(math.isnan(value) for value in summary.values()), summary
    from aanet.evaluate import format_table

    table = format_table({"confidence": summary})
    assert "landmark confidence: no point has a finite prediction" in table and "nan" not in table
    generator = torch.Generator().manual_seed(5)
    errors = torch.rand(40, 98, generator=generator) * 0.1
    with_nan_faces = torch.cat([errors, nan])
    confidence = torch.cat([1.0 - errors * 5, nan])
    assert confidence_summary(with_nan_faces, confidence) == confidence_summary(
        errors, 1.0 - errors * 5
    )


def test_confidence_median_of_an_even_count_is_the_mean_of_the_middle_two():
    confidence = torch.arange(1.0, 9.0) / 10  # 0.1 .. 0.8
    summary = confidence_summary(torch.rand(8), confidence)
    assert summary["median"] == pytest.approx(0.45)


def test_evaluation_json_is_strict_with_empty_subsets_as_null(tmp_path):
    from aanet.evaluate import write_json

    path = tmp_path / "eval.json"
    write_json({"full": {"nme": 0.05, "count": 3}, "pose": {"nme": float("nan")}}, path)
    text = path.read_text()
    assert "NaN" not in text
    assert json.loads(text) == {"full": {"nme": 0.05, "count": 3}, "pose": {"nme": None}}

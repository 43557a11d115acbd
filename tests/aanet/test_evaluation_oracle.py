"""The evaluation against an oracle written from the definitions (not from ``aanet.metrics``):
NME by the inter-ocular or inter-pupil distance, FR@0.1, the exact AUC of the step CED."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aanet.metrics import auc, failure_rate, nme, point_errors, summarize

# --- the oracle --------------------------------------------------------------------------------

# Outer eye corners and pupils, 0-based: WFLW annotates the pupils (96, 97); 300W has none, and its
# pupil is the centre of the six points of each eye.
OCULAR = {98: ([60], [72]), 68: ([36], [45])}
PUPIL = {98: ([96], [97]), 68: (list(range(36, 42)), list(range(42, 48)))}


def oracle_nme(pred: np.ndarray, target: np.ndarray, pupils: bool = False) -> list[float]:
    """Per face: the mean over points of the point-to-point distance, over the distance of the
    two eye centres (each the mean of its points)."""
    left, right = (PUPIL if pupils else OCULAR)[target.shape[1]]
    out = []
    for p, t in zip(pred.astype(np.float64), target.astype(np.float64), strict=True):
        a = [sum(t[i][k] for i in left) / len(left) for k in (0, 1)]
        b = [sum(t[i][k] for i in right) / len(right) for k in (0, 1)]
        norm = math.hypot(a[0] - b[0], a[1] - b[1])
        out.append(sum(math.hypot(*(p[i] - t[i])) for i in range(len(t))) / len(t) / norm)
    return out


def oracle_fr(errors: list[float], threshold: float = 0.1) -> float:
    """A face fails when its NME is above the threshold (or is not a number)."""
    return sum(1 for e in errors if not e <= threshold) / len(errors)


def oracle_auc(errors: list[float], threshold: float = 0.1) -> float:
    """The step CED (fraction of faces with NME <= x) integrated over [0, threshold] rectangle by
    rectangle between its jumps, over the threshold."""
    jumps = sorted(e for e in errors if e <= threshold)
    area, found, x = 0.0, 0, 0.0
    for e in jumps:
        area += (e - x) * found / len(errors)
        found, x = found + 1, e
    area += (threshold - x) * found / len(errors)
    return area / threshold


def trapezoid_auc(errors: list[float], threshold: float = 0.1, step: float = 1e-4) -> float:
    """The grid approximation many papers' code uses, to show where it differs."""
    grid = np.linspace(0.0, threshold, round(threshold / step) + 1)
    ced = [(np.asarray(errors) <= x).mean() for x in grid]
    return float(np.trapezoid(ced, grid)) / threshold


def random_faces(num_points: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(count, num_points, 2, generator=g, dtype=torch.float64) * 100
    pred = target + torch.randn(count, num_points, 2, generator=g, dtype=torch.float64) * 3
    return pred, target


# --- metrics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_points", [98, 68])
@pytest.mark.parametrize("pupils", [False, True], ids=["inter-ocular", "inter-pupil"])
def test_nme_matches_the_oracle(num_points, pupils):
    pred, target = random_faces(num_points, 5, num_points)
    normalization = "inter-pupil" if pupils else "inter-ocular"
    got = nme(pred, target, normalization).tolist()
    assert got == pytest.approx(oracle_nme(pred.numpy(), target.numpy(), pupils), rel=1e-12)
    assert nme(pred, target).tolist() == pytest.approx(oracle_nme(pred.numpy(), target.numpy()))


def test_unknown_normalization_is_refused():
    pred, target = random_faces(98, 1, 0)
    with pytest.raises(ValueError, match="normalization: expected one of"):
        nme(pred, target, "inter-eye")


@pytest.mark.parametrize(
    ("errors", "fr", "area"),
    [
        ([0.0, 0.0, 0.0], 0.0, 1.0),  # all perfect: the whole square
        ([0.2, 0.5, 0.11], 1.0, 0.0),  # all above: nothing
        ([0.1], 0.0, 0.0),  # exactly at 0.1: passes, but is found only at 0.1 itself
        ([0.05], 0.0, 0.5),
        ([0.03, 0.03, 0.07, 0.07], 0.0, 0.5),  # ties
        ([0.0, 0.05, 0.1, 0.2], 0.25, 0.375),
    ],
)
def test_failure_rate_and_exact_auc_against_the_oracle(errors, fr, area):
    for dtype in (torch.float64, torch.float32):
        tensor = torch.tensor(errors, dtype=dtype)
        assert failure_rate(tensor) == pytest.approx(fr) == oracle_fr(errors)
        assert auc(tensor) == pytest.approx(area, abs=1e-7)
    assert oracle_auc(errors) == pytest.approx(area)
    # A trapezoid on a grid of step h is off by up to h / 2 per face, over the threshold.
    assert abs(trapezoid_auc(errors) - area) <= 1e-4 / 2 / 0.1 + 1e-12


def test_the_exact_auc_where_a_grid_trapezoid_is_not():
    """One face at exactly 0.1 is found only at the last cut-off: an area of 0, where the grid's
    trapezoid gives it half a step. All faces at 0 fill the square, on the grid too."""
    assert auc(torch.tensor([0.1], dtype=torch.float64)) == 0.0
    assert trapezoid_auc([0.1]) == pytest.approx(0.5e-4 / 0.1)
    assert auc(torch.zeros(3)) == 1.0 == pytest.approx(trapezoid_auc([0.0] * 3))
    assert auc(torch.tensor([0.25, 0.11])) == 0.0 == trapezoid_auc([0.25, 0.11])


def test_auc_and_fr_on_random_errors_match_the_oracle():
    errors = torch.rand(300, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 0.15
    errors[:20] = errors[20:40]  # ties
    as_list = errors.tolist()
    assert auc(errors) == pytest.approx(oracle_auc(as_list), rel=1e-12)
    assert failure_rate(errors) == oracle_fr(as_list)


def test_a_face_without_a_finite_prediction_fails():
    """Until 2026-12-01 a NaN NME compared as "not above 0.1", so it passed: FR 0 % for a model
    that gave NaN on every face."""
    errors = torch.tensor([float("nan"), 0.05, float("inf")])
    assert failure_rate(errors) == pytest.approx(2 / 3) == oracle_fr(errors.tolist())
    assert auc(errors) == pytest.approx(0.5 / 3) == pytest.approx(oracle_auc(errors.tolist()))
    assert math.isnan(summarize(errors)["nme"])
    assert failure_rate(torch.full((4,), float("nan"))) == 1.0


def test_negative_errors_and_thresholds_are_refused():
    """Until 2026-12-01 an error of -0.1 gave an AUC of 2."""
    with pytest.raises(ValueError, match="errors: expected NMEs >= 0"):
        auc(torch.tensor([-0.1]))
    with pytest.raises(ValueError, match="threshold: expected a positive number"):
        failure_rate(torch.tensor([0.05]), threshold=0.0)


def test_empty_and_single_face_sets():
    empty = summarize(torch.zeros(0))
    assert empty["count"] == 0 and all(math.isnan(empty[k]) for k in ("nme", "fr", "auc"))
    one = summarize(torch.tensor([0.04]))
    assert one == pytest.approx({"nme": 0.04, "fr": 0.0, "auc": 0.6, "count": 1})


@pytest.mark.parametrize(
    ("normalization", "points"), [("inter-ocular", (60, 72)), ("inter-pupil", (96, 97))]
)
def test_degenerate_faces_are_named(normalization, points):
    """Coincident eye corners or pupils, or a NaN among them: an error naming the face (until
    2026-12-01 a NaN corner gave a NaN NME without a word)."""
    pred, target = random_faces(98, 3, 1)
    for value in (target[2, points[0]].clone(), torch.tensor([float("nan"), 1.0])):
        bad = target.clone()
        bad[2, points[1]] = value
        with pytest.raises(ValueError, match="target: face 2: .*coincide or are not finite"):
            point_errors(pred, bad, normalization)

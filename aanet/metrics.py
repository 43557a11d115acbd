"""Landmark accuracy: NME by the inter-ocular (or inter-pupil) distance, failure rate and AUC of
the CED curve."""

from __future__ import annotations

import torch
from torch import Tensor

from aanet.landmarks import normalizing_points, scheme_for

THRESHOLD = 0.1


class DegenerateFaceError(ValueError):
    """A target face whose normalising distance is zero or not finite (its NME is undefined);
    ``face`` is its index in the batch, ``reason`` the message without it."""

    def __init__(self, face: int, reason: str) -> None:
        super().__init__(f"target: face {face}: {reason}")
        self.face = face
        self.reason = reason


def nme(pred: Tensor, target: Tensor, normalization: str = "inter-ocular") -> Tensor:
    """Per-face normalised mean error ``(B,)`` of ``(B, N, 2)`` points.

    The mean point-to-point distance divided by the target's ``normalization`` distance (see
    ``normalizing_distance``), the scheme chosen from ``N``.
    """
    return point_errors(pred, target, normalization).mean(dim=-1)


def normalizing_distance(target: Tensor, normalization: str = "inter-ocular") -> Tensor:
    """Per-face ``(B,)`` distance of ``(B, N, 2)`` targets: between the outer eye corners
    (``inter-ocular``: WFLW points 60 and 72, 300W points 36 and 45) or between the pupils
    (``inter-pupil``: WFLW points 96 and 97; 300W the means of points 36-41 and 42-47).

    Raises :class:`DegenerateFaceError` for the first face where it is zero or not finite (the
    loaders refuse such annotations already, ``records.check_normalizing_distance``: this is the
    last guard, for records made otherwise).
    """
    left, right, what = normalizing_points(scheme_for(target.shape[1]), normalization)
    distance = (target[:, list(left)].mean(dim=1) - target[:, list(right)].mean(dim=1)).norm(dim=-1)
    bad = ~(distance > 0)  # NaN too
    if bad.any():
        face = int(bad.nonzero()[0])
        raise DegenerateFaceError(
            face,
            f"{what} coincide or are not finite ({normalization} distance "
            f"{float(distance[face]):g}): the NME is undefined",
        )
    return distance


def point_errors(pred: Tensor, target: Tensor, normalization: str = "inter-ocular") -> Tensor:
    """Per-point distances ``(B, N)`` divided by the face's ``normalization`` distance (see
    ``normalizing_distance``)."""
    if pred.shape != target.shape or pred.dim() != 3 or pred.shape[-1] != 2:
        raise ValueError(
            f"pred, target: expected equal shapes (B, N, 2), got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    distance = normalizing_distance(target, normalization)
    return (pred - target).norm(dim=-1) / distance[:, None]


def rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two 1-D samples (ties ranked in order of appearance)."""
    if a.numel() < 2:
        return float("nan")
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
    return float(torch.corrcoef(ranks)[0, 1])


def confidence_summary(errors: Tensor, confidence: Tensor) -> dict[str, float]:
    """Whether per-point confidences mean anything: their median, their rank correlation with the
    per-point errors (negative when the sure points are the accurate ones), and the mean error
    of the least and of the most confident quarter of the points; over the points whose error
    and confidence are finite (a face without a finite prediction has neither: NaN would sort,
    and rank, as a number)."""
    errors, confidence = errors.flatten().double(), confidence.flatten().double()
    finite = errors.isfinite() & confidence.isfinite()
    errors, confidence = errors[finite], confidence[finite]
    if not errors.numel():
        return {"median": float("nan"), "rank_correlation": float("nan"),
                "error_least_sure_quarter": float("nan"),
                "error_most_sure_quarter": float("nan")}  # fmt: skip
    # quantile interpolates: an even count's median is the mean of the middle two (Tensor.median
    # gives the lower one).
    low, median, high = torch.quantile(
        confidence, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    )
    return {
        "median": float(median),
        "rank_correlation": rank_correlation(errors, confidence),
        "error_least_sure_quarter": float(errors[confidence <= low].mean()),
        "error_most_sure_quarter": float(errors[confidence >= high].mean()),
    }


def _check_errors(errors: Tensor, threshold: float) -> None:
    if not threshold > 0:
        raise ValueError(f"threshold: expected a positive number, got {threshold!r}")
    if (errors < 0).any():
        raise ValueError(f"errors: expected NMEs >= 0 (or NaN), got {float(errors.min()):g}")


def failure_rate(errors: Tensor, threshold: float = THRESHOLD) -> float:
    """Fraction of faces whose NME is above ``threshold`` (one exactly at it passes) or NaN (no
    usable prediction counts as a failure)."""
    _check_errors(errors, threshold)
    # Compared in the errors' dtype: a float32 NME of 0.1 is at the threshold, not above it.
    return float((~(errors <= threshold)).double().mean()) if errors.numel() else float("nan")


def auc(errors: Tensor, threshold: float = THRESHOLD) -> float:
    """Area under the cumulative error distribution up to ``threshold``, divided by it, in [0, 1].

    The CED at ``x`` is the fraction of faces with NME ``<= x``; its area is taken exactly: a face
    with error ``e <= threshold`` is found at every cut-off in ``[e, threshold]``, a share of
    ``(threshold - e) / threshold``, and a face above the threshold (or NaN) adds nothing. A
    trapezoid on a grid of step ``h`` differs by up to ``h / (2 * threshold)`` (one face at exactly
    the threshold: 0 here).
    """
    _check_errors(errors, threshold)
    if not errors.numel():
        return float("nan")
    found = errors <= threshold
    # In float64 after the comparison; the clamp keeps a float32 0.1 (just above the double 0.1)
    # at a share of 0.
    share = ((threshold - errors.double()) / threshold).clamp(min=0)
    return float(torch.where(found, share, 0.0).mean())


def summarize(errors: Tensor, threshold: float = THRESHOLD) -> dict[str, float]:
    """NME (mean; NaN if a face's is), failure rate and AUC at ``threshold`` of per-face errors,
    plus the count."""
    return {
        "nme": float(errors.double().mean()) if errors.numel() else float("nan"),
        "fr": failure_rate(errors, threshold),
        "auc": auc(errors, threshold),
        "count": int(errors.numel()),
    }

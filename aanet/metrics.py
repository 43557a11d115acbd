"""Landmark accuracy: NME by the inter-ocular distance, failure rate and AUC of the CED curve."""

from __future__ import annotations

import torch
from torch import Tensor

from aanet.landmarks import scheme_for

THRESHOLD = 0.1


def nme(pred: Tensor, target: Tensor) -> Tensor:
    """Per-face normalised mean error ``(B,)`` of ``(B, N, 2)`` points.

    The mean point-to-point distance divided by the distance between the outer eye corners of
    the target (WFLW points 60 and 72, 300W points 36 and 45), chosen from ``N``.
    """
    return point_errors(pred, target).mean(dim=-1)


def point_errors(pred: Tensor, target: Tensor) -> Tensor:
    """Per-point distances ``(B, N)`` divided by the face's inter-ocular distance (see ``nme``)."""
    if pred.shape != target.shape or pred.dim() != 3 or pred.shape[-1] != 2:
        raise ValueError(
            f"pred, target: expected equal shapes (B, N, 2), got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    scheme = scheme_for(target.shape[1])
    ocular = (target[:, scheme.left_eye_outer] - target[:, scheme.right_eye_outer]).norm(dim=-1)
    if (ocular <= 0).any():
        raise ValueError(
            "target: the outer eye corners coincide in some face (zero inter-ocular distance)"
        )
    return (pred - target).norm(dim=-1) / ocular[:, None]


def rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two 1-D samples (ties ranked in order of appearance)."""
    if a.numel() < 2:
        return float("nan")
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
    return float(torch.corrcoef(ranks)[0, 1])


def confidence_summary(errors: Tensor, confidence: Tensor) -> dict[str, float]:
    """Whether per-point confidences mean anything: their median, their rank correlation with the
    per-point errors (negative when the sure points are the accurate ones), and the mean error
    of the least and of the most confident quarter of the points."""
    errors, confidence = errors.flatten().double(), confidence.flatten().double()
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


def failure_rate(errors: Tensor, threshold: float = THRESHOLD) -> float:
    """Fraction of faces whose NME is above ``threshold``."""
    return float((errors > threshold).float().mean()) if errors.numel() else float("nan")


def auc(errors: Tensor, threshold: float = THRESHOLD) -> float:
    """Area under the cumulative error distribution up to ``threshold``, divided by it.

    Computed exactly: a face with error ``e`` is counted as found for every cut-off in
    ``[e, threshold]``, so its share of the area is ``max(0, threshold - e) / threshold``.
    (Papers integrate the curve on a fine grid; the two agree to the grid step.)
    """
    if not errors.numel():
        return float("nan")
    return float(((threshold - errors).clamp(min=0) / threshold).mean())


def summarize(errors: Tensor, threshold: float = THRESHOLD) -> dict[str, float]:
    """NME (mean), failure rate and AUC at ``threshold`` of per-face errors, plus the count."""
    return {
        "nme": float(errors.mean()) if errors.numel() else float("nan"),
        "fr": failure_rate(errors, threshold),
        "auc": auc(errors, threshold),
        "count": int(errors.numel()),
    }

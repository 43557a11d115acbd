"""Training losses: coordinate MSE (default), L1, Wing, and Adaptive Wing on the heat maps.

Coordinate losses compare predicted and target landmarks in crop pixels. Adaptive Wing (Wang
et al., ICCV 2019) is a heat-map loss: it compares ``sigmoid`` of the model's heat-map logits
with Gaussian maps drawn at the targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

LOSSES = ("mse", "l1", "wing", "awing")

LossFn = Callable[[Tensor, Tensor, Tensor, int], Tensor]


def mse_loss(coords: Tensor, logits: Tensor, target: Tensor, stride: int) -> Tensor:
    return (coords - target).pow(2).mean()


def l1_loss(coords: Tensor, logits: Tensor, target: Tensor, stride: int) -> Tensor:
    return (coords - target).abs().mean()


def wing(diff: Tensor, width: float = 10.0, curvature: float = 2.0) -> Tensor:
    """Wing loss (Feng et al., CVPR 2018) of a difference: log near zero, linear far away."""
    x = diff.abs()
    c = width - width * math.log1p(width / curvature)
    return torch.where(x < width, width * torch.log1p(x / curvature), x - c).mean()


def wing_loss(coords: Tensor, logits: Tensor, target: Tensor, stride: int) -> Tensor:
    return wing(coords - target)


def gaussian_heatmaps(
    target: Tensor, height: int, width: int, stride: int, sigma: float = 1.0
) -> Tensor:
    """``(B, N, H, W)`` Gaussians of peak 1 at the targets (crop pixels) on the heat-map grid."""
    centres = (target + 0.5) / stride - 0.5  # crop pixel -> heat-map pixel (centres at integers)
    ys = torch.arange(height, device=target.device, dtype=target.dtype).view(1, 1, -1, 1)
    xs = torch.arange(width, device=target.device, dtype=target.dtype).view(1, 1, 1, -1)
    dx = xs - centres[..., 0, None, None]
    dy = ys - centres[..., 1, None, None]
    return torch.exp(-(dx**2 + dy**2) / (2 * sigma**2))


def adaptive_wing(
    pred: Tensor,
    target: Tensor,
    omega: float = 14.0,
    theta: float = 0.5,
    epsilon: float = 1.0,
    alpha: float = 2.1,
) -> Tensor:
    """Adaptive Wing loss between heat maps ``pred`` and ``target`` with values in [0, 1]."""
    diff = (target - pred).abs()
    power = alpha - target
    ratio = theta / epsilon
    a = omega / (1 + ratio**power) * power * ratio ** (power - 1) / epsilon
    c = theta * a - omega * torch.log1p(ratio**power)
    return torch.where(
        diff < theta, omega * torch.log1p((diff / epsilon) ** power), a * diff - c
    ).mean()


def awing_loss(coords: Tensor, logits: Tensor, target: Tensor, stride: int) -> Tensor:
    maps = gaussian_heatmaps(target, logits.shape[-2], logits.shape[-1], stride)
    return adaptive_wing(torch.sigmoid(logits.float()), maps)


def heatmap_divergence(logits: Tensor, target: Tensor, stride: int, sigma: float = 1.0) -> Tensor:
    """Mean Jensen-Shannon divergence between each softmax heat map and a Gaussian of ``sigma``
    heat-map cells centred on its target, normalised to sum 1 (the regulariser of DSNT, Nibali et
    al., 2018). A coordinate loss alone is met by any map whose mean is right, however spread
    out; this term asks for a compact peak, which is what the confidence measures. In fp32;
    bounded by ``log 2``."""
    b, n, h, w = logits.shape
    p = torch.softmax(logits.float().flatten(2), dim=-1)
    q = gaussian_heatmaps(target.float(), h, w, stride, sigma).flatten(2)
    # A target far off the grid has an all-zero Gaussian: q = 0 there gives a constant term.
    q = q / q.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    m = 0.5 * (p + q)
    kl_p = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(dim=-1)
    kl_q = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(dim=-1)
    return (0.5 * (kl_p + kl_q)).mean()


def build_loss(name: str) -> LossFn:
    """The loss called as ``loss(coords, heatmap_logits, target, stride)``."""
    table = {"mse": mse_loss, "l1": l1_loss, "wing": wing_loss, "awing": awing_loss}
    if name not in table:
        raise ValueError(f"loss: expected one of {LOSSES}, got {name!r}")
    return table[name]


def build_training_loss(name: str, heatmap_reg: float = 0.0) -> LossFn:
    """What training minimises: the loss ``name`` plus ``heatmap_reg`` times
    :func:`heatmap_divergence`; called like :func:`build_loss`'s losses."""
    loss_fn = build_loss(name)
    if not heatmap_reg:
        return loss_fn

    def regularised(coords: Tensor, logits: Tensor, target: Tensor, stride: int) -> Tensor:
        divergence = heatmap_divergence(logits, target, stride)
        return loss_fn(coords, logits, target, stride) + heatmap_reg * divergence

    return regularised

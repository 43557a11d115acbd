"""AANet: a bottleneck CNN whose low-resolution blocks carry attention-augmented convolutions,
with a heat-map head read out by a differentiable soft-argmax.

Why heat maps + soft-argmax: the head keeps the spatial layout of the features (a per-landmark
map over the grid) instead of flattening it into a regression layer, which is what makes heat-map
methods accurate on WFLW; the soft-argmax (expectation of the softmax over the map) turns each map
into sub-pixel ``(x, y)`` that a coordinate loss trains end to end, so the output is not
quantised to the heat-map grid. The confidence of a landmark is the probability mass in the 3x3
cells around its most likely cell: near 1 for a sharp peak, low for a spread-out, unsure map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aanet_kernels import AAConv2d

HEATMAP_STRIDE = 4


@dataclass(frozen=True)
class ModelConfig:
    """Network shape. ``input_size`` must be a multiple of 16. The attention backend is chosen
    at run time with ``aanet_kernels.use_backend`` (the layers use ``backend="auto"``)."""

    num_points: int = 98
    input_size: int = 128
    width: int = 64  # channels at stride 4; doubled at each lower resolution
    # One stage per entry, at strides 4, 8, 16, ...: an entry bottleneck (the downsampling one),
    # then this many more (attention-augmented from stride 8 on).
    blocks: tuple[int, ...] = (1, 1, 2)
    attention: bool = True
    num_heads: int = 4


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 convolutions, each with BatchNorm (and ReLU), plus a shortcut.

    With ``attention`` the 3x3 is an ``AAConv2d`` whose key/query depth and value channels are
    an eighth of the block's output channels (rounded to the heads); the value channels are
    concatenated with the convolution's features inside the layer.
    """

    def __init__(
        self, cin: int, cout: int, stride: int, attention: bool, grid: int, cfg: ModelConfig
    ) -> None:
        super().__init__()
        mid = cout // 2
        self.reduce = conv_bn_relu(cin, mid, 1)
        if attention:
            depth = max(cfg.num_heads * 2, cout // 8 // cfg.num_heads * cfg.num_heads)
            spatial = AAConv2d(
                mid, mid, 3, stride, dk=depth, dv=depth, num_heads=cfg.num_heads,
                bias=False, input_size=grid,
            )  # fmt: skip
        else:
            spatial = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.spatial = nn.Sequential(spatial, nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.expand = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.expand(self.spatial(self.reduce(x))) + self.shortcut(x))


def soft_argmax(logits: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """``(B, N, h, w)`` logits to ``(B, N, 2)`` expected positions in input pixels and ``(B, N)``
    confidences. Softmax statistics are taken in fp32 (AMP safe)."""
    b, n, h, w = logits.shape
    prob = torch.softmax(logits.float().flatten(2), dim=-1).view(b, n, h, w)
    xs = torch.arange(w, device=logits.device, dtype=prob.dtype)
    ys = torch.arange(h, device=logits.device, dtype=prob.dtype)
    x = (prob.sum(dim=2) * xs).sum(dim=-1)
    y = (prob.sum(dim=3) * ys).sum(dim=-1)
    coords = (torch.stack([x, y], dim=-1) + 0.5) * stride - 0.5  # heat-map cell -> input pixel
    mass = F.avg_pool2d(prob, 3, stride=1, padding=1, count_include_pad=True) * 9
    return coords, mass.flatten(2).amax(dim=-1).clamp(max=1.0)


class AANet(nn.Module):
    """Landmarks from a face crop: ``forward(images) -> (coords, confidence, heatmap_logits)``.

    ``images`` is ``(B, 3, S, S)`` with ``S = config.input_size``; ``coords`` ``(B, N, 2)`` are in
    input pixels (pixel centres at integers), ``confidence`` ``(B, N)`` in [0, 1], and the logits
    ``(B, N, S/4, S/4)``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.input_size % 16:
            raise ValueError(f"input_size: expected a multiple of 16, got {config.input_size}")
        coarsest = 4 * 2 ** (len(config.blocks) - 1)
        if config.input_size < coarsest:
            raise ValueError(
                f"input_size: {len(config.blocks)} stages (blocks={list(config.blocks)}) end at "
                f"stride {coarsest}, so the input must be at least {coarsest} pixels; got "
                f"{config.input_size}"
            )
        if config.width < 2:
            raise ValueError(f"width: expected at least 2 channels, got {config.width}")
        self.config = config
        w, s = config.width, config.input_size
        self.stem = nn.Sequential(conv_bn_relu(3, w // 2, 3, 2), conv_bn_relu(w // 2, w, 3, 2))
        stages = []
        cin = w
        for level, count in enumerate(config.blocks):
            cout = w * 2**level
            grid = s // (4 * 2**level)
            # Attention at strides 8 and 16 only: the grids there are small enough (L <= (S/8)^2)
            # for global attention to be cheap; the first block of a stage downsamples with a conv.
            attend = config.attention and level > 0
            blocks = [Bottleneck(cin, cout, 1 if level == 0 else 2, False, grid, config)]
            try:
                blocks += [Bottleneck(cout, cout, 1, attend, grid, config) for _ in range(count)]
            except ValueError as error:  # the attention layer's own check, in its terms
                raise ValueError(
                    f"width: {w} is too narrow for num_heads={config.num_heads} at stride "
                    f"{4 * 2**level} ({error}); use a larger width or fewer heads"
                ) from error
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.laterals = nn.ModuleList(
            [nn.Conv2d(w * 2**level, w, 1) for level in range(len(config.blocks))]
        )
        self.head = nn.Sequential(conv_bn_relu(w, w, 3), nn.Conv2d(w, config.num_points, 1))
        nn.init.zeros_(self.head[-1].weight)  # start from flat maps: every point at the centre
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.stem(images)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        # Top-down path: upsample the coarsest features and add each finer level's lateral.
        top = self.laterals[-1](features[-1])
        for level in range(len(features) - 2, -1, -1):
            lateral = self.laterals[level](features[level])
            top = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
        logits = self.head(top)
        coords, confidence = soft_argmax(logits, HEATMAP_STRIDE)
        return coords, confidence, logits


def build_model(config: ModelConfig) -> AANet:
    """An AANet for ``config``."""
    return AANet(config)

"""Crop-and-augment with OpenCV: one affine warp per sample, landmarks moved by the same matrix.

Coordinates follow OpenCV's convention (pixel centres at integers), for which ``warpAffine`` with
matrix ``M`` sends the source point ``p`` exactly to ``M @ [p, 1]``; a flip about the output
centre is ``x -> size - 1 - x`` followed by the mirror index map of the landmark scheme.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from aanet.landmarks import scheme_for


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms (all off gives the plain crop used for evaluation)."""

    rotation: float = 20.0  # degrees, uniform in [-rotation, rotation]
    scale: float = 0.15  # relative, uniform in [1 - scale, 1 + scale]
    shift: float = 0.08  # fraction of the crop size
    flip: bool = True
    colour: float = 0.25  # brightness/contrast/saturation jitter
    blur: float = 0.2  # probability of a Gaussian blur


NO_AUGMENT = AugmentConfig(rotation=0.0, scale=0.0, shift=0.0, flip=False, colour=0.0, blur=0.0)


def crop_matrix(box: np.ndarray, size: int, margin: float = 1.25) -> np.ndarray:
    """The 2x3 similarity from the image to a ``size`` square centred on ``box``, enlarged by
    ``margin`` around its longer side."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0, 1.0) * margin
    scale = size / side
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    centre = (size - 1) / 2
    return np.array([[scale, 0, centre - scale * cx], [0, scale, centre - scale * cy]])


def random_matrix(
    rng: np.random.Generator, size: int, config: AugmentConfig
) -> tuple[np.ndarray, bool]:
    """A random rotation/scale/shift (and flip) about the crop centre, as a 2x3 matrix."""
    angle = rng.uniform(-config.rotation, config.rotation)
    scale = rng.uniform(1 - config.scale, 1 + config.scale)
    centre = (size - 1) / 2
    matrix = cv2.getRotationMatrix2D((centre, centre), angle, scale)
    matrix[:, 2] += rng.uniform(-config.shift, config.shift, size=2) * size
    flip = bool(config.flip and rng.random() < 0.5)
    if flip:
        matrix = compose(np.array([[-1.0, 0, size - 1], [0, 1, 0]]), matrix)
    return matrix, flip


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 2x3 affine ``outer o inner``."""
    full = lambda m: np.vstack([m, [0, 0, 1]])  # noqa: E731
    return (full(outer) @ full(inner))[:2]


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine to ``(N, 2)`` points."""
    return points @ matrix[:, :2].T + matrix[:, 2]


def flip_landmarks(points: np.ndarray) -> np.ndarray:
    """Reorder mirrored points so each index keeps its meaning (left eye stays index 60...)."""
    return points[list(scheme_for(len(points)).flip_map)]


def warp(
    image: np.ndarray, points: np.ndarray, matrix: np.ndarray, size: int, flipped: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Warp ``image`` to a ``size`` square with ``matrix`` and move ``points`` exactly with it."""
    out = cv2.warpAffine(
        image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )
    moved = transform_points(matrix, points)
    return out, flip_landmarks(moved) if flipped else moved


def colour_and_blur(
    image: np.ndarray, rng: np.random.Generator, config: AugmentConfig
) -> np.ndarray:
    """Random brightness, contrast and saturation, and sometimes a Gaussian blur (BGR uint8)."""
    out = image.astype(np.float32)
    if config.colour > 0:
        gray = out.mean(axis=2, keepdims=True)
        out = gray + (out - gray) * rng.uniform(1 - config.colour, 1 + config.colour)
        mean = out.mean()
        out = (out - mean) * rng.uniform(1 - config.colour, 1 + config.colour) + mean
        out = out * rng.uniform(1 - config.colour, 1 + config.colour)
    if config.blur > 0 and rng.random() < config.blur:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.5, 1.5))
    return np.clip(out, 0, 255).astype(np.uint8)


def augment_sample(
    image: np.ndarray,
    points: np.ndarray,
    box: np.ndarray,
    size: int,
    rng: np.random.Generator | None,
    config: AugmentConfig = NO_AUGMENT,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop by ``box`` and augment; returns the ``size`` image, its landmarks, and the 2x3 matrix
    from the original image to the output (flip excluded from the point order, included in it)."""
    matrix = crop_matrix(box, size)
    flipped = False
    if rng is not None:
        extra, flipped = random_matrix(rng, size, config)
        matrix = compose(extra, matrix)
    out, moved = warp(image, points, matrix, size, flipped)
    if rng is not None:
        out = colour_and_blur(out, rng, config)
    return out, moved.astype(np.float32), matrix

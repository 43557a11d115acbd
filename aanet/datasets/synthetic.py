"""Procedural faces with the 98 WFLW landmarks, written to disk in the WFLW layout.

Each face is built in a canonical frame (face half-width 1, x right, y down) from parametric
parts, turned by a yaw-like rotation about the vertical axis (features carry a depth), then by a
similarity (scale, roll, shift) into the image. The drawing uses the landmarks themselves as
outlines, so every point sits on the feature it names. The six attribute flags are set from
the sampled parameters, so each is true exactly when its condition was drawn.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from filelock import FileLock, Timeout

from aanet.datasets import wflw
from aanet.files import remove_stale_temporaries, replacing
from aanet.landmarks import WFLW_ATTRIBUTES

POSE_DEGREES = 25.0  # |yaw| or |roll| from here on sets the pose flag
OCCLUDED_POINTS = 4  # an occluder covering this many landmarks sets the occlusion flag
_SHIFT = 4  # fixed-point bits for sub-pixel drawing with OpenCV
log = logging.getLogger("aanet.data")


# The smallest image generate() draws: a face there already spans only a few pixels.
SMALLEST_IMAGE = 8
# The config a whole set was generated with, in the set's root: written after its last file.
STAMP = "synthetic.json"
# Held while a set is checked and written (see generate); left in place, empty, afterwards.
LOCK = ".synthetic.lock"


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate: counts, image size, seed."""

    num_train: int = 1500
    num_test: int = 300
    image_size: int = 160
    seed: int = 0

    def __post_init__(self) -> None:
        least = {"num_train": 1, "num_test": 1, "image_size": SMALLEST_IMAGE, "seed": 0}
        for name, smallest in least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
                raise ValueError(f"{name}: expected an int of at least {smallest}, got {value!r}")


@dataclass
class FaceParams:
    """The sampled appearance of one face; attribute flags derive from these."""

    yaw: float
    roll: float
    scale: float
    center: tuple[float, float]
    mouth_open: float
    smile: float
    eye_open: float
    brow_raise: float
    gaze: tuple[float, float]
    light: float  # strength of the directional light gradient, 0 = flat
    light_angle: float
    gamma: float
    makeup: bool
    occluder: bool
    blur_sigma: float


def _arc(cx: float, cy: float, hw: float, height: float, ts: np.ndarray, lift: float = 0.0):
    """Points along a half-sine arc from x = cx - hw to cx + hw; ``lift`` raises the ends."""
    xs = cx - hw + 2 * hw * ts
    ys = cy - height * np.sin(np.pi * ts) - lift * np.cos(np.pi * ts) ** 2
    return np.stack([xs, ys], axis=1)


def _closed_part(cx, cy, hw, up, down, n_up, n_down, lift=0.0):
    """Left corner, upper points left->right, right corner, lower points right->left."""
    t_up = np.arange(1, n_up + 1) / (n_up + 1)
    t_down = np.arange(n_down, 0, -1) / (n_down + 1)
    corners_y = cy - lift
    return np.concatenate(
        [
            [[cx - hw, corners_y]],
            _arc(cx, cy, hw, up, t_up, lift),
            [[cx + hw, corners_y]],
            _arc(cx, cy, hw, -down, t_down, lift),
        ]
    )


def _brow(cx: float, cy: float) -> np.ndarray:
    """Upper edge 5 points left->right, lower edge 4 points right->left."""
    top = _arc(cx, cy, 0.26, 0.07, np.linspace(0, 1, 5))
    bottom = _arc(cx, cy + 0.07, 0.26, 0.05, np.array([0.875, 0.625, 0.375, 0.125]))
    return np.concatenate([top, bottom])


def canonical_landmarks(p: FaceParams) -> tuple[np.ndarray, np.ndarray]:
    """The 98 points in the canonical frame and the depth of each (for the yaw rotation)."""
    jaw = 1.0 + 0.5 * p.mouth_open
    t = np.linspace(0, 1, 33)
    contour = np.stack([-0.95 * np.cos(np.pi * t), -0.1 + jaw * np.sin(np.pi * t)], axis=1)
    brow_y = -0.42 - p.brow_raise
    brows = [_brow(-0.42, brow_y), _brow(0.42, brow_y)]
    bridge = np.stack([np.zeros(4), np.linspace(-0.12, 0.28, 4)], axis=1)
    nose_x = np.linspace(-0.15, 0.15, 5)
    lower_nose = np.stack([nose_x, 0.34 + 0.05 * np.cos(nose_x / 0.15 * np.pi / 2)], axis=1)
    eyes = [
        _closed_part(cx, -0.18, 0.17, 0.09 * p.eye_open, 0.06 * p.eye_open, 3, 3)
        for cx in (-0.4, 0.4)
    ]
    mouth_y = 0.62 + 0.3 * p.mouth_open
    outer = _closed_part(0, mouth_y, 0.3, 0.07, 0.08 + p.mouth_open, 5, 5, lift=p.smile)
    inner = _closed_part(0, mouth_y, 0.22, 0.015, 0.015 + p.mouth_open, 3, 3, lift=0.8 * p.smile)
    pupils = np.array([[-0.4 + p.gaze[0], -0.18 + p.gaze[1]], [0.4 + p.gaze[0], -0.18 + p.gaze[1]]])
    points = np.concatenate([contour, *brows, bridge, lower_nose, *eyes, outer, inner, pupils])
    depth = np.concatenate(
        [
            np.zeros(33),  # the contour is the silhouette
            np.full(18, 0.35),
            np.linspace(0.35, 0.6, 4),
            np.full(5, 0.45),
            np.full(16, 0.3),
            np.full(20, 0.4),
            np.full(2, 0.32),
        ]
    )
    return points, depth


def _to_image(points: np.ndarray, depth: np.ndarray, p: FaceParams) -> np.ndarray:
    yaw, roll = np.radians(p.yaw), np.radians(p.roll)
    xs = points[:, 0] * np.cos(yaw) + depth * np.sin(yaw)
    rotation = np.array([[np.cos(roll), -np.sin(roll)], [np.sin(roll), np.cos(roll)]])
    turned = np.stack([xs, points[:, 1]], axis=1) @ rotation.T
    return (turned * p.scale + np.asarray(p.center)).astype(np.float32)


def sample_params(rng: np.random.Generator, size: int) -> FaceParams:
    """Random pose, expression, lighting, make-up, occlusion and blur for one face."""
    big_pose = rng.random() < 0.3
    yaw = rng.uniform(25, 42) * rng.choice([-1, 1]) if big_pose else rng.uniform(-18, 18)
    roll = rng.uniform(26, 38) * rng.choice([-1, 1]) if rng.random() < 0.15 else rng.normal(0, 8)
    roll = (
        float(np.clip(roll, -38, 38))
        if abs(roll) >= POSE_DEGREES
        else float(np.clip(roll, -22, 22))
    )
    expressive = rng.random() < 0.35
    scale = rng.uniform(0.24, 0.31) * size
    margin = 1.25 * scale
    center = (rng.uniform(margin, size - margin), rng.uniform(margin * 0.9, size - margin * 1.1))
    return FaceParams(
        yaw=float(yaw),
        roll=roll,
        scale=float(scale),
        center=(float(center[0]), float(center[1])),
        mouth_open=float(rng.uniform(0.12, 0.25) if expressive else rng.uniform(0, 0.04)),
        smile=float(
            rng.uniform(0.08, 0.14)
            if expressive and rng.random() < 0.5
            else rng.uniform(-0.02, 0.04)
        ),
        eye_open=float(
            rng.uniform(0.15, 0.4) if expressive and rng.random() < 0.3 else rng.uniform(0.7, 1.1)
        ),
        brow_raise=float(rng.uniform(0.0, 0.05)),
        gaze=(float(rng.uniform(-0.05, 0.05)), float(rng.uniform(-0.02, 0.02))),
        light=float(rng.uniform(0.55, 0.8) if rng.random() < 0.25 else rng.uniform(0, 0.15)),
        light_angle=float(rng.uniform(0, 2 * np.pi)),
        gamma=float(rng.uniform(0.85, 1.15)),
        makeup=bool(rng.random() < 0.2),
        occluder=bool(rng.random() < 0.25),
        blur_sigma=float(rng.uniform(1.6, 2.8) if rng.random() < 0.2 else 0.0),
    )


def attribute_flags(p: FaceParams, occluded_points: int) -> np.ndarray:
    """The six WFLW flags, true exactly when the condition was drawn."""
    expression = p.mouth_open >= 0.1 or p.smile >= 0.07 or p.eye_open <= 0.45
    flags = {
        "pose": abs(p.yaw) >= POSE_DEGREES or abs(p.roll) >= POSE_DEGREES,
        "expression": expression,
        "illumination": p.light >= 0.5,
        "make-up": p.makeup,
        "occlusion": occluded_points >= OCCLUDED_POINTS,
        "blur": p.blur_sigma >= 1.5,
    }
    return np.array([int(flags[name]) for name in WFLW_ATTRIBUTES], dtype=np.int64)


def _pts(points: np.ndarray) -> np.ndarray:
    return np.round(points * (1 << _SHIFT)).astype(np.int32)


def _fill(image, points, color) -> None:
    cv2.fillPoly(image, [_pts(points)], color, cv2.LINE_AA, _SHIFT)


def _line(image, points, color, thickness, closed=False) -> None:
    cv2.polylines(image, [_pts(points)], closed, color, thickness, cv2.LINE_AA, _SHIFT)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(30, 220, size=3)
    ramp = np.linspace(-1, 1, size)[None, :, None] * rng.uniform(-40, 40, size=3)
    image = np.clip(base + ramp, 0, 255).repeat(size, axis=0).astype(np.uint8)
    for _ in range(rng.integers(2, 6)):
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        center = tuple(int(c) for c in rng.integers(0, size, size=2))
        cv2.circle(image, center, int(rng.integers(size // 12, size // 3)), color, -1, cv2.LINE_AA)
    return image


def render_face(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random face: the BGR image, its ``(98, 2)`` landmarks and the six attribute flags."""
    p = sample_params(rng, size)
    canon, depth = canonical_landmarks(p)
    points = _to_image(canon, depth, p)
    ts = np.linspace(0, 1, 15)
    forehead = np.stack([0.95 * np.cos(np.pi * ts), -0.1 - 0.85 * np.sin(np.pi * ts)], axis=1)
    forehead = _to_image(forehead, np.zeros(len(ts)), p)

    image = _background(rng, size)
    hair = tuple(int(c) for c in rng.integers(10, 120, size=3))
    head = np.concatenate([points[:33], forehead])
    cv2.polylines(image, [_pts(forehead)], False, hair, int(p.scale * 0.25), cv2.LINE_AA, _SHIFT)
    skin = np.array([rng.uniform(60, 200), rng.uniform(90, 210), rng.uniform(120, 240)])
    _fill(image, head, tuple(float(c) for c in skin))

    brow_color = tuple(float(c) for c in skin * rng.uniform(0.2, 0.45))
    _fill(image, points[33:42], brow_color)
    _fill(image, points[42:51], brow_color)
    if p.makeup:  # eye shadow and lipstick in a saturated colour
        shadow = tuple(float(c) for c in rng.integers(0, 256, size=3))
        for eye in (points[60:68], points[68:76]):
            lid = eye.copy()
            lid[:, 1] -= 0.08 * p.scale
            _fill(image, lid, shadow)
        lips = (
            float(rng.uniform(20, 120)),
            float(rng.uniform(0, 60)),
            float(rng.uniform(160, 255)),
        )
    else:
        lips = tuple(float(c) for c in skin * np.array([0.75, 0.6, 0.95]))

    iris = tuple(float(c) for c in rng.integers(20, 140, size=3))
    for eye, pupil in ((points[60:68], points[96]), (points[68:76], points[97])):
        mask = np.zeros((size, size), np.uint8)
        _fill(mask, eye, 255)
        layer = image.copy()
        _fill(layer, eye, (235, 235, 235))
        center = tuple(int(v) for v in np.round(pupil * (1 << _SHIFT)))
        radius = int(0.075 * p.scale * (1 << _SHIFT))
        cv2.circle(layer, center, radius, iris, -1, cv2.LINE_AA, _SHIFT)
        cv2.circle(layer, center, radius // 2, (10, 10, 10), -1, cv2.LINE_AA, _SHIFT)
        image[mask > 0] = layer[mask > 0]
        _line(image, eye, brow_color, 1, closed=True)

    nose_color = tuple(float(c) for c in skin * 0.7)
    _line(image, points[51:55], nose_color, 1)
    _line(image, points[55:60], nose_color, 2)
    _fill(image, points[76:88], lips)
    if p.mouth_open > 0.05:
        _fill(image, points[88:96], (25, 20, 40))
    else:
        _line(image, points[88:96], tuple(c * 0.6 for c in lips), 1, closed=True)

    image = _light(image, p)
    occluded = _occlude(image, points, rng, p) if p.occluder else 0
    if p.blur_sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), p.blur_sigma)
    noise = rng.normal(0, 3, size=image.shape)
    image = np.clip(image.astype(np.float64) + noise, 0, 255).astype(np.uint8)
    return image, points, attribute_flags(p, occluded)


def _light(image: np.ndarray, p: FaceParams) -> np.ndarray:
    size = image.shape[0]
    coords = (np.arange(size) - size / 2) / (size / 2)
    direction = np.cos(p.light_angle) * coords[None, :] + np.sin(p.light_angle) * coords[:, None]
    gain = np.clip(1.0 + p.light * direction, 0.1, 2.0)[..., None]
    lit = (image.astype(np.float64) / 255.0) ** p.gamma * gain
    return np.clip(lit * 255, 0, 255).astype(np.uint8)


def _occlude(image: np.ndarray, points: np.ndarray, rng: np.random.Generator, p: FaceParams) -> int:
    """Draw a box or disc over a random landmark; return how many landmarks it covers."""
    size = image.shape[0]
    anchor = points[rng.integers(33, 98)]
    mask = np.zeros((size, size), np.uint8)
    half = rng.uniform(0.2, 0.45) * p.scale
    color = tuple(int(c) for c in rng.integers(0, 256, size=3))
    if rng.random() < 0.5:
        top_left = tuple(int(v) for v in np.round(anchor - half))
        bottom_right = tuple(int(v) for v in np.round(anchor + half))
        cv2.rectangle(mask, top_left, bottom_right, 255, -1)
    else:
        cv2.circle(mask, tuple(int(v) for v in np.round(anchor)), int(half), 255, -1)
    image[mask > 0] = color
    inside = np.clip(np.round(points).astype(int), 0, size - 1)
    return int((mask[inside[:, 1], inside[:, 0]] > 0).sum())


def _box(points: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """The landmarks' bounding box, jittered a little as a face detector would be."""
    low, high = points.min(axis=0), points.max(axis=0)
    extent = high - low
    low = low + rng.uniform(-0.05, 0.05, size=2) * extent
    high = high + rng.uniform(-0.05, 0.05, size=2) * extent
    return np.clip(np.concatenate([low, high]), 0, size - 1)


def generate(root: Path | str, config: SyntheticConfig, option: str = "data_root") -> Path:
    """Write the synthetic set under ``root`` in the WFLW layout; reuse it if already written.

    Face ``i`` of a split comes from ``default_rng([seed, split, i])``, so the set is the same on
    every machine and any face can be regenerated alone. The stamp ``synthetic.json`` (the
    config) is removed before the first file is rewritten and written, atomically, after the
    last: a set whose generation was interrupted is never taken for a whole one. Two processes
    asking for a set in one ``root`` at once (two runs sharing a ``--data-root``) take turns
    under a lock file there: the second waits, then finds the set whole, instead of rewriting
    files the first has begun to read. A root where the set cannot be written raises naming
    ``option`` (the argument that gave the root: ``out`` for ``aanet generate``).
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root}: exists and is not a folder (the synthetic set's root)")
    stamp = root / STAMP
    wanted = asdict(config)
    if _stamped_config(stamp) == wanted:  # no lock needed to read a whole set: a read-only root
        return root
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(root / LOCK)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("%s: another process is generating the synthetic set there; waiting", root)
            lock.acquire()
        try:
            if _stamped_config(stamp) != wanted:
                _write_set(root, config)
        finally:
            lock.release()
    except PermissionError as error:  # its own message names a file inside, or the lock file
        where = f"{error.filename}" if error.filename else "there"
        raise PermissionError(
            f"{option}: cannot write the synthetic set in {root} ({error.strerror}: {where}); "
            "give a folder you can write to, or one holding the whole set"
        ) from error
    return root


def _write_set(root: Path, config: SyntheticConfig) -> None:
    stamp = root / STAMP
    # From the first file rewritten until the last, the folder holds no whole set: no stamp.
    stamp.unlink(missing_ok=True)
    remove_stale_temporaries(stamp)
    (root / wflw.ANNOTATION_DIR).mkdir(parents=True, exist_ok=True)
    for split_index, (split, count) in enumerate(
        (("train", config.num_train), ("test", config.num_test))
    ):
        folder = root / wflw.IMAGE_DIR / f"synthetic_{split}"
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(count):
            rng = np.random.default_rng([config.seed, split_index, i])
            image, points, flags = render_face(rng, config.image_size)
            name = f"synthetic_{split}/{i:05d}.png"
            _write_png(root / wflw.IMAGE_DIR / name, image)
            lines.append(
                wflw.format_line(points, _box(points, rng, config.image_size), flags, name)
            )
        wflw.annotation_file(root, split).write_text("\n".join(lines) + "\n")
    with replacing(stamp) as written:
        written.write_text(json.dumps(asdict(config)))


def _write_png(path: Path, image: np.ndarray) -> None:
    """``image`` as the PNG ``path``; an ``OSError`` naming it where it cannot be written
    (``cv2.imwrite`` only returns False there: the set would be stamped whole without it)."""
    encoded, data = cv2.imencode(".png", image)
    if not encoded:
        raise ValueError(f"{path}: OpenCV could not encode the image as PNG")
    path.write_bytes(data.tobytes())


def _stamped_config(stamp: Path) -> object:
    """What the stamp says the set beside it was generated with; None when there is none, or
    when it does not read (cut short, not UTF-8, not JSON, no read permission): the set is then
    regenerated, the stamp being ours, not the user's."""
    if not stamp.is_file():
        return None
    try:
        return json.loads(stamp.read_bytes().decode("utf-8"))
    except (ValueError, OSError) as exc:  # UnicodeDecodeError, JSONDecodeError: ValueErrors
        why = exc.strerror if isinstance(exc, OSError) else exc  # no "[Errno 13]"
        log.warning("%s: unreadable (%s); generating the synthetic set again", stamp, why)
        return None

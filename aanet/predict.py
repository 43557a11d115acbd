"""``aanet predict``: faces found by OpenCV's bundled Haar cascade, landmarks drawn on the image."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from aanet.datasets.augment import augment_sample
from aanet.datasets.dataset import to_tensor
from aanet.datasets.images import read_image
from aanet.files import check_output_path, replacing
from aanet.model import AANet

log = logging.getLogger("aanet.predict")
CASCADE = "haarcascade_frontalface_default.xml"


def detect_faces(image: np.ndarray) -> list[np.ndarray]:
    """Face boxes ``(x0, y0, x1, y1)`` from OpenCV's bundled frontal-face Haar cascade.

    OpenCV 5 dropped the cascade classifier and its bundled files; there (and whenever the
    cascade cannot be loaded) this warns and returns no boxes.
    """
    folder = getattr(getattr(cv2, "data", None), "haarcascades", "")
    cascade_file = Path(folder) / CASCADE
    if not hasattr(cv2, "CascadeClassifier") or not cascade_file.is_file():
        log.warning(
            "OpenCV %s has no bundled Haar cascade (%s): face detection is off; pass --box or "
            "install opencv-python-headless<5",
            cv2.__version__,
            cascade_file,
        )
        return []
    cascade = cv2.CascadeClassifier(str(cascade_file))
    if cascade.empty():
        raise RuntimeError(f"cannot load the Haar cascade {cascade_file}")
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
    return [np.array([x, y, x + w, y + h], dtype=np.float32) for x, y, w, h in found]


@torch.no_grad()
def landmarks_in_box(
    model: AANet, image: np.ndarray, box: np.ndarray, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks ``(N, 2)`` in image pixels and confidences ``(N,)`` for the face in ``box``."""
    size = model.config.input_size
    crop, _, matrix = augment_sample(image, np.zeros((1, 2), np.float32), box, size, None)
    coords, confidence, _ = model(to_tensor(crop)[None].to(device))
    inverse = cv2.invertAffineTransform(matrix)
    points = coords[0].float().cpu().numpy() @ inverse[:, :2].T + inverse[:, 2]
    return points, confidence[0].float().cpu().numpy()


def draw(image: np.ndarray, faces: list[dict[str, Any]]) -> np.ndarray:
    """A copy of ``image`` with each face box and its landmarks (green sure, red unsure)."""
    out = image.copy()
    radius = max(1, round(min(image.shape[:2]) / 200))
    for face in faces:
        x0, y0, x1, y1 = (int(round(v)) for v in face["box"])
        cv2.rectangle(out, (x0, y0), (x1, y1), (255, 160, 0), 1)
        for (x, y), c in zip(face["landmarks"], face["confidence"], strict=True):
            color = (0, 220, 0) if c >= 0.5 else (0, 0, 255)
            cv2.circle(out, (int(round(x)), int(round(y))), radius, color, -1, cv2.LINE_AA)
    return out


def checked_box(box: Any, width: int, height: int) -> np.ndarray:
    """``box`` as a float32 ``(x0, y0, x1, y1)``; raises ``ValueError`` naming it unless it is a
    finite, non-empty box that overlaps the ``width x height`` image."""
    values = np.asarray(box, dtype=np.float64).reshape(-1)
    x0, y0, x1, y1 = values if values.size == 4 else (np.nan,) * 4
    if not (np.isfinite(values).all() and x0 < x1 and y0 < y1):
        raise ValueError(
            f"box: expected finite (x0, y0, x1, y1) with x0 < x1 and y0 < y1, got {values.tolist()}"
        )
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise ValueError(f"box: {values.tolist()} lies outside the {width}x{height} image")
    return values.astype(np.float32)


def predict_image(
    model: AANet,
    image_path: Path | str,
    device: torch.device,
    detect: bool = True,
    box: np.ndarray | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Annotated image and per-face results (box, where the box came from, landmarks,
    confidence), all in the pixels of the image as displayed (turned upright by its EXIF
    orientation; pixel centres at integers).

    The face boxes are ``box`` if given (``"source": "given"``), else the detector's
    (``"detected"``), else the whole image (``"whole image"``, with a warning when detection was
    asked for and found nothing).
    """
    path = Path(image_path)
    if path.is_dir():
        raise IsADirectoryError(f"image: {image_path} is a folder, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image: no such file: {image_path}")
    try:
        image = read_image(image_path)
    except PermissionError as exc:
        raise PermissionError(f"image: cannot read {image_path} ({exc.strerror})") from exc
    except OSError as exc:
        raise ValueError(f"image: {image_path} is not an image that decodes ({exc})") from exc
    source = "given"
    if box is not None:
        boxes = [checked_box(box, image.shape[1], image.shape[0])]
    else:
        boxes, source = (detect_faces(image) if detect else []), "detected"
    if not boxes:
        if detect and box is None:
            log.warning("%s: no face found; using the whole image as the face box", image_path)
        source = "whole image"
        h, w = image.shape[:2]
        half = max(w, h) / 2 / 1.25  # the crop adds a 1.25 margin: this box's crop is the image
        cx, cy = (w - 1) / 2, (h - 1) / 2
        boxes = [np.array([cx - half, cy - half, cx + half, cy + half], dtype=np.float32)]
    faces = []
    for box in boxes:
        points, confidence = landmarks_in_box(model, image, box, device)
        if not (np.isfinite(points).all() and np.isfinite(confidence).all()):
            raise FloatingPointError(
                f"the model gave non-finite landmarks for {image_path} (box "
                f"{[round(float(v), 1) for v in box]}); {_weights_note(model)}"
            )
        faces.append(
            {
                "box": [float(v) for v in box],
                "source": source,
                "landmarks": points.round(2).tolist(),
                "confidence": confidence.round(4).tolist(),
            }
        )
    return draw(image, faces), faces


def _weights_note(model: torch.nn.Module) -> str:
    """Whether ``model``'s weights are finite, in words (for the error on non-finite output)."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    bad = sum(int((~torch.isfinite(t)).any()) for t in tensors)
    if bad:
        return (
            f"{bad} of its {len(tensors)} weight tensors hold NaN or inf (a diverged training run?)"
        )
    return "its weights are finite"


def check_image_output(out: Path, inputs: dict[str, Path | str]) -> None:
    """Raise naming ``output`` unless OpenCV can write an image named ``out`` (by its extension)
    and a file can be written there that is none of the ``inputs`` (the photo, the checkpoint:
    :func:`~aanet.files.check_output_path`)."""
    if not cv2.haveImageWriter(str(out)):
        raise ValueError(
            f"output: expected an image file name OpenCV can write (.png, .jpg, .bmp, .tif, ...), "
            f"got {str(out)!r}"
        )
    check_output_path(out, "output", inputs)


def results(image_path: Path | str, annotated: np.ndarray, faces: list[dict[str, Any]]) -> dict:
    """What ``--json`` writes: the image, its size as displayed, and each face's results."""
    height, width = annotated.shape[:2]
    return {"image": str(image_path), "width": width, "height": height, "faces": faces}


def write_results(
    annotated: np.ndarray,
    faces: list[dict[str, Any]],
    out: Path,
    as_json: Path | None,
    image_path: Path | str,
) -> dict[str, Any]:
    """Write the annotated image to ``out`` and, if ``as_json``, the :func:`results` there;
    returns those results."""
    with replacing(out) as tmp:  # a kill or a full disk mid-write leaves any earlier file whole
        if not cv2.imwrite(str(tmp), annotated):
            raise OSError(f"output: cannot write {out}")
    report = results(image_path, annotated, faces)
    if as_json is not None:
        with replacing(as_json) as tmp:
            tmp.write_text(json.dumps(report, indent=1) + "\n")
    return report

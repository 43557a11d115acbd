"""Reading face images: one decoder for training, evaluation and prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# EXIF orientations that turn the stored image by 90 degrees (width and height trade places).
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112


def read_image(path: Path | str) -> np.ndarray:
    """The image at ``path`` as BGR ``uint8 (H, W, 3)`` (OpenCV's layout), turned upright by its
    EXIF orientation as ``cv2.imread`` does; grey, palette and alpha images become 3-channel.

    Raises ``OSError`` when the file is not an image or does not decode to its end. Pillow is used
    rather than ``cv2.imread`` because OpenCV returns a truncated JPEG (a cut-off download) without
    an error, its missing part filled with grey, which would train on a wrong image unnoticed.
    """
    with Image.open(path) as image:
        image.load()  # decodes everything: a truncated file raises here
        rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def upright_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of ``image`` once turned upright by its EXIF orientation, from the
    header alone (what ``read_image`` will return)."""
    width, height = image.size
    if image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height

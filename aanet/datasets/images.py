"""Reading face images: one decoder for training, evaluation and prediction."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

# EXIF orientations that turn the stored image by 90 degrees (width and height trade places).
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112
# Pillow's modes of one 16-bit channel ("I" is how older Pillow versions open a 16-bit grey PNG).
_SIXTEEN_BIT_GREY = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


def open_image(path: Path | str) -> Image.Image:
    """``PIL.Image.open(path)`` (the header only), raising ``OSError`` for every file it refuses:
    an image too large for Pillow (``DecompressionBombError``, past twice
    ``PIL.Image.MAX_IMAGE_PIXELS``) is not an ``OSError`` otherwise, and would escape the bad-data
    policy. Between once and twice that size Pillow opens it with a ``DecompressionBombWarning``
    that names Pillow's own source line; this logs one line naming the image instead."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise OSError(
            f"too large for Pillow: {exc} (the limit is PIL.Image.MAX_IMAGE_PIXELS)"
        ) from exc
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        log.warning(
            "%s: %d x %d pixels, past Pillow's decompression-bomb warning size (%d); decoding it "
            "takes about %d MiB",
            path,
            image.width,
            image.height,
            limit,
            image.width * image.height * 3 // 2**20,
        )
    return image


def read_image(path: Path | str) -> np.ndarray:
    """The image at ``path`` as BGR ``uint8 (H, W, 3)`` (OpenCV's layout), turned upright by its
    EXIF orientation as ``cv2.imread`` does; grey, palette and alpha images become 3-channel, and
    16-bit grey keeps its top 8 bits (as in ``cv2.imread``).

    Raises ``OSError`` when the file is not an image or does not decode to its end. Pillow is used
    rather than ``cv2.imread`` because OpenCV returns a truncated JPEG (a cut-off download) without
    an error, its missing part filled with grey, which would train on a wrong image unnoticed.
    """
    with open_image(path) as image:
        image.load()  # decodes everything: a truncated file raises here
        upright = ImageOps.exif_transpose(image)
        if upright.mode in _SIXTEEN_BIT_GREY:
            # convert("RGB") clips 16-bit values at 255: the image would be white.
            grey = (np.asarray(upright).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
            return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
        rgb = np.asarray(upright.convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def upright_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of ``image`` once turned upright by its EXIF orientation, from the
    header alone (what ``read_image`` will return)."""
    width, height = image.size
    if image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height

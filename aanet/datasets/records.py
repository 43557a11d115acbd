"""Annotation records and the bad-data policy shared by every loader."""

from __future__ import annotations

import codecs
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aanet.datasets.images import open_image, upright_size
from aanet.landmarks import normalizing_points, scheme_for

log = logging.getLogger("aanet.data")

ON_ERROR_CHOICES = ("skip", "stop")
# A normalising distance (inter-ocular, inter-pupil) up to this fraction of the face box's longer
# side is taken as zero: the NME would be a point error divided by next to nothing.
MIN_NORMALIZING_DISTANCE = 1e-6


class DataError(ValueError):
    """A problem with one annotation, named by file and line.

    ``DataError(where, message)``; a single argument is taken as the whole message, which is how
    a DataLoader worker re-raises the error in the main process.
    """

    def __init__(self, where: str, message: str | None = None) -> None:
        super().__init__(where if message is None else f"{where}: {message}")
        self.where = where


def annotation_lines(path: Path) -> list[bytes]:
    """The lines of the annotation file at ``path``, without their line ends: CRLF, CR (old Mac
    files) or LF, the only ones ``bytes.splitlines`` knows. A UTF-8 byte order mark (what
    Windows editors such as Notepad put before a file they save) is removed from the file's
    start, whatever its first line holds; it would otherwise stick to the first field, or make
    a blank first line look like a short one."""
    try:
        data = path.read_bytes()
    except OSError as error:  # a bare "[Errno 13] Permission denied: '...'" otherwise
        raise type(error)(f"cannot read the annotation file {path} ({error.strerror})") from error
    return data.removeprefix(codecs.BOM_UTF8).splitlines()


def decode_line(raw: bytes, where: str) -> str:
    """One annotation line as text; bytes that are not UTF-8 are a ``DataError`` at ``where``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(where, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


@dataclass
class Record:
    """One annotated face.

    ``landmarks`` is ``(N, 2)`` float32 pixel coordinates with pixel centres at integers,
    ``box`` is ``(x_min, y_min, x_max, y_max)``, ``attributes`` the six WFLW flags (zeros when the
    data set has none).
    """

    image_path: Path
    landmarks: np.ndarray
    box: np.ndarray
    attributes: np.ndarray
    where: str


@dataclass
class BadDataLog:
    """Collects bad entries; raises at the first one under ``stop``, counts them under ``skip``."""

    on_error: str = "skip"
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error: expected one of {ON_ERROR_CHOICES}, got {self.on_error!r}")

    def report(self, error: DataError) -> None:
        if self.on_error == "stop":
            raise error
        self.problems.append(str(error))

    def summarize(self, source: str, kept: int) -> None:
        """Log the count of skipped entries (and the first few) after loading ``source``."""
        if self.problems:
            shown = "\n  ".join(self.problems[:5])
            more = f"\n  ... and {len(self.problems) - 5} more" if len(self.problems) > 5 else ""
            log.warning(
                "%s: skipped %d bad entries, kept %d:\n  %s%s",
                source,
                len(self.problems),
                kept,
                shown,
                more,
            )

    def require_faces(self, source: str, kept: int) -> None:
        """Raise ``ValueError`` naming ``source`` (the annotation file or folder read) when
        loading it ``kept`` no face: a set without faces can be neither trained nor measured."""
        if not kept:
            why = (
                f"all {len(self.problems)} of its entries are bad (see the warning above)"
                if self.problems
                else "it holds no annotation"
            )
            raise ValueError(f"{source}: no annotated face to load: {why}")


def check_normalizing_distance(record: Record, normalization: str) -> None:
    """Raise :class:`DataError` if the record's ``normalization`` distance (``aanet.metrics``:
    between the outer eye corners or the pupils) is zero or at most
    ``MIN_NORMALIZING_DISTANCE`` of the face box's longer side: its NME would be undefined (or
    the error divided by next to nothing). Expects finite landmarks and a valid box."""
    left, right, what = normalizing_points(scheme_for(len(record.landmarks)), normalization)
    points = record.landmarks.astype(np.float64)
    distance = float(np.linalg.norm(points[list(left)].mean(0) - points[list(right)].mean(0)))
    x_min, y_min, x_max, y_max = (float(c) for c in record.box)
    size = max(x_max - x_min, y_max - y_min)
    if not distance > MIN_NORMALIZING_DISTANCE * size:
        raise DataError(
            record.where,
            f"{what} coincide ({normalization} distance {distance:g} pixels, not above "
            f"{MIN_NORMALIZING_DISTANCE:g} of the face box's longer side of {size:g}): the NME "
            f"normalised by it is undefined",
        )


def validate_record(
    record: Record, tolerance: float = 0.5, normalizations: tuple[str, ...] = ("inter-ocular",)
) -> None:
    """Raise :class:`DataError` if the image is missing or unreadable, the face box is empty, not
    finite or mostly outside the image, a point lies more than ``tolerance`` outside the pixel
    centres (pixel centres are at integers, so the default 0.5 is the image's edge:
    ``[-0.5, width - 0.5]``), or the distance of one of ``normalizations`` is zero
    (:func:`check_normalizing_distance`; by default the outer eye corners coinciding).

    Only the image header is read (PIL opens lazily), so this is cheap enough to run on every
    record at load time instead of failing later inside a DataLoader worker.
    """
    try:
        found = record.image_path.is_file()
    except OSError as exc:  # a name the file system refuses (ENAMETOOLONG), say
        raise DataError(
            record.where, f"image path not usable: {record.image_path} ({exc.strerror})"
        ) from exc
    if not found:
        raise DataError(record.where, f"image not found: {record.image_path}")
    try:
        with open_image(record.image_path) as image:
            width, height = upright_size(image)
    except OSError as exc:
        # An errno error's own text repeats the path ("[Errno 13] Permission denied: '...'").
        reason = exc.strerror or str(exc)
        raise DataError(record.where, f"unreadable image {record.image_path}: {reason}") from exc
    if not np.isfinite(record.landmarks).all():
        raise DataError(record.where, "landmarks contain NaN or infinity")
    x_min, y_min, x_max, y_max = (float(c) for c in record.box)
    if not (np.isfinite(record.box).all() and x_max > x_min and y_max > y_min):
        raise DataError(
            record.where,
            f"face box: expected finite x_min < x_max and y_min < y_max, got "
            f"({x_min:g}, {y_min:g}, {x_max:g}, {y_max:g})",
        )
    xs, ys = record.landmarks[:, 0], record.landmarks[:, 1]
    outside = (
        (xs < -tolerance)
        | (ys < -tolerance)
        | (xs > width - 1 + tolerance)
        | (ys > height - 1 + tolerance)
    )
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        raise DataError(
            record.where,
            f"{int(outside.sum())} points outside the {width}x{height} image "
            f"(first: point {first} at ({xs[first]:.1f}, {ys[first]:.1f}))",
        )
    # Less than half the box on the image: it is not this image's box (an image resized after it
    # was annotated, say); the crop would show a small part of the picture or none of it.
    inside = max(0.0, min(x_max, width - 0.5) - max(x_min, -0.5)) * max(
        0.0, min(y_max, height - 0.5) - max(y_min, -0.5)
    )
    if inside < 0.5 * (x_max - x_min) * (y_max - y_min):
        raise DataError(
            record.where,
            f"face box ({x_min:g}, {y_min:g}, {x_max:g}, {y_max:g}) lies mostly outside the "
            f"{width}x{height} image: expected at least half of it inside",
        )
    for normalization in normalizations:
        check_normalizing_distance(record, normalization)

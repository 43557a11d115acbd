"""300W / iBUG ``.pts`` files (68 points) next to their images, and the 300W test subsets."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from aanet.datasets.records import (
    BadDataLog,
    DataError,
    Record,
    annotation_lines,
    decode_line,
    validate_record,
)

NUM_POINTS = 68
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
SUBSETS = ("common", "challenging")
# The folders of the 300W release: the common subset is the LFPW and HELEN test sets, the
# challenging one iBUG.
_SUBSET_OF_FOLDER = {"lfpw": "common", "helen": "common", "ibug": "challenging"}
# The 300W release (the iBUG archives unpacked side by side): the training set is AFW and the
# LFPW and HELEN training sets, the test set the LFPW and HELEN test sets and iBUG.
RELEASE_FOLDERS = {
    "train": ("afw", "helen/trainset", "lfpw/trainset"),
    "test": ("helen/testset", "lfpw/testset", "ibug"),
}
# What a test set none of whose images is in such a folder is told (the log and the report).
NO_SUBSETS = (
    "no test image lies under a folder named lfpw or helen (the common subset) or ibug (the "
    "challenging subset), so neither subset has a face; only the full set is measured"
)
log = logging.getLogger("aanet.data")


def parse_pts(path: Path) -> np.ndarray:
    """The ``(n_points, 2)`` array of a ``.pts`` file (``version``, ``n_points``, ``{ ... }``)."""
    try:
        raw_lines = annotation_lines(Path(path))
    except OSError as error:  # one face's file: skipped under on_error="skip", as a damaged one is
        raise DataError(str(error)) from error
    lines = [decode_line(raw, f"{path}:{n}").strip() for n, raw in enumerate(raw_lines, start=1)]
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln]
    header = {}
    body_start = None
    for index, (number, text) in enumerate(numbered):
        if text == "{":
            body_start = index + 1
            break
        key, _, value = text.partition(":")
        header[key.strip()] = (number, value.strip())
    if body_start is None:
        raise DataError(f"{path}:1", "no '{' opening the point list")
    if "n_points" not in header:
        raise DataError(f"{path}:1", "missing 'n_points:' header")
    count_line, count_text = header["n_points"]
    try:
        count = int(count_text)
    except ValueError as exc:
        raise DataError(
            f"{path}:{count_line}", f"n_points is not an integer: {count_text!r}"
        ) from exc
    points = []
    for number, text in numbered[body_start:]:
        if text == "}":
            break
        fields = text.split()
        if len(fields) != 2:
            raise DataError(f"{path}:{number}", f"expected 2 numbers (x y), got {len(fields)}")
        try:
            points.append((float(fields[0]), float(fields[1])))
        except ValueError as exc:
            raise DataError(f"{path}:{number}", f"non-numeric coordinate: {text!r}") from exc
    else:
        raise DataError(f"{path}:{numbered[-1][0]}", "no '}' closing the point list")
    if len(points) != count:
        raise DataError(f"{path}:{count_line}", f"n_points says {count}, found {len(points)}")
    return np.asarray(points, dtype=np.float32)


def subset_of(image_path: Path) -> str | None:
    """The 300W test subset of an image, by the nearest of its folders named ``lfpw``, ``helen``
    (``common``) or ``ibug`` (``challenging``), in any case; None if it has none of them."""
    for folder in reversed(Path(image_path).parent.parts):
        if folder.lower() in _SUBSET_OF_FOLDER:
            return _SUBSET_OF_FOLDER[folder.lower()]
    return None


def warn_without_subsets(records: list[Record], folder: Path | str) -> None:
    """Warn when none of the test ``records`` (loaded from ``folder``) is in a 300W subset
    (:func:`subset_of`); called once where the test set is loaded."""
    if records and not any(subset_of(record.image_path) for record in records):
        log.warning("%s: %s", folder, NO_SUBSETS)


def _image_for(pts: Path, names: dict[str, list[Path]]) -> Path:
    """The image beside ``pts``: its stem with one of ``IMAGE_SUFFIXES`` in any case (``a.jpg``,
    ``a.JPG``, ``a.Jpg``), the suffixes tried in that order and, within one, the lower-case
    spelling first; ``names`` maps the lower-cased names of the files in its folder to them."""
    for suffix in IMAGE_SUFFIXES:
        candidates = names.get((pts.stem + suffix).lower(), [])
        if candidates:
            return min(candidates, key=lambda p: (p.suffix != suffix, p.name))
    return pts.with_suffix(IMAGE_SUFFIXES[0])  # validate_record reports it missing


def _annotations(folder: Path) -> tuple[list[Path], dict[Path, dict[str, list[Path]]]]:
    """The ``.pts`` files under ``folder`` in any case of the suffix (``a.PTS`` too), sorted, and
    for each folder holding one, its files by lower-cased name."""
    pts_files, names = [], {}
    for path in folder.rglob("*"):
        if path.suffix.lower() == ".pts" and path.is_file():
            pts_files.append(path)
            names.setdefault(path.parent, {})
    for parent, by_name in names.items():
        for entry in parent.iterdir():
            by_name.setdefault(entry.name.lower(), []).append(entry)
    return sorted(pts_files), names


def _child(folder: Path, relative: str) -> Path | None:
    """The folder ``relative`` (``helen/testset``) under ``folder``, each name in any case
    (``HELEN/testset``); None if there is none."""
    for name in relative.split("/"):
        if not folder.is_dir():
            return None
        found = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.lower() == name)
        if not found:
            return None
        folder = found[0]
    return folder


def release_folders(folder: Path, split: str) -> list[Path] | None:
    """The folders of ``split`` (``RELEASE_FOLDERS``) under ``folder`` when it is the 300W release
    (a ``helen`` or ``lfpw`` folder there holds ``trainset`` or ``testset``; names in any case),
    those that exist; None for any other folder, which is read whole."""
    if split not in RELEASE_FOLDERS:
        raise ValueError(f"split: expected one of {tuple(RELEASE_FOLDERS)}, got {split!r}")
    if not any(
        _child(folder, f"{a}/{b}") for a in ("helen", "lfpw") for b in ("trainset", "testset")
    ):
        return None
    found = (_child(folder, name) for name in RELEASE_FOLDERS[split])
    return [child for child in found if child is not None]


def existing_folder(folder: Path | str) -> Path:
    """``folder`` as a Path, or ``FileNotFoundError`` naming it when it is not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"300W folder not found: {folder}")
    return folder


def load_300w(
    folder: Path | str,
    on_error: str = "skip",
    normalizations: tuple[str, ...] = ("inter-ocular",),
    split: str | None = None,
) -> list[Record]:
    """Every ``.pts`` file under ``folder`` (recursively, the suffix in any case) with the image
    beside it (:func:`_image_for`); a bad file (as ``validate_record`` judges it, with
    ``normalizations``) is skipped with a count or raises. A folder that leaves no face (no
    ``.pts`` file, or every one bad) is a ``ValueError`` naming it.

    300W has no face boxes or attributes: the box is the landmarks' bounding box and the flags
    are zeros. With ``split`` (``train`` or ``test``), a ``folder`` that is the 300W release
    (:func:`release_folders`) gives only that split's folders. Points are converted from the
    1-based ``.pts`` convention (the one menpo, the iBUG group's reader, assumes) to 0-based
    pixels.
    """
    folder = existing_folder(folder)
    bad = BadDataLog(on_error)
    records = []
    roots = release_folders(folder, split) if split else None
    if roots is None:
        roots = [folder]
    else:
        log.info("%s: the 300W release; the %s set is %s", folder, split, RELEASE_FOLDERS[split])
    pts_files, names = [], {}
    for root in roots:
        found, beside = _annotations(root)
        pts_files += found
        names.update(beside)
    for pts in pts_files:
        try:
            points = parse_pts(pts)
            if len(points) != NUM_POINTS:
                raise DataError(f"{pts}:1", f"expected {NUM_POINTS} points, got {len(points)}")
            points = points - 1.0  # .pts files count pixels from 1
            box = np.concatenate([points.min(axis=0), points.max(axis=0)])
            record = Record(
                _image_for(pts, names[pts.parent]), points, box, np.zeros(6, np.int64), f"{pts}:1"
            )
            validate_record(record, normalizations=normalizations)
        except DataError as error:
            bad.report(error)
            continue
        records.append(record)
    bad.summarize(str(folder), len(records))
    bad.require_faces(str(folder), len(records))
    return records

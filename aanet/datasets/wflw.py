"""WFLW annotations: ``list_98pt_rect_attr_{train,test}.txt`` in the published layout.

Each line holds 196 landmark coordinates (x0 y0 x1 y1 ...), the face box (x_min y_min x_max
y_max), six attribute flags (pose, expression, illumination, make-up, occlusion, blur) and the
image path relative to ``WFLW_images/`` (the rest of the line: it may hold spaces).
"""

from __future__ import annotations

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

NUM_POINTS = 98
TOKENS_PER_LINE = 2 * NUM_POINTS + 4 + 6 + 1
ANNOTATION_DIR = Path("WFLW_annotations") / "list_98pt_rect_attr_train_test"
IMAGE_DIR = Path("WFLW_images")
SPLITS = ("train", "test")


def annotation_file(root: Path, split: str) -> Path:
    """The annotation list of ``split`` under the WFLW root folder."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    return Path(root) / ANNOTATION_DIR / f"list_98pt_rect_attr_{split}.txt"


def existing_annotation_file(root: Path, split: str) -> Path:
    """:func:`annotation_file`, or ``FileNotFoundError`` naming it when it is not there."""
    path = annotation_file(root, split)
    if not path.is_file():
        raise FileNotFoundError(f"WFLW annotations not found: {path}")
    return path


def parse_line(line: str, where: str, image_root: Path) -> Record:
    """One annotation line to a :class:`Record`; :class:`DataError` names ``where`` on failure."""
    # The path is the rest of the line after the 206 numbers: a file name may hold spaces.
    tokens = line.split(maxsplit=TOKENS_PER_LINE - 1)
    if len(tokens) != TOKENS_PER_LINE:
        raise DataError(
            where,
            f"expected {TOKENS_PER_LINE} fields (196 coords, 4 box, 6 flags, path), "
            f"got {len(tokens)}",
        )
    tokens[-1] = tokens[-1].rstrip()
    try:
        numbers = np.array([float(t) for t in tokens[:-1]], dtype=np.float64)
    except ValueError as exc:
        raise DataError(where, f"non-numeric field: {exc}") from exc
    flags = numbers[200:206]
    if not np.isin(flags, (0.0, 1.0)).all():
        raise DataError(where, f"attribute flags must be 0 or 1, got {flags.tolist()}")
    return Record(
        image_path=image_root / tokens[-1],
        landmarks=numbers[:196].reshape(NUM_POINTS, 2).astype(np.float32),
        box=numbers[196:200].astype(np.float32),
        attributes=flags.astype(np.int64),
        where=where,
    )


def load_wflw(
    root: Path | str,
    split: str,
    on_error: str = "skip",
    normalizations: tuple[str, ...] = ("inter-ocular",),
) -> list[Record]:
    """Read and validate the WFLW ``split``; bad lines are skipped with a count or raise. A face
    whose distance under one of ``normalizations`` is zero is a bad line (``validate_record``).
    A file that leaves no face (empty, or every line bad) is a ``ValueError`` naming it."""
    root = Path(root)
    path = existing_annotation_file(root, split)
    bad = BadDataLog(on_error)
    records = []
    for number, raw in enumerate(annotation_lines(path), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = parse_line(decode_line(raw, where), where, root / IMAGE_DIR)
            validate_record(record, normalizations=normalizations)
        except DataError as error:
            bad.report(error)
            continue
        records.append(record)
    bad.summarize(str(path), len(records))
    bad.require_faces(str(path), len(records))
    return records


def format_line(landmarks: np.ndarray, box: np.ndarray, attributes: np.ndarray, name: str) -> str:
    """The annotation line for one face (the inverse of :func:`parse_line`)."""
    coords = " ".join(f"{v:.3f}" for v in np.asarray(landmarks, dtype=np.float64).reshape(-1))
    box_text = " ".join(str(int(round(v))) for v in box)
    flags = " ".join(str(int(v)) for v in attributes)
    return f"{coords} {box_text} {flags} {name}"

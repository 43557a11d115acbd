"""Evaluation: NME / failure rate / AUC on the whole test set, on each WFLW subset and on the 300W
common and challenging subsets."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from aanet.datasets import w300
from aanet.datasets.records import DataError
from aanet.files import check_output_path, replacing
from aanet.landmarks import WFLW_ATTRIBUTES
from aanet.metrics import DegenerateFaceError, confidence_summary, point_errors, summarize

log = logging.getLogger("aanet.evaluate")
# The keys of a report (subset_report) that are not subsets.
NOT_SUBSETS = ("confidence", "normalization", "subsets_missing")


class Predictions(NamedTuple):
    """A model's results on a test set: per-face NME ``(F,)``, per-point errors and confidences
    ``(F, N)`` (errors in ``normalization`` distances), the WFLW attribute flags ``(F, 6)``, and
    each face's 300W subset (``w300.subset_of``; None when it has none), of the faces measured;
    ``left_out`` the errors of the faces that were not (their image does not decode, under
    ``on_error="skip"``)."""

    face_errors: torch.Tensor
    point_errors: torch.Tensor
    confidence: torch.Tensor
    flags: torch.Tensor
    subsets: tuple[str | None, ...] = ()
    normalization: str = "inter-ocular"
    left_out: tuple[str, ...] = ()


@torch.no_grad()
def predict_errors(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: bool = False,
    normalization: str = "inter-ocular",
) -> Predictions:
    """Run ``model`` over ``loader`` (of a ``LandmarkDataset``) and measure every point against its
    annotation; a sample that stands in for a face whose image does not decode (``"left_out"``)
    is not measured.

    Both are in crop pixels: the crop is a similarity of the image (``crop_matrix``: one scale, no
    rotation or aspect change), which scales the distances and the normaliser alike, so the NME is
    that of the original image's pixels.
    """
    was_training = model.training
    model.eval()
    records = loader.dataset.records
    points, confidences, flags, indices, left_out = [], [], [], [], []
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp):
            coords, confidence, _ = model(images)
        errors = batch.get("left_out", [""] * len(images))
        kept = torch.tensor([not error for error in errors])
        left_out.extend(error for error in errors if error)
        faces = batch["index"][kept]
        try:
            points.append(
                point_errors(coords.float().cpu()[kept], batch["landmarks"][kept], normalization)
            )
        except DegenerateFaceError as error:
            raise DataError(records[int(faces[error.face])].where, error.reason) from error
        confidences.append(confidence.float().cpu()[kept])
        flags.append(batch["attributes"][kept])
        indices.extend(int(i) for i in faces)
    model.train(was_training)
    point_error = torch.cat(points)
    subsets = ()
    if point_error.shape[1] == w300.NUM_POINTS:
        subsets = tuple(w300.subset_of(records[i].image_path) for i in indices)
    face_error = point_error.mean(dim=-1)
    undefined = int((~torch.isfinite(face_error)).sum())
    if undefined:
        log.warning(
            "%d of %d faces have non-finite predicted points: the mean NME is undefined (null), "
            "and they count as failures in FR and AUC", undefined, len(face_error),
        )  # fmt: skip
    return Predictions(
        face_error, point_error, torch.cat(confidences), torch.cat(flags), subsets,
        normalization, tuple(left_out),
    )  # fmt: skip


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype of ``--amp`` runs, training and evaluation alike: fp16 on CUDA, bf16
    on the CPU."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def subset_report(predictions: Predictions) -> dict[str, Any]:
    """Metrics of the full set and of every subset, one without faces with count 0 and undefined
    metrics: on 68-point sets the 300W ``common`` and ``challenging`` (when neither has a face
    ``"subsets_missing"`` says why), on others the six WFLW ones (faces whose flag is set); under
    ``"confidence"`` how well the landmark confidences track the errors, and under
    ``"normalization"`` the NME's. ``"full"`` also counts the faces ``left_out`` (not measured:
    their image does not decode)."""
    errors, flags = predictions.face_errors, predictions.flags
    report: dict[str, Any] = {"full": {**summarize(errors), "left_out": len(predictions.left_out)}}
    if predictions.point_errors.shape[-1] != w300.NUM_POINTS:
        for column, name in enumerate(WFLW_ATTRIBUTES):
            report[name] = summarize(errors[flags[:, column] == 1])
    else:
        subsets = predictions.subsets or (None,) * len(errors)
        for name in w300.SUBSETS:
            chosen = torch.tensor([subset == name for subset in subsets], dtype=torch.bool)
            report[name] = summarize(errors[chosen])
        if not any(subsets):
            report["subsets_missing"] = w300.NO_SUBSETS
    report["confidence"] = confidence_summary(predictions.point_errors, predictions.confidence)
    report["normalization"] = predictions.normalization
    return report


def format_table(report: dict[str, Any]) -> str:
    """A fixed-width table (subset, faces, NME %, FR@0.1 %, AUC@0.1), then the confidences."""
    lines = []
    if "normalization" in report:
        lines.append(f"NME normalised by the {report['normalization']} distance")
    lines.append(f"{'subset':<14}{'faces':>7}{'NME %':>9}{'FR@0.1 %':>10}{'AUC@0.1':>9}")
    for name, m in report.items():
        if name in NOT_SUBSETS:
            continue
        if m["count"] == 0:  # an empty subset has no metrics ("-", not nan: nan means diverged)
            lines.append(f"{name:<14}{0:>7}{'-':>9}{'-':>10}{'-':>9}")
        else:
            lines.append(
                f"{name:<14}{m['count']:>7}{100 * m['nme']:>9.2f}{100 * m['fr']:>10.2f}"
                f"{m['auc']:>9.4f}"
            )
    if "confidence" in report and math.isnan(report["confidence"]["median"]):
        lines.append("landmark confidence: no point has a finite prediction")
    elif "confidence" in report:
        c = report["confidence"]
        lines.append(
            f"landmark confidence: median {c['median']:.2f}; rank correlation with the error "
            f"{c['rank_correlation']:+.2f}; mean error of the least / most confident quarter of "
            f"the points {100 * c['error_least_sure_quarter']:.2f}% / "
            f"{100 * c['error_most_sure_quarter']:.2f}%"
        )
    if "subsets_missing" in report:
        lines.append(f"common and challenging: {report['subsets_missing']}")
    left_out = report.get("full", {}).get("left_out", 0)
    if left_out:
        lines.append(
            f"{left_out} of the {report['full']['count'] + left_out} test faces left out: their "
            f"image does not decode (--on-error skip); the metrics are over the other "
            f"{report['full']['count']}"
        )
    return "\n".join(lines)


def check_report_path(path: Path | str, checkpoint: Path | str) -> None:
    """Raise naming ``json`` unless a report can be written at ``path`` (checked before the
    evaluation, not after it): not the ``checkpoint`` evaluated, a file that can be made there
    (:func:`~aanet.files.check_output_path`), and named ``.json`` (a report written over a
    ``log.csv`` would lose it)."""
    check_output_path(path, "json", {"checkpoint": checkpoint})
    if Path(path).suffix.lower() != ".json":
        raise ValueError(f"json: expected a file name ending in .json, got {str(path)!r}")


def write_json(report: dict[str, Any], path: Path | str) -> None:
    """The report as strict JSON: a metric that is undefined (NaN: a subset with no faces) is
    written as ``null``."""

    def strict(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: strict(item) for key, item in value.items()}
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    text = json.dumps(strict(report), indent=2, allow_nan=False) + "\n"
    with replacing(path) as tmp:
        tmp.write_text(text)

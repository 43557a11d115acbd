"""``aanet run``: the whole job of ``make run`` in one command, everything under ``runs/``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from aanet.config import Config
from aanet.evaluate import format_table, write_json
from aanet.ranks import is_main_process

log = logging.getLogger("aanet.run")


def demo_photo(path: Path, seed: int = 12345, size: int = 320) -> np.ndarray:
    """Write a synthetic face photo that is not in the training set; return its face box."""
    import cv2

    from aanet.datasets.synthetic import render_face

    image, points, _ = render_face(np.random.default_rng([seed, 99]), size)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):  # it returns False rather than raise
        raise OSError(f"cannot write the demo photo {path}")
    return np.concatenate([points.min(axis=0), points.max(axis=0)])


# What each --data is called in the summary line.
_DATA_NAMES = {"synthetic": "the synthetic set", "wflw": "WFLW", "300w": "300W"}


def headline(config: Config, full: dict[str, float]) -> str:
    """The summary line of ``aanet run``: the network, its epochs and data, the full set's
    metrics."""
    return (
        f"AANet ({'with' if config.attention else 'without'} attention), "
        f"{config.epochs} epoch{'s' if config.epochs != 1 else ''} on "
        f"{_DATA_NAMES.get(config.data, config.data)}: NME {100 * full['nme']:.2f}%  "
        f"FR@0.1 {100 * full['fr']:.2f}%  AUC@0.1 {full['auc']:.4f}"
    )


def run_demo(
    config: Config, resume: bool = False, progress: bool = True
) -> dict[str, dict[str, float]]:
    """Generate the synthetic set, train (with ``resume``, on from ``<out>/last.pt``), evaluate
    (table + JSON), predict on a photo, export; returns the evaluation report
    (``aanet.evaluate.subset_report``). Under ``torchrun`` every rank trains and rank 0 alone
    does the rest (the other ranks return ``{}``)."""
    import cv2

    from aanet.export import export
    from aanet.inference import load_model
    from aanet.predict import detect_faces, predict_image, write_results
    from aanet.train import attention_backend, pick_device, train

    out = Path(config.out)
    result = train(config, resume="auto" if resume else None, progress=progress)
    if not is_main_process():
        return {}
    report = result["report"]
    write_json(report, out / "eval.json")
    device = pick_device(config.device)
    model = load_model(out / "last.pt", device)
    photo = out / "photo.png"
    known_box = demo_photo(photo)
    box = None
    if not detect_faces(cv2.imread(str(photo))):
        log.info("no face detected in the demo photo: using the box it was drawn with")
        box = known_box
    with attention_backend(config.backend):
        annotated, faces = predict_image(model, photo, device, box=box)
    write_results(
        annotated, faces, out / "photo_landmarks.png", out / "photo_landmarks.json", photo
    )
    error = export(model.cpu(), out / "aanet.pt2", "export")
    print(format_table(report))
    print(f"\n{headline(config, report['full'])}")
    print(
        f"checkpoint {out / 'last.pt'}, log {out / 'log.csv'}, curves {out / 'curves.png'}, "
        f"report {out / 'eval.json'},\nannotated photo {out / 'photo_landmarks.png'} "
        f"({len(faces)} face(s)), torch.export {out / 'aanet.pt2'} (max diff {error:.2g})"
    )
    return report

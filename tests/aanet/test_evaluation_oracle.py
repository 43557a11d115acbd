"""The evaluation against an oracle written from the definitions (not from ``aanet.metrics``):
NME by the inter-ocular or inter-pupil distance, FR@0.1, the exact AUC of the step CED, the WFLW
and 300W subsets, the crop's frame against the image's, and ``aanet evaluate`` end to end."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from aanet.cli import main
from aanet.config import Config
from aanet.datasets import w300, wflw
from aanet.datasets.augment import crop_matrix
from aanet.datasets.dataset import LandmarkDataset, to_tensor
from aanet.datasets.records import DataError, Record
from aanet.evaluate import Predictions, predict_errors, subset_report
from aanet.inference import load_model
from aanet.landmarks import WFLW_ATTRIBUTES
from aanet.metrics import auc, failure_rate, nme, point_errors, summarize
from aanet.train import train

# --- the oracle --------------------------------------------------------------------------------

# Outer eye corners and pupils, 0-based: WFLW annotates the pupils (96, 97); 300W has none, and its
# pupil is the centre of the six points of each eye.
OCULAR = {98: ([60], [72]), 68: ([36], [45])}
PUPIL = {98: ([96], [97]), 68: (list(range(36, 42)), list(range(42, 48)))}


def oracle_nme(pred: np.ndarray, target: np.ndarray, pupils: bool = False) -> list[float]:
    """Per face: the mean over points of the point-to-point distance, over the distance of the
    two eye centres (each the mean of its points)."""
    left, right = (PUPIL if pupils else OCULAR)[target.shape[1]]
    out = []
    for p, t in zip(pred.astype(np.float64), target.astype(np.float64), strict=True):
        a = [sum(t[i][k] for i in left) / len(left) for k in (0, 1)]
        b = [sum(t[i][k] for i in right) / len(right) for k in (0, 1)]
        norm = math.hypot(a[0] - b[0], a[1] - b[1])
        out.append(sum(math.hypot(*(p[i] - t[i])) for i in range(len(t))) / len(t) / norm)
    return out


def oracle_fr(errors: list[float], threshold: float = 0.1) -> float:
    """A face fails when its NME is above the threshold (or is not a number)."""
    return sum(1 for e in errors if not e <= threshold) / len(errors)


def oracle_auc(errors: list[float], threshold: float = 0.1) -> float:
    """The step CED (fraction of faces with NME <= x) integrated over [0, threshold] rectangle by
    rectangle between its jumps, over the threshold."""
    jumps = sorted(e for e in errors if e <= threshold)
    area, found, x = 0.0, 0, 0.0
    for e in jumps:
        area += (e - x) * found / len(errors)
        found, x = found + 1, e
    area += (threshold - x) * found / len(errors)
    return area / threshold


def trapezoid_auc(errors: list[float], threshold: float = 0.1, step: float = 1e-4) -> float:
    """The grid approximation many papers' code uses, to show where it differs."""
    grid = np.linspace(0.0, threshold, round(threshold / step) + 1)
    ced = [(np.asarray(errors) <= x).mean() for x in grid]
    return float(np.trapezoid(ced, grid)) / threshold


def random_faces(num_points: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(count, num_points, 2, generator=g, dtype=torch.float64) * 100
    pred = target + torch.randn(count, num_points, 2, generator=g, dtype=torch.float64) * 3
    return pred, target


# --- metrics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_points", [98, 68])
@pytest.mark.parametrize("pupils", [False, True], ids=["inter-ocular", "inter-pupil"])
def test_nme_matches_the_oracle(num_points, pupils):
    pred, target = random_faces(num_points, 5, num_points)
    normalization = "inter-pupil" if pupils else "inter-ocular"
    got = nme(pred, target, normalization).tolist()
    assert got == pytest.approx(oracle_nme(pred.numpy(), target.numpy(), pupils), rel=1e-12)
    assert nme(pred, target).tolist() == pytest.approx(oracle_nme(pred.numpy(), target.numpy()))


def test_unknown_normalization_is_refused():
    pred, target = random_faces(98, 1, 0)
    with pytest.raises(ValueError, match="normalization: expected one of"):
        nme(pred, target, "inter-eye")


@pytest.mark.parametrize(
    ("errors", "fr", "area"),
    [
        ([0.0, 0.0, 0.0], 0.0, 1.0),  # all perfect: the whole square
        ([0.2, 0.5, 0.11], 1.0, 0.0),  # all above: nothing
        ([0.1], 0.0, 0.0),  # exactly at 0.1: passes, but is found only at 0.1 itself
        ([0.05], 0.0, 0.5),
        ([0.03, 0.03, 0.07, 0.07], 0.0, 0.5),  # ties
        ([0.0, 0.05, 0.1, 0.2], 0.25, 0.375),
    ],
)
def test_failure_rate_and_exact_auc_against_the_oracle(errors, fr, area):
    for dtype in (torch.float64, torch.float32):
        tensor = torch.tensor(errors, dtype=dtype)
        assert failure_rate(tensor) == pytest.approx(fr) == oracle_fr(errors)
        assert auc(tensor) == pytest.approx(area, abs=1e-7)
    assert oracle_auc(errors) == pytest.approx(area)
    # A trapezoid on a grid of step h is off by up to h / 2 per face, over the threshold.
    assert abs(trapezoid_auc(errors) - area) <= 1e-4 / 2 / 0.1 + 1e-12


def test_the_exact_auc_where_a_grid_trapezoid_is_not():
    """One face at exactly 0.1 is found only at the last cut-off: an area of 0, where the grid's
    trapezoid gives it half a step. All faces at 0 fill the square, on the grid too."""
    assert auc(torch.tensor([0.1], dtype=torch.float64)) == 0.0
    assert trapezoid_auc([0.1]) == pytest.approx(0.5e-4 / 0.1)
    assert auc(torch.zeros(3)) == 1.0 == pytest.approx(trapezoid_auc([0.0] * 3))
    assert auc(torch.tensor([0.25, 0.11])) == 0.0 == trapezoid_auc([0.25, 0.11])


def test_auc_and_fr_on_random_errors_match_the_oracle():
    errors = torch.rand(300, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 0.15
    errors[:20] = errors[20:40]  # ties
    as_list = errors.tolist()
    assert auc(errors) == pytest.approx(oracle_auc(as_list), rel=1e-12)
    assert failure_rate(errors) == oracle_fr(as_list)


def test_a_face_without_a_finite_prediction_fails():
    """Until 2026-12-01 a NaN NME compared as "not above 0.1", so it passed: FR 0 % for a model
    that gave NaN on every face."""
    errors = torch.tensor([float("nan"), 0.05, float("inf")])
    assert failure_rate(errors) == pytest.approx(2 / 3) == oracle_fr(errors.tolist())
    assert auc(errors) == pytest.approx(0.5 / 3) == pytest.approx(oracle_auc(errors.tolist()))
    assert math.isnan(summarize(errors)["nme"])
    assert failure_rate(torch.full((4,), float("nan"))) == 1.0


def test_negative_errors_and_thresholds_are_refused():
    """Until 2026-12-01 an error of -0.1 gave an AUC of 2."""
    with pytest.raises(ValueError, match="errors: expected NMEs >= 0"):
        auc(torch.tensor([-0.1]))
    with pytest.raises(ValueError, match="threshold: expected a positive number"):
        failure_rate(torch.tensor([0.05]), threshold=0.0)


def test_empty_and_single_face_sets():
    empty = summarize(torch.zeros(0))
    assert empty["count"] == 0 and all(math.isnan(empty[k]) for k in ("nme", "fr", "auc"))
    one = summarize(torch.tensor([0.04]))
    assert one == pytest.approx({"nme": 0.04, "fr": 0.0, "auc": 0.6, "count": 1})


@pytest.mark.parametrize(
    ("normalization", "points"), [("inter-ocular", (60, 72)), ("inter-pupil", (96, 97))]
)
def test_degenerate_faces_are_named(normalization, points):
    """Coincident eye corners or pupils, or a NaN among them: an error naming the face (until
    2026-12-01 a NaN corner gave a NaN NME without a word)."""
    pred, target = random_faces(98, 3, 1)
    for value in (target[2, points[0]].clone(), torch.tensor([float("nan"), 1.0])):
        bad = target.clone()
        bad[2, points[1]] = value
        with pytest.raises(ValueError, match="target: face 2: .*coincide or are not finite"):
            point_errors(pred, bad, normalization)


# --- subsets -----------------------------------------------------------------------------------


def test_wflw_flags_are_read_in_the_published_order():
    """After the 196 coordinates and the 4 box values: pose, expression, illumination, make-up,
    occlusion, blur."""
    assert WFLW_ATTRIBUTES == ("pose", "expression", "illumination", "make-up", "occlusion", "blur")
    coords = " ".join(["1.0"] * 196)
    for column in range(6):
        flags = ["0"] * 6
        flags[column] = "1"
        record = wflw.parse_line(f"{coords} 0 0 9 9 {' '.join(flags)} a.jpg", "x:1", Path("."))
        assert record.attributes.tolist() == [int(f) for f in flags]


def test_subset_report_uses_the_flagged_faces():
    g = torch.Generator().manual_seed(3)
    errors = torch.rand(40, generator=g, dtype=torch.float64) * 0.15
    flags = (torch.rand(40, 6, generator=g) < 0.3).long()
    report = subset_report(Predictions(errors, errors[:, None], torch.rand(40, 1), flags))
    assert report["full"]["nme"] == pytest.approx(errors.mean().item())
    for column, name in enumerate(WFLW_ATTRIBUTES):
        chosen = [e for e, f in zip(errors.tolist(), flags[:, column].tolist(), strict=True) if f]
        assert report[name]["count"] == len(chosen)
        assert report[name]["nme"] == pytest.approx(sum(chosen) / len(chosen))
        assert report[name]["fr"] == pytest.approx(oracle_fr(chosen))
        assert report[name]["auc"] == pytest.approx(oracle_auc(chosen))
    assert "common" not in report and report["normalization"] == "inter-ocular"


@pytest.mark.parametrize("flagged", [0, 1])
def test_a_wflw_report_has_all_six_subsets_whatever_the_flags(tmp_path, flagged):
    """Until 2026-12-03 a WFLW test set with no face flagged gave a report without the six
    subsets, one flagged face a report with all six: now always all six, an empty one with
    count 0 and null metrics in the JSON, as 300W's two."""
    from aanet.evaluate import write_json

    errors = torch.full((4,), 0.05, dtype=torch.float64)
    flags = torch.zeros(4, 6, dtype=torch.long)
    flags[:flagged, 0] = 1
    points = errors[:, None].expand(4, 98)
    report = subset_report(Predictions(errors, points, torch.rand(4, 98), flags))
    assert [name for name in report if name in WFLW_ATTRIBUTES] == list(WFLW_ATTRIBUTES)
    assert report["pose"]["count"] == flagged and report["blur"]["count"] == 0
    write_json(report, tmp_path / "eval.json")
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["blur"] == {"nme": None, "fr": None, "auc": None, "count": 0}
    assert "common" not in written


@pytest.mark.parametrize(
    ("path", "subset"),
    [
        ("300W/lfpw/testset/image_0001.png", "common"),
        ("300W/HELEN/testset/296814969_3.jpg", "common"),
        ("300W/ibug/image_003_1.jpg", "challenging"),
        ("/data/ibug_300W/ibug/image_003_1.jpg", "challenging"),
        ("/data/ibug/helen/testset/1.jpg", "common"),  # the nearest folder decides
        ("300W/afw/134212_1.jpg", None),
        ("300W/01_Indoor/indoor_001.png", None),
    ],
)
def test_300w_subset_of_an_image(path, subset):
    assert w300.subset_of(Path(path)) == subset


def _write_300w_face(folder: Path, name: str, points: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / f"{name}.png"), np.full((80, 80, 3), 100, np.uint8))
    body = "\n".join(f"{x + 1:.3f} {y + 1:.3f}" for x, y in points)  # .pts counts from 1
    (folder / f"{name}.pts").write_text(f"version: 1\nn_points: 68\n{{\n{body}\n}}\n")


class _FixedModel(torch.nn.Module):
    """Predicts the same crop-pixel points for every image."""

    def __init__(self, points: torch.Tensor) -> None:
        super().__init__()
        self.points = points

    def forward(self, images: torch.Tensor):
        b = len(images)
        return self.points.expand(b, -1, -1), torch.ones(b, len(self.points)), None


def _face_points(num_points: int, seed: int, size: float = 60.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.uniform(10, size, (num_points, 2))).astype(np.float32)


def test_300w_report_has_the_common_and_challenging_subsets(tmp_path):
    """Common = LFPW test + HELEN test, challenging = iBUG, full = all faces under --test-root."""
    where = {"lfpw/testset": 2, "helen/testset": 1, "ibug": 2}
    for seed, (folder, count) in enumerate(where.items()):
        for k in range(count):
            _write_300w_face(tmp_path / folder, f"f{k}", _face_points(68, 10 * seed + k))
    records = w300.load_300w(tmp_path, on_error="stop")
    loader = DataLoader(LandmarkDataset(records, 32), batch_size=2)
    model = _FixedModel(torch.from_numpy(_face_points(68, 5, 30.0)))
    predictions = predict_errors(model, loader, torch.device("cpu"))
    report = subset_report(predictions)
    errors = predictions.face_errors.tolist()
    names = [w300.subset_of(r.image_path) for r in records]
    assert report["full"]["count"] == 5
    for name in ("common", "challenging"):
        chosen = [e for e, n in zip(errors, names, strict=True) if n == name]
        assert report[name]["count"] == (3 if name == "common" else 2)
        assert report[name]["nme"] == pytest.approx(sum(chosen) / len(chosen))
        assert report[name]["auc"] == pytest.approx(oracle_auc(chosen))
    assert not any(name in report for name in WFLW_ATTRIBUTES)


def test_a_300w_test_set_without_the_subset_folders_says_so(tmp_path, caplog):
    """Until 2026-12-01 a 300W test folder whose images are under none of lfpw, helen or ibug
    gave a report without the common and challenging subsets, without a word. Now a warning
    names the folders when the test set loads, and the report has both subsets, empty, and says
    why; a training run warns once, not every epoch."""
    from aanet.datasets import sources
    from aanet.evaluate import format_table, write_json

    for seed, folder in enumerate(("01_Indoor", "02_Outdoor")):
        for k in range(4):
            _write_300w_face(tmp_path / "test" / folder, f"f{k}", _face_points(68, 10 * seed + k))
            _write_300w_face(tmp_path / "train" / folder, f"f{k}", _face_points(68, 50 + k))
    config = Config(
        data="300w", data_root=str(tmp_path / "train"), test_root=str(tmp_path / "test"),
        input_size=32, width=16, blocks=[1, 1, 1], batch_size=4, epochs=2, device="cpu",
        out=str(tmp_path / "run"), on_error="stop",
    )  # fmt: skip
    records = sources.load_split(config, "test")
    expected = "no test image lies under a folder named lfpw or helen (the common subset) or ibug"
    assert caplog.text.count(expected) == 1
    assert "aanet.data" in caplog.text and str(tmp_path / "test") in caplog.text
    loader = DataLoader(LandmarkDataset(records, 32), batch_size=4)
    model = _FixedModel(torch.from_numpy(_face_points(68, 5, 30.0)))
    report = subset_report(predict_errors(model, loader, torch.device("cpu")))
    assert report["full"]["count"] == 8
    for name in ("common", "challenging"):
        assert report[name]["count"] == 0 and math.isnan(report[name]["nme"])
    assert report["subsets_missing"].startswith(expected)
    table = format_table(report)
    assert f"common and challenging: {expected}" in table
    for name in ("common", "challenging"):  # empty: no metrics, rather than nan
        assert re.search(rf"^{name} +0 +- +- +-$", table, re.MULTILINE)
    assert "nan" not in table
    write_json(report, tmp_path / "eval.json")
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["common"]["nme"] is None and written["subsets_missing"].startswith(expected)
    caplog.clear()
    result = train(config, progress=False)
    assert caplog.text.count(expected) == 1
    assert "subsets_missing" in result["report"]


def test_a_300w_test_set_with_one_subset_folder_has_no_missing_note(tmp_path, caplog):
    for k in range(2):
        _write_300w_face(tmp_path / "ibug", f"f{k}", _face_points(68, k))
    records = w300.load_300w(tmp_path, on_error="stop")
    w300.warn_without_subsets(records, tmp_path)
    assert "no test image lies" not in caplog.text
    loader = DataLoader(LandmarkDataset(records, 32), batch_size=2)
    model = _FixedModel(torch.from_numpy(_face_points(68, 5, 30.0)))
    report = subset_report(predict_errors(model, loader, torch.device("cpu")))
    assert (report["common"]["count"], report["challenging"]["count"]) == (0, 2)
    assert "subsets_missing" not in report


# --- the crop's frame against the image's ------------------------------------------------------


def _oracle_in_image_pixels(
    crop_points: np.ndarray, record: Record, size: int, pupils: bool = False
) -> float:
    """Map crop-pixel predictions back to the image through the inverse crop and measure them
    against the annotation as written."""
    inverse = cv2.invertAffineTransform(crop_matrix(record.box, size))
    back = crop_points.astype(np.float64) @ inverse[:, :2].T + inverse[:, 2]
    return oracle_nme(back[None], record.landmarks[None], pupils)[0]


def test_the_nme_of_the_crop_is_the_nme_in_image_pixels(tmp_path):
    """A wide image with a wide (non-square) face box: the crop is still a similarity, so the
    NME measured in crop pixels is the one measured in the original image."""
    image = tmp_path / "wide.png"
    cv2.imwrite(str(image), np.full((70, 150, 3), 90, np.uint8))
    points = _face_points(98, 11) * np.array([2.2, 1.0], np.float32)  # x up to 132, y up to 60
    box = np.array([5.0, 8.0, 140.0, 64.0], np.float32)  # 135 x 56
    record = Record(image, points, box, np.zeros(6, np.int64), "wide:1")
    crop_prediction = torch.from_numpy(_face_points(98, 12, 30.0))
    for normalization, pupils in (("inter-ocular", False), ("inter-pupil", True)):
        got = predict_errors(
            _FixedModel(crop_prediction), DataLoader(LandmarkDataset([record], 32)),
            torch.device("cpu"), normalization=normalization,
        ).face_errors  # fmt: skip
        expected = _oracle_in_image_pixels(crop_prediction.numpy(), record, 32, pupils)
        assert got.item() == pytest.approx(expected, rel=1e-5)


def test_a_degenerate_annotation_is_named_by_file_and_line(tmp_path):
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.full((70, 70, 3), 90, np.uint8))
    points = _face_points(98, 13)
    points[72] = points[60]
    record = Record(image, points, np.array([5, 5, 65, 65], np.float32), np.zeros(6, np.int64),
                    "list.txt:7")  # fmt: skip
    model = _FixedModel(torch.from_numpy(_face_points(98, 14, 30.0)))
    with pytest.raises(DataError, match=r"^list.txt:7: the outer eye corners \(points 60 and 72\)"):
        predict_errors(model, DataLoader(LandmarkDataset([record], 32)), torch.device("cpu"))


def _move_point(annotations: Path, line: int, point: int, to: int) -> None:
    """Put point ``point`` of annotation line ``line`` (1-based) on point ``to``."""
    lines = annotations.read_text().splitlines()
    fields = lines[line - 1].split()
    fields[2 * point : 2 * point + 2] = fields[2 * to : 2 * to + 2]
    lines[line - 1] = " ".join(fields)
    annotations.write_text("\n".join(lines) + "\n")


def test_training_skips_a_test_face_whose_eye_corners_coincide_when_it_loads(tmp_path, caplog):
    """Until 2026-12-01 the face loaded and the first epoch's evaluation stopped the run at it,
    under --on-error skip too."""
    from tests.aanet.test_train import tiny_config, tiny_data

    config = tiny_config(tmp_path, epochs=1)
    annotations = wflw.annotation_file(tiny_data(config), "test")
    _move_point(annotations, 2, 72, 60)
    result = train(config, progress=False)
    assert result["report"]["full"]["count"] == 7
    assert f"{annotations}:2: the outer eye corners (points 60 and 72) coincide" in caplog.text


def test_evaluate_by_the_pupils_skips_a_face_whose_pupils_coincide_when_it_loads(
    tiny_run, tmp_path, capsys, caplog
):
    """Inter-ocular, the face is measured; inter-pupil, it is a bad entry of the test list (until
    2026-12-01 the evaluation stopped at it, under --on-error skip too)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_run.data_root, data)
    annotations = wflw.annotation_file(data, "test")
    _move_point(annotations, 4, 97, 96)
    argv = ["evaluate", "--checkpoint", str(Path(tiny_run.out) / "last.pt"),
            "--data-root", str(data), "--json", str(tmp_path / "eval.json")]  # fmt: skip
    counts = {}
    for normalization in ("inter-ocular", "inter-pupil"):
        assert main([*argv, "--normalization", normalization]) == 0, capsys.readouterr().err
        counts[normalization] = json.loads((tmp_path / "eval.json").read_text())["full"]["count"]
    assert counts == {"inter-ocular": 6, "inter-pupil": 5}
    assert caplog.text.count(f"{annotations}:4: the pupils coincide") == 1
    assert main([*argv, "--normalization", "inter-pupil", "--on-error", "stop"]) == 2
    assert f"{annotations}:4: the pupils coincide" in capsys.readouterr().err


def test_non_finite_predictions_fail_and_are_logged(tmp_path, caplog):
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.full((70, 70, 3), 90, np.uint8))
    record = Record(image, _face_points(98, 15), np.array([5, 5, 65, 65], np.float32),
                    np.zeros(6, np.int64), "list.txt:3")  # fmt: skip
    points = torch.from_numpy(_face_points(98, 16, 30.0))
    points[4, 1] = float("nan")
    loader = DataLoader(LandmarkDataset([record, record], 32))
    with caplog.at_level("WARNING", logger="aanet.evaluate"):
        report = subset_report(predict_errors(_FixedModel(points), loader, torch.device("cpu")))
    assert "2 of 2 faces have non-finite predicted points" in caplog.text
    assert report["full"]["fr"] == 1.0 and report["full"]["auc"] == 0.0
    assert math.isnan(report["full"]["nme"])


# --- aanet evaluate end to end -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Config:
    tmp = tmp_path_factory.mktemp("oracle")
    config = Config(
        data_root=str(tmp / "data"), num_train=16, num_test=6, image_size=64, input_size=32,
        width=16, blocks=[1, 1, 1], batch_size=4, epochs=1, device="cpu", out=str(tmp / "run"),
    )  # fmt: skip
    train(config, progress=False)
    return config


def _crop(record: Record, size: int) -> torch.Tensor:
    """The evaluation crop, made here with OpenCV (the data set decodes with Pillow)."""
    image = cv2.imread(str(record.image_path))
    crop = cv2.warpAffine(
        image, crop_matrix(record.box, size), (size, size), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
    )  # fmt: skip
    return to_tensor(crop)


class _PlantedModel(torch.nn.Module):
    """Knows each test crop: answers its annotation moved right by a chosen fraction of its
    inter-ocular distance, so that the NMEs spread on both sides of 0.1."""

    def __init__(self, records: list[Record], size: int, shifts: list[float]) -> None:
        super().__init__()
        self.answers = {}
        for record, shift in zip(records, shifts, strict=True):
            matrix = crop_matrix(record.box, size)
            points = record.landmarks.astype(np.float64) @ matrix[:, :2].T + matrix[:, 2]
            points[:, 0] += shift * np.linalg.norm(points[60] - points[72])
            self.answers[_crop(record, size).numpy().tobytes()] = torch.from_numpy(points).float()

    def forward(self, images: torch.Tensor):
        coords = torch.stack([self.answers[image.numpy().tobytes()] for image in images])
        return coords, torch.ones(coords.shape[:2]), None


@pytest.mark.parametrize("model", ["trained", "planted"])
@pytest.mark.parametrize("normalization", ["inter-ocular", "inter-pupil"])
def test_evaluate_reports_the_oracle_numbers(
    tiny_run, tmp_path, capsys, monkeypatch, normalization, model
):
    """Run the model on each test crop ourselves, map its points back to the image, and measure
    them with the oracle: eval.json and the printed table give the same numbers. The trained
    model of a few steps fails every face; the planted one gives NMEs from 0 to 0.3."""
    checkpoint = Path(tiny_run.out) / "last.pt"
    records = wflw.load_wflw(tiny_run.data_root, "test")
    net = load_model(checkpoint)
    if model == "planted":
        net = _PlantedModel(records, 32, [0.0, 0.02, 0.05, 0.08, 0.13, 0.3])
        monkeypatch.setattr("aanet.inference.model_from_state", lambda *args: net)
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--json", str(out), "--batch-size", "4"]
    if normalization != "inter-ocular":  # the default
        argv += ["--normalization", normalization]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())

    errors = []
    for record in records:
        with torch.no_grad():
            coords = net(_crop(record, 32)[None])[0][0].numpy()
        errors.append(
            _oracle_in_image_pixels(coords, record, 32, pupils=normalization == "inter-pupil")
        )
    if model == "planted" and normalization == "inter-ocular":
        assert errors == pytest.approx([0.0, 0.02, 0.05, 0.08, 0.13, 0.3], abs=1e-5)
    assert report["full"]["count"] == len(records) == 6
    assert report["full"]["nme"] == pytest.approx(sum(errors) / len(errors), rel=1e-4)
    assert report["full"]["fr"] == pytest.approx(oracle_fr(errors))
    assert report["full"]["auc"] == pytest.approx(oracle_auc(errors), abs=1e-5)
    for column, name in enumerate(WFLW_ATTRIBUTES):
        chosen = [e for e, r in zip(errors, records, strict=True) if r.attributes[column]]
        assert report[name]["count"] == len(chosen)
        if chosen:
            assert report[name]["nme"] == pytest.approx(sum(chosen) / len(chosen), rel=1e-4)
            assert report[name]["fr"] == pytest.approx(oracle_fr(chosen))
            assert report[name]["auc"] == pytest.approx(oracle_auc(chosen), abs=1e-5)
        else:
            assert report[name]["nme"] is None
    full = next(line for line in printed.splitlines() if line.startswith("full "))
    assert full.split() == [
        "full", "6", f"{100 * report['full']['nme']:.2f}", f"{100 * report['full']['fr']:.2f}",
        f"{report['full']['auc']:.4f}",
    ]  # fmt: skip
    assert f"NME normalised by the {normalization} distance" in printed
    assert report["normalization"] == normalization

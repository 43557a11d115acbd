"""Hostile image files at load, training, evaluation and prediction time.

What is promised: a file that is not a whole image (empty, text, cut short, too large for the
decoder) is a bad entry named by its annotation line, under the ``on_error`` policy, at load time
when its header shows it and when it is read otherwise; every image that decodes gives the pixels
``cv2.imread`` would (grey, 16-bit, alpha, palette, CMYK); under ``skip`` a face whose image stops
decoding after loading is replaced in its batch by the next face (training) or left out of the
metrics (evaluation), reported once with its file; under ``stop`` the run ends naming it.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from aanet import checkpoint
from aanet.cli import main
from aanet.datasets import synthetic, w300, wflw
from aanet.datasets.dataset import LandmarkDataset
from aanet.datasets.images import read_image
from aanet.datasets.records import DataError
from aanet.model import ModelConfig, build_model
from aanet.train import train
from tests.aanet.test_train import HERE, tiny_config, tiny_data, torchrun


def _cut(path: Path, fraction: float = 2 / 3) -> None:
    """Cut ``path`` short, as an interrupted download would."""
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])


def _as_truncated_jpeg(path: Path) -> None:
    """Replace the image at ``path`` by a cut-off JPEG of it, under the same name: its header
    reads (it passes loading), its pixels do not (OpenCV would fill them with grey)."""
    jpeg = cv2.imencode(".jpg", cv2.imread(str(path)))[1].tobytes()
    path.write_bytes(jpeg[: len(jpeg) * 2 // 3])


def _huge_png_header(path: Path, side: int = 20000) -> None:
    """A PNG whose header claims ``side`` x ``side`` pixels: Pillow refuses to open it
    (``DecompressionBombError``), a few bytes on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def _hostile(kind: str, path: Path, good: Path) -> None:
    """Write the ``kind`` of hostile file at ``path`` (``good`` is a real image to damage)."""
    if kind == "zero bytes":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n")
    elif kind == "truncated png":
        path.write_bytes(good.read_bytes())
        _cut(path)
    elif kind == "huge header":
        _huge_png_header(path)
    else:
        raise AssertionError(kind)


HOSTILE = ("zero bytes", "text", "truncated png", "huge header")


def _wflw_set(root: Path, num_train: int = 3) -> Path:
    return synthetic.generate(
        root, synthetic.SyntheticConfig(num_train=num_train, num_test=1, image_size=64)
    )


def _w300_set(folder: Path, names: tuple[str, ...] = ("a", "b")) -> Path:
    """68 points in a 64x64 image per name, 1-based as in the ``.pts`` files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4)
    for name in names:
        points = rng.uniform(8, 56, size=(68, 2)).round(2)
        body = "\n".join(f"{x} {y}" for x, y in points)
        (folder / f"{name}.pts").write_text(f"version: 1\nn_points: 68\n{{\n{body}\n}}\n")
        cv2.imwrite(str(folder / f"{name}.png"), rng.integers(0, 255, (64, 64, 3), np.uint8))
    return folder


# --- at load time: the header -----------------------------------------------------------------


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_wflw_image_is_a_bad_entry_named_by_its_line(tmp_path, kind, caplog):
    """Until 2026-12-01 an image too large for Pillow raised ``DecompressionBombError`` out of
    the loader, under ``--on-error skip`` too (it is not an ``OSError``)."""
    root = _wflw_set(tmp_path)
    path = wflw.annotation_file(root, "train")
    lines = path.read_text().splitlines()
    image = root / wflw.IMAGE_DIR / lines[1].split()[-1]
    _hostile(kind, image, root / wflw.IMAGE_DIR / lines[0].split()[-1])
    records = wflw.load_wflw(root, "train", on_error="skip")
    assert len(records) == 2 and "skipped 1 bad entries" in caplog.text
    with pytest.raises(DataError, match=f"{path}:2: unreadable image {image}"):
        wflw.load_wflw(root, "train", on_error="stop")


def test_a_wflw_image_path_too_long_for_the_file_system_is_a_bad_entry(tmp_path, caplog):
    """Until 2026-12-03 a path the file system refuses (a name of 300 characters: ENAMETOOLONG)
    ended the whole load with an OSError naming no line, even under ``skip``."""
    root = _wflw_set(tmp_path)
    path = wflw.annotation_file(root, "train")
    good = path.read_text().splitlines()[0].split()
    with path.open("a") as annotations:
        annotations.write(" ".join(good[:-1] + ["a" * 300 + ".png"]) + "\n")
    assert len(wflw.load_wflw(root, "train", on_error="skip")) == 3
    assert f"{path}:4: image path not usable: " in caplog.text
    with pytest.raises(DataError, match=r":4: image path not usable: .*File name too long"):
        wflw.load_wflw(root, "train", on_error="stop")


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_300w_image_is_a_bad_entry_named_by_its_file(tmp_path, kind):
    folder = _w300_set(tmp_path)
    _hostile(kind, folder / "b.png", folder / "a.png")
    assert [r.image_path.name for r in w300.load_300w(folder, on_error="skip")] == ["a.png"]
    with pytest.raises(DataError, match="b.pts:1: unreadable image .*b.png"):
        w300.load_300w(folder, on_error="stop")


def test_an_image_much_smaller_than_its_face_box_is_a_bad_entry(tmp_path):
    """A box mostly off the image is another image's box (the image was resized after it was
    annotated): until 2026-12-01 it was trained on, the picture a few pixels in the crop's
    corner, or not in it at all. A box partly off the image (a face at its edge) is kept."""
    root = _wflw_set(tmp_path, num_train=2)
    path = wflw.annotation_file(root, "train")
    good = path.read_text().splitlines()[0].split()
    for box in (("-100", "-100", "400", "400"), ("200", "0", "260", "60")):
        lines = path.read_text().splitlines()[:2]
        path.write_text("\n".join([*lines, " ".join(good[:196] + list(box) + good[200:])]) + "\n")
        assert len(wflw.load_wflw(root, "train", on_error="skip")) == 2
        with pytest.raises(DataError, match=f"{path}:3: face box .* lies mostly outside the 64x64"):
            wflw.load_wflw(root, "train", on_error="stop")
    x0, y0, x1, y1 = (float(v) for v in good[196:200])
    edge = (f"{-0.5 - 0.3 * (x1 - x0):.1f}", *good[197:200])  # more than 3/4 on the image
    lines = path.read_text().splitlines()[:2]
    path.write_text("\n".join([*lines, " ".join(good[:196] + list(edge) + good[200:])]) + "\n")
    assert len(wflw.load_wflw(root, "train", on_error="stop")) == 3


def test_a_thumbnail_under_full_size_annotations_is_a_bad_entry(tmp_path):
    """The image shrunk to a quarter after annotation: its points lie off it (this held before)."""
    root = _wflw_set(tmp_path, num_train=2)
    path = wflw.annotation_file(root, "train")
    image = root / wflw.IMAGE_DIR / path.read_text().splitlines()[1].split()[-1]
    cv2.imwrite(str(image), cv2.resize(cv2.imread(str(image)), (16, 16)))
    with pytest.raises(DataError, match=f"{path}:2: .*points outside the 16x16 image"):
        wflw.load_wflw(root, "train", on_error="stop")


# --- decoding: the pixels -----------------------------------------------------------------------


def _formats(folder: Path) -> dict[str, Path]:
    """One image per layout a face set may hold, all of the same smooth picture."""
    rng = np.random.default_rng(0)
    bgr = cv2.GaussianBlur(rng.integers(0, 256, (24, 32, 3), np.uint8), (5, 5), 2)
    wide = rng.integers(0, 65536, (24, 32, 3), dtype=np.uint16)
    rgb = Image.fromarray(bgr[:, :, ::-1])
    files = {}

    def path(name: str) -> Path:
        files[name] = folder / name
        return files[name]

    cv2.imwrite(str(path("grey.png")), bgr[:, :, 0])
    cv2.imwrite(str(path("grey.jpg")), bgr[:, :, 0])
    cv2.imwrite(str(path("grey16.png")), wide[:, :, 0])
    cv2.imwrite(str(path("colour16.png")), wide)
    cv2.imwrite(str(path("rgba.png")), np.dstack([bgr, bgr[:, :, 1]]))
    rgb.convert("P").save(path("palette.png"))
    rgb.convert("P").save(path("palette_transparent.png"), transparency=0)
    rgb.convert("CMYK").save(path("cmyk.jpg"))  # OpenCV reads CMYK JPEGs, it does not write them
    rgb.convert("1").save(path("bilevel.png"))
    return files


def test_every_image_layout_reads_as_opencv_reads_it(tmp_path):
    """Until 2026-12-01 a 16-bit grey PNG read as white (every value above 255 clipped)."""
    for name, path in _formats(tmp_path).items():
        got, want = read_image(path), cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert got.shape == want.shape and got.dtype == np.uint8, name
        # CMYK to RGB: Pillow's and libjpeg's arithmetic differ by one level at most.
        tolerance = 1 if name == "cmyk.jpg" else 0
        assert np.abs(got.astype(int) - want.astype(int)).max() <= tolerance, name


def test_a_16_bit_grey_face_trains_on_its_pixels_not_on_white(tmp_path):
    """Through the dataset: the crop of a 16-bit grey image is the crop of its 8-bit version."""
    root = _wflw_set(tmp_path, num_train=1)
    record = wflw.load_wflw(root, "train", on_error="stop")[0]
    grey = cv2.imread(str(record.image_path), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(record.image_path), grey.astype(np.uint16) * 256 + 128)
    eight_bit = tmp_path / "grey8.png"
    cv2.imwrite(str(eight_bit), grey)
    wide = LandmarkDataset([record], 32)[0]["image"]
    record.image_path = eight_bit
    torch.testing.assert_close(wide, LandmarkDataset([record], 32)[0]["image"], rtol=0, atol=0)


def _untrained_model():
    return build_model(ModelConfig(input_size=32, width=16, blocks=(1, 1, 1))).eval()


def test_an_image_past_pillows_warning_size_is_logged_by_name_and_read(
    tmp_path, monkeypatch, caplog
):
    """Between once and twice ``PIL.Image.MAX_IMAGE_PIXELS`` Pillow opens an image with a
    ``DecompressionBombWarning`` naming its own source line; until 2026-12-02 that leaked out of
    training and ``predict``. Past twice the limit the refusal says it is Pillow's limit."""
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    large, too_large = tmp_path / "large.png", tmp_path / "too large.png"
    cv2.imwrite(str(large), np.full((12, 12, 3), 7, np.uint8))  # 144 pixels: 1-2x the limit
    cv2.imwrite(str(too_large), np.full((15, 15, 3), 7, np.uint8))  # 225: past twice
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        assert (read_image(large) == 7).all()
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert f"{large}: 12 x 12 pixels, past Pillow's decompression-bomb warning size" in caplog.text
    with pytest.raises(OSError, match="too large for Pillow: .*PIL.Image.MAX_IMAGE_PIXELS"):
        read_image(too_large)


def test_predict_names_an_image_too_large_to_decode(tmp_path):
    """Until 2026-12-01 ``DecompressionBombError`` escaped: a traceback, not ``aanet predict:
    error: ...``."""
    from aanet.predict import predict_image

    image = tmp_path / "huge.png"
    _huge_png_header(image)
    with pytest.raises(ValueError, match="image: .*huge.png is not an image that decodes"):
        predict_image(_untrained_model(), image, torch.device("cpu"), detect=False)


# --- after loading: the dataset ------------------------------------------------------------------


def test_a_removed_image_is_named_as_removed_not_as_undecodable(tmp_path):
    """Until 2026-12-01 a file deleted after loading was "cannot decode image ... its header
    reads, its data does not: a truncated or damaged file"."""
    records = wflw.load_wflw(_wflw_set(tmp_path), "train", on_error="stop")
    records[1].image_path.unlink()
    with pytest.raises(DataError, match=f"{records[1].where}: image not found: .*removed after"):
        LandmarkDataset(records, 32)[1]


@pytest.mark.parametrize("kind", ["truncated jpeg", "zero bytes", "text"])
def test_under_skip_the_next_face_stands_in_for_one_that_does_not_decode(tmp_path, kind):
    records = wflw.load_wflw(_wflw_set(tmp_path), "train", on_error="stop")
    if kind == "truncated jpeg":
        _as_truncated_jpeg(records[1].image_path)  # passes loading: found only when read
    else:
        _hostile(kind, records[1].image_path, records[0].image_path)
    skipping = LandmarkDataset(records, 32, on_error="skip")
    stand_in, next_face = skipping[1], skipping[2]
    assert (
        f"{records[1].where}: cannot decode image {records[1].image_path}" in (stand_in["left_out"])
    )
    for key in ("image", "landmarks", "attributes"):
        assert torch.equal(stand_in[key], next_face[key]), key
    assert next_face["left_out"] == "" and skipping[0]["left_out"] == ""
    with pytest.raises(DataError, match=f"{records[1].where}: cannot decode image"):
        LandmarkDataset(records, 32, on_error="stop")[1]


def test_the_stand_in_wraps_around_and_a_set_with_no_image_is_an_error(tmp_path):
    records = wflw.load_wflw(_wflw_set(tmp_path), "train", on_error="stop")
    _as_truncated_jpeg(records[2].image_path)
    skipping = LandmarkDataset(records, 32, on_error="skip")
    assert torch.equal(skipping[2]["image"], skipping[0]["image"])
    for record in records[:2]:
        _as_truncated_jpeg(record.image_path)
    with pytest.raises(DataError, match="none of the 3 images decodes"):
        skipping[0]


# --- after loading: training and evaluation -------------------------------------------------------


def _bad_after_loading(config, train_index: int = 3, test_index: int | None = 0) -> list[Path]:
    """Write ``config``'s data, then make training face ``train_index`` (and test face
    ``test_index``) a truncated JPEG: both load, neither decodes."""
    root = tiny_data(config)
    images = [wflw.load_wflw(root, "train")[train_index].image_path]
    if test_index is not None:
        images.append(wflw.load_wflw(root, "test")[test_index].image_path)
    for image in images:
        _as_truncated_jpeg(image)
    return images


def test_training_under_skip_replaces_a_face_that_does_not_decode_and_says_so_once(
    tmp_path, caplog
):
    """Until 2026-12-01 it stopped the run, under ``--on-error skip`` (the default) too."""
    caplog.set_level(logging.INFO, "aanet")
    config = tiny_config(tmp_path, on_error="skip")
    bad_train, bad_test = _bad_after_loading(config)
    result = train(config, progress=False)
    assert [row["skipped_faces"] for row in result["history"]] == [1, 1]
    for image in (bad_train, bad_test):
        assert caplog.text.count(f"cannot decode image {image}") == 1, caplog.text
    assert "training faces whose image does not decode" in caplog.text
    assert "test NME" in caplog.text and "(inter-ocular, 7 of 8 faces)" in caplog.text
    full = result["report"]["full"]
    assert (full["count"], full["left_out"]) == (7, 1)
    assert "skipped_faces" in (Path(config.out) / "log.csv").read_text().splitlines()[0]


def test_training_under_skip_with_a_bad_face_resumes_exactly(tmp_path):
    straight = tiny_config(tmp_path / "a", on_error="skip")
    _bad_after_loading(straight, test_index=None)
    interrupted = tiny_config(tmp_path / "b", on_error="skip")
    _bad_after_loading(interrupted, test_index=None)
    a = train(straight, progress=False)["model"].state_dict()
    train(interrupted, progress=False, stop_after=1)
    b = train(interrupted, resume="auto", progress=False)["model"].state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_resumed_run_does_not_name_a_bad_face_again_but_still_tries_it(tmp_path, caplog):
    """The named files are kept in the checkpoint: until 2026-12-01 a resumed run named them
    again. They are still read every epoch, so a file replaced before --resume trains again."""
    caplog.set_level(logging.INFO, "aanet")
    config = tiny_config(tmp_path, epochs=3, on_error="skip")
    bad_train, bad_test = _bad_after_loading(config)
    train(config, progress=False, stop_after=1)
    for image in (bad_train, bad_test):
        assert caplog.text.count(f"cannot decode image {image}") == 1, caplog.text
    named = checkpoint.load(Path(config.out) / "last.pt")["named_bad_faces"]
    assert [f"cannot decode image {bad_train}" in error for error in named["train"]] == [True]
    assert [f"cannot decode image {bad_test}" in error for error in named["test"]] == [True]
    caplog.clear()
    result = train(config, resume="auto", progress=False, stop_after=1)
    assert "cannot decode image" not in caplog.text and "test NME" in caplog.text
    assert result["history"][-1]["skipped_faces"] == 1  # tried again, left out again
    assert result["report"]["full"]["left_out"] == 1
    shutil.copy(wflw.load_wflw(config.data_root, "train")[0].image_path, bad_train)
    result = train(config, resume="auto", progress=False)
    assert [row["skipped_faces"] for row in result["history"]] == [1, 1, 0]


def test_training_under_stop_ends_naming_the_image_and_keeps_the_checkpoint(tmp_path):
    config = tiny_config(tmp_path, on_error="stop")
    tiny_data(config)
    train(config, progress=False, stop_after=1)
    saved = Path(config.out) / "last.pt"
    before = saved.read_bytes()
    image = wflw.load_wflw(config.data_root, "train")[3].image_path
    _as_truncated_jpeg(image)
    with pytest.raises(DataError) as info:
        train(config, resume="auto", progress=False)
    message = str(info.value)
    assert f":4: cannot decode image {image}" in message
    assert f"the last completed epoch is in {saved}" in message and "--on-error skip" in message
    assert saved.read_bytes() == before and checkpoint.load(saved)["epoch"] == 0


@pytest.fixture(scope="module")
def trained_copy(tmp_path_factory):
    """A tiny trained checkpoint; each test damages its own copy of the data."""
    config = tiny_config(tmp_path_factory.mktemp("bad_images"), epochs=1)
    train(config, progress=False)
    return config


def _damaged_copy(config, tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    shutil.copytree(config.data_root, data)
    image = wflw.load_wflw(data, "test")[2].image_path
    _as_truncated_jpeg(image)
    return data, image


def test_evaluate_under_skip_says_how_many_faces_it_left_out(trained_copy, tmp_path, capsys):
    """Until 2026-12-01 ``aanet evaluate`` stopped at such an image whatever ``--on-error``."""
    data, image = _damaged_copy(trained_copy, tmp_path)
    out = tmp_path / "eval.json"
    ckpt = str(Path(trained_copy.out) / "last.pt")
    flags = ["evaluate", "--checkpoint", ckpt, "--data-root", str(data), "--json", str(out)]
    assert main([*flags, "--on-error", "skip"]) == 0
    printed = capsys.readouterr().out
    assert "1 of the 8 test faces left out" in printed and "over the other 7" in printed
    full = json.loads(out.read_text())["full"]
    assert (full["count"], full["left_out"]) == (7, 1)
    assert main([*flags, "--on-error", "stop"]) == 2
    err = capsys.readouterr().err
    assert "aanet evaluate: error: " in err and f":3: cannot decode image {image}" in err


def test_evaluate_of_a_whole_set_says_none_left_out(trained_copy, tmp_path):
    out = tmp_path / "eval.json"
    ckpt = str(Path(trained_copy.out) / "last.pt")
    assert main(["evaluate", "--checkpoint", ckpt, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["full"]["left_out"] == 0


def test_ddp_under_skip_every_rank_takes_the_same_steps_and_the_face_is_named_once(tmp_path):
    """Two ranks, one face that does not decode on whichever rank draws it: the run completes,
    the replicas stay identical (each rank took every step), rank 0 names the file once."""
    config = tiny_config(tmp_path, epochs=1, on_error="skip")
    (image,) = _bad_after_loading(config, test_index=None)
    done = torchrun(str(HERE / "ddp_worker.py"), json.dumps(config.to_dict()))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count(f"cannot decode image {image}") == 1, done.stderr[-3000:]
    out = Path(config.out)
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    steps = [len(json.loads((out / f"rank{rank}_losses.json").read_text())) for rank in (0, 1)]
    assert steps == [2, 2]
    assert checkpoint.load(out / "last.pt")["history"][0]["skipped_faces"] == 1

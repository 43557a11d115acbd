"""Parsing, the synthetic set, the bad-data policy, augmentation geometry and flip maps."""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from filelock import FileLock

import aanet.train
from aanet.config import Config, make_config
from aanet.datasets import sources, synthetic, w300, wflw
from aanet.datasets.augment import AugmentConfig, augment_sample
from aanet.datasets.records import DataError
from aanet.landmarks import W300, WFLW


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return synthetic.generate(
        root, synthetic.SyntheticConfig(num_train=6, num_test=3, image_size=96)
    )


def _append_line(root, text):
    path = wflw.annotation_file(root, "train")
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [text]) + "\n")
    return len(lines) + 1


def test_synthetic_set_reads_back_through_the_wflw_loader(synth_root):
    train = wflw.load_wflw(synth_root, "train", on_error="stop")
    test = wflw.load_wflw(synth_root, "test", on_error="stop")
    assert len(train) == 6 and len(test) == 3
    for record in train:
        assert record.landmarks.shape == (98, 2)
        assert record.attributes.shape == (6,)
        image = cv2.imread(str(record.image_path))
        assert image.shape == (96, 96, 3)


def test_synthetic_set_is_reproducible(tmp_path):
    config = synthetic.SyntheticConfig(num_train=2, num_test=1, image_size=64, seed=7)
    a = synthetic.generate(tmp_path / "a", config)
    b = synthetic.generate(tmp_path / "b", config)
    name = "WFLW_images/synthetic_train/00001.png"
    assert (a / name).read_bytes() == (b / name).read_bytes()
    text_a = wflw.annotation_file(a, "train").read_text()
    assert text_a == wflw.annotation_file(b, "train").read_text()
    other = synthetic.generate(tmp_path / "c", dataclasses.replace(config, seed=8))
    assert wflw.annotation_file(other, "train").read_text() != text_a


def test_an_interrupted_regeneration_is_not_taken_for_a_whole_set(tmp_path, monkeypatch):
    """A regeneration with other settings stopped part way (killed, or Ctrl-C) has overwritten
    the first images. Until 2026-12-03 the stamp of the earlier set stayed until the end, so
    the next run with the earlier settings reused the mix: the new run's faces under the old
    run's landmarks. The stamp now goes before the first file is rewritten."""
    config = synthetic.SyntheticConfig(num_train=3, num_test=1, image_size=64)
    root = synthetic.generate(tmp_path / "set", config)
    fresh = synthetic.generate(tmp_path / "fresh", config)
    image = "WFLW_images/synthetic_train/00000.png"
    write = synthetic._write_png
    written = []

    def killed_after_two_images(path, pixels):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)
        return write(path, pixels)

    monkeypatch.setattr(synthetic, "_write_png", killed_after_two_images)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(root, dataclasses.replace(config, num_train=20, seed=1))
    monkeypatch.setattr(synthetic, "_write_png", write)
    assert not (root / synthetic.STAMP).exists()
    assert (root / image).read_bytes() != (fresh / image).read_bytes()  # the seed-1 face
    synthetic.generate(root, config)
    assert (root / image).read_bytes() == (fresh / image).read_bytes()
    assert (root / synthetic.STAMP).read_text() == (fresh / synthetic.STAMP).read_text()


def test_a_second_process_waits_for_the_first_generation_and_reuses_it(tmp_path, caplog):
    """Two runs sharing a --data-root generated into it at once: each rewrote images and
    annotation files the other had begun to read (until 2026-12-04). The second now waits on
    the lock the first holds, then finds the set whole and writes nothing."""
    config = synthetic.SyntheticConfig(num_train=2, num_test=1, image_size=64)
    root = tmp_path / "set"
    root.mkdir()
    caplog.set_level(logging.INFO, "aanet.data")
    first = FileLock(root / synthetic.LOCK)  # the first process, in the middle of its set
    first.acquire()
    second = threading.Thread(target=synthetic.generate, args=(root, config))
    second.start()
    second.join(timeout=1.0)
    assert second.is_alive(), "the second generation did not wait for the first"
    assert "another process is generating the synthetic set there; waiting" in caplog.text
    assert not (root / synthetic.STAMP).exists() and not (root / wflw.IMAGE_DIR).exists()
    synthetic._write_set(root, config)  # the first one's work, then its release
    written = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    first.release()
    second.join(timeout=30)
    assert not second.is_alive()
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == written


@pytest.mark.parametrize("stamp", [b'{"num_train": 2\n', b"\xff\xfe", b""])
def test_an_unreadable_stamp_regenerates_the_set_with_a_warning_naming_it(tmp_path, caplog, stamp):
    """Until 2026-12-03 a damaged ``synthetic.json`` stopped ``generate`` and ``train`` with an
    error naming no file ("Invalid control character at: line 1 column 9", or a UTF-8 decode
    error), and kept doing so: the set could not be made again without deleting it."""
    config = synthetic.SyntheticConfig(num_train=2, num_test=1, image_size=64)
    root = synthetic.generate(tmp_path, config)
    good = (root / synthetic.STAMP).read_text()
    (root / synthetic.STAMP).write_bytes(stamp)
    synthetic.generate(root, config)
    assert f"{root / synthetic.STAMP}: unreadable" in caplog.text
    assert (root / synthetic.STAMP).read_text() == good
    assert len(wflw.load_wflw(root, "train", on_error="stop")) == 2


def test_attribute_flags_follow_the_drawn_conditions():
    params = synthetic.sample_params(np.random.default_rng(0), 128)
    plain = dataclasses.replace(
        params,
        yaw=0.0,
        roll=0.0,
        mouth_open=0.0,
        smile=0.0,
        eye_open=1.0,
        light=0.0,
        makeup=False,
        occluder=False,
        blur_sigma=0.0,
    )
    assert synthetic.attribute_flags(plain, 0).tolist() == [0] * 6
    changes = [
        {"yaw": 30.0},
        {"mouth_open": 0.2},
        {"light": 0.7},
        {"makeup": True},
        {},
        {"blur_sigma": 2.0},
    ]
    for position, change in enumerate(changes):
        occluded = synthetic.OCCLUDED_POINTS if position == 4 else 0
        flags = synthetic.attribute_flags(dataclasses.replace(plain, **change), occluded)
        assert flags.tolist() == [int(i == position) for i in range(6)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1 2 3 a.png", "expected 207 fields"),
        (" ".join(["1"] * 199 + ["x"] + ["0"] * 6) + " a.png", "non-numeric"),
        (" ".join(["1"] * 200 + ["0", "2", "0", "0", "0", "0"]) + " a.png", "must be 0 or 1"),
    ],
)
def test_malformed_wflw_lines_name_file_and_line(synth_root, tmp_path, line, message):
    with pytest.raises(DataError, match=message) as info:
        wflw.parse_line(line, "list.txt:12", tmp_path)
    assert "list.txt:12" in str(info.value)


def test_bad_wflw_entries_skip_with_count_or_stop(tmp_path, caplog):
    root = synthetic.generate(
        tmp_path, synthetic.SyntheticConfig(num_train=3, num_test=1, image_size=64)
    )
    good = wflw.annotation_file(root, "train").read_text().splitlines()[0].split()
    missing = " ".join(good[:-1] + ["synthetic_train/nope.png"])
    outside = " ".join(["500"] + good[1:])
    short = " ".join(good[5:])
    numbers = [_append_line(root, text) for text in (missing, outside, short)]
    records = wflw.load_wflw(root, "train", on_error="skip")
    assert len(records) == 3
    assert "skipped 3 bad entries" in caplog.text
    path = wflw.annotation_file(root, "train")
    for number, what in zip(
        numbers, ("image not found", "1 points outside", "expected 207"), strict=True
    ):
        assert f"{path}:{number}: {what}" in caplog.text
    with pytest.raises(DataError, match=f":{numbers[0]}: image not found"):
        wflw.load_wflw(root, "train", on_error="stop")
    with pytest.raises(ValueError, match="on_error"):
        wflw.load_wflw(root, "train", on_error="ignore")


def test_a_wflw_image_path_with_spaces_is_read_whole(tmp_path):
    """The path is the rest of the line after the 206 numbers, spaces (even two in a row) and
    all; a trailing space or CR is not part of it."""
    root = synthetic.generate(
        tmp_path, synthetic.SyntheticConfig(num_train=2, num_test=1, image_size=64)
    )
    good = wflw.annotation_file(root, "train").read_text().splitlines()[0].split()
    source = root / wflw.IMAGE_DIR / good[-1]
    named = source.with_name("my  photo 1.png")
    source.rename(named)
    text = " ".join(good[:-1]) + " " + str(named.relative_to(root / wflw.IMAGE_DIR)) + " "
    path = wflw.annotation_file(root, "train")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([text] + lines[1:]) + "\n")
    records = wflw.load_wflw(root, "train", on_error="stop")
    assert [r.image_path for r in records][0] == named
    assert len(records) == 2


@pytest.mark.parametrize("before", ["\t", "  ", " \t "])
def test_blanks_before_and_after_a_wflw_image_path_are_separators(tmp_path, before):
    """Several blanks or tabs may stand between fields, the path's field too, so blanks that
    open or close the path are separators, not part of its name (inside it they are kept)."""
    line = _one_image_wflw(tmp_path, "my  photo.jpg")
    numbers = line[: -len("my  photo.jpg")].rstrip()
    wflw.annotation_file(tmp_path, "train").write_text(f"{numbers}{before}my  photo.jpg \t\n")
    records = wflw.load_wflw(tmp_path, "train", on_error="stop")
    assert [r.image_path.name for r in records] == ["my  photo.jpg"]


@pytest.mark.parametrize(
    "box", [("nan", "10", "50", "50"), ("10", "10", "inf", "50"), ("50", "50", "10", "10")]
)
def test_a_wflw_face_box_that_is_empty_or_not_finite_is_a_bad_entry(tmp_path, box):
    root = synthetic.generate(
        tmp_path, synthetic.SyntheticConfig(num_train=2, num_test=1, image_size=64)
    )
    good = wflw.annotation_file(root, "train").read_text().splitlines()[0].split()
    number = _append_line(root, " ".join(good[:196] + list(box) + good[200:]))
    assert len(wflw.load_wflw(root, "train", on_error="skip")) == 2
    with pytest.raises(DataError, match=f":{number}: face box: expected finite x_min < x_max"):
        wflw.load_wflw(root, "train", on_error="stop")


def _with_points(line: list[str], moves: dict[int, tuple[float, float]]) -> str:
    """The annotation line ``line`` (its fields) with points moved (written to full precision)."""
    fields = list(line)
    for point, (x, y) in moves.items():
        fields[2 * point], fields[2 * point + 1] = repr(x), repr(y)
    return " ".join(fields)


@pytest.mark.parametrize("offset", [0.0, 1e-5], ids=["coincident", "nearly"])
def test_coincident_outer_eye_corners_are_a_bad_wflw_entry(tmp_path, caplog, offset):
    """Until 2026-12-01 such a line loaded, and the evaluation (at the end of the first epoch of
    training) stopped at it, under --on-error skip too. Nearly coincident: 1e-5 pixels in a box
    of about 40 (the limit is 1e-6 of the box's longer side)."""
    root = synthetic.generate(
        tmp_path, synthetic.SyntheticConfig(num_train=2, num_test=1, image_size=64)
    )
    path = wflw.annotation_file(root, "train")
    good = path.read_text().splitlines()[0].split()
    x, y = float(good[120]), float(good[121])  # point 60, the left eye's outer corner
    number = _append_line(root, _with_points(good, {72: (x + offset, y)}))
    assert len(wflw.load_wflw(root, "train", on_error="skip")) == 2
    assert "skipped 1 bad entries" in caplog.text
    assert f"{path}:{number}: the outer eye corners (points 60 and 72) coincide" in caplog.text
    with pytest.raises(DataError, match=f":{number}: the outer eye corners .* coincide"):
        wflw.load_wflw(root, "train", on_error="stop")
    _append_line(root, _with_points(good, {72: (x + 0.01, y)}))  # close, but a distance
    assert len(wflw.load_wflw(root, "train", on_error="skip")) == 3


def test_coincident_pupils_are_a_bad_test_entry_only_when_the_nme_uses_them(tmp_path, caplog):
    """The training set is the same under either normalisation; the test set loses a face whose
    pupils coincide when the NME is to be normalised by the pupils, and keeps it otherwise."""
    from aanet.config import Config
    from aanet.datasets import sources

    root = synthetic.generate(
        tmp_path, synthetic.SyntheticConfig(num_train=2, num_test=2, image_size=64)
    )
    for split in ("train", "test"):
        path = wflw.annotation_file(root, split)
        lines = path.read_text().splitlines()
        first = lines[0].split()
        pupil = (float(first[192]), float(first[193]))  # point 96
        path.write_text("\n".join([*lines, _with_points(first, {97: pupil})]) + "\n")
    pupils = Config(data_root=str(root), normalization="inter-pupil", on_error="skip")
    corners = Config(data_root=str(root), on_error="skip")
    assert len(sources.load_split(pupils, "train")) == 3
    assert len(sources.load_split(corners, "test")) == 3
    assert "skipped" not in caplog.text
    assert len(sources.load_split(pupils, "test")) == 2
    test_list = wflw.annotation_file(root, "test")
    assert f"{test_list}:3: the pupils coincide (inter-pupil distance 0 pixels" in caplog.text
    with pytest.raises(DataError, match=":3: the pupils coincide"):
        sources.load_split(dataclasses.replace(pupils, on_error="stop"), "test")


def test_an_image_whose_data_does_not_decode_is_named_when_read(tmp_path):
    from aanet.datasets.dataset import LandmarkDataset

    root = synthetic.generate(
        tmp_path, synthetic.SyntheticConfig(num_train=2, num_test=1, image_size=64)
    )
    records = wflw.load_wflw(root, "train")
    raw = records[1].image_path.read_bytes()
    records[1].image_path.write_bytes(raw[:200])  # the header reads, the pixels do not
    data = LandmarkDataset(records, 32)
    assert data[0]["image"].shape == (3, 32, 32)
    with pytest.raises(DataError, match=f"{records[1].where}: cannot decode image"):
        data[1]
    # A DataLoader worker re-raises with the message alone.
    assert str(DataError("list.txt:3: cannot decode")) == "list.txt:3: cannot decode"


def test_a_truncated_jpeg_is_named_not_read_as_grey(tmp_path):
    """OpenCV decodes a cut-off JPEG without an error, the missing rows grey; the dataset must
    refuse it as it does a cut-off PNG (WFLW's images are JPEGs)."""
    from aanet.datasets.dataset import LandmarkDataset

    root = synthetic.generate(
        tmp_path, synthetic.SyntheticConfig(num_train=2, num_test=1, image_size=64)
    )
    records = wflw.load_wflw(root, "train")
    jpeg = records[1].image_path.with_suffix(".jpg")
    cv2.imwrite(str(jpeg), cv2.imread(str(records[1].image_path)))
    raw = jpeg.read_bytes()
    jpeg.write_bytes(raw[: len(raw) * 2 // 3])
    assert cv2.imread(str(jpeg)) is not None  # what OpenCV alone would have trained on
    records[1] = dataclasses.replace(records[1], image_path=jpeg)
    data = LandmarkDataset(records, 32)
    with pytest.raises(DataError, match=f"{records[1].where}: cannot decode image .*truncated"):
        data[1]


def test_images_read_as_opencv_would_upright_by_their_exif_orientation(tmp_path):
    from PIL import Image

    from aanet.datasets.images import read_image, upright_size

    pixels = cv2.GaussianBlur(
        (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8), (5, 5), 2
    )
    plain, turned, grey = tmp_path / "plain.jpg", tmp_path / "turned.jpg", tmp_path / "grey.png"
    cv2.imwrite(str(plain), pixels)
    cv2.imwrite(str(grey), pixels[:, :, 0])
    image = Image.fromarray(pixels[:, :, ::-1])
    exif = image.getexif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to view
    image.save(turned, exif=exif)
    for path in (plain, turned, grey):
        got = read_image(path)
        np.testing.assert_array_equal(got, cv2.imread(str(path), cv2.IMREAD_COLOR))
        with Image.open(path) as header:
            assert upright_size(header) == (got.shape[1], got.shape[0])
    assert read_image(turned).shape == (30, 20, 3)


def _write_pts(path, points, count=None, close=True):
    body = "\n".join(f"{x} {y}" for x, y in points)
    text = f"version: 1\nn_points: {count or len(points)}\n{{\n{body}\n" + ("}\n" if close else "")
    path.write_text(text)


def test_a_300w_pts_that_cannot_be_read_is_skipped_as_a_damaged_one_is(tmp_path, monkeypatch):
    """Until 2026-12-04 one unreadable ``.pts`` ended the whole load under ``on_error="skip"``."""
    points = np.random.default_rng(2).uniform(5, 60, size=(68, 2)).round(3)
    for name in ("a", "b"):
        _write_pts(tmp_path / f"{name}.pts", points)
        cv2.imwrite(str(tmp_path / f"{name}.png"), np.zeros((64, 64, 3), np.uint8))
    read_bytes = Path.read_bytes

    def denied_for_b(path):
        if path.name == "b.pts":
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", denied_for_b)
    assert [r.where for r in w300.load_300w(tmp_path, on_error="skip")] == [f"{tmp_path}/a.pts:1"]
    expected = f"cannot read the annotation file {tmp_path / 'b.pts'} (Permission denied)"
    with pytest.raises(DataError, match=re.escape(expected)):
        w300.load_300w(tmp_path, on_error="stop")


def test_300w_pts_parsing_good_and_bad(tmp_path):
    rng = np.random.default_rng(1)
    points = rng.uniform(5, 60, size=(68, 2)).round(3)
    _write_pts(tmp_path / "a.pts", points)
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((64, 64, 3), np.uint8))
    np.testing.assert_allclose(w300.parse_pts(tmp_path / "a.pts"), points, atol=1e-4)
    records = w300.load_300w(tmp_path, on_error="stop")
    np.testing.assert_allclose(records[0].landmarks, points - 1, atol=1e-4)
    _write_pts(tmp_path / "b.pts", points, count=70)
    with pytest.raises(DataError, match=r"b.pts:2: n_points says 70, found 68"):
        w300.parse_pts(tmp_path / "b.pts")
    (tmp_path / "c.pts").write_text("version: 1\nn_points: 1\n{\n1.0 oops\n}\n")
    with pytest.raises(DataError, match=r"c.pts:4: non-numeric"):
        w300.parse_pts(tmp_path / "c.pts")
    _write_pts(tmp_path / "d.pts", points, close=False)
    with pytest.raises(DataError, match="no '}'"):
        w300.parse_pts(tmp_path / "d.pts")
    assert len(w300.load_300w(tmp_path, on_error="skip")) == 1  # b, c, d skipped; a kept


def test_300w_eyes_that_coincide_are_a_bad_entry_named_by_the_file(tmp_path):
    points = np.random.default_rng(3).uniform(5, 60, size=(68, 2)).round(3)
    corners, eyes = points.copy(), points.copy()
    corners[45] = corners[36]
    eyes[42:48] = eyes[36:42]  # the "pupils" (each eye's mean) coincide, the corners do not
    for name, face in (("a", points), ("corners", corners), ("eyes", eyes)):
        _write_pts(tmp_path / f"{name}.pts", face)
        cv2.imwrite(str(tmp_path / f"{name}.png"), np.zeros((64, 64, 3), np.uint8))
    kept = w300.load_300w(tmp_path, on_error="skip")
    assert [r.image_path.name for r in kept] == ["a.png", "eyes.png"]
    with pytest.raises(DataError, match=r"corners.pts:1: the outer eye corners \(points 36 and 45"):
        w300.load_300w(tmp_path, on_error="stop")
    both = ("inter-ocular", "inter-pupil")
    kept = w300.load_300w(tmp_path, on_error="skip", normalizations=both)
    assert [r.image_path.name for r in kept] == ["a.png"]
    (tmp_path / "corners.pts").unlink()
    with pytest.raises(DataError, match="eyes.pts:1: the pupils coincide"):
        w300.load_300w(tmp_path, on_error="stop", normalizations=both)


@pytest.mark.parametrize("scheme", [WFLW, W300], ids=["98", "68"])
def test_flip_maps_are_involutions(scheme):
    mapping = np.array(scheme.flip_map)
    assert sorted(mapping.tolist()) == list(range(scheme.num_points))
    np.testing.assert_array_equal(mapping[mapping], np.arange(scheme.num_points))
    assert mapping[scheme.left_eye_outer] == scheme.right_eye_outer


def test_wflw_flip_map_matches_a_mirrored_frontal_face():
    """A frontal, centred synthetic face is its own mirror image once the map renames points."""
    params = synthetic.sample_params(np.random.default_rng(3), 100)
    params = dataclasses.replace(
        params, yaw=0.0, roll=0.0, smile=0.05, gaze=(0.0, 0.01), center=(50.0, 50.0)
    )
    canon, depth = synthetic.canonical_landmarks(params)
    mirrored = canon * np.array([-1.0, 1.0])
    np.testing.assert_allclose(mirrored[list(WFLW.flip_map)], canon, atol=1e-9)
    # Every swapped pair really sits on opposite sides, and self-mapped points on the midline.
    for i, j in enumerate(WFLW.flip_map):
        if i == j:
            assert abs(canon[i, 0]) < 1e-9
        else:
            assert np.sign(canon[i, 0]) == -np.sign(canon[j, 0])


def test_300w_points_on_the_image_edge_and_upper_case_suffixes(tmp_path):
    """A point within half a pixel of the border lies on the image (pixel centres at integers);
    until 2026-12-01 1-based x = 0.7 (0-based -0.3) dropped the face. ``A.JPG`` is found too."""
    points = np.random.default_rng(2).uniform(5, 60, size=(68, 2)).round(3)
    edge = points.copy()
    edge[0] = (0.7, 64.4)  # 0-based (-0.3, 63.4): inside the 64 x 64 image's pixel area
    _write_pts(tmp_path / "edge.pts", edge)
    cv2.imwrite(str(tmp_path / "edge.JPG"), np.zeros((64, 64, 3), np.uint8))
    beyond = points.copy()
    beyond[0] = (0.4, 30.0)  # 0-based -0.6: off the image
    _write_pts(tmp_path / "off.pts", beyond)
    cv2.imwrite(str(tmp_path / "off.png"), np.zeros((64, 64, 3), np.uint8))
    records = w300.load_300w(tmp_path, on_error="skip")
    assert [r.image_path.name for r in records] == ["edge.JPG"]
    with pytest.raises(DataError, match="1 points outside the 64x64 image"):
        w300.load_300w(tmp_path, on_error="stop")


def test_annotation_files_saved_on_windows_read_as_published(tmp_path):
    """A UTF-8 byte order mark, CRLF line ends, trailing blanks, tabs and blank lines (a file
    re-saved by a Windows editor) read as the published files. Until 2026-12-02 the mark stuck
    to the first field: WFLW's first line was "non-numeric", and a ``.pts`` file starting with
    ``n_points`` (no ``version`` line) had "missing 'n_points:' header"."""
    rng = np.random.default_rng(4)
    root = tmp_path / "wflw"
    (root / wflw.IMAGE_DIR / "0--Parade").mkdir(parents=True)
    cv2.imwrite(str(root / wflw.IMAGE_DIR / "0--Parade" / "a.jpg"), np.zeros((64, 64, 3), np.uint8))
    face = rng.uniform(5, 60, size=(98, 2))
    line = wflw.format_line(face, np.array([2, 2, 62, 62]), np.zeros(6), "0--Parade/a.jpg")
    path = wflw.annotation_file(root, "train")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\xef\xbb\xbf" + f"{line} \t\r\n{line}\r\n\r\n".encode())
    records = wflw.load_wflw(root, "train", on_error="stop")
    assert len(records) == 2
    np.testing.assert_allclose(records[0].landmarks, face, atol=1e-3)

    points = rng.uniform(5, 60, size=(68, 2)).round(3)
    body = "\r\n".join(f"{x}\t{y} " for x, y in points)
    text = f"n_points:  68\r\n\r\n{{\r\n{body}\r\n}}\r\n\r\n"
    (tmp_path / "a.pts").write_bytes(b"\xef\xbb\xbf" + text.encode())
    np.testing.assert_allclose(w300.parse_pts(tmp_path / "a.pts"), points, atol=1e-4)


def _one_image_wflw(root, name="a.jpg"):
    """A WFLW root with one 64x64 image ``name`` and the annotation line of a face in it."""
    (root / wflw.IMAGE_DIR).mkdir(parents=True)
    cv2.imwrite(str(root / wflw.IMAGE_DIR / name), np.zeros((64, 64, 3), np.uint8))
    wflw.annotation_file(root, "train").parent.mkdir(parents=True)
    face = np.random.default_rng(6).uniform(5, 60, size=(98, 2))
    return wflw.format_line(face, np.array([2, 2, 62, 62]), np.zeros(6), name)


@pytest.mark.parametrize(
    ("body", "numbers"),
    [
        (b"{line}\r{line}\r", [1, 2]),  # CR only: old Mac files
        (b"{line}\r\n\r{line}\n", [1, 3]),  # the three line ends mixed, a blank line between
        (b"\xef\xbb\xbf\r\n{line}\r\n", [2]),  # a byte order mark, then a blank first line
    ],
)
def test_wflw_lines_end_at_cr_lf_or_crlf_and_a_byte_order_mark_may_precede_a_blank_line(
    tmp_path, body, numbers
):
    """Until 2026-12-03 the WFLW loader split only at LF (a CR-only file was one line, its "image
    path" too long to open: ``[Errno 36] File name too long``), and took the byte order mark off
    the first non-blank line only, so a blank line after it was line 1, "expected 207 fields
    ..., got 0"."""
    line = _one_image_wflw(tmp_path)
    path = wflw.annotation_file(tmp_path, "train")
    path.write_bytes(body.replace(b"{line}", line.encode()))
    records = wflw.load_wflw(tmp_path, "train", on_error="stop")
    assert [r.where for r in records] == [f"{path}:{number}" for number in numbers]


@pytest.mark.parametrize("content", ["", "\n\n", "1 2 3 a.jpg\n"])
def test_an_annotation_file_or_folder_without_a_face_is_an_error_naming_it(tmp_path, content):
    """Until 2026-12-03 an empty or all-bad annotation file loaded as no records, and the data
    set refused them naming nothing: "records: expected at least one annotated face, got
    none"."""
    _one_image_wflw(tmp_path)
    path = wflw.annotation_file(tmp_path, "train")
    path.write_text(content)
    why = "all 1 of its entries are bad" if content.strip() else "it holds no annotation"
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: no annotated face .*{why}"):
        wflw.load_wflw(tmp_path, "train", on_error="skip")
    folder = tmp_path / "300w"
    folder.mkdir()
    (folder / "a.pts").write_text(content)  # not even a header: a bad file, or none
    with pytest.raises(ValueError, match=f"^{re.escape(str(folder))}: no annotated face"):
        w300.load_300w(folder, on_error="skip")


def test_300w_suffixes_in_any_case(tmp_path):
    """``a.Jpg`` beside ``a.pts`` and ``b.png`` beside ``b.PTS`` are found: until 2026-12-02 only
    all-lower and all-upper image suffixes were tried ("image not found"), and ``*.PTS`` files
    were not read at all."""
    points = np.random.default_rng(5).uniform(5, 60, size=(68, 2)).round(3)
    _write_pts(tmp_path / "a.pts", points)
    _write_pts(tmp_path / "b.PTS", points)
    for name in ("a.Jpg", "b.png"):
        cv2.imwrite(str(tmp_path / "x.png"), np.zeros((64, 64, 3), np.uint8))
        (tmp_path / "x.png").rename(tmp_path / name)
    records = w300.load_300w(tmp_path, on_error="stop")
    assert [r.image_path.name for r in records] == ["a.Jpg", "b.png"]


def test_the_300w_release_folder_gives_each_split_its_own_folders(tmp_path):
    """``--data-root`` and ``--test-root`` may both be the unpacked release (afw, helen and lfpw
    with trainset and testset, ibug): training reads afw, helen/trainset and lfpw/trainset, the
    test set helen/testset, lfpw/testset and ibug. Until 2026-12-02 each read every ``.pts``
    file below it: training took in the test faces, and the test set the training ones (those of
    helen/trainset and lfpw/trainset counted in the common subset)."""
    points = np.random.default_rng(6).uniform(5, 60, size=(68, 2)).round(3)
    names_on_disk = (  # folder names in any case: HELEN
        "afw",
        "HELEN/trainset",
        "lfpw/trainset",
        "HELEN/testset",
        "lfpw/testset",
        "ibug",
    )
    for name in names_on_disk:
        (tmp_path / name).mkdir(parents=True)
        _write_pts(tmp_path / name / "a.pts", points)
        cv2.imwrite(str(tmp_path / name / "a.jpg"), np.zeros((64, 64, 3), np.uint8))

    config = Config(data="300w", data_root=str(tmp_path), test_root=str(tmp_path))

    def folders(split):
        records = sources.load_split(config, split)
        return sorted(r.image_path.parent.relative_to(tmp_path).as_posix() for r in records)

    assert folders("train") == ["HELEN/trainset", "afw", "lfpw/trainset"]
    assert folders("test") == ["HELEN/testset", "ibug", "lfpw/testset"]
    assert len(w300.load_300w(tmp_path, on_error="stop")) == 6  # no split: the whole folder
    assert len(w300.load_300w(tmp_path / "HELEN", on_error="stop", split="test")) == 2


def test_300w_flip_map_semantics():
    """Points named by 300W's index meanings: the map pairs them across the face."""
    mapping = W300.flip_map
    assert [mapping[i] for i in (0, 8, 17, 21, 30, 31, 33, 36, 39, 48, 51, 54, 57, 60, 62, 66)] == [
        16,
        8,
        26,
        22,
        30,
        35,
        33,
        45,
        42,
        54,
        51,
        48,
        57,
        64,
        62,
        66,
    ]


def _blob_centres(image: np.ndarray, points: np.ndarray, radius: float = 4.0) -> np.ndarray:
    """Intensity-weighted centroid of the image around each of ``points``."""
    ys, xs = np.mgrid[: image.shape[0], : image.shape[1]]
    centres = []
    for x, y in points:
        window = ((xs - x) ** 2 + (ys - y) ** 2 <= radius**2) * image
        centres.append([(window * xs).sum() / window.sum(), (window * ys).sum() / window.sum()])
    return np.array(centres)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_augmented_landmarks_follow_the_image(seed):
    """Draw a Gaussian dot at a few WFLW points, warp, and find the dots at the moved points."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(30, 170, size=(98, 2)).astype(np.float32)
    chosen = [0, 16, 33, 60, 72, 96]  # far apart after the uniform draw is not guaranteed: spread
    points[chosen] = [[40, 60], [100, 170], [60, 40], [150, 90], [90, 120], [160, 160]]
    ys, xs = np.mgrid[:200, :200]
    image = np.zeros((200, 200), np.float64)
    for x, y in points[chosen]:
        image += np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 1.5**2))
    image8 = np.repeat((image * 200).astype(np.uint8)[..., None], 3, axis=2)
    box = np.array([30.0, 30.0, 170.0, 170.0])
    config = AugmentConfig(rotation=30, scale=0.2, shift=0.1, flip=True, colour=0.0, blur=0.0)
    out, moved, matrix = augment_sample(
        image8, points, box, 128, np.random.default_rng(seed), config
    )
    flipped = np.linalg.det(matrix[:, :2]) < 0
    renamed = [WFLW.flip_map[i] for i in chosen] if flipped else chosen
    renamed = [i for i in renamed if (moved[i] > 6).all() and (moved[i] < 121).all()]
    assert len(renamed) >= 3  # dots pushed off the crop by the shift are not checked
    found = _blob_centres(out[:, :, 0].astype(np.float64), moved[renamed])
    np.testing.assert_allclose(found, moved[renamed], atol=0.35)


def test_flip_happens_for_some_seed_and_keeps_left_eye_left():
    config = AugmentConfig(rotation=0, scale=0, shift=0, flip=True, colour=0, blur=0)
    points = synthetic.canonical_landmarks(synthetic.sample_params(np.random.default_rng(0), 100))[
        0
    ]
    points = (points * 30 + 64).astype(np.float32)
    box = np.array([20.0, 20.0, 108.0, 108.0])
    image = np.zeros((128, 128, 3), np.uint8)
    dets = []
    for seed in range(8):
        _, moved, matrix = augment_sample(
            image, points, box, 96, np.random.default_rng(seed), config
        )
        dets.append(np.linalg.det(matrix[:, :2]))
        assert moved[WFLW.left_eye_outer, 0] < moved[WFLW.right_eye_outer, 0]
        assert moved[33, 0] < moved[46, 0] and moved[96, 0] < moved[97, 0]
    assert min(dets) < 0 < max(dets)


@pytest.mark.parametrize(
    ("data", "test_root", "error", "message"),
    [
        ("300w", "", ValueError, "test_root: the 300W test folder is needed"),
        ("300w", "absent", FileNotFoundError, "300W folder not found: .*absent"),
        ("wflw", "", FileNotFoundError, "WFLW annotations not found: .*_train.txt"),
    ],
)
def test_training_names_a_missing_split_before_loading_any(
    tmp_path, monkeypatch, data, test_root, error, message
):
    """A missing --test-root was named only once the whole training set had loaded."""

    def load_split(config, split):
        raise AssertionError(f"loaded the {split} split before checking the sources")

    monkeypatch.setattr(sources, "load_split", load_split)
    config = make_config(
        {
            "data": data, "data_root": str(tmp_path), "device": "cpu", "out": str(tmp_path / "run"),
            "test_root": str(tmp_path / test_root) if test_root else "",
        }
    )  # fmt: skip
    with pytest.raises(error, match=message):
        aanet.train.train(config, progress=False)

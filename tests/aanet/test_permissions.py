"""Files and folders the file system denies: each is one line naming what it is, exit status 2.

The runs go through :mod:`tests.aanet.denied`, so the permissions hold when the suite runs as
root (CI) too."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from aanet import checkpoint
from aanet.datasets import synthetic, wflw
from tests.aanet.denied import error_line, run_denied, start_denied

SET = ("--num-train", "8", "--num-test", "4", "--image-size", "48")
TINY = (
    "--epochs", "1", "--input-size", "32", "--width", "16", "--blocks", "1", "1", "1",
    "--batch-size", "4", "--device", "cpu", "--no-progress",
)  # fmt: skip


def make_read_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)


def test_a_synthetic_root_that_cannot_be_written_names_its_argument(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    root.chmod(0o555)
    message = error_line(run_denied("generate", "--out", str(root), *SET), "generate")
    assert message.startswith(f"out: cannot write the synthetic set in {root} (")
    assert "give a folder you can write to" in message
    below = root / "inner"  # its parent is the folder that cannot be written
    args = ("--data-root", str(below), "--out", str(tmp_path / "run"))
    message = error_line(run_denied("train", *SET, *TINY, *args), "train")
    assert message.startswith(f"data_root: cannot write the synthetic set in {below} (")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_whole_synthetic_set_that_is_read_only_is_read(tmp_path):
    root = tmp_path / "data"
    synthetic.generate(root, synthetic.SyntheticConfig(8, 4, 48, 0))
    (root / synthetic.LOCK).unlink()  # a copy without it (or made before there was one)
    make_read_only(root)
    before = sorted(path.name for path in root.rglob("*"))
    out = tmp_path / "run"
    done = run_denied("train", *SET, *TINY, "--data-root", str(root), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "last.pt").is_file()
    assert sorted(path.name for path in root.rglob("*")) == before


def test_a_stamp_that_cannot_be_read_regenerates_the_set_with_a_warning(tmp_path):
    """Until 2026-12-04 it ended generate with a bare "[Errno 13] Permission denied"."""
    root = tmp_path / "data"
    synthetic.generate(root, synthetic.SyntheticConfig(8, 4, 48, 0))
    (root / synthetic.STAMP).chmod(0o000)
    done = run_denied("generate", "--out", str(root), *SET)
    assert done.returncode == 0, done.stderr[-3000:]
    stamp = root / synthetic.STAMP
    assert f"{stamp}: unreadable (Permission denied); generating the synthetic set again" in (
        done.stderr
    )
    assert json.loads(stamp.read_text())["num_train"] == 8  # written again, readable


def test_a_face_that_cannot_be_written_stops_the_generation_unstamped(tmp_path):
    """The old set's image folder denies new files (its faces can still be overwritten): the
    new, larger set must not be stamped whole with two of its faces missing."""
    root = tmp_path / "data"
    synthetic.generate(root, synthetic.SyntheticConfig(8, 4, 48, 0))
    images = root / "WFLW_images" / "synthetic_train"
    images.chmod(0o555)
    argv = ("generate", "--out", str(root), "--num-train", "10", "--num-test", "4")
    message = error_line(run_denied(*argv, "--image-size", "48"), "generate")
    assert message.startswith(f"out: cannot write the synthetic set in {root} (")
    assert str(images / "00008.png") in message
    assert not (root / synthetic.STAMP).exists()


def trained_run(tmp_path: Path) -> Path:
    """A finished one-epoch run's ``out`` (its set beside it, in ``tmp_path / "data"``)."""
    out = tmp_path / "run"
    args = ("--data-root", str(tmp_path / "data"), "--out", str(out))
    done = run_denied("train", *SET, *TINY, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_a_checkpoint_that_cannot_be_read_is_named_as_one(tmp_path):
    out = trained_run(tmp_path)
    saved = out / "last.pt"
    saved.chmod(0o000)
    expected = f"checkpoint {saved}: cannot read it (Permission denied)"
    args = ("--data-root", str(tmp_path / "data"), "--out", str(out))
    resumed = run_denied("train", *SET, *TINY, "--epochs", "2", *args, "--resume")
    assert error_line(resumed, "train") == expected
    again = ("evaluate", "--checkpoint", str(saved), "--json", str(tmp_path / "e.json"))
    assert error_line(run_denied(*again), "evaluate") == expected
    photo = next((tmp_path / "data").rglob("*.png"))
    predicted = run_denied("predict", str(photo), "--checkpoint", str(saved), "--device", "cpu",
                           "--output", str(tmp_path / "p.png"))  # fmt: skip
    assert error_line(predicted, "predict") == expected
    exported = run_denied("export", "--checkpoint", str(saved), "--output", str(tmp_path / "m.pt2"))
    assert error_line(exported, "export") == expected
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "p.png").exists()
    saved.chmod(0o644)
    assert checkpoint.load(saved)["epoch"] == 0  # the failed resume left it as it was


def test_a_config_file_that_cannot_be_read_is_named_as_the_config(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 1\n")
    config.chmod(0o000)
    args = ("--config", str(config), "--out", str(tmp_path / "run"))
    message = error_line(run_denied("train", *args, "--data-root", str(tmp_path / "d")), "train")
    assert message == f"config: cannot read {config} (Permission denied)"
    assert not (tmp_path / "d").exists()  # refused before the set is generated


def wflw_set(tmp_path: Path) -> Path:
    """The synthetic set, to be read as WFLW (``--data wflw``): its layout."""
    return synthetic.generate(tmp_path / "wflw", synthetic.SyntheticConfig(8, 4, 48, 0))


def test_a_wflw_annotation_file_that_cannot_be_read_is_named_as_one(tmp_path):
    root = wflw_set(tmp_path)
    annotations = wflw.annotation_file(root, "train")
    annotations.chmod(0o000)
    args = ("--data", "wflw", "--data-root", str(root), "--out", str(tmp_path / "run"))
    message = error_line(run_denied("train", *TINY, *args), "train")
    assert message == f"cannot read the annotation file {annotations} (Permission denied)"


@pytest.mark.parametrize("on_error", ["skip", "stop"])
def test_a_wflw_image_that_cannot_be_read_is_skipped_or_stops_naming_it(tmp_path, on_error):
    root = wflw_set(tmp_path)
    image = root / "WFLW_images" / "synthetic_train" / "00003.png"
    image.chmod(0o000)
    out = tmp_path / "run"
    args = ("--data", "wflw", "--data-root", str(root), "--out", str(out), "--on-error", on_error)
    done = run_denied("train", *TINY, *args)
    where = f"{wflw.annotation_file(root, 'train')}:4: unreadable image {image}"
    if on_error == "stop":
        # The path once: "[Errno 13] Permission denied: '<path>'" repeated it until 2026-12-04.
        assert error_line(done, "train") == f"{where}: Permission denied"
        assert not (out / "last.pt").exists()
    else:
        assert done.returncode == 0, done.stderr[-3000:]
        assert "skipped 1 bad entries, kept 7" in done.stderr and where in done.stderr
        assert (out / "last.pt").is_file()


def test_an_out_made_read_only_mid_run_ends_it_saying_what_is_saved(tmp_path):
    """``out`` turns read-only once the first epoch's checkpoint is there (the run began where
    it could write): a later output fails; the line says so, and where the run can go on."""
    synthetic.generate(tmp_path / "data", synthetic.SyntheticConfig(8, 4, 48, 0))
    out = tmp_path / "run"
    args = ("--data-root", str(tmp_path / "data"), "--out", str(out), "--epochs", "3")
    with start_denied("train", *SET, *TINY, *args) as process:
        deadline = time.monotonic() + 240
        while not (out / "last.pt").exists() and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1][-3000:]
            time.sleep(0.02)
        out.chmod(0o555)
        stdout, stderr = process.communicate(timeout=240)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    message = error_line(result, "train")
    assert message.startswith(f"could not write {out}/") and ": Permission denied; " in message
    saved = f"the last completed epoch is in {out / 'last.pt'} (resume with --resume)"
    assert message.endswith(saved)
    out.chmod(0o755)
    assert checkpoint.load(out / "last.pt")["epoch"] < 2  # whole: the last write that ended

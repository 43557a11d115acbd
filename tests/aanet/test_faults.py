"""Faults a training job meets: killed processes, damaged checkpoints, non-finite losses,
malformed annotations.

What is promised: a run killed with SIGKILL and resumed ends with the same weights as one never
interrupted; a damaged or foreign checkpoint raises an error naming the file; a non-finite loss
stops the run with an error naming the step (``on_nan="stop"``, the default) or skips that step
(``"skip"``); every malformed annotation raises :class:`DataError` naming its file and line (never
another exception).
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aanet.train
from aanet import checkpoint
from aanet.config import Config, make_config
from aanet.datasets import synthetic, w300, wflw
from aanet.datasets.records import DataError

REPO = Path(__file__).resolve().parents[2]
FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
PARSER_BUDGET = settings(
    max_examples=2000 if FUZZ else 150, derandomize=not FUZZ, deadline=None, database=None
)


# --- SIGKILL and resume ---------------------------------------------------------------------------


def _train_command(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "aanet", "train", "--device", "cpu",
        "--data-root", str(data), "--num-train", "96", "--num-test", "8", "--image-size", "64",
        "--input-size", "32", "--width", "16", "--blocks", "1", "1", "1", "--batch-size", "8",
        "--epochs", "3", "--seed", "3", "--out", str(out), *extra,
    ]  # fmt: skip


def _run(command: list[str]) -> None:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# The progress bar of the second epoch after at least one and before the last of its steps.
MID_EPOCH_2 = re.compile(rb"epoch 2/3[^\r\n]*?\| *([1-9][0-9]*)/([0-9]+) ")


def _kill_inside_epoch_2(process: subprocess.Popen) -> bytes:
    """Read the run's progress bars until the second epoch is part done, then SIGKILL it."""
    seen = bytearray()

    def read() -> None:
        while chunk := process.stderr.read1(4096):
            seen.extend(chunk)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        match = MID_EPOCH_2.search(bytes(seen))
        if match and int(match.group(1)) < int(match.group(2)):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait(timeout=60)
    return bytes(seen)


def test_sigkilled_training_resumes_to_the_same_weights(tmp_path):
    """SIGKILL ``python -m aanet train`` in the middle of its second epoch (its progress bar shows
    a step done and more to come), resume with ``--resume``: the weights equal an uninterrupted
    run's, bit for bit (one process on the CPU: every reduction runs in a fixed order)."""
    data = tmp_path / "data"
    synthetic.generate(data, synthetic.SyntheticConfig(num_train=96, num_test=8, image_size=64))
    _run(_train_command(data, tmp_path / "straight"))

    out = tmp_path / "killed"
    process = subprocess.Popen(
        _train_command(data, out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    log = _kill_inside_epoch_2(process)
    assert process.returncode == -signal.SIGKILL, (
        f"the run was not killed mid-epoch (exit {process.returncode}): {log[-2000:]!r}"
    )
    assert checkpoint.load(out / "last.pt")["epoch"] == 0  # only epoch 1 was saved

    _run(_train_command(data, out, "--resume"))
    straight = checkpoint.load(tmp_path / "straight" / "last.pt")
    resumed = checkpoint.load(out / "last.pt")
    assert resumed["epoch"] == straight["epoch"] == 2
    for name, tensor in straight["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    assert [r["train_loss"] for r in resumed["history"]] == [
        r["train_loss"] for r in straight["history"]
    ]


# --- non-finite losses ----------------------------------------------------------------------------


def _nan_at_calls(monkeypatch: pytest.MonkeyPatch, poisoned: set[int]) -> None:
    """Make the training loss NaN at the given (1-based) calls of the loss function."""
    build = aanet.train.build_training_loss
    calls = iter(range(1, 10**6))

    def build_poisoned(name: str, heatmap_reg: float):
        loss_fn = build(name, heatmap_reg)

        def poisoned_loss(*args, **kwargs):
            loss = loss_fn(*args, **kwargs)
            return loss * float("nan") if next(calls) in poisoned else loss

        return poisoned_loss

    monkeypatch.setattr(aanet.train, "build_training_loss", build_poisoned)


def _nan_config(tmp_path: Path, on_nan: str) -> Config:
    # 16 images in batches of 8: two steps per epoch.
    return make_config(
        {
            "data_root": str(tmp_path / "data"), "num_train": 16, "num_test": 4,
            "image_size": 64, "input_size": 32, "width": 16, "blocks": [1, 1, 1],
            "batch_size": 8, "epochs": 2, "device": "cpu", "out": str(tmp_path / "run"),
            "on_nan": on_nan,
        }
    )  # fmt: skip


def test_nan_loss_stops_with_the_step_named_and_the_last_epoch_kept(tmp_path, monkeypatch):
    _nan_at_calls(monkeypatch, {3})  # epoch 2, step 1
    with pytest.raises(FloatingPointError, match=r"epoch 2, step 1\b"):
        aanet.train.train(_nan_config(tmp_path, "stop"), progress=False)
    saved = checkpoint.load(tmp_path / "run" / "last.pt")
    assert saved["epoch"] == 0  # epoch 1 finished and was written before the fault
    assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())


def test_nan_loss_in_the_first_epoch_says_nothing_is_saved_yet(tmp_path, monkeypatch):
    _nan_at_calls(monkeypatch, {1})  # epoch 1, step 1
    with pytest.raises(FloatingPointError, match="no epoch has completed yet") as info:
        aanet.train.train(_nan_config(tmp_path, "stop"), progress=False)
    assert "--resume" not in str(info.value)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_nan_loss_skips_the_step_when_asked(tmp_path, monkeypatch, caplog):
    _nan_at_calls(monkeypatch, {2})  # epoch 1, step 2
    result = aanet.train.train(_nan_config(tmp_path, "skip"), progress=False)
    assert [row["skipped_steps"] for row in result["history"]] == [1, 0]
    assert "epoch 1, step 2" in caplog.text
    params = result["model"].state_dict().values()
    assert all(torch.isfinite(t).all() for t in params if t.is_floating_point())
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in result["history"])


def test_an_epoch_whose_every_step_was_skipped_logs_no_loss(tmp_path, monkeypatch, caplog, recwarn):
    """Its train_loss was 0.0 in log.csv (a perfect loss, on a log-scale plot) until 2026-12-03;
    until 2026-12-04 torch also warned that the scheduler stepped "before optimizer.step()",
    advice that does not apply to a schedule kept by the epoch."""
    _nan_at_calls(monkeypatch, {1, 2})  # both steps of epoch 1
    result = aanet.train.train(_nan_config(tmp_path, "skip"), progress=False)
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
    first, second = result["history"]
    assert first["skipped_steps"] == 2 and math.isnan(first["train_loss"])
    assert second["skipped_steps"] == 0 and math.isfinite(second["train_loss"])
    assert "epoch 1: every step was skipped (non-finite loss): train_loss is NaN" in caplog.text
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert rows[1].split(",")[rows[0].split(",").index("train_loss")] == "nan"


def test_unknown_nan_policy_is_refused():
    with pytest.raises(ValueError, match="on_nan: expected one of"):
        make_config({"on_nan": "ignore"})


# --- damaged checkpoints ----------------------------------------------------------------------


def _damaged_checkpoints(folder: Path) -> dict[str, Path]:
    """A real checkpoint cut short at several points, an empty file, and foreign files."""
    good = folder / "good.pt"
    checkpoint.save_atomic({"model": {"w": torch.randn(64, 64)}, "epoch": 0}, good)
    data = good.read_bytes()
    files = {}
    for fraction in (0.1, 0.5, 0.99):
        path = folder / f"cut{fraction}.pt"
        path.write_bytes(data[: int(len(data) * fraction)])
        files[f"truncated {fraction:.0%}"] = path
    files["empty"] = folder / "empty.pt"
    files["empty"].write_bytes(b"")
    files["png"] = folder / "image.pt"
    files["png"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    files["text"] = folder / "notes.pt"
    files["text"].write_text("model: not a checkpoint\n")
    return files


def test_damaged_checkpoint_raises_an_error_naming_the_file(tmp_path):
    for kind, path in _damaged_checkpoints(tmp_path).items():
        with pytest.raises(Exception) as info:
            checkpoint.load(path)
        assert str(path) in str(info.value), f"{kind}: {info.value!r}"


def test_damaged_checkpoint_error_is_one_line_saying_what_is_wrong(tmp_path):
    """Not torch's paragraph advising ``weights_only=False`` (for a PNG), nor ``KeyError: 101``
    (for a text file): one line saying what the file is."""
    expected = {
        "empty": "the file is empty",
        "png": "starts with b'\\x89PNG",
        "text": "starts with b'model",
    }
    expected.update({f"truncated {f:.0%}": "ends too soon" for f in (0.1, 0.5, 0.99)})
    for kind, path in _damaged_checkpoints(tmp_path).items():
        with pytest.raises(ValueError) as info:
            checkpoint.load(path)
        message = str(info.value)
        assert expected[kind] in message, f"{kind}: {message!r}"
        assert "\n" not in message and "weights_only" not in message, f"{kind}: {message!r}"


def test_damaged_checkpoint_never_loads(tmp_path):
    """Whatever the message, no damaged file yields a state (no half-loaded model)."""
    for kind, path in _damaged_checkpoints(tmp_path).items():
        with pytest.raises(Exception):  # noqa: B017 - any error; the point is that it raises
            checkpoint.load(path)
            pytest.fail(f"{kind} checkpoint loaded")


def test_foreign_checkpoint_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"conv.weight": torch.randn(4, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match="foreign.pt"):
        checkpoint.load(path)


class _RunsCodeWhenUnpickled:
    """A pickle payload that touches a file when loaded: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile.pt"
    torch.save({"model": {}, "payload": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(ValueError, match="hostile.pt"):
        checkpoint.load(path)
    assert not marker.exists()


def test_checkpoint_holding_other_objects_is_named_in_one_line(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"model": {}, "extra": _RunsCodeWhenUnpickled(tmp_path / "x")}, path)
    with pytest.raises(
        ValueError, match="objects other than tensors and plain Python data"
    ) as info:
        checkpoint.load(path)
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)


# --- annotation parsers -------------------------------------------------------------------------

WORDS = st.sampled_from(["1", "0", "-3.5", "1e3", "nan", "inf", "x", "", "1,2", "0x1f", "a.png"])


@pytest.mark.fuzz
@PARSER_BUDGET
@given(
    tokens=st.one_of(
        st.lists(WORDS | st.text(max_size=6), max_size=230),
        # The right count (207 fields) with random contents reaches the number and flag checks.
        st.lists(WORDS | st.text(max_size=6), min_size=207, max_size=207),
    )
)
def test_wflw_line_parser_answers_malformed_lines_with_data_error(tokens):
    """Random token lists (wrong counts, non-numbers, odd unicode) either parse or raise
    DataError carrying ``where``; nothing else escapes."""
    where = "list.txt:7"
    try:
        wflw.parse_line(" ".join(tokens), where, Path("images"))
    except DataError as error:
        assert error.where == where and str(error).startswith(where)


@pytest.mark.fuzz
@PARSER_BUDGET
@given(
    field=st.integers(0, 205),
    value=st.sampled_from(["x", "1..2", "--1", "0x10", "1e", "", "½", "1_0_"]),
)
def test_wflw_loader_names_file_and_line_of_a_non_number(field, value, tmp_path_factory):
    root = _fresh_wflw(tmp_path_factory)
    path = wflw.annotation_file(root, "train")
    lines = path.read_text().splitlines()
    tokens = lines[1].split()
    tokens[field] = value
    lines[1] = " ".join(t for t in tokens if t)  # an empty value makes the count wrong
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        wflw.load_wflw(root, "train", on_error="stop")
    assert info.value.where == f"{path}:2"


_WFLW_CACHE: dict[str, Path] = {}


def _fresh_wflw(factory: pytest.TempPathFactory) -> Path:
    """A small synthetic WFLW tree, copied fresh from one generated per session."""
    import shutil

    if "root" not in _WFLW_CACHE:
        _WFLW_CACHE["root"] = synthetic.generate(
            factory.mktemp("wflw"),
            synthetic.SyntheticConfig(num_train=3, num_test=1, image_size=64),
        )
    copy = factory.mktemp("wflw_copy")
    shutil.copytree(_WFLW_CACHE["root"], copy, dirs_exist_ok=True)
    return copy


def test_wflw_loader_names_the_line_with_non_utf8_bytes(tmp_path_factory):
    root = _fresh_wflw(tmp_path_factory)
    path = wflw.annotation_file(root, "train")
    lines = path.read_bytes().splitlines()
    lines[2] = lines[2].replace(b".png", b"\xff\xfe.png")
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as info:
        wflw.load_wflw(root, "train", on_error="stop")
    assert info.value.where == f"{path}:3"


PTS_LINES = st.sampled_from(
    ["version: 1", "n_points: 2", "n_points: x", "n_points: 68", "{", "}", "1 2", "1", "1 2 3",
     "a b", "nan 1", "", "   ", "version 1", "n_points:", "3.5 -2"]
)  # fmt: skip


@pytest.mark.fuzz
@PARSER_BUDGET
@given(lines=st.lists(PTS_LINES | st.text(max_size=8), max_size=12))
def test_pts_parser_answers_malformed_files_with_data_error(lines, tmp_path_factory):
    """Random .pts files: a parsed file has the points its header promises; anything else is a
    DataError naming this file and a line that exists in it."""
    path = tmp_path_factory.mktemp("pts") / "face.pts"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        points = w300.parse_pts(path)
    except DataError as error:
        name, _, line = error.where.rpartition(":")
        assert name == str(path)
        assert 1 <= int(line) <= max(1, len(path.read_text().splitlines()))
    else:
        assert points.ndim == 2 and points.shape[1] == 2


def test_pts_parser_names_the_line_with_non_utf8_bytes(tmp_path):
    path = tmp_path / "face.pts"
    path.write_bytes(b"version: 1\nn_points: 2\n{\n1 2\n\xff\xfe 3\n}\n")
    with pytest.raises(DataError) as info:
        w300.parse_pts(path)
    assert info.value.where == f"{path}:5"

"""``aanet predict`` and ``aanet export`` as a user meets them: where the points land in the photo
(EXIF orientation included), what the JSON says, the errors for wrong files, and exported files
loaded in a fresh interpreter that never imports ``aanet`` or ``aanet_kernels``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from aanet.cli import main
from aanet.datasets import synthetic
from aanet.export import export, format_for
from aanet.inference import load_model
from aanet.model import ModelConfig
from aanet.predict import predict_image
from aanet.train import train
from aanet_kernels import available_backends, use_backend
from tests.aanet.test_train import tiny_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    config = tiny_config(tmp_path_factory.mktemp("predict"), epochs=1, num_train=8, num_test=2)
    train(config, progress=False)
    return Path(config.out) / "last.pt"


class _DotFinder(torch.nn.Module):
    """Answers, for every landmark, the centroid of the crop's brightness above black: the crop
    position of a white dot on a black photo, whatever network would have found it."""

    def __init__(self, input_size: int = 32) -> None:
        super().__init__()
        self.config = ModelConfig(input_size=input_size)

    def forward(self, images: torch.Tensor):
        weight = (images.mean(dim=1) + 2.0).clamp(min=0)  # black is -2 after normalisation
        ys, xs = torch.meshgrid(
            *(torch.arange(n, dtype=images.dtype) for n in images.shape[-2:]), indexing="ij"
        )
        total = weight.sum(dim=(1, 2))
        centre = torch.stack([(weight * xs).sum((1, 2)) / total, (weight * ys).sum((1, 2)) / total])
        coords = centre.T[:, None, :].expand(-1, 98, -1)
        return coords, torch.ones(coords.shape[:2]), None


# For each EXIF orientation, the transpose that stores an upright image so that Pillow's
# exif_transpose (and any photo viewer) shows it upright again.
_STORED = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", sorted(_STORED))
def test_predicted_points_are_in_the_pixels_of_the_photo_as_displayed(tmp_path, orientation):
    """A white dot at a known pixel of a non-square photo, stored turned by its EXIF orientation
    as a phone does: the point comes back at that pixel of the upright photo (OpenCV's convention,
    pixel centres at integers), through the crop and its inverse, and ``--box`` is read in the
    same upright pixels. The crop is at about one photo pixel per crop pixel, so half a pixel of
    convention error or a crop mapped back the wrong way would show."""
    upright = np.zeros((48, 80, 3), np.uint8)
    dot = (51.0, 20.0)  # x, y
    upright[19:22, 50:53] = 255
    stored = Image.fromarray(upright[:, :, ::-1])
    if _STORED[orientation] is not None:
        stored = stored.transpose(_STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    photo = tmp_path / f"phone {orientation}.png"
    stored.save(photo, exif=exif)
    box = np.array([dot[0] - 12.8, dot[1] - 12.8, dot[0] + 12.8, dot[1] + 12.8])  # crop 1:1
    annotated, faces = predict_image(_DotFinder(), photo, CPU, box=box)
    assert annotated.shape == upright.shape  # drawn on the photo as displayed
    points = np.array(faces[0]["landmarks"])
    np.testing.assert_allclose(points, np.broadcast_to(dot, points.shape), atol=0.2)
    # An off-centre box: the same pixel, through another crop.
    _, faces = predict_image(_DotFinder(), photo, CPU, box=box + [5, -3, 5, -3])
    np.testing.assert_allclose(faces[0]["landmarks"][0], dot, atol=0.2)


def test_predict_json_names_the_image_its_size_and_where_each_box_came_from(
    checkpoint, tmp_path, capsys
):
    """Until 2026-12-02 the JSON was ``{"faces": [...]}`` alone: a face box the detector found
    and the whole-image stand-in used when it found none read the same."""
    photo = tmp_path / "photo.png"
    image, _, _ = synthetic.render_face(np.random.default_rng(5), 96)
    cv2.imwrite(str(photo), cv2.copyMakeBorder(image, 0, 0, 0, 20, cv2.BORDER_REPLICATE))
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((40, 50, 3), 127, np.uint8))
    cases = {
        "detected": [str(photo)],
        "given": [str(photo), "--box", "20", "4", "76", "60"],
        "whole image": [str(photo), "--no-detect"],
        "whole image (none found)": [str(blank)],
    }
    for source, argv in cases.items():
        out = tmp_path / f"{source}.png"
        code = main(["predict", *argv, "--checkpoint", str(checkpoint), "--json", "--output",
                     str(out)])  # fmt: skip
        assert code == 0, source
        printed = capsys.readouterr()
        report = json.loads(printed.out)
        assert report == json.loads(out.with_suffix(".json").read_text())
        size = (116, 96) if argv[0] == str(photo) else (50, 40)
        assert (report["image"], report["width"], report["height"]) == (argv[0], *size)
        assert [face["source"] for face in report["faces"]] == [source.split(" (")[0]]
        assert ("no face found" in printed.err) == source.endswith("(none found)"), printed.err


def test_predict_refuses_to_overwrite_its_photo_and_names_folders_and_files_in_the_way(
    checkpoint, tmp_path, capsys
):
    """Until 2026-12-02 ``--output photo.png`` on ``photo.png`` replaced the photo with its
    annotated copy; a file where the output's folder should be gave ``[Errno 17] File exists``
    after the model had run; a folder given as the image was 'no such file'."""
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), np.full((40, 50, 3), 127, np.uint8))
    before = photo.read_bytes()
    (tmp_path / "a_file").write_text("")
    (tmp_path / "folder.png").mkdir()
    cases = [
        ([str(photo), "--output", str(tmp_path / "." / "photo.png")], "is the input image"),
        ([str(photo), "--output", str(tmp_path / "a_file" / "out.png")],
         "a_file is a file, not a folder"),
        ([str(photo), "--output", str(tmp_path / "folder.png")], "folder.png is a folder"),
        ([str(tmp_path)], f"image: {tmp_path} is a folder, not an image file"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(["predict", *argv, "--checkpoint", str(checkpoint)]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert photo.read_bytes() == before


def test_an_unreadable_photo_is_named_as_unreadable(tmp_path, monkeypatch):
    """A photo without read permission (tests run as root here, so the denial is simulated): until
    2026-12-02 it was 'not an image that decodes'."""
    photo = tmp_path / "private.png"
    cv2.imwrite(str(photo), np.zeros((8, 8, 3), np.uint8))

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("aanet.predict.read_image", denied)
    with pytest.raises(PermissionError, match=r"image: cannot read .*private.png \(Permission"):
        predict_image(_DotFinder(), photo, CPU)


def test_checkpoint_errors_name_the_file_and_say_what_it_is(checkpoint, tmp_path, capsys):
    """A file that is not the training checkpoint ``aanet predict`` / ``evaluate`` / ``export``
    want: one line naming it. Until 2026-12-02 an exported model gave torch's loader message (a
    paragraph on ``weights_only``), weights of another width a RuntimeError of some 130 lines
    naming no file, and a config option this version lacks named no file either."""
    state = torch.load(checkpoint, weights_only=False)
    wider = tmp_path / "wider.pt"
    torch.save(dict(state, config=dict(state["config"], width=32)), wider)
    newer = tmp_path / "newer.pt"
    torch.save(dict(state, config=dict(state["config"], option_from_the_future=1)), newer)
    exported = tmp_path / "model.pt2"
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(exported)]) == 0
    scripted = tmp_path / "model.ts.pt"
    argv = ["export", "--checkpoint", str(checkpoint), "--format", "torchscript"]
    assert main([*argv, "--output", str(scripted)]) == 0
    capsys.readouterr()
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), np.full((40, 50, 3), 127, np.uint8))
    cases = {
        wider: "wider.pt: its weights do not fit the network its config describes (size mismatch",
        newer: "newer.pt: its saved config does not read here: config: unknown option",
        exported: "model.pt2: an exported model (torch.export, what `aanet export` writes), not",
        scripted: "model.ts.pt: an exported model (TorchScript, what `aanet export` writes), not",
    }
    # An --output of its own: export's default for model.pt2 is model.pt2, refused as the input.
    export_argv = ["export", "--output", str(tmp_path / "again.pt2")]
    for path, message in cases.items():
        for command in (["predict", str(photo), "--no-detect"], export_argv, ["evaluate"]):
            assert main([*command, "--checkpoint", str(path)]) == 2, (command, path)
            err = capsys.readouterr().err
            assert message in err and err.count("\n") == 1, (command, err)


def test_predict_with_non_finite_weights_says_so(checkpoint, tmp_path, capsys):
    """Until 2026-12-02 a checkpoint holding NaN weights ended ``aanet predict`` with ``error:
    cannot convert float NaN to integer`` (from drawing the points)."""
    state = torch.load(checkpoint, weights_only=False)
    weights = dict(state["model"], **{"head.1.bias": state["model"]["head.1.bias"] * np.nan})
    diverged = tmp_path / "diverged.pt"
    torch.save(dict(state, model=weights), diverged)
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), np.full((40, 50, 3), 127, np.uint8))
    assert main(["predict", str(photo), "--checkpoint", str(diverged), "--no-detect"]) == 2
    err = capsys.readouterr().err
    assert "the model gave non-finite landmarks for" in err
    assert "1 of its" in err and "weight tensors hold NaN or inf" in err
    assert not (tmp_path / "photo_landmarks.png").exists()


# --- export -----------------------------------------------------------------------------------

# Run in a fresh interpreter, from a folder outside the repository, with aanet and aanet_kernels
# made unimportable: the exported file must load and run on torch alone.
_FRESH = """
import importlib.abc, sys
class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("aanet", "aanet_kernels"):
            raise ImportError(f"{name} must not be needed to run an exported model")
sys.meta_path.insert(0, _Refuse())
import torch
path, inputs, out = sys.argv[1:]
if path.endswith(".onnx"):
    import onnxruntime
    session = onnxruntime.InferenceSession(path)
    def model(batch):
        return [torch.from_numpy(o) for o in session.run(None, {"images": batch.numpy()})]
elif path.endswith(".pt2"):
    model = torch.export.load(path).module()
else:
    model = torch.jit.load(path)
images = torch.load(inputs)
torch.save([model(images[:1]), model(images)], out)
assert not [m for m in sys.modules if m.split(".")[0] in ("aanet", "aanet_kernels")]
"""


def _model_with_peaked_maps(checkpoint: Path) -> torch.nn.Module:
    """The checkpoint's model with a head that gives each point its own input-dependent place
    (a barely trained one puts every point near the centre: any file would match it)."""
    model = load_model(checkpoint)
    torch.nn.init.normal_(
        model.head[-1].weight, std=10.0, generator=torch.Generator().manual_seed(0)
    )
    return model


def _run_fresh(tmp_path: Path, exported: Path, images: torch.Tensor) -> list:
    inputs, out = tmp_path / "images.pt", tmp_path / "outputs.pt"
    torch.save(images, inputs)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AANET_KERNELS_BACKEND")}
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _FRESH, str(exported), str(inputs), str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("name", ["model.pt2", "model.ts.pt", "model.onnx"])
def test_exported_files_run_on_torch_alone_at_batch_1_and_7_as_the_eager_model(
    checkpoint, tmp_path, name
):
    """What the README promises: reloaded in a fresh Python that cannot import aanet or
    aanet_kernels (the ONNX file through onnxruntime), each file takes a batch of 1 and of 7
    (traced at 2) and gives the eager model's coordinates and confidences."""
    model = _model_with_peaked_maps(checkpoint)
    exported = tmp_path / name
    assert export(model, exported, format_for(exported, None)) <= 1e-4
    images = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use_backend("reference"):
        eager = [model(images[:1])[:2], model(images)[:2]]
    assert eager[1][0].std() > 2.0  # points spread over the crop: a real comparison
    for want, got in zip(eager, _run_fresh(tmp_path, exported, images), strict=True):
        for a, b in zip(want, got, strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(
    "cpu" not in available_backends("cpu"), reason="the C++ extension is not built here"
)
def test_a_file_recording_the_compiled_kernels_says_it_needs_aanet_kernels(
    checkpoint, tmp_path, caplog, capsys
):
    """``--backend cpu`` (or ``auto``, which picks it where the extension is built) records the
    extension's operators: the in-process check passes, but torch alone cannot load the file.
    Until 2026-12-02 nothing said so."""
    for fmt, name in (("export", "cpu.pt2"), ("torchscript", "cpu.ts.pt")):
        argv = ["export", "--checkpoint", str(checkpoint), "--format", fmt, "--backend", "auto"]
        assert main([*argv, "--output", str(tmp_path / name)]) == 0
        assert f"{name} records aanet_kernels' compiled operators (backend 'auto')" in caplog.text
        inputs = tmp_path / "images.pt"
        torch.save(torch.zeros(1, 3, 32, 32), inputs)
        done = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", _FRESH, str(tmp_path / name), str(inputs),
             str(tmp_path / "out.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode != 0 and "aanet_kernels" in done.stderr
        caplog.clear()
    assert (
        main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "r.pt2")]) == 0
    )
    assert "compiled operators" not in caplog.text


@pytest.mark.skipif(
    "cpu" not in available_backends("cpu"), reason="the C++ extension is not built here"
)
@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_onnx_with_the_compiled_kernels_is_refused_in_one_line(
    checkpoint, tmp_path, capsys, backend
):
    """Until 2026-12-06 ``--format onnx --backend cpu`` (or ``auto``, which picks it where the
    extension is built) ended in torch's 16-line "Failed to convert the exported program to an
    ONNX model ... No ONNX function found for aanet_kernels.attention_2d_fwd"."""
    argv = ["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--backend", backend]
    assert main([*argv, "--output", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert f"aanet export: error: backend: {backend!r}" in err, err
    assert "--format onnx needs --backend reference" in err and len(err.splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_torchscripts_deprecation_is_one_log_line_not_eight_warnings(
    checkpoint, tmp_path, caplog, recwarn
):
    """torch 2.14's torch.jit.trace, save and load each warn that they are deprecated: a
    TorchScript export printed eight lines of torch's (until 2026-12-04). One line of ours says
    it, when torch does, and names the format to use."""
    with warnings.catch_warnings(record=True) as probe:  # does this torch warn?
        warnings.simplefilter("always")
        torch.jit.save(torch.jit.script(torch.nn.Identity()), str(tmp_path / "probe.ts.pt"))
    torch_warns = any(_deprecation(w) for w in probe)
    out = tmp_path / "model.ts.pt"
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(out)]) == 0
    assert not [w for w in recwarn if _deprecation(w)]
    assert ("deprecates TorchScript" in caplog.text) == torch_warns
    assert ("--format export writes a torch.export .pt2" in caplog.text) == torch_warns


def _deprecation(warning: warnings.WarningMessage) -> bool:
    return issubclass(warning.category, FutureWarning) and "is deprecated" in str(warning.message)


def test_export_takes_its_format_from_the_output_name_and_refuses_a_name_of_another(
    checkpoint, tmp_path, capsys
):
    """Until 2026-12-02 ``--output model.ts.pt`` without ``--format`` was refused as not .pt2, and
    ``--format torchscript --output model.pt2`` wrote a TorchScript file that torch.export.load
    then failed on."""
    out = tmp_path / "model.ts.pt"
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(out)]) == 0
    assert "(torchscript)" in capsys.readouterr().out
    torch.jit.load(str(out))
    cases = [
        (["--format", "torchscript", "--output", "m.pt2"],
         "'m.pt2' is the name of a torch.export file, not TorchScript: give a name such as "
         "'m.ts.pt', or --format export"),
        (["--format", "onnx", "--output", "m.ts.pt"], "'m.ts.pt' is the name of a TorchScript"),
        (["--format", "export", "--output", "m.onnx"], "a torch.export file is a .pt2 archive"),
        (["--output", "m.bin"], "a torch.export file is a .pt2 archive, got 'm.bin'"),
    ]  # fmt: skip
    for flags, message in cases:
        flags = [str(tmp_path / f) if f.startswith("m.") else f for f in flags]
        # The name is refused before the checkpoint is read: this one does not exist.
        assert main(["export", "--checkpoint", str(tmp_path / "none.pt"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ts.pt"]


def test_export_and_predict_refuse_an_output_in_the_way_before_reading_the_checkpoint(
    checkpoint, tmp_path, monkeypatch, capsys
):
    """Until 2026-12-03 ``aanet export --checkpoint m.pt2`` (whose default output is the
    checkpoint's name with .pt2) and ``aanet predict --output`` could write over the checkpoint;
    an export ``--output`` below a file was ``[Errno 17] File exists``, and one in a folder where
    no file can be made (``/proc``) named the temporary file, both once the checkpoint was
    loaded."""
    monkeypatch.setattr("aanet.inference.load_model", lambda *a, **k: pytest.fail("loaded"))
    as_pt2, as_png = tmp_path / "m.pt2", tmp_path / "c.png"
    for copy in (as_pt2, as_png):
        copy.write_bytes(checkpoint.read_bytes())
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), np.full((40, 50, 3), 127, np.uint8))
    (tmp_path / "a_file").write_text("")
    cases = [
        (["export", "--checkpoint", str(as_pt2)], f"output: {as_pt2} is the checkpoint"),
        (["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "a_file/m.pt2")],
         f"output: {tmp_path / 'a_file'} is a file, not a folder"),
        (["export", "--checkpoint", str(checkpoint), "--output", "/proc/m.pt2"],
         "output: cannot write in /proc, for /proc/m.pt2"),
        (["predict", str(photo), "--checkpoint", str(as_png), "--output", str(as_png)],
         f"output: {as_png} is the checkpoint, which it would overwrite"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert as_pt2.read_bytes() == as_png.read_bytes() == checkpoint.read_bytes()


def test_a_file_that_fails_its_check_is_not_left_behind(checkpoint, tmp_path):
    """Until 2026-12-02 the file was written, then checked: one that failed stayed where a user
    would take it for the export (over an earlier good one)."""
    model = load_model(checkpoint)
    earlier = tmp_path / "model.pt2"
    earlier.write_bytes(b"an earlier export")
    for fmt, path in (("export", earlier), ("torchscript", tmp_path / "new.ts.pt")):
        with pytest.raises(RuntimeError, match="differs from the eager one .* not written"):
            export(model, path, fmt, atol=-1.0)
    assert earlier.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]  # no temporary files


def test_onnx_names_the_package_it_lacks(checkpoint, tmp_path, monkeypatch):
    """torch.onnx.export needs onnxscript as well; until 2026-12-02 only onnx and onnxruntime were
    checked (and in the ``[onnx]`` extra), so with those two installed the export ended in a
    ModuleNotFoundError traceback."""
    model = load_model(checkpoint)
    real = importlib.util.find_spec

    def find_spec(name, *args):  # onnx and onnxruntime installed, onnxscript not
        if name == "onnxscript":
            return None
        return object() if name in ("onnx", "onnxruntime") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(RuntimeError, match="onnxscript cannot be imported here: pip install"):
        export(model, tmp_path / "m.onnx", "onnx")
    assert not list(tmp_path.iterdir())

    def none_found(name, *args):
        return None if name in ("onnx", "onnxscript", "onnxruntime") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", none_found)
    with pytest.raises(RuntimeError, match="onnxruntime, and none of them can be imported here"):
        export(model, tmp_path / "m.onnx", "onnx")


def test_predict_outputs_replace_earlier_ones_whole_or_not_at_all(tmp_path, monkeypatch):
    """Until 2026-12-02 the annotated image and the JSON were written in place: a kill or a full
    disk mid-write left half a file over the earlier one."""
    import aanet.predict as predict

    out, as_json = tmp_path / "faces.png", tmp_path / "faces.json"
    annotated = np.zeros((8, 8, 3), np.uint8)
    predict.write_results(annotated, [], out, as_json, "photo.png")
    earlier = out.read_bytes(), as_json.read_bytes()
    assert json.loads(earlier[1]) == {"image": "photo.png", "width": 8, "height": 8, "faces": []}

    def cut_short(name, image):
        Path(name).write_bytes(earlier[0][:10])
        return False

    monkeypatch.setattr(predict.cv2, "imwrite", cut_short)
    with pytest.raises(OSError, match="cannot write"):
        predict.write_results(annotated + 1, [], out, as_json, "other.png")
    assert (out.read_bytes(), as_json.read_bytes()) == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces.json", "faces.png"]

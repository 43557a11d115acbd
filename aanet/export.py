"""``aanet export``: TorchScript or ``torch.export`` (ONNX when installed), checked on output."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch

from aanet.model import AANet
from aanet_kernels import use_backend

FORMATS = ("torchscript", "export", "onnx")
# The batch dim of ``images`` stays free in torch.export and ONNX files (a TorchScript trace
# records shape arithmetic, so its batch is free too); the image size is fixed by the model.
_DYNAMIC_BATCH = {"images": {0: torch.export.Dim("batch", min=1)}}


class _Landmarks(torch.nn.Module):
    """The exported interface: images to ``(coords, confidence)``."""

    def __init__(self, model: AANet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        coords, confidence, _ = self.model(images)
        return coords, confidence


def export(
    model: AANet,
    path: Path | str,
    fmt: str = "torchscript",
    backend: str = "reference",
    atol: float = 1e-4,
) -> float:
    """Write ``model`` in ``fmt`` to ``path``, reload it, and return the largest difference of its
    outputs from the eager model on a fresh random batch of another size than the traced one
    (raises if above ``atol``).

    ``backend="reference"`` (the default) records attention as plain ATen operations, so the
    file runs where ``aanet_kernels``'s compiled extension is absent.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")
    path = Path(path)
    if fmt == "export" and path.suffix != ".pt2":
        # torch.export.save writes a .pt2 archive whatever the name; load then warns on others.
        raise ValueError(f"output: a torch.export file is a .pt2 archive, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _Landmarks(model.eval())
    size = model.config.input_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    # Another batch size than the example's: the file must take any batch.
    check = torch.randn(3, 3, size, size)
    with use_backend(backend), torch.no_grad():
        expected = wrapper(check)
        if fmt == "torchscript":
            with warnings.catch_warnings():
                # "the trace might not generalize", once per shape read in Python (some 25):
                # the file is checked on another batch size just below, which is the answer.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(wrapper, example)
            torch.jit.save(traced, str(path))
            got = torch.jit.load(str(path))(check)
        elif fmt == "export":
            program = torch.export.export(wrapper, (example,), dynamic_shapes=_DYNAMIC_BATCH)
            torch.export.save(program, str(path))
            got = torch.export.load(str(path)).module()(check)
        else:
            got = _onnx(wrapper, example, check, path)
    error = max(float((a - b).abs().max()) for a, b in zip(expected, got, strict=True))
    if error > atol:
        raise RuntimeError(f"exported model differs from the eager one by {error:.3g} > {atol}")
    return error


def _onnx(wrapper: torch.nn.Module, example: torch.Tensor, check: torch.Tensor, path: Path):
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
        raise RuntimeError(
            "format 'onnx' needs the onnx and onnxruntime packages: "
            "pip install 'aanet-kernels[onnx]' (or the two packages)"
        )
    import onnxruntime

    torch.onnx.export(wrapper, (example,), str(path), input_names=["images"],
                      output_names=["coords", "confidence"], dynamo=True,
                      dynamic_shapes=_DYNAMIC_BATCH)  # fmt: skip
    session = onnxruntime.InferenceSession(str(path))
    outputs = session.run(None, {"images": check.numpy()})
    return [torch.from_numpy(o) for o in outputs]

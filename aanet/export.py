"""``aanet export``: TorchScript or ``torch.export`` (ONNX when installed), checked on output."""

from __future__ import annotations

import importlib.util
import logging
import re
import warnings
from pathlib import Path

import torch

from aanet.files import check_output_path, replacing
from aanet.model import AANet
from aanet_kernels import resolve_backend, use_backend

log = logging.getLogger("aanet.export")

FORMATS = ("torchscript", "export", "onnx")
# The file name each format gets by default, and the suffixes that say which format a file is.
SUFFIXES = {"torchscript": ".ts.pt", "export": ".pt2", "onnx": ".onnx"}
_NAMES = {"torchscript": "TorchScript", "export": "torch.export", "onnx": "ONNX"}
# The batch dim of ``images`` stays free in torch.export and ONNX files (a TorchScript trace
# records shape arithmetic, so its batch is free too); the image size is fixed by the model.
_DYNAMIC_BATCH = {"images": {0: torch.export.Dim("batch", min=1)}}
# What torch.onnx.export (dynamo=True, the only exporter of current torch) needs, and onnxruntime
# to run the file for the check.
_ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class _Landmarks(torch.nn.Module):
    """The exported interface: images to ``(coords, confidence)``."""

    def __init__(self, model: AANet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        coords, confidence, _ = self.model(images)
        return coords, confidence


def named_format(path: Path | str) -> str | None:
    """The format ``path``'s name says: ``.pt2`` torch.export, ``.onnx`` ONNX, ``.ts.pt`` or
    ``.ts`` TorchScript; else ``None``."""
    name = Path(path).name
    if name.endswith((".ts.pt", ".ts")):
        return "torchscript"
    return {".pt2": "export", ".onnx": "onnx"}.get(Path(path).suffix)


def format_for(path: Path | str | None, fmt: str | None) -> str:
    """The format to write: ``fmt`` if given, else the one ``path``'s name says
    (:func:`named_format`), else torch.export."""
    if fmt is not None:
        return fmt
    return (named_format(path) if path is not None else None) or "export"


def check_output_name(path: Path, fmt: str) -> None:
    """Raise ``ValueError`` naming ``output`` when ``path``'s suffix says another format than
    ``fmt`` (a TorchScript file named ``.pt2`` would be taken for a torch.export archive)."""
    if fmt == "export" and path.suffix != ".pt2":
        # torch.export.save writes a .pt2 archive whatever the name; load then warns on others.
        raise ValueError(
            f"output: a torch.export file is a .pt2 archive, got {path.name!r} "
            "(--format torchscript or onnx for another format)"
        )
    named = named_format(path)
    if named is not None and named != fmt:
        stem = path.name.removesuffix(".ts.pt").removesuffix(path.suffix)
        raise ValueError(
            f"output: {path.name!r} is the name of a {_NAMES[named]} file, not {_NAMES[fmt]}: "
            f"give a name such as {stem + SUFFIXES[fmt]!r}, or --format {named}"
        )


def export(
    model: AANet,
    path: Path | str,
    fmt: str = "torchscript",
    backend: str = "reference",
    atol: float = 1e-4,
) -> float:
    """Write ``model`` in ``fmt`` to ``path``, reload it, and return the largest difference of its
    outputs from the eager model on fresh random batches of 1 and 3 (another size than the traced
    one); raises if above ``atol``. ``path`` is replaced only by a file that passed the check.

    ``backend="reference"`` (the default) records attention as plain ATen operations, so the
    file runs where ``aanet_kernels``'s compiled extension is absent; another backend records its
    compiled operators, and the file then loads only after ``import aanet_kernels`` (a warning
    says so).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")
    path = Path(path)
    check_output_name(path, fmt)
    check_output_path(path, "output")
    if fmt == "onnx":
        missing = [name for name in _ONNX_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            lacking = (
                "none of them can"
                if len(missing) == len(_ONNX_PACKAGES)
                else f"{', '.join(missing)} cannot"
            )
            raise RuntimeError(
                f"format 'onnx' needs the packages {', '.join(_ONNX_PACKAGES)}, and {lacking} be "
                "imported here: pip install 'aanet-kernels[onnx]'"
            )
        # ONNX has no translation of the extension's operators: torch's exporter would end in a
        # paragraph of advice on registering one.
        with use_backend(backend):
            chosen = resolve_backend("auto", next(model.parameters()).device)
        if chosen != "reference" and getattr(model.config, "attention", True):
            picks = "" if backend == chosen else f" (which picks {chosen!r} here)"
            raise ValueError(
                f"backend: {backend!r}{picks} records aanet_kernels' compiled operators, which "
                "ONNX has no translation for; --format onnx needs --backend reference (the "
                "default)"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _Landmarks(model).eval()  # eval() recurses: the wrapper too, which ONNX checks
    size = model.config.input_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    # Other batch sizes than the example's: the file must take any batch, a single image too.
    checks = [torch.randn(n, 3, size, size) for n in (1, 3)]
    # Written under a temporary name and renamed only once checked: a file that fails the check
    # (or an export that raises) leaves any earlier file in place.
    with replacing(path) as tmp:
        with use_backend(backend), torch.no_grad():
            expected = [wrapper(check) for check in checks]
            if fmt == "torchscript":
                got, compiled_ops = _torchscript(wrapper, example, checks, tmp)
            elif fmt == "export":
                program = torch.export.export(wrapper, (example,), dynamic_shapes=_DYNAMIC_BATCH)
                compiled_ops = any(
                    str(node.target).startswith("aanet_kernels.")
                    for node in program.graph.nodes
                    if node.op == "call_function"
                )
                torch.export.save(program, str(tmp))
                loaded = torch.export.load(str(tmp)).module()
                got = [loaded(check) for check in checks]
            else:
                compiled_ops = False  # refused above: ONNX has no translation for them
                got = _onnx(wrapper, example, checks, tmp)
        error = max(
            float((a - b).abs().max())
            for want, have in zip(expected, got, strict=True)
            for a, b in zip(want, have, strict=True)
        )
        if error > atol:
            raise RuntimeError(
                f"exported model differs from the eager one by {error:.3g} > {atol}; "
                f"{path} not written"
            )
    if compiled_ops:
        log.warning(
            "%s records aanet_kernels' compiled operators (backend %r): it loads only after "
            "`import aanet_kernels`, with its extension built; the default --backend reference "
            "writes a file that needs neither",
            path,
            backend,
        )
    return error


# torch 2.14's torch.jit.trace, save and load each warn "`torch.jit.<name>` is deprecated".
_JIT_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"


def _torchscript(
    wrapper: torch.nn.Module, example: torch.Tensor, checks: list[torch.Tensor], path: Path
) -> tuple[list[list[torch.Tensor]], bool]:
    """Trace ``wrapper`` to ``path``, reload it and run ``checks``; also whether the file records
    aanet_kernels' compiled operators. torch's deprecation of TorchScript, some eight warning
    lines, is said once, in a log line naming the format to use instead."""
    with warnings.catch_warnings(record=True) as caught:
        # "the trace might not generalize", once per shape read in Python (some 25): the file
        # is checked on other batch sizes, which is the answer.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("always", _JIT_DEPRECATED, FutureWarning)
        traced = torch.jit.trace(wrapper, example)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path))
        got = [loaded(check) for check in checks]
    deprecated = False
    for warning in caught:
        if issubclass(warning.category, FutureWarning) and re.search(
            _JIT_DEPRECATED, str(warning.message)
        ):
            deprecated = True
        else:  # not ours to hide
            warnings.showwarning(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    if deprecated:
        log.warning(
            "torch %s deprecates TorchScript (torch.jit.trace, save and load warn so): "
            "--format export writes a torch.export .pt2, the format torch keeps",
            torch.__version__,
        )
    return got, "aanet_kernels::" in str(traced.inlined_graph)


def _onnx(
    wrapper: torch.nn.Module, example: torch.Tensor, checks: list[torch.Tensor], path: Path
) -> list[list[torch.Tensor]]:
    import onnxruntime

    # external_data=False: one self-contained file (torch's default writes the weights to a
    # second file, <name>.data, which a copy of the .onnx alone would lack; past 2 GB torch
    # writes it anyway).
    torch.onnx.export(wrapper, (example,), str(path), input_names=["images"],
                      output_names=["coords", "confidence"], dynamo=True, verbose=False,
                      dynamic_shapes=_DYNAMIC_BATCH, external_data=False)  # fmt: skip
    session = onnxruntime.InferenceSession(str(path))
    return [
        [torch.from_numpy(o) for o in session.run(None, {"images": check.numpy()})]
        for check in checks
    ]

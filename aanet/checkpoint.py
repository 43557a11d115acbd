"""Checkpoints written atomically (``aanet.files.replacing``) and read back."""

from __future__ import annotations

import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aanet.files import replacing


def save_atomic(state: dict[str, Any], path: Path | str) -> None:
    """Write ``state`` with ``torch.save`` so that ``path`` is never a half-written file."""
    with replacing(path) as tmp:
        torch.save(state, tmp)


def load(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic` (tensors and plain Python data only).

    A missing, damaged or foreign file raises an error that names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        exported = exported_kind(path)  # the first read of the file
    except OSError as error:  # a bare "[Errno 13] Permission denied: 'last.pt'" otherwise
        raise type(error)(f"checkpoint {path}: cannot read it ({error.strerror})") from error
    if exported:
        raise ValueError(
            f"{path}: an exported model ({exported}, what `aanet export` writes), not a "
            "training checkpoint: give the checkpoint it was exported from (last.pt)"
        )
    try:
        # weights_only: a checkpoint is tensors and plain Python data, so torch's restricted
        # unpickler suffices, and a hostile file cannot run code when it is loaded.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load raises many kinds (EOF, unpickling, zip, OS errors)
        raise ValueError(
            f"{path}: damaged or not a checkpoint ({_why_not_loaded(path, exc)})"
        ) from exc
    if not isinstance(state, dict) or "model" not in state:
        keys = sorted(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: not an aanet checkpoint (no 'model' entry; found {keys})")
    return state


def _why_not_loaded(path: Path, error: Exception) -> str:
    """Why ``torch.load`` refused ``path``, in one line: torch's own message is a paragraph for a
    file it does not load with ``weights_only`` (advice to load it unrestricted, which for a PNG
    or a text file would not help either) and a bare ``KeyError: 101`` for some foreign bytes."""
    with open(path, "rb") as stream:
        head = stream.read(8)
    if not head:
        return "the file is empty"
    # torch.save writes a zip archive ("PK") or, in its legacy format, a pickle (0x80).
    if head[:2] != b"PK" and head[:1] != b"\x80":
        return f"torch.save writes a zip archive or a pickle; this file starts with {head!r}"
    if (head[:2] == b"PK" and not zipfile.is_zipfile(path)) or isinstance(error, EOFError):
        return "the file ends too soon or is damaged: cut short while it was copied or written?"
    text = str(error)
    marker = "WeightsUnpickler error: "
    if marker in text:
        detail = text.split(marker, 1)[1].split("\n", 1)[0].split(". ", 1)[0]
        return f"it holds objects other than tensors and plain Python data ({detail})"
    lines = text.strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def exported_kind(path: Path | str) -> str | None:
    """``"torch.export"``, ``"TorchScript"`` or ``"ONNX"`` when ``path`` looks like a file of that
    format (a model for deployment, not a checkpoint), else ``None``."""
    path = Path(path)
    with open(path, "rb") as stream:
        head = stream.read(4)
    # An ONNX ModelProto starts with its ir_version (field 1, a varint: byte 0x08, then 3 to 20
    # or so); torch.save writes a zip ("PK") or, in the legacy format, a pickle (0x80).
    looks_onnx = len(head) >= 2 and head[0] == 0x08 and 3 <= head[1] <= 20
    if looks_onnx or (path.suffix == ".onnx" and head[:2] != b"PK"):
        return "ONNX"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    if any(name.endswith("/archive_format") for name in names):
        return "torch.export"
    if any("/code/__torch__/" in name for name in names):
        return "TorchScript"
    return None


def require(state: dict[str, Any], keys: tuple[str, ...], path: Path | str) -> None:
    """Raise naming ``path`` if the checkpoint ``state`` lacks any of ``keys``."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing} (saved by another program?)")


def rng_state() -> dict[str, Any]:
    """The Python, numpy and torch (CPU and CUDA) random states, as tensors and plain Python
    values (what :func:`load` accepts)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    saved = state["numpy"]
    np.random.set_state(
        (
            saved["kind"],
            saved["keys"].numpy().astype(np.uint32),
            saved["pos"],
            saved["has_gauss"],
            saved["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""A trained model loaded from a checkpoint, ready for inference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from aanet import checkpoint
from aanet.config import Config, make_config
from aanet.model import AANet, build_model


def load_model(path: Path | str, device: torch.device | str = "cpu") -> AANet:
    """The model of a training checkpoint, in eval mode on ``device``."""
    state = checkpoint.load(path, map_location=device)
    checkpoint.require(state, ("model", "config"), path)
    return model_from_state(state, device, path)


def saved_config(state: dict[str, Any], path: Path | str = "checkpoint") -> Config:
    """The :class:`Config` a loaded checkpoint ``state`` was trained with; raises ``ValueError``
    naming ``path`` when it does not read (an option this version does not know, say)."""
    try:
        return make_config(state["config"])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: its saved config does not read here: {exc}") from exc


def model_from_state(
    state: dict[str, Any], device: torch.device | str = "cpu", path: Path | str = "checkpoint"
) -> AANet:
    """The model of a loaded checkpoint ``state`` (with ``model`` and ``config``), in eval mode
    on ``device``; raises ``ValueError`` naming ``path`` when the weights do not fit the network
    its config describes."""
    model = build_model(saved_config(state, path).model_config())
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        # load_state_dict lists every mismatched tensor (dozens of lines): keep the first.
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()] or [str(exc)]
        shown = lines[0] + (f"; and {len(lines) - 1} more" if len(lines) > 1 else "")
        raise ValueError(
            f"{path}: its weights do not fit the network its config describes ({shown})"
        ) from exc
    return model.to(device).eval()

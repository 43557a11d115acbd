"""A trained model loaded from a checkpoint, ready for inference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from aanet import checkpoint
from aanet.config import make_config
from aanet.model import AANet, build_model


def load_model(path: Path | str, device: torch.device | str = "cpu") -> AANet:
    """The model of a training checkpoint, in eval mode on ``device``."""
    state = checkpoint.load(path, map_location=device)
    checkpoint.require(state, ("model", "config"), path)
    return model_from_state(state, device)


def model_from_state(state: dict[str, Any], device: torch.device | str = "cpu") -> AANet:
    """The model of a loaded checkpoint ``state`` (with ``model`` and ``config``), in eval mode
    on ``device``."""
    model = build_model(make_config(state["config"]).model_config())
    model.load_state_dict(state["model"])
    return model.to(device).eval()

"""Evaluation: NME / failure rate / AUC on the whole test set and on each WFLW subset."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from aanet.landmarks import WFLW_ATTRIBUTES
from aanet.metrics import nme, summarize


@torch.no_grad()
def predict_errors(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-face NME ``(F,)`` and attribute flags ``(F, 6)`` over ``loader``."""
    was_training = model.training
    model.eval()
    errors, flags = [], []
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=_amp_dtype(device), enabled=amp):
            coords, _, _ = model(images)
        errors.append(nme(coords.float().cpu(), batch["landmarks"]))
        flags.append(batch["attributes"])
    model.train(was_training)
    return torch.cat(errors), torch.cat(flags)


def _amp_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def subset_report(errors: torch.Tensor, flags: torch.Tensor) -> dict[str, dict[str, float]]:
    """Metrics of the full set and of each WFLW subset (faces whose flag is set)."""
    report = {"full": summarize(errors)}
    if flags.numel() and flags.any():
        for column, name in enumerate(WFLW_ATTRIBUTES):
            report[name] = summarize(errors[flags[:, column] == 1])
    return report


def format_table(report: dict[str, dict[str, float]]) -> str:
    """A fixed-width table: subset, faces, NME (%), FR@0.1 (%), AUC@0.1."""
    lines = [f"{'subset':<14}{'faces':>7}{'NME %':>9}{'FR@0.1 %':>10}{'AUC@0.1':>9}"]
    for name, m in report.items():
        lines.append(
            f"{name:<14}{m['count']:>7}{100 * m['nme']:>9.2f}{100 * m['fr']:>10.2f}{m['auc']:>9.4f}"
        )
    return "\n".join(lines)


def write_json(report: dict[str, dict[str, float]], path: Path | str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")

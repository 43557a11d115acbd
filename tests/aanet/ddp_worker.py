"""Run by ``torch.distributed.run`` in the DDP tests: train, then save this rank's weights and
the loss of each of its steps. A second argument ``RANK:STEP`` makes that rank's loss NaN at that
(1-based) step."""

from __future__ import annotations

import json
import os
import sys

import torch

import aanet.train
from aanet.config import make_config


def record_losses(losses: list[float], nan_at: int | None = None) -> None:
    """Make ``aanet.train`` append every training step's loss to ``losses`` (NaN at step
    ``nan_at``)."""
    build = aanet.train.build_training_loss

    def build_recording(*args):
        loss_fn = build(*args)

        def recording(*inputs):
            loss = loss_fn(*inputs)
            if len(losses) + 1 == nan_at:
                loss = loss * float("nan")
            losses.append(float(loss.detach()))
            return loss

        return recording

    aanet.train.build_training_loss = build_recording


if __name__ == "__main__":
    config = make_config(json.loads(sys.argv[1]))
    rank = int(os.environ["RANK"])
    poisoned, _, at = sys.argv[2].partition(":") if len(sys.argv) > 2 else ("", "", "")
    losses: list[float] = []
    record_losses(losses, int(at) if poisoned == str(rank) else None)
    result = aanet.train.train(config, progress=False)
    torch.save(result["model"].state_dict(), os.path.join(config.out, f"rank{rank}.pt"))
    with open(os.path.join(config.out, f"rank{rank}_losses.json"), "w") as handle:
        json.dump(losses, handle)

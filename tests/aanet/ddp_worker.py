"""Run by ``torch.distributed.run`` in the DDP test: train, then save this rank's weights."""

from __future__ import annotations

import json
import os
import sys

import torch

from aanet.config import make_config
from aanet.train import train

if __name__ == "__main__":
    config = make_config(json.loads(sys.argv[1]))
    result = train(config, progress=False)
    rank = int(os.environ["RANK"])
    torch.save(result["model"].state_dict(), os.path.join(config.out, f"rank{rank}.pt"))

"""The README's complete Python examples run as written and do what their comments say.

A ```python block that begins with ``import`` is a complete program (the others are fragments
that assume the reader's own tensors); each one is executed in a fresh namespace.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def complete_examples() -> list[str]:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    return [block for block in blocks if block.startswith("import ")]


def test_the_readme_has_complete_examples():
    assert len(complete_examples()) >= 2


@pytest.mark.parametrize("index", range(len(complete_examples())))
def test_readme_example_runs(index):
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(complete_examples()[index], f"README example {index}", "exec"), namespace)
    # What the examples' comments promise.
    if "out" in namespace and "bias_h" in namespace:  # the op
        q, out = namespace["q"], namespace["out"]
        assert out.shape == (*q.shape[:3], namespace["dvh"])
        assert all(namespace[n].grad is not None for n in ("k", "v", "rel_h", "rel_w"))
    if "upgraded" in namespace:  # the layer
        layer, conv, upgraded = namespace["layer"], namespace["conv"], namespace["upgraded"]
        assert namespace["y"].shape == (2, 128, 28, 28) and layer.dv == 16
        kept = upgraded.conv.weight
        assert kept.shape[0] == 112 and torch.equal(kept, conv.weight[:112])
        assert any(type(m).__name__ == "AAConv2d" for m in namespace["cnn"].modules())
        assert namespace["net"][2].nominal_size == (32, 32)  # example_input: its own size

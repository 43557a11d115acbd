"""The Triton backend under torch.func transforms and forward-mode autograd, run by the Triton
interpreter (the same checks as tests/test_func_transforms.py, on the CPU)."""

import pytest
import torch

from tests import func_transform_checks as checks


@pytest.mark.parametrize("check", checks.CHECKS, ids=lambda c: c.__name__)
def test_transform_matches_reference(check) -> None:
    check("triton", "cpu", torch.float64, 1e-10)


def test_vmap_in_float32() -> None:
    checks.check_vmap("triton", "cpu", torch.float32, 2e-5)

"""Property-based tests (hypothesis) of the Triton backend, run by the Triton interpreter.

The same random problems as ``tests/test_properties.py`` (shapes, layouts, broadcast biases,
scales, -inf masks) at smaller sizes, since the interpreter runs each program instance in Python.
float64, float32 and float16 only: the interpreter's bf16 ``tl.dot`` is wrong (see
``test_triton_interpret.py``), so bf16 is left to the GPU tests.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

from tests.property_cases import EXTREME, Spec, budget, check_against_reference, specs

pytestmark = pytest.mark.fuzz

DTYPES = (torch.float64, torch.float32, torch.float16)


@budget(12, 200)
@given(spec=specs(dtypes=DTYPES, max_side=6))
def test_triton_backend_matches_reference(spec: Spec) -> None:
    check_against_reference(spec, "triton")


@budget(6, 100)
@given(spec=specs(**{**EXTREME, "max_side": 6}))
def test_triton_backend_matches_reference_on_extreme_logits(spec: Spec) -> None:
    """Scales from 1e-8 to 1e3 and biases up to +-1e4 (with -inf masks), in float64."""
    check_against_reference(spec, "triton")

"""Property-based tests (hypothesis) of the C++ CPU backend of attention_2d against the reference.

Random shapes (H != W, L = 1, head dims 1 to 33), every dtype, strided / sliced / stride-0 inputs,
each bias absent, full or broadcast, random scales and -inf masks. ``make test`` runs a fixed,
derandomized budget; ``make fuzz`` (``HYPOTHESIS_PROFILE=fuzz``) a much larger random one.
"""

from __future__ import annotations

import pytest
from hypothesis import given

import aanet_kernels as ak
from tests.property_cases import EXTREME, Spec, budget, check_against_reference, specs

pytestmark = [
    pytest.mark.fuzz,
    pytest.mark.skipif(
        "cpu" not in ak.available_backends("cpu"),
        reason="the C++ extension is not built (run `make test`, which builds it)",
    ),
]


@budget(40, 600)
@given(spec=specs())
def test_cpu_backend_matches_reference(spec: Spec) -> None:
    check_against_reference(spec, "cpu")


@budget(40, 600)
@given(spec=specs(max_side=24))
def test_cpu_backend_matches_reference_on_larger_maps(spec: Spec) -> None:
    """Maps up to 24 x 24 (L up to 576) cross the kernel's 64-query and ~128-key blocks."""
    check_against_reference(spec, "cpu")


@budget(20, 300)
@given(spec=specs(**EXTREME))
def test_cpu_backend_matches_reference_on_extreme_logits(spec: Spec) -> None:
    """Scales from 1e-8 to 1e3 and biases up to +-1e4 (with -inf masks), in float64."""
    check_against_reference(spec, "cpu")
